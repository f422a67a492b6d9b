"""Pretrain a ViT on synthetic images: StableRep and the paper's baselines from one script.

    python pretrain.py --data synthetic/cc3m --output runs/stablerep                  # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 pretrain.py --data synthetic/cc3m --output runs/stablerep
    python pretrain.py --output runs/stablerep --resume                             # continue, same recipe

Objectives (--loss), one row each of OBJECTIVES below:
    stablerep   multi-positive contrastive loss over caption ids (Eq. 2-4), m images per caption
    simclr      the same loss, positives = the c crops of one image (m = 1, c = 2)
    clip        image-text contrastive loss with a CLIP-style text transformer
    stablerep+  the multi-positive image loss + the image-text loss (text -> image uniform over the m images)
    mocov3      MoCo v3 (families/mocov3.py)   byol  BYOL (families/byol.py)
    dino        DINO (families/dino.py)        mae   MAE (families/mae.py)

The defaults are the paper's ViT-B/16 recipe as the official code runs it (FIDELITY.md lists every item): per
GPU 43 captions x 6 images, as on each of its 32 GPUs (8256 images a step); lr = 2e-4 x images per step / 512;
the CC12M "1x" schedule (15 epochs, 0.5 warmup); the head's BatchNorm once per view. The four self-supervised
families of the paper's first question (Sec. 2) default to their own official ViT-B recipes (the RECIPE of each
families/ file) and take one image of each caption a step; encoder.pth is the encoder their authors evaluate.

--data takes generate.py's output (a folder tree or tar shards), img2dataset's output, tar paths and brace
patterns, the official CSV with --folder-list, or streamed webdataset URLs (docs/RUNNING.md). A resumed run
(--resume) takes its recipe from its checkpoint: only flags that do not change the training may differ.
"""
import argparse
import os
import sys

from util.catalog import VIT_SIZES
from util.cli import SEED, ArgumentParser, UserError, available_cpus, integer, number, parse_command_line, run

# the official README's schedules: name -> (epochs, warmup epochs); "1x" is the paper's 35 epochs of 2 views
SCHEDULES = {
    "cc12m-1x": (15, 0.5), "cc12m-2x": (31, 1.0), "cc12m-3x": (46, 1.5),
    "redcaps-1x": (13, 0.45), "redcaps-2x": (27, 0.9), "redcaps-3x": (40, 1.35),
}
# the rows of OBJECTIVES (below the imports, which load torch once the command line is read)
OBJECTIVE_NAMES = ("stablerep", "simclr", "clip", "stablerep+", "mocov3", "byol", "dino", "mae")
# what a run writes in --output besides its checkpoints: a folder holding any of them holds a run
RUN_FILES = ("run.json", "log.jsonl", "summary.json", "encoder.pth", "tensorboard", "wandb-run-id", "wandb")
INDEX_CACHE = "index-cache"  # --output's copy of the data index, when the data's own folder is read-only
# flags a resumed run may change: they do not change what is trained (the rest must stay as the checkpoint says)
RESUMABLE_FLAGS = {"workers", "log_every", "save_every", "keep", "compile", "tensorboard", "wandb", "output",
                   "gpu_augment", "gpu_decode"}
NEVER_RESTORED = {"resume", "init_from", "flags_given", "quiet", "max_steps"}  # about this launch, not the run
BY_LOSS = "default: the --loss recipe's"  # flags whose default depends on --loss (fill_recipe)


def get_args_parser():
    parser = ArgumentParser("pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- data ----
    parser.add_argument("--data", nargs="+", default=None,
                        help="generate.py's output, img2dataset's, tars, brace patterns, the official CSV, or "
                             "streamed URLs (required unless --resume reads it from a checkpoint)")
    parser.add_argument("--folder-list", nargs="+", default=None, metavar="ROOT",
                        help="image roots of a --data CSV, one per seed (the official --folder_list)")
    parser.add_argument("--stream-captions", type=integer(1), default=None,
                        help="captions in an epoch of streamed --data URLs (required for them)")
    parser.add_argument("--shuffle-buffer", type=integer(1), default=500,
                        help="samples each loader worker holds to shuffle streamed shards (500)")
    parser.add_argument("--stream-mix", type=integer(1), default=4,
                        help="streamed shards each loader worker reads at once (4)")
    parser.add_argument("--images-per-caption", type=integer(1), default=None,
                        help=f"m, images of a caption in the batch (paper: 6 of the 10 generated; {BY_LOSS})")
    parser.add_argument("--crops-per-image", type=integer(1), default=None,
                        help=f"c, augmented crops of each image (paper: 1; SimCLR: 2; {BY_LOSS})")
    parser.add_argument("--crop-scale", type=number(above=0, maximum=1), nargs=2, default=None,
                        metavar=("MIN", "MAX"), help=f"RandomResizedCrop's area fraction (paper: 0.08 1; {BY_LOSS})")
    parser.add_argument("--blur-sigma", type=number(0), nargs=2, default=[0.1, 2.0],
                        metavar=("MIN", "MAX"), help="Gaussian blur's sigma range in pixels (paper: 0.1 2, at 224 px; "
                                                     "scale it with --image-size for small images)")
    parser.add_argument("--color-augment", action=argparse.BooleanOptionalAction, default=True,
                        help="colour jitter, grayscale and solarisation of every view (paper: on; off leaves crops, "
                             "flips and blur: the CPU miniature's caption-grouped objectives)")
    parser.add_argument("--downsample-prob", type=number(0, 1), default=0.0,
                        help="probability of resizing the image down to --downsample-res and back (official "
                             "README command: 0.05; default 0, FIDELITY.md says why)")
    parser.add_argument("--downsample-res", type=integer(8), nargs="+", default=(64, 128), metavar="PIXELS",
                        help="shorter sides --downsample-prob picks from (official: 64 128)")
    parser.add_argument("--gpu-augment", action="store_true",
                        help="colour jitter, blur, flip and normalisation on the training device (same draws)")
    parser.add_argument("--gpu-decode", action="store_true",
                        help="with --gpu-augment, decode the JPEGs on the training device too (nvJPEG)")
    parser.add_argument("--workers", type=integer(0), default=min(8, available_cpus()),
                        help=f"loader processes per GPU (8, or the cores if fewer: here {min(8, available_cpus())})")
    # ---- model ----
    parser.add_argument("--model", default="vit_base", choices=list(VIT_SIZES), help="encoder (paper: vit_base)")
    parser.add_argument("--depth", type=integer(1), default=None,
                        help="transformer blocks, to shrink the encoder for quick runs (default: the size's own)")
    parser.add_argument("--image-size", type=integer(1), default=224,
                        help="crop size, a multiple of --patch-size (paper: 224)")
    parser.add_argument("--patch-size", type=integer(1), default=16,
                        help="side of the ViT's square patches in pixels (paper: 16; a 32 px miniature takes 8)")
    parser.add_argument("--head-hidden-dim", type=integer(1), default=None,
                        help=f"hidden width of the projection head (paper: 4096; {BY_LOSS}, x width / 768 for a "
                             "family's ViT-Ti)")
    parser.add_argument("--embed-dim", type=integer(1), default=None,
                        help=f"embedding the loss compares (paper: 256; {BY_LOSS})")
    parser.add_argument("--head-batchnorm", default="per-view", choices=["per-view", "joint"],
                        help="per-view: the head runs once per view, as the official code (joint: one pass)")
    parser.add_argument("--text-width", type=integer(1), default=512, help="text transformer width (CLIP: 512)")
    parser.add_argument("--text-layers", type=integer(1), default=12, help="text transformer depth (CLIP: 12)")
    parser.add_argument("--text-heads", type=integer(1), default=8, help="text transformer heads (CLIP: 8)")
    parser.add_argument("--context-length", type=integer(2), default=77,
                        help="text tokens; longer captions are cut (CLIP: 77)")
    parser.add_argument("--tokenizer", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="CLIPTokenizer of clip and stablerep+: a hub id or local folder (default: SD v1.5's)")
    # ---- objective ----
    parser.add_argument("--loss", default="stablerep", choices=OBJECTIVE_NAMES, help="training objective (see above)")
    parser.add_argument("--temperature", type=number(above=0), default=None,
                        help=f"tau of the contrastive loss, DINO's student temperature (paper: 0.1; {BY_LOSS})")
    # ---- the self-supervised families' own (families/*.py; each refused for the other objectives) ----
    parser.add_argument("--momentum", type=number(0, maximum=1), default=None,
                        help="MoCo v3, BYOL, DINO: the momentum network's start, raised to 1 along a half cosine")
    parser.add_argument("--frozen-patch-embed", action=argparse.BooleanOptionalAction, default=None,
                        help="MoCo v3: keep the random patch projection untrained (its --stop-grad-conv1: on)")
    parser.add_argument("--out-dim", type=integer(1), default=None,
                        help="DINO: prototypes K (65536; x width / 768 for a ViT-Ti)")
    parser.add_argument("--teacher-temperature", type=number(above=0), default=None,
                        help="DINO: the teacher's temperature after its warmup (0.04)")
    parser.add_argument("--warmup-teacher-temperature", type=number(above=0), default=None,
                        help="DINO: the teacher's temperature at epoch 0 (0.04)")
    parser.add_argument("--warmup-teacher-temperature-epochs", type=integer(0), default=None,
                        help="DINO: epochs of the teacher temperature's warmup (0)")
    parser.add_argument("--weight-decay-end", type=number(0), default=None,
                        help="DINO: the weight decay rises to this along a half cosine (0.4)")
    parser.add_argument("--clip-grad", type=number(0), default=None,
                        help="DINO: clip each parameter's gradient to this norm; 0 = off (3.0)")
    parser.add_argument("--freeze-last-layer", type=integer(0), default=None,
                        help="DINO: epochs during which the head's last layer is not trained (1)")
    parser.add_argument("--drop-path", type=number(0, below=1), default=None,
                        help="DINO: stochastic depth rate of the student's last block (0.1)")
    parser.add_argument("--local-crops", type=integer(0), default=None,
                        help="DINO: local crops of each image beside its two global ones; 0 = off (8)")
    parser.add_argument("--local-crop-scale", type=number(above=0, maximum=1), nargs=2, default=None,
                        metavar=("MIN", "MAX"), help="DINO: area fraction of the local crops (0.05 0.4)")
    parser.add_argument("--local-crop-size", type=integer(16), default=None,
                        help="DINO: local crop size, a multiple of 16 (96; image-size x 96 / 224 where 96 won't fit)")
    parser.add_argument("--mask-ratio", type=number(above=0, below=1), default=None,
                        help="MAE: fraction of each image's patches removed before the encoder (0.75)")
    parser.add_argument("--decoder-width", type=integer(1), default=None,
                        help="MAE: decoder width (512; x width / 768 for a ViT-Ti)")
    parser.add_argument("--decoder-depth", type=integer(1), default=None, help="MAE: decoder blocks (8)")
    parser.add_argument("--decoder-heads", type=integer(1), default=None, help="MAE: decoder attention heads (16)")
    parser.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="MAE: regress each patch's pixels standardised by the patch's own statistics (on)")
    # ---- optimisation ----
    parser.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                        help="the official README's schedules (epochs/warmup): " + ", ".join(
                            f"{name} {epochs}/{warmup:g}" for name, (epochs, warmup) in SCHEDULES.items())
                        + "; default cc12m-1x (StableRep's objectives)")
    parser.add_argument("--epochs", type=integer(1), default=None,
                        help="passes over the captions (default: --schedule's, or the family's)")
    parser.add_argument("--warmup-epochs", type=number(0), default=None,
                        help="linear warmup, then cosine decay to 0 (default: --schedule's, or the family's)")
    parser.add_argument("--max-steps", type=integer(1), default=None,
                        help="stop after step N of the full schedule, to try a recipe small; lr, momenta and "
                             "temperatures follow the uncapped run, so --resume continues it exactly (paper: no cap)")
    parser.add_argument("--captions-per-gpu", type=integer(1), default=None,
                        help=f"captions per GPU per step (paper: 43, x 6 images x 32 GPUs; {BY_LOSS})")
    parser.add_argument("--base-lr", type=number(0), default=None,
                        help=f"lr = base-lr x crops per step / 512 (paper: 2e-4; the families: x images / 256; "
                             f"{BY_LOSS})")
    parser.add_argument("--weight-decay", type=number(0), default=None,
                        help=f"AdamW weight decay, not on biases, norms or the logit scale (paper: 0.1; {BY_LOSS})")
    parser.add_argument("--betas", type=number(0, below=1), nargs=2, default=None,
                        help=f"AdamW betas (paper: 0.9 0.98; {BY_LOSS})")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="autocast: auto = bf16 on GPU, fp32 on CPU; fp16 adds a gradient scaler")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU, fixed shapes)")
    parser.add_argument("--seed", type=SEED, default=0, help="seeds the weights, the caption order and every crop")
    # ---- checkpoints and logs ----
    parser.add_argument("--output", default="runs/stablerep", help="folder for checkpoints, logs and the encoder")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run: alone, the newest checkpoint in --output; or this file (ours or an "
                             "official one)")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="start a new run from these weights (official, ours, or a timm ViT state dict)")
    parser.add_argument("--save-every", type=integer(1), default=1000, help="checkpoint every N steps and at the end")
    parser.add_argument("--keep", type=integer(1), default=2, help="checkpoints kept in --output")
    parser.add_argument("--log-every", type=integer(1), default=10,
                        help="steps between records of log.jsonl and progress lines")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (log.jsonl is written all the same)")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                        help="TensorBoard event files in <output>/tensorboard (default: on if installed)")
    parser.add_argument("--wandb", default=None, metavar="PROJECT",
                        help="also log to this Weights & Biases project (needs the wandb package)")
    return parser


if __name__ == "__main__":  # the command line is read before torch loads (2 s): --help and a bad flag answer at once
    command_line = parse_command_line(get_args_parser())

# the imports below load torch: after the command line, see above
import contextlib
import itertools
import math
import time
from typing import Callable, NamedTuple, Optional, Tuple

import torch

import augment
import data
import loss as loss_lib
import model as model_lib
from augment import augment_crops
from families import byol, dino, mae, mocov3
from util import checkpoints, dataindex, distributed, resume
from util.cli import git_commit, raised_message
from util.files import atomic_write_json, check_creatable, output_folder
from util.jpeg import decode_crops
from util.runlog import Progress, RunLog, check_loggers
from util.tokenizer import load_tokenizer

# ---- objectives ----
# One row per objective: the views it takes when --images-per-caption / --crops-per-image are not given, the parts
# of the model it needs, and the loss terms it sums. StableRep's objectives build StableRepModel (model.py) and sum
# terms of loss.py; a self-supervised family is one file of families/ and one row naming its network, loss term,
# recipe, views and the hooks it runs around each optimiser step (hook(model, optimizer, position, args), the
# model without DDP).

def caption_positives(out, batch, args):
    """StableRep, Eq. 2-4: the images of one caption are positives of each other."""
    return loss_lib.multi_positive_loss(out["image"], batch["image_labels"].to(out["image"].device),
                                        args.temperature)


def crop_positives(out, batch, args):
    """SimCLR: the crops of one image are positives (NT-Xent, the same loss with image ids as labels)."""
    return loss_lib.multi_positive_loss(out["image"], batch["crop_labels"].to(out["image"].device), args.temperature)


def image_text(out, batch, args):
    """CLIP's image-text loss, text -> image uniform over the caption's m images."""
    device = out["image_text"].device
    return loss_lib.image_text_loss(out["image_text"], out["text"], batch["image_labels"].to(device),
                                    batch["caption_labels"].to(device), out["logit_scale"])


def clamp_logit_scale(model, optimizer, position, args):
    """CLIP and StableRep+, after every step: the logit scale stays in [0, 4.6052] (the official cap)."""
    model.clamp_logit_scale()


def online_encoder(model):
    """The encoder that encoder.pth exports: the one trained by gradient (StableRep's f, MoCo v3's base encoder,
    BYOL's online encoder, MAE's encoder)."""
    return model.visual


class StepPosition(NamedTuple):
    """Where a step sits in the run, for the hooks' schedules."""
    step: int  # optimiser steps done before this one
    steps_per_epoch: int
    total_steps: int

    @property
    def epoch(self):
        return self.step // self.steps_per_epoch


# the defaults of the flags that depend on --loss: the paper's ViT-B/16 recipe
STABLEREP_RECIPE = {"captions_per_gpu": 43, "base_lr": 2e-4, "weight_decay": 0.1, "betas": (0.9, 0.98),
                    "crop_scale": (0.08, 1.0), "temperature": 0.1, "head_hidden_dim": 4096, "embed_dim": 256,
                    "schedule": "cc12m-1x"}


class Objective(NamedTuple):
    images_per_caption: int  # m by default
    crops_per_image: int  # c by default
    head: bool  # the projection head h (image_mlp) of the multi-positive loss
    text: bool  # the text tower, the image projection and the logit scale of the image-text loss
    terms: Tuple[Callable, ...]  # summed into the loss
    build: Optional[Callable] = None  # the model from args; None: StableRepModel with the head / text tower above
    recipe: dict = STABLEREP_RECIPE  # defaults of the flags that depend on --loss
    reads: Tuple[str, ...] = ()  # the objective-dependent flags it reads beyond its recipe's (OBJECTIVE_FLAGS)
    lr_divisor: Tuple[str, int] = ("crops", 512)  # lr = base-lr x crops (or images) per step / this
    lr_schedule: Optional[Callable] = None  # lr(step, total_steps, warmup_steps, peak); None: cosine_lr
    views: Optional[tuple] = None  # an augment.View per crop (None: SimCLR's for all c)
    local_crops: Optional[Callable] = None  # args -> data.LocalCrops or None (DINO's small crops)
    noise: Optional[Callable] = None  # uniform draws per crop the model takes (args -> count)
    check: Optional[Callable] = None  # args -> None, UserError for flags of the objective that cannot go together
    exported: Callable = online_encoder  # the encoder written to encoder.pth
    before_step: Tuple[Callable, ...] = ()  # hooks before the forward pass
    after_backward: Tuple[Callable, ...] = ()  # hooks on the (unscaled) gradients before the optimiser step
    after_step: Tuple[Callable, ...] = ()  # hooks after the optimiser step
    monitor: Optional[Callable] = None  # (model, out, position, args) -> scalars for log.jsonl: collapse signals


HEAD_FLAGS = ("head_batchnorm",)  # a projection head's, beside the recipe's head_hidden_dim and embed_dim
TEXT_FLAGS = ("text_width", "text_layers", "text_heads", "context_length", "tokenizer")  # the text tower's
# StableRep's recipe without what CLIP does not read (no projection head, a learnt logit scale for a temperature)
CLIP_RECIPE = {k: v for k, v in STABLEREP_RECIPE.items() if k not in ("temperature", "head_hidden_dim", "embed_dim")}
OBJECTIVES = {
    "stablerep": Objective(6, 1, head=True, text=False, terms=(caption_positives,), reads=HEAD_FLAGS),
    "simclr": Objective(1, 2, head=True, text=False, terms=(crop_positives,), reads=HEAD_FLAGS),
    "clip": Objective(1, 1, head=False, text=True, terms=(image_text,), recipe=CLIP_RECIPE, reads=TEXT_FLAGS,
                      after_step=(clamp_logit_scale,)),
    "stablerep+": Objective(6, 1, head=True, text=True, terms=(caption_positives, image_text),
                            reads=HEAD_FLAGS + TEXT_FLAGS, after_step=(clamp_logit_scale,)),
    "mocov3": Objective(1, 2, head=False, text=False, terms=(mocov3.loss_term,), build=mocov3.build,
                        recipe=mocov3.RECIPE, reads=HEAD_FLAGS, lr_divisor=("images", 256), views=mocov3.VIEWS,
                        before_step=(mocov3.update_momentum_encoder,), monitor=mocov3.monitor),
    "byol": Objective(1, 2, head=False, text=False, terms=(byol.loss_term,), build=byol.build, recipe=byol.RECIPE,
                      reads=HEAD_FLAGS, lr_divisor=("images", 256), views=byol.VIEWS,
                      after_step=(byol.update_target_network,), monitor=byol.monitor),
    "dino": Objective(1, 2, head=False, text=False, terms=(dino.loss_term,), build=dino.build, recipe=dino.RECIPE,
                      lr_divisor=("images", 256), views=dino.VIEWS, local_crops=dino.local_crops,
                      noise=dino.noise_per_crop, check=dino.check_args, lr_schedule=dino.learning_rate,
                      exported=dino.teacher_encoder,
                      before_step=(dino.schedules,), after_backward=(dino.clip_and_cancel_gradients,),
                      after_step=(dino.update_teacher,), monitor=dino.monitor),
    "mae": Objective(1, 1, head=False, text=False, terms=(mae.loss_term,), build=mae.build, recipe=mae.RECIPE,
                     lr_divisor=("images", 256), views=mae.VIEWS, noise=mae.noise_per_crop, check=mae.check_args,
                     monitor=mae.monitor),
}
FAMILIES = ("mocov3", "byol", "dino", "mae")  # the paper's first question: each takes one image of a caption
COMMON_RECIPE = {"captions_per_gpu", "base_lr", "weight_decay", "betas", "crop_scale", "epochs", "warmup_epochs",
                 "schedule"}  # every objective reads these (--schedule: check_family_flags)


def flags_read(objective):
    """The objective-dependent flags an objective reads: its recipe's and its `reads`."""
    return (set(objective.recipe) - COMMON_RECIPE) | set(objective.reads)


# flags that only some objectives read: given for another objective, they are refused (check_family_flags)
OBJECTIVE_FLAGS = set().union(*(flags_read(objective) for objective in OBJECTIVES.values()))


def fill_recipe(args):
    """The defaults that depend on --loss: the objective's m and c, and its recipe for every flag left at None
    (a resumed run's recorded values are never None, so they stay). Returns args."""
    objective = OBJECTIVES[args.loss]
    args.images_per_caption = args.images_per_caption or objective.images_per_caption
    args.crops_per_image = args.crops_per_image or objective.crops_per_image
    for key, value in objective.recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, follow_size(key, value, args) if args.loss in FAMILIES else value)
    if args.loss not in FAMILIES:
        schedule_epochs, schedule_warmup = SCHEDULES[args.schedule]
        args.epochs = schedule_epochs if args.epochs is None else args.epochs
        args.warmup_epochs = schedule_warmup if args.warmup_epochs is None else args.warmup_epochs
    return args


# a family's head and decoder widths that follow the encoder's width below ViT-S (the official codes keep them at
# every size they publish, ViT-S to ViT-L): x width / 768, the ViT-B recipe's ratio; DINO's local crop size follows
# --image-size where 96 pixels do not fit (96 / 224 of it, in whole patches)
SIZE_FOLLOWS_WIDTH = ("head_hidden_dim", "out_dim", "decoder_width")
SMALLEST_OFFICIAL_WIDTH, RECIPE_WIDTH, RECIPE_IMAGE_SIZE = VIT_SIZES["vit_small"][0], VIT_SIZES["vit_base"][0], 224


def follow_size(key, value, args):
    """The recipe's `value` of `key` for this --model and --image-size: the recipe's own at ViT-S and up (ViT-B/224,
    the paper's, included) and wherever it fits; scaled down for a ViT-Ti, and DINO's local crops for small
    images. Flags given on the command line are never changed (fill_recipe calls this for those left at None)."""
    width = VIT_SIZES[args.model][0]
    if key in SIZE_FOLLOWS_WIDTH and width < SMALLEST_OFFICIAL_WIDTH:
        return max(16, round(value * width / RECIPE_WIDTH))
    if key == "local_crop_size" and value >= args.image_size:
        patch = args.patch_size
        return max(patch, patch * round(args.image_size * value / RECIPE_IMAGE_SIZE / patch))
    return value


def check_args(args):
    """Fill the defaults that depend on other flags, and stop with one line on a combination that cannot work;
    reads and writes nothing."""
    objective = OBJECTIVES[args.loss]
    check_family_flags(args)
    fill_recipe(args)
    if not args.data:
        raise UserError("the following arguments are required: --data (unless --resume reads it from a checkpoint)")
    if args.resume and args.init_from:
        raise UserError("--resume continues a run and --init-from starts a new one: give one of them")
    if args.images_per_caption * args.crops_per_image * args.captions_per_gpu < 2:
        raise UserError("a contrastive batch needs at least two images per GPU")
    if args.crop_scale[0] > args.crop_scale[1]:
        raise UserError(f"--crop-scale {args.crop_scale[0]:g} {args.crop_scale[1]:g} must satisfy MIN <= MAX")
    if args.image_size % args.patch_size:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the patch size {args.patch_size} "
                        "(--patch-size)")
    if args.gpu_decode and not args.gpu_augment:
        raise UserError("--gpu-decode goes with --gpu-augment (the device then crops and augments what it decodes)")
    if objective.text and args.text_width % args.text_heads:
        raise UserError(f"--text-width {args.text_width} is not divisible by --text-heads {args.text_heads}")
    if args.loss in FAMILIES:
        check_family_args(args, objective)
    local = [spec for spec in args.data if not dataindex.is_streamed(spec)]
    repeated = sorted({spec for spec in local if local.count(spec) > 1})
    if repeated:
        raise UserError(f"--data names {repeated[0]} more than once (its captions would be counted twice)")
    if args.folder_list and not any(spec.lower().endswith(".csv") for spec in args.data):
        raise UserError("--folder-list goes with a --data CSV of (image path, caption)")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a file, not a folder")
    check_creatable(args.output)
    check_loggers(args.tensorboard, args.wandb)


def check_family_flags(args):
    """A flag typed on the command line that only other objectives read would do nothing: one line naming it (and,
    for a resumed run, where its --loss comes from). Settings a checkpoint recorded are never blamed: only the flags
    of this command line (args.flags_given; without it, those that differ from their defaults). --schedule names
    StableRep's."""
    unread = OBJECTIVE_FLAGS - flags_read(OBJECTIVES[args.loss])
    given = getattr(args, "flags_given", None)
    if given is None:  # main called directly: the values that are not the defaults
        defaults = vars(get_args_parser().parse_args(["--data", "x"]))
        given = {key for key in unread if getattr(args, key) != defaults[key]}
    for key in sorted(unread & set(given)):
        owners = "/".join(name for name, objective in OBJECTIVES.items() if key in flags_read(objective))
        where = " (the loss the resumed checkpoint records)" if args.resume and "loss" not in given else ""
        raise UserError(f"--{key.replace('_', '-')} is {owners}'s: it does nothing for --loss {args.loss}{where}")
    if args.loss in FAMILIES and args.schedule is not None:
        raise UserError(f"--schedule names the official StableRep README's schedules; --loss {args.loss} takes "
                        "--epochs and --warmup-epochs")


def check_family_args(args, objective):
    """What a self-supervised family cannot take."""
    if args.images_per_caption != 1:
        raise UserError(f"--loss {args.loss} takes one image of each caption a step (its instances are images): "
                        f"--images-per-caption 1, not {args.images_per_caption}")
    if args.crops_per_image != objective.crops_per_image:
        raise UserError(f"--loss {args.loss} takes {objective.crops_per_image} crop(s) of each image (its views), "
                        f"not --crops-per-image {args.crops_per_image}")
    if args.init_from:
        raise UserError(f"--init-from starts StableRep's objectives from other weights; --loss {args.loss} starts "
                        "from random weights, as its paper does")
    if args.gpu_decode:
        raise UserError(f"--gpu-decode crops every JPEG at --image-size with bilinear resampling on the device; "
                        f"--loss {args.loss}'s views are drawn in the loader (their own resampling, DINO's local "
                        "crops): leave --gpu-decode off")
    if objective.check:
        objective.check(args)


def absolute_paths(args):
    """Local --data and --folder-list paths made absolute (URLs kept), so a run records where its data is and can
    be resumed from any folder."""
    if args.data:
        args.data = [spec if dataindex.is_streamed(spec) else os.path.abspath(spec) for spec in args.data]
    if args.folder_list:
        args.folder_list = [os.path.abspath(root) for root in args.folder_list]


def scaled_lr(base_lr, images_per_step):
    """The official scaling rule: base_lr x images per step / 512 (main_stablerep.py's `blr x batch x n_img / 256
    x num_crop / 2`, which is this for every objective). The paper's 2e-4 at 8256 images a step: 3.225e-3."""
    return base_lr * images_per_step / 512


def objective_lr(objective, base_lr, images_per_step, crops_per_image):
    """(lr, its arithmetic for the start line): StableRep's rule over crops (scaled_lr's / 512), or the families'
    linear scaling rule lr = base_lr x images per step / 256 (main_moco.py, main_dino.py, main_pretrain.py: their
    batch counts images, not crops)."""
    unit, divisor = objective.lr_divisor
    batch = images_per_step if unit == "crops" else images_per_step // crops_per_image
    lr = base_lr * batch / divisor
    return lr, f"{base_lr:g} x {batch} {unit} / {divisor} = {lr:.4g}"


def cosine_lr(step, total_steps, warmup_steps, peak_lr):
    """The official schedule (util/misc.py `adjust_learning_rate`, called at the fractional epoch of every step):
    linear from 0 at step 0 to peak_lr at warmup_steps, then half a cosine down to 0 at total_steps. With
    warmup_steps = warmup epochs x steps per epoch, unrounded, this is `lr x epoch / warmup_epochs`, then
    `lr x (1 + cos(pi (epoch - warmup_epochs) / (epochs - warmup_epochs))) / 2`, at epoch = step / steps per epoch."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps) if total_steps > warmup_steps else 1.0
    return 0.5 * peak_lr * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------

def main(args):
    # ---- arguments (and, when resuming, the run's recorded recipe) ----
    absolute_paths(args)
    resumed = resume.read_resume_checkpoint(args, get_args_parser(), RESUMABLE_FLAGS, NEVER_RESTORED)
    check_args(args)
    run_id = checkpoints.check_output(args, resumed, RUN_FILES)
    with output_folder(args.output, scratch=(INDEX_CACHE,)):  # a launch refused before its first write leaves
        train(args, resumed, run_id)                           # no folder behind (an index it built included)


def train(args, resumed, run_id):
    """The run itself, once its arguments and --output are checked: nothing is written to --output until the data
    has given its first batch."""
    objective = OBJECTIVES[args.loss]

    # ---- distributed ----
    device = distributed.init_distributed()
    world_size, rank, is_main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    images_per_step = args.captions_per_gpu * args.images_per_caption * args.crops_per_image * world_size
    if resumed:
        resume.check_same_global_batch(resumed, images_per_step, world_size)
    torch.manual_seed(args.seed)

    # ---- data ----
    tokenizer = load_tokenizer(args.tokenizer) if objective.text else None
    dataset, sampler, loader = build_data(args, tokenizer, world_size, rank, device)
    total_steps = sampler.steps_per_epoch * args.epochs  # the schedule's length, with or without --max-steps
    last_step = min(total_steps, args.max_steps or total_steps)  # where this launch stops
    warmup_steps = args.warmup_epochs * sampler.steps_per_epoch  # fractional, as the official epoch counter
    lr, lr_arithmetic = objective_lr(objective, args.base_lr, images_per_step, args.crops_per_image)
    lr_schedule = objective.lr_schedule or cosine_lr

    # ---- model ----
    model_without_ddp, model = distributed.data_parallel(build_model(args, tokenizer).to(device), device)
    forward = torch.compile(model) if args.compile else model

    # ---- optimiser and schedule ----
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=lr,
                                  betas=tuple(args.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    # ---- resume, or initialise from other weights ----
    step = resume.restore(resumed, args, model_without_ddp, optimizer, scaler, sampler, is_main)
    if step >= last_step:  # trained to the end (or the cap): only the finish may be missing (killed while writing it)
        if is_main:
            checkpoints.finish_trained_run(objective.exported(model_without_ddp), args, step, total_steps,
                                           images_per_step, resumed["state"].get("loss"))
        return distributed.leave()
    if is_main:
        local = (f" (+ {args.captions_per_gpu * args.local_crops * world_size} local crops of {args.local_crop_size} "
                 "px)" if args.loss == "dino" and args.local_crops else "")  # DINO's small crops, beside the views
        print(f"{len(dataset)} captions; {images_per_step} images a step = {args.captions_per_gpu} captions x "
              f"{args.images_per_caption} images x {args.crops_per_image} crops x {world_size} process(es){local}; "
              f"lr = {lr_arithmetic}; {args.epochs} epochs = {total_steps} "
              f"steps ({sampler.steps_per_epoch} per epoch, {warmup_steps:g} warmup); {precision} on {device}"
              + (f"; resumed at step {step}" if step else ""))
        print(data.describe_loader(args.workers, args.captions_per_gpu, args.images_per_caption, args.crops_per_image,
                                   args.image_size, args.gpu_augment, on_gpu=device.type == "cuda"))
        if last_step < total_steps:
            print(f"--max-steps {args.max_steps}: stopping after step {last_step} of the {total_steps}-step schedule; "
                  f"lr (warmup to step {warmup_steps:g}, then cosine decay), momenta and temperatures are those of "
                  "the whole run, so these steps are its first ones and --resume (without --max-steps) continues it")
        if warmup_steps >= total_steps:
            print(f"note: the warmup ({warmup_steps:g} steps) is as long as the whole run ({total_steps} steps): the "
                  "learning rate never decays; lower --warmup-epochs", file=sys.stderr)

    # ---- the first batch: data that cannot be read is refused before anything is written ----
    batches = training_batches(loader, sampler, step, last_step)
    with data_errors_as_one_line(args):
        first_batch = next(batches)

    # ---- output ----
    log = None
    if is_main:
        atomic_write_json(os.path.join(args.output, "run.json"),
                          {"args": vars(args), "run_id": run_id, "git_commit": git_commit(), "world_size": world_size,
                           "torch": torch.__version__, "images_per_step": images_per_step, "lr": lr,
                           "total_steps": total_steps, "max_steps": args.max_steps,
                           "resumed_from": resumed["path"] if resumed else None})
        log = RunLog(args.output, step, tensorboard=args.tensorboard, wandb_project=args.wandb, config=vars(args),
                     progress=None if args.quiet else Progress(last_step, sampler.steps_per_epoch, step))

    # ---- loop ----
    start_time, start_step, last_saved = time.time(), step, step
    loss_value, corrupt = float("nan"), 0
    model.train()
    with checkpoints.interrupts_as_one_line(lambda: step, lambda: last_saved, log), data_errors_as_one_line(args), \
            checkpoints.stop_at_step_boundary() as preemption:
        for epoch, batch in itertools.chain([first_batch], batches):
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(step, total_steps, warmup_steps, lr)
            position = StepPosition(step, sampler.steps_per_epoch, total_steps)
            for hook in objective.before_step:
                hook(model_without_ddp, optimizer, position, args)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss, out = compute_loss(forward, batch, objective, args, device)
            logged = log is not None and ((step + 1) % args.log_every == 0 or step + 1 == last_step)
            watched = objective.monitor(model_without_ddp, out, position, args) if logged and objective.monitor else {}
            del out  # the outputs (DINO's: [N, 10, 65536]) are not kept through the next step
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at step {step} (epoch {epoch}); stopping")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if objective.after_backward:
                scaler.unscale_(optimizer)
                for hook in objective.after_backward:
                    hook(model_without_ddp, optimizer, position, args)
            scaler.step(optimizer)
            scaler.update()
            for hook in objective.after_step:
                hook(model_without_ddp, optimizer, position, args)
            step += 1
            loss_value, corrupt = loss.item(), corrupt + batch["corrupt"]
            if logged:
                log.write(step, epoch=step / sampler.steps_per_epoch,  # epochs done, as the progress line says
                          loss=loss_value, lr=optimizer.param_groups[0]["lr"],
                          images=(step - start_step) * images_per_step, corrupt_images=corrupt,
                          logit_scale=(model_without_ddp.logit_scale.exp().item() if objective.text else None),
                          **watched)
            stopping = step < last_step and preemption.due(device)  # SIGTERM or SIGUSR1: save, then stop
            if stopping or checkpoints.checkpoint_due(step, last_step, sampler.steps_per_epoch, args.save_every):
                data_state = sampler.state_dict()  # streams: every rank's positions (a collective)
                if is_main:
                    checkpoints.save_training_state(model_without_ddp, optimizer, scaler, step, world_size, args,
                                                    run_id, loss_value, data_state)
                last_saved = step
            if stopping:
                if is_main:
                    log.close()
                    print(f"\npretrain.py: {preemption.name()} at step {step}: saved "
                          f"{checkpoints.checkpoint_path(args.output, step)}; rerun the same command with --resume to "
                          "continue", file=sys.stderr)
                distributed.leave()
                sys.exit(130)

        # ---- finish: a step like the others, repeated by --resume until it is done ----
        if is_main:
            log.close()
            elapsed = time.time() - start_time
            summary = checkpoints.summary_of(step, images_per_step, step - start_step, elapsed, loss_value, corrupt)
            checkpoints.finish(objective.exported(model_without_ddp), args, summary)
            print(f"done: {step} steps, {step * images_per_step} images seen, {elapsed:.0f}s this run, final loss "
                  f"{loss_value:.4f}; encoder in {os.path.join(args.output, 'encoder.pth')}")
    distributed.leave()


def training_batches(loader, sampler, step, last_step):
    """(epoch, batch) from `step` to `last_step` (the run's end, or --max-steps), epoch after epoch."""
    while step < last_step:
        epoch, step_in_epoch = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, start_step=step_in_epoch)
        for batch in loader:
            yield epoch, batch
            step += 1
            if step == last_step:
                return


@contextlib.contextmanager
def data_errors_as_one_line(args):
    """Data with no readable image, raised here or in a loader worker, ends the run as one line."""
    try:
        yield
    except data.UnreadableData as err:
        raise UserError(f"{raised_message(err)} in --data {' '.join(args.data)}; check that its images decode (e.g. "
                        "open a few with PIL)") from None


# ------------------------------------------------------------------------------------------------------------
# data, model, loss
# ------------------------------------------------------------------------------------------------------------

def build_data(args, tokenizer, world_size, rank, device):
    """(dataset, sampler, loader): random access through the cached index, or a stream of webdataset URLs. The
    sampler yields this rank's captions of each step; it knows steps_per_epoch and takes set_epoch."""
    views = dict(images_per_caption=args.images_per_caption, crops_per_image=args.crops_per_image,
                 image_size=args.image_size, seed=args.seed, tokenizer=tokenizer, context_length=args.context_length,
                 crop_scale=args.crop_scale, downsample_prob=args.downsample_prob,
                 downsample_res=args.downsample_res, augment_on_device=args.gpu_augment,
                 decode_on_device=args.gpu_decode, **family_crops(args))
    streamed = [spec for spec in args.data if dataindex.is_streamed(spec)]
    if streamed:  # webdataset URLs dealt to the workers' streams, an epoch of --stream-captions captions
        if len(streamed) < len(args.data):
            raise UserError(f"--data mixes streamed URLs ({streamed[0]}) with local data: stream all or none")
        if not args.stream_captions:
            raise UserError("streamed --data needs --stream-captions N (the captions of an epoch)")
        try:
            dataset = data.CaptionShardStream(args.data, args.stream_captions, args.captions_per_gpu, rank=rank,
                                              world_size=world_size, workers=args.workers,
                                              shuffle_buffer=args.shuffle_buffer, mix=args.stream_mix, **views)
        except ValueError as err:  # a brace pattern of too many names, or unbalanced braces
            raise UserError(str(err)) from None
        sampler = dataset  # its own epoch schedule (set_epoch, steps_per_epoch); fresh workers copy it each epoch
        loader = data.StreamLoader(dataset, **data.loader_options(args.workers, device.type == "cuda"))
    else:  # random access through the cached index, built once by each node's first process
        builder = int(os.environ.get("LOCAL_RANK", 0)) == 0
        if world_size > 1 and not builder:
            torch.distributed.barrier()
        try:
            dataset = data.CaptionImagesDataset(args.data, folder_list=args.folder_list, build_index=builder,
                                                fallback_cache=os.path.join(args.output, INDEX_CACHE), **views)
        except ValueError as err:
            raise UserError(str(err)) from None
        if world_size > 1 and builder:
            torch.distributed.barrier()
        fewest, fewest_count = dataset.fewest_images()
        if fewest_count < args.images_per_caption:
            raise UserError(f"--images-per-caption {args.images_per_caption} is more than "
                            f"{dataset.describe(fewest)} has: {fewest_count} image(s)")
        sampler = data.CaptionSampler(len(dataset), args.captions_per_gpu, rank, world_size, args.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate,
                                             persistent_workers=args.workers > 0,
                                             **data.loader_options(args.workers, device.type == "cuda"))
    if sampler.steps_per_epoch < 1:
        raise UserError(f"{len(dataset)} captions are fewer than one step needs "
                        f"({args.captions_per_gpu} per GPU x {world_size} GPUs)")
    if rank == 0:
        for note in dataset.notes:  # damaged or empty shards, CSV rows skipped, mixed settings, too few shards
            print(f"note: {note}", file=sys.stderr)
    return dataset, sampler, loader


def family_crops(args):
    """The dataset's arguments for an objective's own crops: a View per crop, DINO's local crops, the model's
    noise per crop (none for StableRep's objectives: their data path is the same as before the families)."""
    objective = OBJECTIVES[args.loss]
    crops = {}
    if objective.views:
        crops["views"] = objective.views
    changes = {} if args.color_augment else {"jitter_p": 0.0, "gray_p": 0.0, "solarize_p": 0.0}
    if tuple(args.blur_sigma) != augment.BLUR_SIGMA:
        changes["blur_sigma"] = tuple(args.blur_sigma)
    if changes:  # --blur-sigma, --no-color-augment: every view changed alike, the local crops' too
        crops["views"] = tuple(view._replace(**changes)
                               for view in crops.get("views") or (augment.View(),) * args.crops_per_image)
    if objective.local_crops:
        crops["local"] = objective.local_crops(args)
        if crops["local"] is not None and changes:
            crops["local"] = crops["local"]._replace(view=crops["local"].view._replace(**changes))
    if objective.noise:
        crops["noise_per_crop"] = objective.noise(args)
    return crops


def build_model(args, tokenizer=None):
    """The encoder with the parts the objective needs (OBJECTIVES: the head, the text tower; a family's own). The
    objective's recipe fills the flags left at None first (fill_recipe), for callers that parse the flags alone."""
    objective = OBJECTIVES[fill_recipe(args).loss]
    if objective.build:
        return objective.build(args)
    visual = model_lib.build_vit(args.model, image_size=args.image_size, patch_size=args.patch_size,
                                  depth=args.depth)
    image_mlp = model_lib.ProjectionHead(visual.width, args.head_hidden_dim, args.embed_dim) if objective.head else None
    text = (model_lib.TextTransformer(len(tokenizer), tokenizer.eos_token_id, args.context_length, args.text_width,
                                      args.text_layers, args.text_heads) if objective.text else None)
    return model_lib.StableRepModel(visual, image_mlp, text, head_batchnorm=args.head_batchnorm)


def compute_loss(model, batch, objective, args, device):
    """(the sum of the objective's loss terms on one batch from data.collate, the model's outputs)."""
    images = batch["images"].to(device, non_blocking=True)
    views = len(batch["image_labels"]) // len(batch["caption_labels"])  # m images x c crops of each caption
    if batch["jpegs"] is not None:  # --gpu-decode: the JPEGs decoded and cropped on the device, next to the rest
        images, failed = decode_crops(images, batch["jpegs"], len(batch["image_labels"]), views)
        batch["corrupt"] += failed
    if batch["color"] is not None:  # --gpu-augment: uint8 crops [N, S, S, 3] -> float [N, 3, S, S], on the device
        images = augment_crops(images, batch["color"])
    inputs = {"views": views}  # m images x c crops of each caption, caption-major
    if batch["tokens"] is not None:
        inputs["tokens"] = batch["tokens"].to(device, non_blocking=True)
    if batch.get("local_images") is not None:  # DINO's local crops
        local = batch["local_images"].to(device, non_blocking=True)
        color = batch["local_color"]
        inputs["local_images"] = augment_crops(local, color) if color is not None else local
    for key in ("noise", "local_noise"):  # the crops' draws for the model's own random choices
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    out = model(images, **inputs)
    return sum(term(out, batch, args) for term in objective.terms), out


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and embeddings, none on biases, norm weights and the logit scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# the run's edges
# ------------------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    run(main, get_args_parser(), args=command_line)
