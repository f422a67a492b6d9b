"""Results files of the evaluations: a result names what made it, and never replaces an input or a result of other
settings. Each results JSON holds `made_by` (the script, the checkpoint it scored, the data and the settings that
change the number); writing to a path that already holds a file is allowed only when that file is a results file
with the same `made_by` (a rerun replacing its own)."""
import json
import os

from util.cli import UserError

MADE_BY = "made_by"
DEFAULT_CHECKPOINT_STEM = "encoder"  # pretrain.py's encoder.pth: its results keep the plain name


def default_name(results_name, parts, checkpoint):
    """<results_name>_<part>_...json beside `checkpoint`, with the checkpoint's stem last unless it is encoder.pth,
    so the results of checkpoint-3 and checkpoint-6 of one run are two files."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    words = [results_name, *parts] + ([stem] if stem != DEFAULT_CHECKPOINT_STEM else [])
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "_".join(words) + ".json")


def check_output(path, made_by, inputs, flag="--output"):
    """UserError unless results made by `made_by` may be written to `path`: it is none of `inputs` (the files and
    folders the run reads), and whatever it holds already is a results file of the same `made_by`."""
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(path) and os.path.samefile(path, source):
            raise UserError(f"{flag} {path} is an input of this run ({source}); results never replace their inputs: "
                            "choose another file")
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isfile(path):
        raise UserError(f"{flag} {path} is not a plain file; choose another results file")
    try:
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{flag} {path} exists and is not a results file; results never replace other files: "
                        "choose another") from None
    recorded = existing.get(MADE_BY) if isinstance(existing, dict) else None
    if recorded != jsonable(made_by):
        differ = ("it records no settings (an earlier version's results)" if recorded is None else
                  "; ".join(f"{key} {there!r} there, {here!r} here"
                            for key, there, here in _differences(recorded, jsonable(made_by)))
                  if isinstance(recorded, dict) else "its settings are unreadable")
        raise UserError(f"{flag} {path} holds the results of other settings ({differ}); choose another --output, or "
                        "move that file away")


def _differences(recorded, made_by, prefix=""):
    """(key, recorded value, this run's value) of every setting that differs, nested dicts key by key."""
    for key in sorted(set(recorded) | set(made_by)):
        there, here = recorded.get(key), made_by.get(key)
        if isinstance(there, dict) and isinstance(here, dict):
            yield from _differences(there, here, f"{prefix}{key}.")
        elif there != here:
            yield f"{prefix}{key}", there, here


def jsonable(value):
    """`value` as it reads back from JSON (tuples as lists), for comparing with a file's record."""
    return json.loads(json.dumps(value))
