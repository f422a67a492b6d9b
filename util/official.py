"""Checkpoints of the official StableRep code (google-research/syn-rep-learn, StableRep/main_stablerep.py): their
recorded recipe in our flags, and their weights, AdamW moments and gradient scale loaded into our model, so that
`pretrain.py --resume official.pth` continues their run.

An official checkpoint is {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}; its keys are
`visual.*` (timm's ViT names), `image_mlp.*` and, for StableRep+, the text tower's.
"""
import argparse
import math

from util.checkpoints import check_finite, model_state_dict, our_name
from util.cli import UserError, first_line

# main_stablerep.py's --model -> ours
OFFICIAL_MODELS = {"small": "vit_small", "base": "vit_base", "large": "vit_large"}


BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_official_checkpoint(state):
    """A checkpoint of the official code: {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}."""
    return isinstance(state, dict) and isinstance(state.get("args"), argparse.Namespace) and isinstance(
        state.get("epoch"), int) and isinstance(state.get("model"), dict) and isinstance(state.get("optimizer"), dict)


def official_recipe(namespace, path):
    """(our flags, world size) for the recipe an official checkpoint's args record (main_stablerep.py's names);
    UserError for a recipe we cannot continue."""
    recorded = vars(namespace)
    missing = [key for key in ("model", "batch_size", "n_img", "epochs", "warmup_epochs", "blr") if key not in recorded]
    if missing:
        raise UserError(f"{path} is an official checkpoint whose args lack --{missing[0]}, so its run cannot be "
                        "continued: start from its weights with --init-from instead")
    unsupported = {"vl_projection": "linear", "ssl_temp_cos": False, "ssl_scale": 1.0, "ssl_w1": 1.0, "ssl_w2": 1.0,
                   "weak_aug": False, "down_prob": None}
    changed = [key for key, value in unsupported.items() if recorded.get(key, value) != value]
    if changed or recorded["model"] not in OFFICIAL_MODELS:
        what = f"--{changed[0]} {recorded[changed[0]]}" if changed else f"--model {recorded['model']}"
        raise UserError(f"{path} was trained with {what}, which pretrain.py does not have: start from its weights "
                        "with --init-from instead")
    for key in ("batch_size", "n_img", "num_crop", "world_size", "epochs"):
        value = recorded.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path} is an official checkpoint whose args record --{key} {value!r}, not a whole "
                            "number of at least 1 (a damaged checkpoint)")
    for key in ("blr", "lr", "warmup_epochs"):
        value = recorded.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise UserError(f"{path} is an official checkpoint whose args record --{key} {value!r}, not a finite "
                            "number of at least 0 (a damaged checkpoint)")
    world_size, crops = recorded.get("world_size", 1), recorded.get("num_crop", 1)
    images_per_step = recorded["batch_size"] * recorded["n_img"] * crops * world_size
    lr = recorded.get("lr") or recorded["blr"] * images_per_step / 512  # main_stablerep.py sets args.lr so
    loss = ("stablerep+" if recorded.get("add_language") else
            "simclr" if (recorded["n_img"], crops) == (1, 2) else "stablerep")
    recipe = {"model": OFFICIAL_MODELS[recorded["model"]], "loss": loss, "captions_per_gpu": recorded["batch_size"],
              "images_per_caption": recorded["n_img"], "crops_per_image": crops, "epochs": recorded["epochs"],
              "warmup_epochs": float(recorded["warmup_epochs"]), "base_lr": lr * 512 / images_per_step,
              "weight_decay": recorded.get("weight_decay", 0.1),
              "betas": [recorded.get("beta1", 0.9), recorded.get("beta2", 0.95)],
              "temperature": recorded.get("ssl_temp", 0.1), "head_hidden_dim": recorded.get("ssl_mlp_dim", 4096),
              "embed_dim": recorded.get("ssl_emb_dim", 256), "seed": recorded.get("seed", 0),
              "downsample_prob": recorded.get("downsample_prob", 0.05) if recorded.get("downsample") else 0.0}
    if recorded.get("downsample") and recorded.get("down_res"):
        recipe["downsample_res"] = [int(size) for size in recorded["down_res"]]
    return recipe, world_size


def continue_official(resumed, model, optimizer, scaler, steps_per_epoch):
    """Load an official checkpoint's weights, AdamW moments and gradient scale into ours; returns the step after its
    last epoch. Its random state and data order are not restorable (numpy's global generator drew them)."""
    state, path = resumed["state"], resumed["path"]
    weights = model_state_dict(state)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit this model ({str(err).splitlines()[0]})") from None
    check_finite(weights, path)
    try:
        optimizer.load_state_dict(official_optimizer_state(state, model, optimizer))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} cannot be continued: its optimiser state does not fit this model "
                        f"({first_line(err)})") from None
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return (state["epoch"] + 1) * steps_per_epoch


def official_no_decay(name, tensor):
    """util/misc.py add_weight_decay's rule: no weight decay for 1-d tensors and names with `bias`, `ln` or `bn`."""
    return tensor.ndim < 2 or any(part in name for part in ("bias", "ln", "bn"))


def official_optimizer_state(state, model, optimizer):
    """The official AdamW state re-keyed to our optimiser. The official groups are util/misc.py add_weight_decay's,
    in this order: [decay, no decay] over named_parameters, no decay for names with `bias`, `ln` or `bn` and 1-d
    tensors; a checkpoint's parameter order is its state dict's less the BatchNorm buffers. Moments of the [in, out]
    projection matrices are transposed as their weights."""
    names = [key for key in state["model"] if not key.endswith(BATCHNORM_BUFFERS)]
    no_decay = [key for key in names if official_no_decay(key, state["model"][key])]
    decay = [key for key in names if key not in no_decay]
    groups = state["optimizer"]["param_groups"]
    if [len(group["params"]) for group in groups] != [len(decay), len(no_decay)]:
        raise ValueError(f"{len(groups)} parameter groups of {[len(group['params']) for group in groups]} "
                         f"parameters, not [{len(decay)}, {len(no_decay)}]")
    official_names = {index: key for group, keys in zip(groups, (decay, no_decay))
                      for index, key in zip(group["params"], keys)}
    ours = optimizer.state_dict()
    our_params = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    names_of = {id(parameter): name for name, parameter in model.named_parameters()}
    our_index = {names_of[id(parameter)]: index for index, parameter in enumerate(our_params)}
    moments = {}
    for index, values in state["optimizer"]["state"].items():
        name, transposed = our_name(official_names[index])
        moments[our_index[name]] = {key: value.T.contiguous() if transposed and value.ndim == 2 else value
                                    for key, value in values.items()}
    return {"state": moments, "param_groups": ours["param_groups"]}
