"""pretrain.py --resume: which checkpoint continues the run, the recipe it records put back into the arguments (ours,
or an official StableRep checkpoint's), and the checks that the launch can continue it."""
from util import dataindex
from util.checkpoints import (
    check_recorded_settings,
    check_training_state,
    comparable_value,
    init_from,
    list_checkpoints,
    load_checkpoint_file,
    load_training_state,
    shown_value,
)
from util.cli import UserError
from util.official import continue_official, is_official_checkpoint, official_recipe


def read_resume_checkpoint(args, parser, resumable_flags, never_restored):
    """With --resume: the checkpoint to continue ({"path", "state", ...}), and args replaced by its recorded recipe.
    Flags given on this command line may differ only where `resumable_flags` allows; those in `never_restored` are
    about this launch and never taken from the checkpoint. None without --resume. `parser` is pretrain.py's."""
    if args.resume is None:
        if args.init_from is None and list_checkpoints(args.output):
            raise UserError(f"{args.output} already holds checkpoints: pass --resume to continue that run, or "
                            "choose another --output")
        return None
    path = args.resume
    if path == "latest":
        found = list_checkpoints(args.output)
        if not found:  # nothing to continue yet: a first run that was asked to resume if it can
            return None
        path = found[-1]
    try:
        state = load_checkpoint_file(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    official = is_official_checkpoint(state)
    if official:
        recorded, world_size = official_recipe(state["args"], path)
        check_recorded_settings(recorded, parser, path)
        if not 0 <= state["epoch"] < recorded["epochs"]:
            raise UserError(f"{path} is an official checkpoint after epoch {state['epoch']} of a run of "
                            f"{recorded['epochs']} epochs (a damaged checkpoint)")
    elif not isinstance(state, dict) or not isinstance(state.get("args"), dict) or "step" not in state:
        raise UserError(f"{path} is neither a pretrain.py checkpoint nor an official StableRep one (an encoder alone "
                        "has no optimiser state to continue): start from its weights with --init-from instead")
    else:
        check_training_state(state, path, parser, never_restored)
        recorded, world_size = state["args"], state.get("world_size", 1)
    given = set(getattr(args, "flags_given", None) or changed_from_defaults(args, parser))
    resumable = resumable_flags
    if any(dataindex.is_streamed(spec) for spec in recorded.get("data") or []):
        resumable = resumable_flags - {"workers"}  # a stream's steps are dealt to the workers in turn
    take_recorded_settings(args, recorded, path, given, resumable, never_restored,
                           hint="drop {flag}, or start a new run with --init-from")
    streamed = [spec for spec in args.data or [] if dataindex.is_streamed(spec)]
    if streamed and "data" not in given:  # a URL or pipe: runs a command: only one typed by the user may run
        raise UserError(f"{path} records the streamed --data {streamed[0]!r}; a command or URL is run only from "
                        "this command line: pass --data again (the same sources) to resume")
    if official and not args.data:
        raise UserError(f"{path} is an official checkpoint, which does not say where its images are: pass --data "
                        "(its --csv_path as --data and its --folder_list as --folder-list, or the same images in "
                        "another layout)")
    return {"path": path, "state": state, "recipe": recorded, "world_size": world_size, "official": official}


def take_recorded_settings(args, recorded, path, given, resumable, never_restored, hint="drop {flag}"):
    """args takes every setting `recorded` (a checkpoint's args) holds, except those of `never_restored` and those of
    `resumable` that this command line gave (`given`); a setting given here that differs from the recorded one is a
    UserError naming the checkpoint `path` (`hint`, with {flag}, says what to do). pretrain.py's and segment.py's
    resume."""
    for key, value in recorded.items():
        if key in never_restored or not hasattr(args, key) or (key in resumable and key in given):
            continue
        if key in given and comparable_value(getattr(args, key)) != comparable_value(value):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path} was trained with {flag} {shown_value(value)}, not "
                            f"{shown_value(getattr(args, key))}: a resumed run keeps its recipe ("
                            + hint.format(flag=flag) + ")")
        setattr(args, key, value)


def changed_from_defaults(args, parser):
    """When the command line is not known (main called directly): the flags whose value is not the default."""
    defaults = vars(parser.parse_args(["--data", "x"]))
    return {key for key, value in vars(args).items() if key in defaults and value != defaults[key]}


def check_same_global_batch(resumed, images_per_step, world_size):
    """A resumed run must take the same images a step: another number of processes would change the schedule,
    the learning rate and every batch."""
    recorded_world, args = resumed["world_size"], resumed["recipe"]
    recorded = args["captions_per_gpu"] * args["images_per_caption"] * args["crops_per_image"] * recorded_world
    if recorded != images_per_step:
        raise UserError(f"{resumed['path']} was trained with {recorded} images a step ({args['captions_per_gpu']} "
                        f"captions x {args['images_per_caption']} images x {args['crops_per_image']} crops x "
                        f"{recorded_world} process(es)); this launch would take {images_per_step} ({world_size} "
                        f"process(es)): resume with {recorded_world} process(es)")


def restore(resumed, args, model, optimizer, scaler, sampler, is_main):
    """The step a launch starts at, its model, optimiser, gradient scale and data order restored: from our
    checkpoint (exactly), from an official one (its weights, moments and scale, after its last epoch), from
    --init-from's weights (step 0), or nothing (step 0). `model` is without DDP."""
    if resumed and resumed["official"]:
        step = continue_official(resumed, model, optimizer, scaler, sampler.steps_per_epoch)
        if is_main:
            print(f"continuing the official run of {resumed['path']} after its epoch {resumed['state']['epoch'] + 1} "
                  f"of {args.epochs}: its weights, AdamW moments{' and gradient scale' if scaler.is_enabled() else ''}"
                  " are restored; its data order is not (its loader drew images and crops from numpy's global "
                  "generator), so the next epochs draw theirs anew, on the captions its DistributedSampler deals "
                  f"(seed {args.seed})")
        return step
    if resumed:
        step = load_training_state(resumed, model, optimizer, scaler)
        sampler.load_state_dict(resumed["state"].get("data"))  # a stream resumes where each of its streams stood
        return step
    if args.init_from:
        loaded = init_from(args.init_from, model)
        if is_main:
            print(f"initialised {', '.join(loaded)} from {args.init_from}")
    return 0
