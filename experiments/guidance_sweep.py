"""The paper's guidance sweep (Sec. 2, its first question): for each classifier-free guidance scale w, the CC3M
captions drawn by Stable Diffusion at w, each self-supervised family pretrained on those images and probed on
ImageNet with the official linear protocol; then one figure of accuracy against w, one line per family (and, with
--real, each family's accuracy on the real images of the same captions as a dashed level).

    python experiments/guidance_sweep.py --captions cc3m.tsv --imagenet imagenet --nproc-per-node 8
    python experiments/guidance_sweep.py --captions cc3m.tsv --imagenet imagenet --real real/cc3m --dry-run

Every step is a stage script run as a user would run it (under torchrun with --nproc-per-node > 1), from the
recipes of recipes/ with the sweep's data and outputs after them:

    generate.py      @recipes/generate_cc3m_w8.args --w W --output <output>/syn/w<W>
    pretrain.py      @recipes/pretrain_cc3m_<family>_synthetic.args --data <output>/syn/w<W>
                     --output <output>/runs/<family>_w<W> --resume
    linear_probe.py  @recipes/probe_imagenet.args --checkpoint <output>/runs/<family>_w<W>/encoder.pth
                     --train-dir <imagenet>/train --val-dir <imagenet>/val --output .../linear_probe.json

A step whose result is there is skipped: a probe with its linear_probe.json, a pretraining run with its
summary.json, and the generation of a w once every family's run on it is done (a generation cut short resumes
itself, as does a pretraining run: rerun the same command to continue the sweep). The accuracies go to
<output>/guidance_sweep.json (ImageNet top-1, the official probe's best head and evaluation, and its last epoch)
and <output>/guidance_sweep.png. Extra flags for a stage: --generate-args, --pretrain-args, --probe-args (one
string each, e.g. --pretrain-args "--epochs 30"). Multi-node runs: run the recipes by hand, then this script for
the figure.
"""
import argparse
import glob
import os
import re
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from demo.stages import read_json, run_stage  # noqa: E402
from util.cli import ArgumentParser, UserError, integer, number, run  # noqa: E402
from util.files import atomic_write_json, check_writable_folder  # noqa: E402

PAPER_WS = (2, 3, 4, 6, 8, 10, 12)  # the guidance scales of the paper's sweep
FAMILIES = ("simclr", "mocov3", "byol", "dino", "mae")  # the paper's first question (SimCLR's recipe: StableRep's)


def get_args_parser():
    parser = ArgumentParser("guidance_sweep.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    parser.add_argument("--captions", required=True, help="the CC3M captions file generate.py reads (its TSV)")
    parser.add_argument("--imagenet", required=True,
                        help="ImageNet as image folders: <imagenet>/train and <imagenet>/val")
    parser.add_argument("--real", default=None, metavar="DATA",
                        help="the real images of the same captions (img2dataset's output): each family is also "
                             "trained and probed on them once, the level its synthetic curve is compared with")
    # the sweep
    parser.add_argument("--ws", type=number(0, 100), nargs="+", default=list(PAPER_WS),
                        help="guidance scales (the paper's: " + " ".join(map(str, PAPER_WS)) + ")")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="pretraining objectives (default: all five of the paper's first question)")
    # stages
    parser.add_argument("--nproc-per-node", type=integer(1), default=1,
                        help="GPUs of this machine: each stage runs under torchrun with this many processes")
    parser.add_argument("--generate-args", type=shell_words, default="", help="extra flags for generate.py, one string")
    parser.add_argument("--pretrain-args", type=shell_words, default="", help="extra flags for pretrain.py, one string")
    parser.add_argument("--probe-args", type=shell_words, default="",
                        help="extra flags for linear_probe.py, one string")
    parser.add_argument("--output", default="runs/guidance_sweep", help="folder for the images, runs and results")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands the sweep would run now (none for the steps already done)")
    return parser


def shell_words(text):
    """An argparse `type`: flags as one string, split as the shell would (an unclosed quote stops at parse time,
    before any folder is made)."""
    try:
        shlex.split(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be split into flags: {err}") from None
    return text


def w_name(w):
    """2.0 -> 'w2', 7.5 -> 'w7.5': a folder name."""
    return f"w{w:g}"


class Sweep:
    """The stages of the sweep, each run (or, dry, printed) unless its result is there."""

    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.output)
        torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node), "--standalone"]
        self.launcher = torchrun if args.nproc_per_node > 1 else []

    def stage(self, title, script, *flags, extra=""):
        command = [script, *flags, *shlex.split(extra)]
        if self.args.dry_run:
            print(" ".join(shlex.quote(str(part)) for part in ["python", *self.launcher, *command]))
        else:
            run_stage(title, *command, launcher=self.launcher, offline=False)

    def run_folder(self, family, data_name):
        return os.path.join(self.out, "runs", f"{family}_{data_name}")

    def probe_done(self, family, data_name):
        return os.path.isfile(os.path.join(self.run_folder(family, data_name), "linear_probe.json"))

    def pretrain_done(self, family, data_name):
        return os.path.isfile(os.path.join(self.run_folder(family, data_name), "summary.json"))

    def pretrain(self, family, data, data_name, kind):
        if not self.pretrain_done(family, data_name):
            self.stage(f"pretrain {family} on {data_name}", "pretrain.py",
                       f"@recipes/pretrain_cc3m_{family}_{kind}.args", "--data", data,
                       "--output", self.run_folder(family, data_name), "--resume", extra=self.args.pretrain_args)

    def probe(self, family, data_name):
        folder = self.run_folder(family, data_name)
        if not self.probe_done(family, data_name):
            self.stage(f"ImageNet linear probe of {family} on {data_name}", "linear_probe.py",
                       "@recipes/probe_imagenet.args", "--checkpoint", os.path.join(folder, "encoder.pth"),
                       "--train-dir", os.path.join(self.args.imagenet, "train"),
                       "--val-dir", os.path.join(self.args.imagenet, "val"),
                       "--output", os.path.join(folder, "linear_probe.json"), extra=self.args.probe_args)

    def one_w(self, w):
        """Generation at w (when a run still needs its images), then each family's pretraining and probe."""
        name, images = w_name(w), os.path.join(self.out, "syn", w_name(w))
        todo = [family for family in self.args.families if not self.probe_done(family, name)]
        if any(not self.pretrain_done(family, name) for family in todo):
            self.stage(f"generate CC3M at w = {w:g}", "generate.py", "@recipes/generate_cc3m_w8.args",
                       "--captions", self.args.captions, "--w", f"{w:g}", "--output", images,
                       extra=self.args.generate_args)
        for family in todo:
            self.pretrain(family, images, name, "synthetic")
            self.probe(family, name)

    def results(self):
        """{family: {"synthetic": {w: {"best", "last"}}, "real": {...} or None}} of every probe done in --output:
        this launch's families and w's, and those of earlier launches (a sweep over fewer families or w's keeps
        the others' rows)."""
        def accuracy(family, data_name):
            if not self.probe_done(family, data_name):
                return None
            probe = read_json(os.path.join(self.run_folder(family, data_name), "linear_probe.json"))
            return {"best": probe["best"]["top1"], "last": probe["last"]["top1"]}

        done = [os.path.basename(os.path.dirname(path)).rsplit("_", 1) for path in
                glob.glob(os.path.join(glob.escape(self.out), "runs", "*_*", "linear_probe.json"))]
        families = [family for family in FAMILIES if family in self.args.families or family in dict(done)]
        ws = sorted({float(name[1:]) for _, name in done if re.fullmatch(r"w\d+(\.\d+)?", name)} | set(self.args.ws))
        table = {}
        for family in families:
            synthetic = {f"{w:g}": accuracy(family, w_name(w)) for w in ws}
            real = accuracy(family, "real")
            table[family] = {"synthetic": {w: a for w, a in synthetic.items() if a is not None},
                             "real": real if self.args.real or real else None}
        return table


def main(args):
    # the stages run from the repository root: the user's paths become absolute
    args.captions, args.imagenet = os.path.abspath(args.captions), os.path.abspath(args.imagenet)
    args.real = os.path.abspath(args.real) if args.real and "://" not in args.real else args.real
    if not os.path.isfile(args.captions):
        raise UserError(f"--captions {args.captions} does not exist")
    if not args.dry_run:
        check_writable_folder(args.output)
    sweep = Sweep(args)
    for w in args.ws:
        sweep.one_w(w)
    if args.real:
        for family in args.families:
            if not sweep.probe_done(family, "real"):
                sweep.pretrain(family, args.real, "real", "real")
                sweep.probe(family, "real")
    if args.dry_run:
        return None
    table = sweep.results()
    atomic_write_json(os.path.join(sweep.out, "guidance_sweep.json"), {"imagenet_top1": table, "args": vars(args)})
    print("\nImageNet linear probe top-1 (best head and evaluation), by guidance scale w:")
    ws = sorted({float(w) for row in table.values() for w in row["synthetic"]} | set(args.ws))
    print(f"| {'family':8s} | " + " | ".join(f"w = {w:g}" for w in ws) + " | real |")
    for family, row in table.items():
        cells = [f"{row['synthetic'][f'{w:g}']['best']:.1f}" if f"{w:g}" in row["synthetic"] else "-"
                 for w in ws]
        real = f"{row['real']['best']:.1f}" if row["real"] else "-"
        print(f"| {family:8s} | " + " | ".join(cells) + f" | {real} |")
    from plots import plot_guidance_sweep
    figure = os.path.join(sweep.out, "guidance_sweep.png")
    plot_guidance_sweep(table, figure)
    print(f"\nnumbers in {os.path.join(sweep.out, 'guidance_sweep.json')}, the figure in {figure}")
    return table


if __name__ == "__main__":
    run(main, get_args_parser())
