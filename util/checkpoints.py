"""Run folders, checkpoints and resuming, for pretrain.py and segment.py: writing a checkpoint whole or not at all,
reading one back with every part checked, a resumed run taking its recorded settings, an --output that never
takes over another run's files, and Ctrl-C / SIGTERM as one line that names the last checkpoint.

Reading checkpoints of every kind (ours, the official StableRep code's, timm's) into our models lives here too:
`load_checkpoint_file`, `encoder_state_dict`, `model_state_dict`, `load_encoder`, `load_image_text_model`.
"""
import argparse
import atexit
import contextlib
import glob
import json
import math
import multiprocessing
import os
import signal
import sys
import warnings

import torch

from model import StableRepModel, TextTransformer, build_vit, interpolate_pos_embed
from util import distributed
from util.catalog import VIT_SIZES, vit_name
from util.cli import UserError, first_line
from util.files import atomic_open, atomic_write_json

CHECKPOINT_GLOB = "checkpoint-*.pth"


# ------------------------------------------------------------------------------------------------------------
# writing checkpoints
# ------------------------------------------------------------------------------------------------------------


def checkpoint_path(output, step):
    return os.path.join(output, f"checkpoint-{step:08d}.pth")


def list_checkpoints(output):
    return sorted(glob.glob(os.path.join(output, CHECKPOINT_GLOB)))


def remove_all_but_newest(output, keep):
    """Delete the checkpoints of `output` but the newest `keep`."""
    for old in list_checkpoints(output)[:-keep]:
        os.remove(old)


def checkpoint_due(step, total_steps, steps_per_epoch, save_every):
    """Every save_every steps and at the end; at an epoch's end only when epochs are at least save_every steps
    long (a run of one-step epochs would otherwise write a checkpoint every step)."""
    epoch_end = step % steps_per_epoch == 0 and steps_per_epoch >= save_every
    return step % save_every == 0 or step == total_steps or epoch_end


def save_checkpoint(path, state):
    """torch.save through files.atomic_open: a run killed mid-write keeps its last checkpoint, a full disk is one
    line and leaves no partial file, and a link planted at the name is replaced, never written through. Ctrl-C
    and SIGTERM wait until the file is whole."""
    with interrupts_deferred(), atomic_open(path) as f:
        torch.save(state, f)


def save_training_state(model, optimizer, scaler, step, world_size, args, run_id, loss, data_state):
    """A checkpoint that continues the run exactly (all randomness after it is a function of seed and step, and
    a stream's order of where its streams stood: `data_state`); only the newest --keep are kept. `run_id` names the
    run (check_output), `loss` is the step's."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "world_size": world_size, "args": vars(args), "rng": {"torch": torch.get_rng_state()},
             "run_id": run_id, "loss": loss, "data": data_state}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    save_checkpoint(checkpoint_path(args.output, step), state)
    remove_all_but_newest(args.output, args.keep)


def export_encoder(path, visual, args):
    """The encoder alone under timm's key names, with the config a later stage rebuilds it from."""
    save_checkpoint(path, {"model": visual.state_dict(),
                           "config": {"model": args.model, "image_size": args.image_size, **visual.config}})


# ------------------------------------------------------------------------------------------------------------
# the run folder: another run's files are never taken over; the finish (encoder.pth, then summary.json)
# ------------------------------------------------------------------------------------------------------------


def check_output(args, resumed, run_files):
    """The id of the run this launch starts or continues, once --output is known to hold no other run's files: a
    run never overwrites what another wrote, nor deletes its checkpoints (--keep). Writes nothing; UserError for
    an --output that holds another run, a dangling link, or a log.jsonl that is a link or not a file."""
    output = args.output
    if os.path.islink(output) and not os.path.exists(output):
        raise UserError(f"--output {output} is a symbolic link to {os.readlink(output)}, which does not exist")
    run_id = (resumed["state"].get("run_id") if resumed else None) or os.urandom(8).hex()
    if not os.path.isdir(output):
        return run_id
    log = os.path.join(output, "log.jsonl")
    if os.path.islink(log) or (os.path.lexists(log) and not os.path.isfile(log)):
        raise UserError(f"{log} is {'a symbolic link' if os.path.islink(log) else 'not a file'}; refusing to write "
                        "there (move it away, or choose another --output)")
    present = [name for name in run_files if os.path.lexists(os.path.join(output, name))]
    present += [os.path.basename(path) for path in list_checkpoints(output)]
    if not present:
        return run_id
    if resumed:
        own_folder = os.path.samefile(os.path.dirname(os.path.abspath(resumed["path"])), output)
        recorded = _recorded_run_id(output)
        if own_folder or (recorded is not None and recorded == resumed["state"].get("run_id")):
            check_nothing_newer(output, resumed)
            return run_id
        raise UserError(f"--output {output} holds another run ({', '.join(present[:3])}), not the one "
                        f"{resumed['path']} continues: choose an empty --output (or the checkpoint's own folder)")
    if args.resume == "latest":  # a run that stopped before its first checkpoint: nothing of it can be continued
        return _recorded_run_id(output) or run_id
    raise UserError(f"--output {output} already holds a run ({', '.join(present[:3])}): pass --resume to continue "
                    "it, or choose another --output")


def check_nothing_newer(output, resumed):
    """UserError when `output` holds a newer state than the checkpoint a launch resumes from (a later checkpoint,
    or the finish of a longer run): continuing from the older one would overwrite it, and --keep delete it."""
    step = resumed["state"].get("step")
    if resumed["official"] or not isinstance(step, int):
        return
    newer = [path for path in list_checkpoints(output) if checkpoint_step(path) > step]
    finished_steps = _finished_steps(output)
    if newer or (isinstance(finished_steps, int) and finished_steps > step):
        what = os.path.basename(newer[-1]) if newer else f"the finish of step {finished_steps} (summary.json)"
        raise UserError(f"--output {output} holds {what}, newer than {resumed['path']} (step {step}): resuming "
                        "from it would overwrite that; resume the newest (--resume alone), or continue the older "
                        "one into an empty --output")


def checkpoint_step(path):
    """checkpoint-00000012.pth -> 12 (-1 for a name of another form)."""
    digits = os.path.basename(path)[len("checkpoint-"):-len(".pth")]
    return int(digits) if digits.isdigit() else -1


def _recorded_run_id(output):
    """The run id run.json of `output` records, or None (no file, a damaged one, a run from before run ids)."""
    return _json_field(os.path.join(output, "run.json"), "run_id")


def _json_field(path, key):
    """`key` of the JSON object in the file `path`, or None (no file, not JSON, not an object, no such key)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    return content.get(key) if isinstance(content, dict) else None


def summary_of(steps, images_per_step, steps_this_run, seconds, final_loss, corrupt):
    return {"steps": steps, "images_seen": steps * images_per_step, "steps_this_run": steps_this_run,
            "seconds_this_run": seconds, "final_loss": final_loss, "corrupt_images_this_run": corrupt}


def finish(visual, args, summary):
    """The run's last step: encoder.pth, then summary.json, which says the run is finished (`finished`)."""
    export_encoder(os.path.join(args.output, "encoder.pth"), visual, args)
    atomic_write_json(os.path.join(args.output, "summary.json"), summary)


def finished(output, steps):
    """Has the run in `output` written its finish for `steps` (summary.json saying so, and encoder.pth)?"""
    return _finished_steps(output) == steps and os.path.isfile(os.path.join(output, "encoder.pth"))


def _finished_steps(output):
    """The steps summary.json of `output` says the run finished at, or None (no file, a damaged one)."""
    return _json_field(os.path.join(output, "summary.json"), "steps")


def finish_trained_run(encoder, args, step, total_steps, images_per_step, final_loss):
    """A resumed run already at its last step: write its finish if a kill interrupted it, else say it is done."""
    if finished(args.output, step):
        print(f"{args.output}: the run finished at step {step} of {total_steps}; nothing to do "
              f"(summary.json and encoder.pth are there)")
        return
    print(f"{args.output}: trained to step {step} of {total_steps}; writing encoder.pth and summary.json")
    with interrupts_as_one_line(step, step):
        finish(encoder, args, summary_of(step, images_per_step, 0, 0.0, final_loss, 0))


# ------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: one line, and never in the middle of a write
# ------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_deferred():
    """Within the block, Ctrl-C (SIGINT) and SIGTERM wait: they end the run as KeyboardInterrupt once the block is
    done, so a checkpoint being written is never cut in the middle (torch.save's own cleanup would then fail with a
    traceback). A signal the process was started to ignore (nohup, a background job) stays ignored."""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received:  # delivered now to whoever handled it before (a preemption flag, or Ctrl-C)
            handler = previous[signum]
            if not callable(handler):
                raise KeyboardInterrupt
            handler(signum, None)


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what `timeout`, scancel and preemption send; SLURM's warning


class stop_at_step_boundary:
    """Within the block, SIGTERM (`timeout`, scancel, a cluster's preemption, torchrun stopping its workers) or
    SIGUSR1 (SLURM's advance warning: `#SBATCH --signal=B:USR1@120`) asks the loop to stop at its next step
    boundary: `due(device)` turns true there on every process (under torchrun a max all-reduce, so all stop at the
    same step), the loop saves a checkpoint and ends with one line. A second SIGTERM stops at once, as Ctrl-C does
    (KeyboardInterrupt). A signal the process was started to ignore stays ignored. DataLoader workers ignore both
    (quiet_worker): their parent ends them."""

    def __enter__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self._note) for sig in PREEMPTION_SIGNALS
                         if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame):
        if self.received is not None and signum == signal.SIGTERM:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def name(self):
        return signal.Signals(self.received).name if self.received else None

    def due(self, device=None):
        """Has any process been asked to stop? (A collective under torchrun: every rank calls it each step.)"""
        asked = self.received is not None
        if distributed.world_size() > 1:
            flag = torch.tensor([int(asked)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked


def quiet_worker(worker_id=None):
    """A DataLoader worker's init: SIGTERM and SIGUSR1 sent to the whole process group leave it serving batches,
    so the training loop reaches its step boundary and saves; it ends with its parent (torch's watchdog), with no
    traceback. (The parent ends such workers with SIGKILL at exit: end_quiet_workers_at_exit.)"""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_ENDING_REGISTERED = []


def end_quiet_workers_at_exit():
    """In the process that starts quiet_worker loaders: at exit, its daemonic children (the loader workers still
    alive after an error or a stop) end by SIGKILL. multiprocessing's own exit handler sends them SIGTERM, which they
    ignore, and then waits for them forever; this runs before it (atexit runs the last registered first)."""
    if not _ENDING_REGISTERED:
        atexit.register(_kill_daemonic_children)
        _ENDING_REGISTERED.append(True)


def _kill_daemonic_children():
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker's failure
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class stop_on_sigterm:
    """Within the block, SIGTERM (a cluster's preemption, torchrun stopping its workers) raises KeyboardInterrupt,
    so it ends the run as Ctrl-C does: one line, no traceback."""

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_as_one_line(step, last_saved, log=None):
    """Ctrl-C (every rank gets it) or SIGTERM (a cluster's preemption) within the block ends the run with one line
    from rank 0 saying where it stopped and how to go on, exit code 130. `step` and `last_saved` are numbers or
    functions returning them (read when the interrupt lands)."""
    try:
        with stop_on_sigterm():
            yield
    except KeyboardInterrupt:
        if distributed.is_main_process():
            if log:
                log.close()
            current, saved = (value() if callable(value) else value for value in (step, last_saved))
            print(f"\npretrain.py: stopped at step {current}; the last checkpoint is step {saved}: rerun the same "
                  "command with --resume to continue", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------------------
# continuing a run of ours, or starting from other weights
# ------------------------------------------------------------------------------------------------------------


def check_training_state(state, path, parser, never_restored):
    """One line naming `path` and what is wrong when a checkpoint of ours cannot continue a run (a damaged or
    hand-edited file): each part of the right kind, every recorded flag a value its flag takes in `parser` (those in
    `never_restored` are not checked)."""
    parts = {"model": dict, "optimizer": dict, "scaler": dict, "args": dict, "rng": dict, "step": int}
    for key, kind in parts.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            found = f"a {type(state[key]).__name__}" if key in state else "missing"
            raise UserError(f"{path} cannot be resumed: its {key!r} is {found}, not a {kind.__name__} (a damaged "
                            "checkpoint: resume from an earlier one)")
    rng = state["rng"].get("torch")
    if state["step"] < 0 or not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise UserError(f"{path} cannot be resumed: its step or its random state is damaged (resume from an earlier "
                        "checkpoint)")
    world_size = state.get("world_size", 1)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise UserError(f"{path} cannot be resumed: its world_size {world_size!r} is not a number of processes")
    check_recorded_settings(state["args"], parser, path, never_restored)


def check_recorded_settings(recorded, parser, path, skipped=()):
    """UserError naming `path` unless every setting `recorded` (a checkpoint's args, or a recipe read from one) holds
    for a flag of `parser` is a value the command line could give that flag: the same argparse types, ranges and
    choices as a typed flag, and the same Python type (a "12" where a number belongs is damage). One place for
    pretrain.py's, segment.py's and the official checkpoints' recorded settings; those in `skipped` are about a
    launch, not checked."""
    for action in parser._actions:
        value = recorded.get(action.dest)
        if action.option_strings and value is not None and action.dest not in skipped and not _takes(action, value):
            raise UserError(f"{path} cannot be resumed: it records {action.option_strings[0]} {value!r}, which the "
                            "flag does not take (a damaged checkpoint)")


def _takes(action, value):
    """Would the command line give `value` for this flag (its type, range and choices)?"""
    many = action.nargs not in (None, "?", 0)
    if many != isinstance(value, (list, tuple)):
        return False
    for item in value if many else [value]:
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(item, bool):
                return False
        elif isinstance(item, bool) or not isinstance(item, (str, int, float)):
            return False
        elif action.choices is not None and item not in action.choices:
            return False
        elif action.type is None and not isinstance(item, str):
            return False
        elif action.type is not None:
            try:
                parsed = action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError):
                return False
            same_kind = type(parsed) is type(item) or (isinstance(parsed, float) and type(item) is int)
            if not same_kind or parsed != item:
                return False
    return True


def comparable_value(value):
    return list(value) if isinstance(value, tuple) else value


def shown_value(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def load_training_state(resumed, model, optimizer, scaler):
    """Load a checkpoint of ours into model, optimizer and scaler, and restore the random state; returns the step
    to continue from. UserError naming the file for weights or optimiser state that do not fit."""
    state, path = resumed["state"], resumed["path"]
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit this model ({str(err).splitlines()[0]})") from None
    check_finite(state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} cannot be resumed: its optimiser or gradient-scaler state does not fit this run "
                        f"({first_line(err)})") from None
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            moments = {key: value for key, value in optimizer.state.get(parameter, {}).items() if key != "step"}
            wrong = [key for key, value in moments.items()
                     if not isinstance(value, torch.Tensor) or value.shape != parameter.shape]
            if wrong:
                raise UserError(f"{path} cannot be resumed: its optimiser state {wrong[0]!r} does not have the shape "
                                f"of its parameter {tuple(parameter.shape)} (a damaged checkpoint)")
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def check_finite(weights, path):
    """UserError naming the first tensor of `weights` (a state dict) that holds NaN or infinity."""
    for key, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{path} holds non-finite weights ({key} has NaN or infinite values); training from "
                            "them would only produce NaN")


def init_from(path, model):
    """Load the weights of `path` (ours, official, or an encoder alone) into `model` where names and shapes
    match; returns the top-level parts loaded. UserError when the encoder does not fit or nothing matches."""
    try:
        state = model_state_dict(load_checkpoint_file(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    own = model.state_dict()
    if "visual.pos_embed" in state:  # another input size: resample the position grid as load_encoder does
        state["visual.pos_embed"] = interpolate_pos_embed(state["visual.pos_embed"],
                                                                    model.visual.patch_embed.grid_size)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise UserError(f"{path} does not fit this model: {mismatched[0]} is {tuple(state[mismatched[0]].shape)} "
                        f"there, {tuple(own[mismatched[0]].shape)} here (check --model, --depth, --image-size, "
                        "--embed-dim, --head-hidden-dim and the text tower's flags)")
    missing_encoder = [k for k in own if k.startswith("visual.") and k not in state]
    if missing_encoder:
        raise UserError(f"{path} lacks encoder weights this model needs, e.g. {missing_encoder[0]}")
    check_finite({k: v for k, v in state.items() if k in own}, path)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted({k.split(".")[0] for k in state if k in own})


# ------------------------------------------------------------------------------------------------------------
# reading any checkpoint: ours, the official code's, timm's
# ------------------------------------------------------------------------------------------------------------


# a DINO run's teacher first (the encoder DINO evaluates), then official / DDP-wrapped names, longest first
ENCODER_PREFIXES = ("module.teacher.visual.", "teacher.visual.", "module.visual.", "visual.", "module.")


def load_checkpoint_file(path):
    """`torch.load(path, weights_only=True)`, with one-sentence errors for a missing or unreadable file.

    argparse.Namespace is allowed because checkpoints written by the official code store their args as one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on a foreign pickle's protocol: not lines for the user
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        reason = first_line(err)
        if "weights_only" in reason or "Weights only" in reason:  # torch advises unsafe loading: we never do
            reason = ("it holds Python objects other than tensors and plain data; checkpoints are only read "
                      "weights-only, so that no file can run code")
        elif len(reason) < 12:  # torch's bare codes ("101") for bytes that are no torch.save file at all
            reason = f"not a file torch.save wrote: {reason}"
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None


def _tensors_of(checkpoint):
    """The state dict inside a loaded checkpoint: the dict itself, or the one under 'model' / 'state_dict'.
    ValueError when there is none (a bare tensor, a list, a dict of other things)."""
    state = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError("checkpoint holds no state dict (expected a dict of tensors, or one under 'model')")
    return state


def encoder_state_dict(checkpoint):
    """The encoder's weights, under timm's names, from any of the formats we accept:

    - ours (pretrain.py): {"model": {"visual.*", "image_mlp.*", ...}, "args": {...}}
    - the official StableRep code: {"model": {"module.visual.*" or "visual.*", ...}, "args": Namespace}
    - a plain timm state dict, or our exported encoder ({"model": timm keys, "config": {...}})
    Heads (timm's classifier `head.*`, `fc_norm.*`, the projection head and text tower) are dropped."""
    state = _tensors_of(checkpoint)
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix + "cls_token") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if not k.startswith(("head.", "head_drop.", "fc_norm."))}


# the official StableRep+ text tower (CLIP's module names) -> ours; weights of the same layout unless transposed
OFFICIAL_TEXT_NAMES = (
    ("transformer.resblocks.", "text.blocks."), (".attn.in_proj_", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."),
    (".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
    ("token_embedding.", "text.token_embedding."), ("positional_embedding", "text.positional_embedding"),
    ("ln_final.", "text.norm."),
)


OFFICIAL_PROJECTIONS = {"text_projection": "text.projection.weight", "image_projection": "image_projection.weight"}


def model_state_dict(checkpoint):
    """The weights of a whole StableRepModel (encoder, head, text tower) under our names, from:

    - ours (pretrain.py's checkpoints): returned as they are
    - the official code's (StableRep and StableRep+, with or without DDP's `module.`): the text tower is renamed
      (CLIP's `transformer.resblocks.N.attn.in_proj_weight` -> `text.blocks.N.attn.qkv.weight`, ...; the same
      q, k, v layout) and the two projection matrices, stored as [in, out] parameters, become Linear weights
    - an encoder alone (a timm ViT state dict, or our exported encoder.pth): under `visual.`
    Raises ValueError for a file without a state dict."""
    state = _tensors_of(checkpoint)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith("visual.") for k in state):  # an encoder alone
        return {f"visual.{k}": v for k, v in encoder_state_dict(state).items()}
    renamed = {}
    for key, value in state.items():
        name, transposed = our_name(key)
        renamed[name] = value.T.contiguous() if transposed else value  # [in, out] parameter -> Linear [out, in]
    return renamed


def our_name(key):
    """(our name, whether the tensor is stored transposed) of one key of an official StableRep or StableRep+
    checkpoint (DDP's `module.` dropped); our own names come back as they are."""
    key = key.removeprefix("module.")
    if key in OFFICIAL_PROJECTIONS:
        return OFFICIAL_PROJECTIONS[key], True
    if not key.startswith(("visual.", "image_mlp.", "text.")):
        for official, ours in OFFICIAL_TEXT_NAMES:
            key = key.replace(official, ours)
    return key, False


def checkpoint_config(checkpoint):
    """What the file says of the architecture: {"model": name, "image_size": int} where it says it, else {}."""
    if not isinstance(checkpoint, dict):
        return {}
    args = checkpoint.get("args") or checkpoint.get("config") or {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    config = {}
    if args.get("model") in VIT_SIZES:  # the official code says "base"; its width tells us instead
        config["model"] = args["model"]
    for key in ("image_size", "input_size"):
        if isinstance(args.get(key), int):
            config["image_size"] = args[key]
            break
    return config


def infer_vit_name(state):
    """The VIT_SIZES entry whose width matches the state dict's, or None (the depth is read off the keys)."""
    return vit_name(state["cls_token"].shape[-1]) if "cls_token" in state else None


def load_encoder(path, model_name=None, image_size=None, checkpoint=None):
    """Build a VisionTransformer and load the encoder weights of the checkpoint at `path` into it (`checkpoint`:
    the file's content when the caller has read it already).

    model_name: a VIT_SIZES name; default what the checkpoint records, else what its shapes say.
    image_size: the input size to evaluate at; default the checkpoint's. The position embedding is interpolated
    when it differs. Raises FileNotFoundError or ValueError with a one-line message naming the problem (missing
    file, not a checkpoint, other architecture, missing or unexpected keys).
    """
    checkpoint = load_checkpoint_file(path) if checkpoint is None else checkpoint
    state = encoder_state_dict(checkpoint)
    config = checkpoint_config(checkpoint)
    stored_name = config.get("model") or infer_vit_name(state)
    model_name = model_name or stored_name
    if model_name is None:
        raise ValueError(f"{path}: cannot tell the architecture from the file; name it (e.g. vit_base)")
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"{path}: no ViT encoder weights found (no patch_embed.proj.weight / pos_embed)")
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    stored_grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    image_size = image_size or config.get("image_size") or stored_grid * patch_size
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    model = build_vit(model_name, image_size=image_size, patch_size=patch_size, depth=depth)
    stored_width = state["pos_embed"].shape[-1]
    if stored_width != model.width:
        raise ValueError(f"{path}: checkpoint is a ViT of width {stored_width} ({stored_name or 'unknown size'}),"
                         f" not {model_name} (width {model.width})")
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match {model_name}: missing {sorted(missing)[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    return model


def load_image_text_model(path, text_heads=None, image_size=None, eos_token_id=None):
    """A StableRepModel with its text tower (no head) from a checkpoint that has one: ours (pretrain.py --loss clip
    or stablerep+) or the official StableRep+ code's (renamed by model_state_dict). The text tower's sizes are read
    off the weights; its number of heads, which the weights do not show, from the checkpoint's args (ours record
    text_heads), else `text_heads`, else CLIP's width / 64. eos_token_id: the tokenizer's end-of-text token, whose
    state is pooled (set `model.text.eos_token_id` later when the tokenizer is known only then). Returns (model in
    eval mode, the heads used, the checkpoint's recorded args as a dict). Raises ValueError (one line) for a
    checkpoint without a text tower."""
    checkpoint = load_checkpoint_file(path)
    state = model_state_dict(checkpoint)
    if "text.token_embedding.weight" not in state or "image_projection.weight" not in state:
        raise ValueError(f"{path} has no text tower: image-text evaluations need a StableRep+ or CLIP checkpoint "
                         "(pretrain.py --loss stablerep+ or clip, or the official StableRep+)")
    visual = load_encoder(path, image_size=image_size, checkpoint=checkpoint)
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    vocab, width = state["text.token_embedding.weight"].shape
    depth = len({k.split(".")[2] for k in state if k.startswith("text.blocks.")})
    heads = text_heads or args.get("text_heads") or max(1, width // 64)
    if width % heads:
        raise ValueError(f"{path}: a text width of {width} does not split into {heads} heads (give the right number)")
    text = TextTransformer(vocab, eos_token_id, state["text.positional_embedding"].shape[0], width, depth, heads,
                           state["text.projection.weight"].shape[0])
    model = StableRepModel(visual, None, text)
    wanted = {k: v for k, v in state.items() if k.startswith("text.") or k in ("image_projection.weight",
                                                                                 "logit_scale")}
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.startswith("visual.") and k != "logit_scale"]
    if missing or unexpected:
        raise ValueError(f"{path}: the text tower's keys do not match: missing {sorted(missing)[:4]}, unexpected "
                         f"{sorted(unexpected)[:4]}")
    return model.eval(), heads, args
