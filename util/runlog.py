"""The record of a training run, written by rank 0: `log.jsonl` (one JSON line per logging interval) and the same
scalars in TensorBoard and Weights & Biases, both optional.

    log = RunLog(folder, start_step, tensorboard=None, wandb_project=None, config=vars(args))
    log.write(step, loss=..., lr=..., images=...)   # images: seen since this run started, for images/s
    log.close()

With `progress=Progress(total_steps, steps_per_epoch, start_step)`, each record is also a progress line on stdout
(step, epoch, loss, lr, images/s, time left): redrawn in place in a terminal, one line per record in a batch job's
log.

TensorBoard: event files in `<folder>/tensorboard` (or `tensorboard_dir`), on by default when the `tensorboard`
package is installed (`tensorboard=True` insists, `False` turns it off). wandb: with a project name, when `wandb`
is installed (`WANDB_MODE=offline` logs without network). A resumed run continues the same curves with no step twice:
log.jsonl loses its lines after the resumed step, TensorBoard purges its events from that step on, and wandb
resumes the same run id (kept in `<folder>/wandb-run-id`) from that step.
"""
import importlib.util
import json
import math
import os
import sys
import time

from util.cli import UserError, first_line
from util.files import atomic_write_bytes, open_append


def check_loggers(tensorboard, wandb_project):
    """One line when a logger is asked for and its package is missing (called before anything is written)."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb needs the wandb package: pip install wandb")


class RunLog:
    def __init__(self, folder, start_step=0, tensorboard=None, wandb_project=None, config=None, name="log.jsonl",
                 tensorboard_dir="tensorboard", progress=None):
        self.path = os.path.join(folder, name)
        self.progress = progress
        self.start_step = start_step
        self.started = time.time()
        self.window = (start_step, 0, self.started)  # (step, images, time) at the last record, for images/s
        damaged = drop_records_after(self.path, start_step)
        if damaged:
            print(f"note: {self.path}: {damaged} damaged line(s) dropped (torn by a kill, or not a record)",
                  file=sys.stderr)
        self.jsonl = open_append(self.path)
        if tensorboard is None:
            tensorboard = importlib.util.find_spec("tensorboard") is not None
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(folder, tensorboard_dir), purge_step=start_step or None)
        self.wandb = None
        if wandb_project:
            import wandb
            try:
                self.wandb = wandb.init(project=wandb_project, dir=folder, id=_wandb_run_id(folder),
                                        resume="allow", config=config)
            except Exception as err:  # noqa: BLE001 - no login, no network, a bad project name...
                self.close()
                raise UserError(f"wandb could not start ({first_line(err)}): run `wandb login`, or set "
                                "WANDB_MODE=offline to log without network") from None

    def write(self, step, images=None, **scalars):
        """One record: the scalars given (None ones left out), plus images/s since the last record when `images`
        (seen since this run started) is given."""
        record = {"step": step, **{k: v for k, v in scalars.items() if v is not None}}
        if images is not None:
            now = time.time()
            last_step, last_images, last_time = self.window
            record["images_per_s"] = (images - last_images) / max(now - last_time, 1e-9)
            self.window = (step, images, now)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.progress is not None:
            self.progress.show(record)
        return record

    def close(self):
        if self.progress is not None:
            self.progress.close()
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """Progress of a training run on stdout, one line per record RunLog writes (every --log-every steps):

        step 120/3000 (4%)  epoch 0.40/10  loss 5.1234  lr 3.20e-04  412 images/s  1h02m left

    with `corrupt images N` added once a corrupt image has been skipped. In a terminal the line is redrawn in place
    (a carriage return, a newline at close); into a file or a pipe (a batch job's log) every record is a line of its
    own, so the log holds no redraws. Time left: the mean time per step since this run started, times the steps to
    go."""

    def __init__(self, total_steps, steps_per_epoch, start_step=0, stream=None):
        self.total_steps, self.steps_per_epoch, self.start_step = total_steps, steps_per_epoch, start_step
        self.stream = stream or sys.stdout
        self.redraw = self.stream.isatty()
        self.started = time.time()
        self.shown = 0  # characters of the line on screen (redraw mode), 0 when none

    def show(self, record):
        step = record["step"]
        seconds_per_step = (time.time() - self.started) / max(step - self.start_step, 1)
        line = progress_line(step, self.total_steps, self.steps_per_epoch, record.get("loss"), record.get("lr"),
                             record.get("images_per_s"), seconds_per_step * (self.total_steps - step),
                             record.get("corrupt_images", 0))
        if self.redraw:  # over the previous line, blanking what a longer one left
            self.stream.write("\r" + line.ljust(self.shown))
            self.shown = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = 0


def progress_line(step, total_steps, steps_per_epoch, loss, lr, images_per_s, seconds_left, corrupt=0):
    """One progress line (Progress's); the fields that are None are left out."""
    parts = [f"step {step}/{total_steps} ({100 * step // total_steps}%)",
             f"epoch {step / steps_per_epoch:.2f}/{total_steps / steps_per_epoch:g}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if images_per_s is not None:
        parts.append(f"{images_per_s:.0f} images/s" if images_per_s >= 10 else f"{images_per_s:.2g} images/s")
    parts.append(f"{duration(seconds_left)} left")
    if corrupt:
        parts.append(f"corrupt images {corrupt}")
    return "  ".join(parts)


def duration(seconds):
    """A short human duration: 45s, 12m05s, 3h04m, 2d05h."""
    seconds = max(0, round(seconds))
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d{h:02d}h"
    if hours:
        return f"{hours}h{m:02d}m"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def drop_records_after(path, step):
    """Rewrite a log.jsonl without its records after `step` (a resumed run trains those steps again) and without
    damaged lines (torn by a killed run, bytes that are not a JSON record with an integer step); returns how many
    damaged lines were dropped."""
    if not os.path.isfile(path) or os.path.islink(path):
        return 0  # a link or a folder there is refused by open_append, with one line
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    records = [parse_record(line) for line in lines]
    kept = [line for line, record in zip(lines, records) if record is not None and record["step"] <= step]
    if len(kept) < len(lines):
        atomic_write_bytes(path, b"".join(line if line.endswith(b"\n") else line + b"\n" for line in kept))
    return sum(record is None for record in records)


def parse_record(line):
    """A log.jsonl line (bytes or text) as a dict with an integer "step" >= 0, or None for a damaged line."""
    try:
        record = json.loads(line)
    except ValueError:  # torn JSON, bytes that are not UTF-8 (UnicodeDecodeError is a ValueError)
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    return record if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def read_records(path):
    """(records, damaged) of a log.jsonl: its well-formed records in file order, and how many lines were not.
    UserError when the file cannot be read as a file."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror})") from None
    records = [parse_record(line) for line in lines if line.strip()]
    return [record for record in records if record is not None], sum(record is None for record in records)


def _wandb_run_id(folder):
    """The wandb run id of this folder's run, made on the first run and reused on resume."""
    path = os.path.join(folder, "wandb-run-id")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    run_id = os.urandom(6).hex()
    atomic_write_bytes(path, (run_id + "\n").encode())
    return run_id
