"""cli.py: one-line errors with exit code 2, range-checked flags."""
import argparse
import os

import pytest

from util import cli


def test_user_error_is_one_line_and_exit_code_2(capsys):
    def main(args):
        raise cli.UserError(f"bad value {args.x}")

    parser = argparse.ArgumentParser("tool.py")
    parser.add_argument("--x", default="7")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "tool.py: error: bad value 7\n"


# ---- range-checked flags: one line, exit code 2, before main runs ----

@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--epochs", "1.5"], "argument --epochs: expected an integer, got '1.5'"),
    (["--temperature", "0"], "argument --temperature: must be a finite number > 0, got 0"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number > 0, got nan"),
    (["--w", "inf"], "argument --w: must be a finite number >= 0, got inf"),
    (["--p", "1.5"], "argument --p: must be a finite number >= 0 and <= 1, got 1.5"),
    (["--seed", str(2 ** 64)], f"argument --seed: must be >= 0 and <= {2 ** 63 - 1}, got {2 ** 64}"),
    (["--nope"], "unrecognized arguments: --nope"),
])
def test_bad_flags_are_one_line_before_main_runs(argv, message, capsys):
    parser = argparse.ArgumentParser("tool.py")
    parser.add_argument("--epochs", type=cli.integer(1), default=1)
    parser.add_argument("--temperature", type=cli.number(above=0), default=0.1)
    parser.add_argument("--w", type=cli.number(0), default=2.0)
    parser.add_argument("--p", type=cli.number(0, 1), default=0.5)
    parser.add_argument("--seed", type=cli.SEED, default=0)
    called = []
    with pytest.raises(SystemExit) as exit_info:
        cli.run(called.append, parser, argv)
    assert exit_info.value.code == 2 and not called
    assert capsys.readouterr().err == f"tool.py: error: {message}\n"


def test_good_flags_are_parsed_to_numbers():
    parser = argparse.ArgumentParser("tool.py")
    parser.add_argument("--epochs", type=cli.integer(1))
    parser.add_argument("--temperature", type=cli.number(above=0))
    args = parser.parse_args(["--epochs", "3", "--temperature", "1e-3"])
    assert (args.epochs, args.temperature) == (3, 1e-3)


# ---- messages of exceptions, for one-line errors ----

class Unreadable(Exception):
    pass


def test_first_line_of_an_error_or_its_type():
    assert cli.first_line(ValueError("bad header\nmore detail")) == "bad header"
    assert cli.first_line(Unreadable()) == "Unreadable"


def test_raised_message_finds_the_message_in_a_loader_workers_traceback():
    assert cli.raised_message(Unreadable("a/b.png: truncated")) == "a/b.png: truncated"  # raised in this process
    from_worker = Unreadable("Caught Unreadable in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1, in f\n"
                             f"{__name__}.Unreadable: a/b.png: truncated\n")
    assert cli.raised_message(from_worker) == "a/b.png: truncated"


# ---- recipe files (@file) ----

def recipe_parser():
    parser = cli.ArgumentParser("tool.py")
    parser.add_argument("--epochs", type=cli.integer(1), default=1)
    parser.add_argument("--data", default=None)
    return parser


def test_recipe_files_nest_and_later_flags_override(tmp_path):
    (tmp_path / "base.args").write_text("--epochs 3  # the schedule\n--data 'a folder'\n")
    (tmp_path / "run.args").write_text(f"@{tmp_path / 'base.args'}\n--epochs 5\n")
    args = recipe_parser().parse_args([f"@{tmp_path / 'run.args'}"])
    assert (args.epochs, args.data) == (5, "a folder")
    assert recipe_parser().parse_args([f"@{tmp_path / 'run.args'}", "--epochs", "7"]).epochs == 7


@pytest.mark.parametrize("content, message", [
    (None, "the recipe file includes itself"),  # names itself
    (b"--epochs \xff\xfe 3\n", "is not a text file of flags"),
    (b"--data 'unclosed\n", "cannot be read as flags (No closing quotation)"),
    (b"--data a\x00b\n", "holds a NUL byte"),
])
def test_bad_recipe_files_are_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "bad.args"
    path.write_bytes(f"--epochs 2\n@{path}\n".encode() if content is None else content)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda args: None, recipe_parser(), [f"@{path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    with pytest.raises(SystemExit):
        cli.run(lambda args: None, recipe_parser(), [f"@{tmp_path / 'missing.args'}"])
    assert "cannot read" in capsys.readouterr().err


def test_a_nul_byte_in_an_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda args: None, recipe_parser(), ["--data", "runs/a\0b"])
    assert exit_info.value.code == 2 and "holds a NUL byte ('runs/a\\\\0b')" in capsys.readouterr().err


def test_worker_defaults_never_exceed_the_cores_the_process_may_use(monkeypatch):
    import fewshot
    import linear_probe
    import pretrain
    assert cli.available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine, or a job given 2 cores
    assert pretrain.get_args_parser().get_default("workers") == 2  # not 8: torch would warn, and nothing is gained
    assert linear_probe.get_args_parser().get_default("num_workers") == 2
    assert fewshot.get_args_parser().get_default("num_workers") == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert pretrain.get_args_parser().get_default("workers") == 8  # the paper's machines: 8 per GPU
    assert linear_probe.get_args_parser().get_default("num_workers") == 4


STAGES = ("generate.py", "pretrain.py", "linear_probe.py", "fewshot.py", "segment.py", "compositionality.py")
CHECK_TORCH = ("import atexit, runpy, sys; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules)); "
               "sys.argv = [sys.argv[1], *sys.argv[2:]]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.slow
@pytest.mark.parametrize("script", STAGES)
def test_help_and_a_bad_flag_answer_before_torch_is_imported(script):
    """Each stage script reads its command line (parse_command_line) before the imports that load torch: --help and
    a refused flag never import it."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv, code in ((["--help"], 0), (["--seed", "-1"], 2)):
        result = subprocess.run([sys.executable, "-c", CHECK_TORCH, script, *argv], cwd=repo, capture_output=True,
                                text=True)
        assert result.returncode == code, result.stderr
        assert result.stdout.strip().endswith("torch loaded: False"), (script, argv, result.stdout[-200:])
