"""Pictures of a run for a person to read: the loss and learning rate of a pretrain.py run against the step (from
its log.jsonl), a panel for each collapse signal a self-supervised family logs, and the demo's summary figure.
Needs matplotlib (requirements.txt installs it; the stages themselves never import it).

    python plots.py runs/stablerep                      # -> runs/stablerep/curves.png
    python plots.py demo_output                         # the run inside: -> demo_output/pretrain/curves.png
    python plots.py runs/stablerep/log.jsonl --output curves.png
"""
import argparse
import glob
import math
import os
import sys

from util.cli import ArgumentParser, UserError, run
from util.files import atomic_open
from util.runlog import read_records


def get_args_parser():
    parser = ArgumentParser("plots.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a pretrain.py output folder, a folder holding one (the demo's output), or a "
                                    "log.jsonl")
    parser.add_argument("--output", default=None, help="the PNG to write (default: curves.png beside the log)")
    return parser


def main(args):
    log = find_log(args.run) if os.path.isdir(args.run) else args.run
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(log)), "curves.png")
    if os.path.isdir(output):
        raise UserError(f"--output {output} is a folder: name the PNG to write, e.g. "
                        f"{os.path.join(output, 'curves.png')}")
    if os.path.lexists(output) and not is_figure(output):
        raise UserError(f"--output {output} exists and is not a figure (a log, a checkpoint?): a plot never replaces "
                        "anything else; choose another file")
    records = read_log(log)
    plot_curves(records, output, title=os.path.basename(os.path.dirname(os.path.abspath(log))))
    print(f"{len(records)} records of {log} -> {output}")
    return output


FIGURE_MAGIC = (b"\x89PNG", b"%PDF", b"<?xml", b"<svg")  # what matplotlib writes as PNG, PDF or SVG


def is_figure(path):
    """Does `path` hold a figure (a PNG, PDF or SVG file, which a new plot may replace)?"""
    try:
        with open(path, "rb") as f:
            return os.path.isfile(path) and f.read(8).startswith(FIGURE_MAGIC)
    except OSError:
        return False


def find_log(folder):
    """The log.jsonl of a run folder, or of the one run folder inside it (the demo's output holds its run in
    pretrain/); UserError when there is none, or several to choose from."""
    own = os.path.join(folder, "log.jsonl")
    if os.path.lexists(own):  # read_log says what is wrong with it, if anything
        return own
    inside = sorted(glob.glob(os.path.join(glob.escape(folder), "*", "log.jsonl")))
    if not inside:
        raise UserError(f"{folder} holds no log.jsonl, nor does any folder in it (expected a pretrain.py output "
                        "folder, a folder holding one, or a log.jsonl)")
    if len(inside) > 1:
        raise UserError(f"{folder} holds {len(inside)} runs ({', '.join(os.path.dirname(p) for p in inside)}): "
                        "name one")
    return inside[0]


def read_log(path):
    """The records of a log.jsonl that have a step and a numeric loss, in step order; UserError for a missing file
    or a log without any. Damaged lines (torn by a kill, bytes that are not a record) are skipped and counted."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file (expected a pretrain.py output folder or its log.jsonl)"
                        if os.path.exists(path) else
                        f"{path} does not exist (expected a pretrain.py output folder or its log.jsonl)")
    records, damaged = read_records(path)
    records = [record for record in records if _is_number(record.get("loss"))]
    plottable = [record for record in records if _plottable(record)]
    damaged, records = damaged + len(records) - len(plottable), plottable
    if damaged:
        print(f"note: {path}: {damaged} damaged line(s) skipped", file=sys.stderr)
    if not records:
        raise UserError(f"{path} holds no training records yet")
    return sorted(records, key=lambda record: record["step"])


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plottable(record):
    """A step, a loss and (if any) a learning rate a float can hold: JSON's integers have no bound (a step of 10^400
    is a damaged record, not a point)."""
    values = [record.get("step"), record["loss"]]
    if not all(_is_number(value) for value in values):
        return False
    values += [record["lr"]] if _is_number(record.get("lr")) else []  # any other learning rate is left out
    try:
        as_floats = [float(value) for value in values]  # OverflowError: an integer past a float's range
    except OverflowError:
        return False
    return math.isfinite(as_floats[0])


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib (in requirements.txt): pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    return plt


def _save(figure, path):
    with atomic_open(path) as f:
        figure.savefig(f, format="png", dpi=120)


def _curves(axes_loss, records):
    """Loss (left axis) and learning rate (right axis) against the step."""
    steps = [r["step"] for r in records]
    axes_loss.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    axes_loss.set_xlabel("step")
    axes_loss.set_ylabel("loss", color="tab:blue")
    if all(_is_number(r.get("lr")) for r in records):
        axes_lr = axes_loss.twinx()
        axes_lr.plot(steps, [r["lr"] for r in records], color="tab:orange", linestyle="--", label="learning rate")
        axes_lr.set_ylabel("learning rate", color="tab:orange")
        axes_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes_loss.grid(alpha=0.3)


# what the families log to watch for collapse (families/*.py `monitor`), each drawn in a panel of its own
WATCHED = {"embedding_std": "embedding std (0: collapsed)", "momentum": "momentum",
           "teacher_entropy": "teacher entropy (0 or ln K: collapsed)", "teacher_student_kl": "KL(teacher || student)",
           "teacher_temperature": "teacher temperature", "masked_patch_loss": "loss on removed patches",
           "visible_patch_loss": "loss on visible patches"}


def plot_curves(records, path, title=None):
    """One PNG: the loss and the learning rate of `records` (read_log's) against the step, and below them a panel
    for each collapse signal (WATCHED) the records hold."""
    plt = _pyplot()
    watched = [key for key in WATCHED if any(_is_number(r.get(key)) for r in records)]
    figure, panels = plt.subplots(1 + len(watched), 1, figsize=(7, 4 + 2 * len(watched)), squeeze=False,
                                  gridspec_kw={"height_ratios": [2] + [1] * len(watched)})
    axes = panels[0][0]
    _curves(axes, records)
    axes.set_title(f"pretraining{': ' + title if title else ''}")
    for (panel,), key in zip(panels[1:], watched):
        shown = [r for r in records if _is_number(r.get(key))]
        panel.plot([r["step"] for r in shown], [r[key] for r in shown], color="tab:green")
        panel.set_ylabel(WATCHED[key], fontsize=8)
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_demo(records, encoders, path):
    """The demo's figure: the pretraining curves, and each encoder's linear-probe and few-shot accuracy as bars
    (few-shot with its 95% interval). `encoders`: {name: {"linear_probe_top1", "fewshot_5way_5shot",
    "fewshot_ci95"}}."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    _curves(left, records)
    left.set_title(f"pretraining, {records[-1]['step']} steps")
    names = list(encoders)
    width, positions = 0.38, range(len(names))
    probe = [encoders[n]["linear_probe_top1"] for n in names]
    fewshot = [encoders[n]["fewshot_5way_5shot"] for n in names]
    interval = [encoders[n]["fewshot_ci95"] for n in names]
    bars = right.bar([p - width / 2 for p in positions], probe, width, label="linear probe top-1")
    right.bar_label(bars, fmt="%.1f", fontsize=8)
    bars = right.bar([p + width / 2 for p in positions], fewshot, width, yerr=interval, capsize=3,
                     label="5-way 5-shot")
    right.bar_label(bars, fmt="%.1f", fontsize=8, padding=3)
    right.set_xticks(list(positions), names)
    right.set_ylabel("accuracy on the held-out digits (%)")
    right.set_ylim(0, 100)  # from zero: the gaps as large as they are
    right.legend(loc="lower right", fontsize=8)
    right.set_title("frozen encoders")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_guidance_sweep(table, path):
    """experiments/guidance_sweep.py's figure: ImageNet linear-probe top-1 against the guidance scale w, one line
    per family, and its accuracy on the real images as a dashed level of the same colour. `table`: {family:
    {"synthetic": {w: {"best": top-1}}, "real": {"best": top-1} or None}}, w as strings."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (family, row) in enumerate(table.items()):
        colour = f"C{index}"
        points = sorted((float(w), accuracy["best"]) for w, accuracy in row["synthetic"].items())
        if points:
            axes.plot(*zip(*points), marker="o", color=colour, label=f"{family}, synthetic")
        if row.get("real"):
            axes.axhline(row["real"]["best"], color=colour, linestyle="--", linewidth=1, label=f"{family}, real")
    axes.set_xlabel("guidance scale w")
    axes.set_ylabel("ImageNet linear probe top-1 (%)")
    axes.set_title("self-supervised pretraining on synthetic CC3M (paper, Sec. 2)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_findings(table, path, title):
    """experiments/findings.py's figure: linear probe and few-shot accuracy per config, mean and standard deviation
    over seeds, the raw pixels' level dashed. `table`: {config: {"linear_probe_mean", "linear_probe_std",
    "fewshot_mean", "fewshot_std"}}."""
    plt = _pyplot()
    names = list(table)
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.5), sharey=True)
    for ax, key, label in ((axes[0], "linear_probe", "linear probe top-1 (%)"),
                           (axes[1], "fewshot", "5-way 5-shot (%)")):
        means = [table[n][f"{key}_mean"] for n in names]
        ax.barh(range(len(names)), means, xerr=[table[n][f"{key}_std"] for n in names],
                color=["grey" if n in ("raw_pixels", "random_init", "broken") else "C0" for n in names])
        ax.axvline(table["raw_pixels"][f"{key}_mean"] if "raw_pixels" in table else 0, color="k", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)

if __name__ == "__main__":
    run(main, get_args_parser())
