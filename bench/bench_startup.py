"""How long each stage script takes to answer `--help` and a bad flag, against another checkout of the project.

    git worktree add /tmp/before <commit>
    python bench/bench_startup.py --baseline /tmp/before          # this checkout vs /tmp/before, 5 runs each

Both are timed as whole commands (`python <script> --help`), interpreter start-up included, the two checkouts taking
turns so that the machine's load falls on both alike; the median of --repeats runs is printed with the ratio.
The stage scripts import torch (about 2 s on its own) only once the command line has been read: each parses it
before its heavy imports (`parse_command_line`, then the imports, then `run(main, ...)`).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# script -> (a flag, a value its parser refuses)
SCRIPTS = {"generate.py": ("--w", "nan"), "pretrain.py": ("--epochs", "0"),
           "linear_probe.py": ("--epochs", "0"), "fewshot.py": ("--episodes", "0"), "segment.py": ("--batch-size", "0"),
           "compositionality.py": ("--batch-size", "0")}


def time_command(command, cwd, expected_code):
    """Seconds the command takes; it must exit with `expected_code` (0 for --help, 2 for a refused flag), or what
    was timed is not start-up."""
    start = time.perf_counter()
    code = subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - start
    if code != expected_code:
        raise SystemExit(f"{' '.join(command[1:])} in {cwd} exited with {code}, not {expected_code}")
    return seconds


def main(args):
    sides = {"this": HERE, "baseline": os.path.abspath(args.baseline)} if args.baseline else {"this": HERE}
    print(f"{'command':40s} " + " ".join(f"{side:>10s}" for side in sides) + ("   ratio" if args.baseline else ""))
    for script, bad_flag in SCRIPTS.items():
        for label, extra, code in (("--help", ["--help"], 0), ("bad flag " + " ".join(bad_flag), list(bad_flag), 2)):
            times = {side: [] for side in sides}
            for _ in range(args.repeats):  # the sides take turns
                for side, folder in sides.items():
                    times[side].append(time_command([sys.executable, script, *extra], folder, code))
            medians = {side: statistics.median(values) for side, values in times.items()}
            ratio = f"   {medians['this'] / medians['baseline']:.2f}x" if args.baseline else ""
            print(f"{script + ' ' + label:40s} " + " ".join(f"{m:9.2f}s" for m in medians.values()) + ratio,
                  flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="another checkout of the project to time beside this one")
    parser.add_argument("--repeats", type=int, default=5, help="runs per command and side; the median is printed")
    main(parser.parse_args())
