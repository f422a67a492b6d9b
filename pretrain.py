"""Pretrain a ViT on synthetic images: StableRep and the paper's baselines from one script.

    python pretrain.py --data synthetic/cc3m --output runs/stablerep                  # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 pretrain.py --data synthetic/cc3m --output runs/stablerep
    python pretrain.py --output runs/stablerep --resume                             # continue, same recipe

Objectives (--loss), one row each of OBJECTIVES below:
    stablerep   multi-positive contrastive loss over caption ids (Eq. 2-4), m images per caption
    simclr      the same loss, positives = the c crops of one image (m = 1, c = 2)
    clip        image-text contrastive loss with a CLIP-style text transformer
    stablerep+  the multi-positive image loss + the image-text loss (text -> image uniform over the m images)
    mocov3      MoCo v3: symmetrised InfoNCE of predictor queries against a momentum encoder's keys (ViT recipe)
    byol        BYOL: the online predictor regresses the momentum target network's projection of the other view
    dino        DINO: a student matches its momentum teacher's centred, sharpened softmax across multi-crop views
    mae         MAE: reconstruct the pixels of the 75% of patches removed before the encoder

The defaults are the paper's ViT-B/16 recipe as the official code runs it (FIDELITY.md lists every item): per
GPU 43 captions x 6 images, as on each of its 32 GPUs (8256 images a step); lr = 2e-4 x images per step / 512;
the CC12M "1x" schedule (15 epochs, 0.5 warmup); the head's BatchNorm once per view. The four self-supervised
families of the paper's first question (Sec. 2) default to their own official ViT-B recipes, each with its own
augmentation, and take one image of each caption a step; encoder.pth is the encoder their authors evaluate
(MoCo v3's base encoder, BYOL's online one, DINO's teacher, MAE's encoder).

--data takes generate.py's output (a folder tree or tar shards), img2dataset's `files` or `webdataset` output,
tar paths and brace patterns, the official CSV with --folder-list, or streamed webdataset URLs; see README.md.
A resumed run (--resume) takes its recipe from its checkpoint: only flags that do not change the training
(workers, logging, checkpoint cadence) may differ, and a different global batch is refused.
"""
import argparse
import contextlib
import glob
import itertools
import json
import math
import os
import signal
import sys
import time
from typing import Callable, NamedTuple, Optional, Tuple

from util.catalog import VIT_SIZES
from util.cli import (
    SEED,
    ArgumentParser,
    UserError,
    available_cpus,
    first_line,
    git_commit,
    integer,
    lazy_import,
    number,
    raised_message,
    run,
)
from util.files import atomic_open, atomic_write_json, check_creatable, output_folder
from util.runlog import Progress, RunLog, check_loggers
from util.tokenizer import load_tokenizer

torch = lazy_import("torch")  # torch and our torch-based modules load at first use: --help answers at once
augment = lazy_import("augment")
data = lazy_import("data")
dataindex = lazy_import("util.dataindex")
distributed = lazy_import("util.distributed")
loss_lib = lazy_import("loss")
model_lib = lazy_import("model")

CHECKPOINT_GLOB = "checkpoint-*.pth"
# what a run writes in --output besides its checkpoints: a folder holding any of them holds a run
RUN_FILES = ("run.json", "log.jsonl", "summary.json", "encoder.pth", "tensorboard", "wandb-run-id", "wandb")
INDEX_CACHE = "index-cache"  # --output's copy of the data index, when the data's own folder is read-only
# the official README's schedules: name -> (epochs, warmup epochs); "1x" is the paper's 35 epochs of 2 views
SCHEDULES = {
    "cc12m-1x": (15, 0.5), "cc12m-2x": (31, 1.0), "cc12m-3x": (46, 1.5),
    "redcaps-1x": (13, 0.45), "redcaps-2x": (27, 0.9), "redcaps-3x": (40, 1.35),
}
# flags a resumed run may change: they do not change what is trained (the rest must stay as the checkpoint says)
RESUMABLE_FLAGS = {"workers", "log_every", "save_every", "keep", "compile", "tensorboard", "wandb", "output",
                   "gpu_augment", "gpu_decode"}
NEVER_RESTORED = {"resume", "init_from", "flags_given", "quiet"}  # about this launch, not the run


def get_args_parser():
    parser = ArgumentParser("pretrain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- data ----
    parser.add_argument("--data", nargs="+", default=None,
                        help="one or more sources, read at random through a cached index: a folder of generate.py "
                             "(tree or tar shards), img2dataset's --output_format files or webdataset folder, tar "
                             "paths or a brace pattern (shards/{00000..00123}.tar), or the official CSV of (image "
                             "path, caption) with --folder-list; or streamed: webdataset URLs (pipe:..., http(s)://, "
                             "gs://, patterns too), shuffled per shard (see --stream-captions). Required, except "
                             "with --resume, which reads it from the checkpoint")
    parser.add_argument("--folder-list", nargs="+", default=None, metavar="ROOT",
                        help="image roots of a --data CSV, one per seed (the official --folder_list): an item opens "
                             "the row's relative path under m roots drawn without replacement")
    parser.add_argument("--stream-captions", type=integer(1), default=None,
                        help="captions in an epoch of streamed --data URLs (required for them: a stream cannot be "
                             "counted in advance; generate.py's settings.json says captions_used, img2dataset's "
                             "stats say successes)")
    parser.add_argument("--shuffle-buffer", type=integer(1), default=500,
                        help="samples each loader worker holds to shuffle streamed shards (500: about 125 MB of "
                             "10 JPEGs of 256 px per caption; more mixes better and costs memory)")
    parser.add_argument("--stream-mix", type=integer(1), default=4,
                        help="streamed shards each loader worker reads at once, taking each next sample from one of "
                             "them at random: a batch mixes about this many shards (1: one shard after another, as a "
                             "plain webdataset pipeline; each one more is one more open stream per worker)")
    parser.add_argument("--images-per-caption", type=integer(1), default=None,
                        help="m, images of a caption in the batch, drawn without replacement (paper: 6 of the 10 "
                             "generated; more positives per caption help). Default: the objective's (see --loss)")
    parser.add_argument("--crops-per-image", type=integer(1), default=None,
                        help="c, augmented crops of each image (paper: 1 for StableRep; SimCLR: 2). Default by --loss")
    parser.add_argument("--crop-scale", type=number(above=0, maximum=1), nargs=2, default=None,
                        metavar=("MIN", "MAX"),
                        help="area fraction RandomResizedCrop keeps (DINO: of its global crops); tiny images need "
                             "larger crops. Default by --loss: " + recipe_values("crop_scale"))
    parser.add_argument("--downsample-prob", type=number(0, 1), default=0.0,
                        help="probability that the whole image is resized down to a shorter side drawn from "
                             "--downsample-res and back up before the crop; the official README's command uses 0.05 "
                             "(--downsample-prob 0.05 with the default --downsample-res reproduces it). Default 0, "
                             "off: the official README's own table scores it lower on the ImageNet linear probe "
                             "without BN, CC12M 1x 72.8 without vs 71.4 with, 3x 75.7 vs 75.4, RedCaps 1x 73.7 vs "
                             "73.4 (with BN: equal or lower)")
    parser.add_argument("--downsample-res", type=integer(8), nargs="+", default=(64, 128), metavar="PIXELS",
                        help="shorter sides --downsample-prob picks from, uniformly (official: 64 128)")
    parser.add_argument("--gpu-augment", action="store_true",
                        help="run the colour jitter, grayscale, blur, flip and normalisation batched on the training "
                             "device: the loader workers then only decode, crop and resize, and ship uint8 crops (4x "
                             "smaller than float) with each crop's drawn parameters. For when the CPU cores cannot "
                             "feed the GPU (bench/bench_data.py prints the cost per image of both shares). Same "
                             "distribution and the same draws as without it, so resume stays exact. Not the "
                             "default: its results equal the CPU path's exactly on a CPU only (a GPU's kernels round "
                             "differently), and it has not yet been timed on a GPU (bench/gpu_report.py)")
    parser.add_argument("--gpu-decode", action="store_true",
                        help="with --gpu-augment, decode the JPEGs on the training device too (torchvision's batched "
                             "decode_jpeg: nvJPEG on a GPU): the loader workers then only read each file, check its "
                             "header and end, and draw its crop, so a GPU needs far fewer CPU cores (bench/bench_data"
                             ".py); other formats are still decoded by the workers. Same draws; the pixels differ from "
                             "PIL's decode by rounding. Not yet run on a GPU (bench/gpu_report.py measures it)")
    parser.add_argument("--workers", type=integer(0), default=min(8, available_cpus()),
                        help="data-loading processes per GPU: 8, or the CPU cores this machine gives the process "
                             f"if fewer (here {min(8, available_cpus())})")
    # ---- model ----
    parser.add_argument("--model", default="vit_base", choices=list(VIT_SIZES), help="encoder (paper: vit_base)")
    parser.add_argument("--depth", type=integer(1), default=None,
                        help="transformer blocks, to shrink the encoder for quick runs (default: the size's own, 12)")
    parser.add_argument("--image-size", type=integer(16), default=224, help="crop size, a multiple of the patch "
                        "size 16 (paper: 224)")
    parser.add_argument("--head-hidden-dim", type=integer(1), default=None,
                        help="hidden width of the projection head (MoCo v3, BYOL: of projector and predictor; DINO: "
                             "of its MLP). Default by --loss: " + recipe_values("head_hidden_dim"))
    parser.add_argument("--embed-dim", type=integer(1), default=None,
                        help="embedding the loss compares (StableRep: of the multi-positive loss; MoCo v3, BYOL: "
                             "the projector's output; DINO: the head's bottleneck). Default by --loss: "
                             + recipe_values("embed_dim"))
    parser.add_argument("--head-batchnorm", default="per-view", choices=["per-view", "joint"],
                        help="per-view (official): the head runs once per view, so each BatchNorm batch holds one "
                             "image of every caption and its statistics never mix a caption's positives; joint: "
                             "one pass over all m x c images of the batch (one BN batch, cheaper on small batches). "
                             "MoCo v3's and BYOL's MLPs too: per-view is their official codes' (one view of every "
                             "image per BN batch)")
    parser.add_argument("--text-width", type=integer(1), default=512, help="text transformer width (CLIP: 512)")
    parser.add_argument("--text-layers", type=integer(1), default=12, help="text transformer depth (CLIP: 12)")
    parser.add_argument("--text-heads", type=integer(1), default=8, help="text transformer heads (CLIP: 8)")
    parser.add_argument("--context-length", type=integer(2), default=77,
                        help="text tokens; longer captions are cut (CLIP: 77)")
    parser.add_argument("--tokenizer", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="CLIPTokenizer for clip and stablerep+: a hub id or local folder, with or without a "
                             "tokenizer/ subfolder (default: the tokenizer of generate.py's Stable Diffusion)")
    # ---- objective ----
    parser.add_argument("--loss", default="stablerep", choices=list(OBJECTIVES), help="training objective (see above)")
    parser.add_argument("--temperature", type=number(above=0), default=None,
                        help="tau of the contrastive loss (StableRep's multi-positive loss, MoCo v3's InfoNCE) or "
                             "DINO's student temperature. Default by --loss: " + recipe_values("temperature"))
    # ---- the self-supervised families' own (each refused for the other objectives) ----
    parser.add_argument("--momentum", type=number(0, maximum=1), default=None,
                        help="MoCo v3, BYOL, DINO: start of the momentum of the momentum encoder / target network / "
                             "teacher, raised to 1 along a half cosine over the run (" + recipe_values("momentum")
                             + ": MoCo v3's --moco-m, BYOL's tau_base, DINO's --momentum_teacher)")
    parser.add_argument("--frozen-patch-embed", action=argparse.BooleanOptionalAction, default=None,
                        help="MoCo v3: keep the random patch projection untrained (its --stop-grad-conv1, on in every "
                             "ViT recipe of CONFIG.md: it stabilises training). Default on for mocov3")
    parser.add_argument("--out-dim", type=integer(1), default=None,
                        help="DINO: prototypes K of the head's weight-normalised last layer (main_dino.py: 65536)")
    parser.add_argument("--teacher-temperature", type=number(above=0), default=None,
                        help="DINO: the teacher's temperature after its warmup (main_dino.py: 0.04; above 0.07 is "
                             "unstable, says DINO)")
    parser.add_argument("--warmup-teacher-temperature", type=number(above=0), default=None,
                        help="DINO: the teacher's temperature at epoch 0, raised linearly per epoch to "
                             "--teacher-temperature over --warmup-teacher-temperature-epochs (main_dino.py: 0.04)")
    parser.add_argument("--warmup-teacher-temperature-epochs", type=integer(0), default=None,
                        help="DINO: epochs of the teacher temperature's warmup (main_dino.py: 0)")
    parser.add_argument("--weight-decay-end", type=number(0), default=None,
                        help="DINO: the weight decay rises from --weight-decay to this along a half cosine "
                             "(main_dino.py: 0.04 to 0.4; larger decay late helps ViTs, says DINO)")
    parser.add_argument("--clip-grad", type=number(0), default=None,
                        help="DINO: clip each parameter's gradient to this norm, parameter by parameter as its "
                             "utils.clip_gradients does; 0 = off (main_dino.py: 3.0)")
    parser.add_argument("--freeze-last-layer", type=integer(0), default=None,
                        help="DINO: epochs during which the head's last layer is not trained (main_dino.py: 1; it "
                             "helps the loss start to fall)")
    parser.add_argument("--drop-path", type=number(0, below=1), default=None,
                        help="DINO: stochastic depth rate of the student's last block, rising linearly from 0 at "
                             "the first (main_dino.py: 0.1)")
    parser.add_argument("--local-crops", type=integer(0), default=None,
                        help="DINO: local crops of each image beside its two global ones; 0 turns multi-crop off "
                             "(main_dino.py: 8)")
    parser.add_argument("--local-crop-scale", type=number(above=0, maximum=1), nargs=2, default=None,
                        metavar=("MIN", "MAX"), help="DINO: area fraction of the local crops (main_dino.py: 0.05 0.4)")
    parser.add_argument("--local-crop-size", type=integer(16), default=None,
                        help="DINO: local crop size in pixels, a multiple of 16 (main_dino.py: 96 at 224)")
    parser.add_argument("--mask-ratio", type=number(above=0, below=1), default=None,
                        help="MAE: fraction of each image's patches removed before the encoder (MAE: 0.75)")
    parser.add_argument("--decoder-width", type=integer(1), default=None,
                        help="MAE: width of the lightweight decoder (MAE's ViT-B: 512)")
    parser.add_argument("--decoder-depth", type=integer(1), default=None,
                        help="MAE: decoder blocks (MAE's ViT-B: 8)")
    parser.add_argument("--decoder-heads", type=integer(1), default=None,
                        help="MAE: decoder attention heads (MAE's ViT-B: 16)")
    parser.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="MAE: regress each patch's pixels standardised by the patch's own mean and variance "
                             "(MAE's recipe, PRETRAIN.md: better representations); default on for mae")
    # ---- optimisation ----
    parser.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                        help="the official StableRep README's schedules, epochs / warmup epochs: " + ", ".join(
                            f"{name} {epochs}/{warmup:g}" for name, (epochs, warmup) in SCHEDULES.items())
                        + ". Default cc12m-1x, the paper's main setting, for stablerep, simclr, clip and "
                          "stablerep+; --epochs / --warmup-epochs override it (the self-supervised families "
                          "take their own papers' epochs, see --epochs)")
    parser.add_argument("--epochs", type=integer(1), default=None,
                        help="passes over the captions (default: --schedule's; " + recipe_values("epochs") + ")")
    parser.add_argument("--warmup-epochs", type=number(0), default=None,
                        help="linear warmup per step, then cosine decay to 0 (default: --schedule's; "
                             + recipe_values("warmup_epochs") + ")")
    parser.add_argument("--captions-per-gpu", type=integer(1), default=None,
                        help="captions per GPU per step (paper: 43 x 6 images x 32 GPUs = 8256 images a step; the "
                             "families take one image of each caption, their official batch per GPU). Default by "
                             "--loss: " + recipe_values("captions_per_gpu"))
    parser.add_argument("--base-lr", type=number(0), default=None,
                        help="StableRep's official rule: lr = base-lr x images per step / 512, where images per step "
                             "= captions x m images x c crops x GPUs (the official `blr x batch x n_img / 256 x "
                             "num_crop / 2`: the same for StableRep, SimCLR and CLIP; paper: 2e-4, i.e. 3.225e-3 at "
                             "8256 images a step). The families scale by their own rule, lr = base-lr x images (not "
                             "crops) per step / 256. Default by --loss: " + recipe_values("base_lr"))
    parser.add_argument("--weight-decay", type=number(0), default=None,
                        help="AdamW weight decay, not on biases, norms or the logit scale (DINO: its start, see "
                             "--weight-decay-end). Default by --loss: " + recipe_values("weight_decay"))
    parser.add_argument("--betas", type=number(0, below=1), nargs=2, default=None,
                        help="AdamW betas. Default by --loss: " + recipe_values("betas"))
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="autocast: auto = bf16 on GPU, fp32 on CPU; fp16 adds a gradient scaler. The losses "
                             "compute in float32 whatever this says")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU, fixed shapes)")
    parser.add_argument("--seed", type=SEED, default=0, help="seeds the weights, the caption order and every crop")
    # ---- checkpoints and logs ----
    parser.add_argument("--output", default="runs/stablerep", help="folder for checkpoints, logs and the encoder")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run with its recorded recipe: alone, from the newest checkpoint in "
                             "--output; or from this file, ours or an official StableRep checkpoint (its recipe from "
                             "its args, its weights, AdamW moments and epoch; give --data: it does not say where its "
                             "images are)")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="start a new run (step 0, fresh optimiser) from these weights: an official StableRep or "
                             "StableRep+ checkpoint, one of ours, or a timm ViT state dict (encoder only); the parts "
                             "the file lacks (e.g. the text tower) keep their initialisation")
    parser.add_argument("--save-every", type=integer(1), default=1000,
                        help="checkpoint every N steps and at the end (and at an epoch's end when an epoch is at "
                             "least N steps); resume is exact from any of them")
    parser.add_argument("--keep", type=integer(1), default=2, help="checkpoints kept in --output (older ones are "
                        "deleted)")
    parser.add_argument("--log-every", type=integer(1), default=10,
                        help="steps between records of log.jsonl and progress lines on stdout (step, epoch, loss, "
                             "lr, images/s, time left; redrawn in place in a terminal, a line each in a batch log)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress lines: only the run's first line, notes and the final line (log.jsonl "
                             "is written all the same)")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                        help="TensorBoard event files in <output>/tensorboard (default: on when the tensorboard "
                             "package is installed)")
    parser.add_argument("--wandb", default=None, metavar="PROJECT",
                        help="also log to this Weights & Biases project (needs the wandb package; WANDB_MODE=offline "
                             "works without network)")
    return parser


# ---- objectives ----
# One row per objective: the views it takes when --images-per-caption / --crops-per-image are not given, the parts
# of the model it needs, and the loss terms it sums. A new objective is one row and, if new, one loss term. The
# self-supervised families add their own networks (build), recipe, crops, and hooks run around each optimiser
# step (momentum updates, DINO's schedules and gradient surgery).

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


def momentum_contrast(out, batch, args):
    """MoCo v3: each view's query against the momentum keys of the global batch, the other view's key positive."""
    return loss_lib.mocov3_loss(out["online"], out["target"], args.temperature)


def bootstrap_regression(out, batch, args):
    """BYOL: each view's prediction regresses the target network's projection of the other view."""
    return loss_lib.byol_loss(out["online"], out["target"])


def self_distillation(out, batch, args):
    """DINO: every student crop learns the centred, sharpened teacher softmax of the other global crop(s)."""
    return loss_lib.dino_loss(out["student"], out["teacher"], out["center"], args.temperature,
                              out["teacher_temperature"])


def masked_reconstruction(out, batch, args):
    """MAE: the pixels of the removed patches (standardised per patch with --norm-pix-loss)."""
    return loss_lib.mae_loss(out["pred"], out["patches"], out["mask"], args.norm_pix_loss)


# ---- the families' networks: the encoder they evaluate, and how --model, --depth, --image-size build it ----

def build_visual(args, **overrides):
    return model_lib.build_vit(args.model, image_size=args.image_size, depth=args.depth, **overrides)


def build_mocov3(args):
    """MoCo v3's ViT (sin-cos position embedding, xavier init, frozen random patch projection), a 3-layer
    projector and a 2-layer predictor (moco/builder.py MoCo_ViT), and their momentum copies."""
    visual = model_lib.init_like_mocov3(build_visual(args), frozen_patch_embed=args.frozen_patch_embed)
    projector = model_lib.mocov3_mlp(3, visual.width, args.head_hidden_dim, args.embed_dim)
    predictor = model_lib.mocov3_mlp(2, args.embed_dim, args.head_hidden_dim, args.embed_dim)
    return model_lib.MomentumModel(visual, projector, predictor, args.head_batchnorm == "per-view")


def build_byol(args):
    """BYOL's online network (encoder, projector, predictor: Linear-BN-ReLU-Linear) and its target copy."""
    visual = build_visual(args)
    projector = model_lib.byol_mlp(visual.width, args.head_hidden_dim, args.embed_dim)
    predictor = model_lib.byol_mlp(args.embed_dim, args.head_hidden_dim, args.embed_dim)
    return model_lib.MomentumModel(visual, projector, predictor, args.head_batchnorm == "per-view")


def build_dino(args):
    """DINO's student (ViT with stochastic depth, DINOHead) and teacher; the teacher temperature starts at its
    warmup value (set each step by dino_schedules)."""
    visual = build_visual(args, drop_path_rate=args.drop_path)
    head = model_lib.DINOHead(visual.width, args.out_dim, args.head_hidden_dim, args.embed_dim)
    return model_lib.DINOModel(visual, head, teacher_temperature=args.warmup_teacher_temperature)


def build_mae(args):
    """MAE's encoder (sin-cos position embedding, xavier init) and its lightweight decoder."""
    visual = model_lib.init_like_mae(build_visual(args))
    decoder = model_lib.MAEDecoder(visual.width, visual.patch_embed.grid_size, visual.config["patch_size"],
                                   args.decoder_width, args.decoder_depth, args.decoder_heads)
    return model_lib.MAEModel(visual, decoder, args.mask_ratio)


def online_encoder(model):
    """The encoder that encoder.pth exports: the one trained by gradient (StableRep's f, MoCo v3's base encoder,
    BYOL's online encoder, MAE's encoder)."""
    return model.visual


def teacher_encoder(model):
    """DINO exports its teacher, the network its paper evaluates."""
    return model.teacher["visual"]


def mae_noise(args):
    """MAE's mask: one uniform draw per patch of each crop."""
    return (args.image_size // 16) ** 2


def dino_noise(args):
    """DINO's stochastic depth: two draws (attention, MLP) per block of the student, for each crop."""
    return 2 * (args.depth or model_lib.default_depth(args.model)) if args.drop_path > 0 else 0


# ---- per-step hooks: hook(model, optimizer, position, args), model without DDP ----

class StepPosition(NamedTuple):
    """Where a step sits in the run, for the hooks' schedules."""
    step: int  # optimiser steps done before this one
    steps_per_epoch: int
    total_steps: int

    @property
    def epoch(self):
        return self.step // self.steps_per_epoch


def cosine_schedule(start, end, step, total_steps):
    """From `start` at step 0 to `end` at total_steps along a half cosine: the momentum of MoCo v3
    (adjust_moco_momentum), BYOL (tau) and DINO (momentum_schedule), and DINO's weight decay (wd_schedule)."""
    return end + (start - end) * (1 + math.cos(math.pi * step / total_steps)) / 2


def update_momentum_encoder(model, optimizer, position, args):
    """MoCo v3, before the forward pass (moco/builder.py does it inside forward): the momentum encoder moves towards
    the base encoder with this step's momentum."""
    model.update_momentum(cosine_schedule(args.momentum, 1.0, position.step, position.total_steps))


def update_target_network(model, optimizer, position, args):
    """BYOL, after the optimiser step: the target network moves towards the online one with this step's tau."""
    model.update_momentum(cosine_schedule(args.momentum, 1.0, position.step, position.total_steps))


def update_teacher(model, optimizer, position, args):
    """DINO, after the optimiser step: the teacher moves towards the student with this step's momentum."""
    model.update_teacher(cosine_schedule(args.momentum, 1.0, position.step, position.total_steps))


def dino_schedules(model, optimizer, position, args):
    """DINO, before each step: the teacher temperature (linear per epoch from its warmup value over the warmup
    epochs, then constant: DINOLoss.teacher_temp_schedule) and the weight decay of the decayed parameters (cosine
    from --weight-decay to --weight-decay-end; only main_dino.py's first group is regularised, as ours)."""
    start, end, warmup = (args.warmup_teacher_temperature, args.teacher_temperature,
                          args.warmup_teacher_temperature_epochs)
    if position.epoch < warmup:
        model.teacher_temperature = start + (end - start) * (position.epoch / (warmup - 1) if warmup > 1 else 0)
    else:
        model.teacher_temperature = end
    optimizer.param_groups[0]["weight_decay"] = cosine_schedule(args.weight_decay, args.weight_decay_end,
                                                                position.step, position.total_steps)


def dino_gradients(model, optimizer, position, args):
    """DINO, between backward and the optimiser step (on unscaled gradients): each parameter's gradient clipped to
    norm --clip-grad on its own (utils.clip_gradients), and none for the head's last layer during the first
    --freeze-last-layer epochs (utils.cancel_gradients_last_layer: AdamW then skips it entirely)."""
    if args.clip_grad:
        for parameter in model.parameters():
            if parameter.grad is not None:
                scale = args.clip_grad / (parameter.grad.norm() + 1e-6)
                parameter.grad.mul_(scale.clamp(max=1.0))
    if position.epoch < args.freeze_last_layer:
        for parameter in model.head.last_layer.parameters():
            parameter.grad = None


def clamp_logit_scale(model, optimizer, position, args):
    """CLIP and StableRep+: the logit scale stays in [0, 4.6052] (the official cap) after every step."""
    model.clamp_logit_scale()


# ---- the recipes: the defaults of the flags that depend on --loss ----

STABLEREP_RECIPE = {"captions_per_gpu": 43, "base_lr": 2e-4, "weight_decay": 0.1, "betas": (0.9, 0.98),
                    "crop_scale": (0.08, 1.0), "temperature": 0.1, "head_hidden_dim": 4096, "embed_dim": 256,
                    "schedule": "cc12m-1x"}
# MoCo v3 ViT-B (CONFIG.md, main_moco.py): batch 4096 (64 a GPU x 64), lr 1.5e-4 x batch / 256, AdamW wd 0.1 and
# torch's default betas, 300 epochs, 40 warmup, T 0.2, m 0.99 to 1, crop-min 0.08, MLPs 4096 -> 256
MOCOV3_RECIPE = {"captions_per_gpu": 64, "base_lr": 1.5e-4, "weight_decay": 0.1, "betas": (0.9, 0.999),
                 "crop_scale": (0.08, 1.0), "temperature": 0.2, "head_hidden_dim": 4096, "embed_dim": 256,
                 "epochs": 300, "warmup_epochs": 40, "momentum": 0.99, "frozen_patch_embed": True}
# BYOL (paper Sec. 3.3, Appendix): MLPs 4096 -> 256, tau 0.996 to 1, crop 0.08-1. BYOL's own optimiser is LARS for
# ResNet-50; for a ViT we take MoCo v3's AdamW recipe, as the MoCo v3 paper does for its ViT BYOL (FIDELITY.md)
BYOL_RECIPE = {"captions_per_gpu": 64, "base_lr": 1.5e-4, "weight_decay": 0.1, "betas": (0.9, 0.999),
               "crop_scale": (0.08, 1.0), "head_hidden_dim": 4096, "embed_dim": 256, "epochs": 300,
               "warmup_epochs": 40, "momentum": 0.996}
# DINO (main_dino.py's defaults): 64 a GPU, lr 5e-4 x batch / 256, AdamW, wd 0.04 -> 0.4, 100 epochs, 10 warmup,
# student temperature 0.1, teacher 0.04, m 0.996 to 1, head 2048 -> 256 -> 65536, clip 3.0, last layer frozen 1
# epoch, drop path 0.1, global crops 0.4-1, 8 local crops of 96 px at 0.05-0.4
DINO_RECIPE = {"captions_per_gpu": 64, "base_lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4,
               "betas": (0.9, 0.999), "crop_scale": (0.4, 1.0), "temperature": 0.1, "head_hidden_dim": 2048,
               "embed_dim": 256, "out_dim": 65536, "epochs": 100, "warmup_epochs": 10, "momentum": 0.996,
               "teacher_temperature": 0.04, "warmup_teacher_temperature": 0.04,
               "warmup_teacher_temperature_epochs": 0, "clip_grad": 3.0, "freeze_last_layer": 1, "drop_path": 0.1,
               "local_crops": 8, "local_crop_scale": (0.05, 0.4), "local_crop_size": 96}
# MAE ViT-B (PRETRAIN.md, main_pretrain.py, models_mae.py): batch 4096 (64 a GPU x 64), blr 1.5e-4 x batch / 256,
# AdamW (0.9, 0.95) wd 0.05, 800 epochs, 40 warmup, mask 0.75, normalised pixels, decoder 512 wide, 8 blocks, 16
# heads, crop 0.2-1
MAE_RECIPE = {"captions_per_gpu": 64, "base_lr": 1.5e-4, "weight_decay": 0.05, "betas": (0.9, 0.95),
              "crop_scale": (0.2, 1.0), "epochs": 800, "warmup_epochs": 40, "mask_ratio": 0.75, "decoder_width": 512,
              "decoder_depth": 8, "decoder_heads": 16, "norm_pix_loss": True}


class Objective(NamedTuple):
    images_per_caption: int  # m by default
    crops_per_image: int  # c by default
    head: bool  # the projection head h (image_mlp) of the multi-positive loss
    text: bool  # the text tower, the image projection and the logit scale of the image-text loss
    terms: Tuple[Callable, ...]  # summed into the loss
    build: Optional[Callable] = None  # the model from args; None: StableRepModel with the head / text tower above
    recipe: dict = STABLEREP_RECIPE  # defaults of the flags that depend on --loss
    lr_divisor: Tuple[str, int] = ("crops", 512)  # lr = base-lr x crops (or images) per step / this
    views: Optional[str] = None  # augment's name of a View per crop (None: SimCLR's for all c)
    local_view: Optional[str] = None  # augment's name of the View of DINO's local crops
    noise: Optional[Callable] = None  # uniform draws per crop the model takes (args -> count)
    exported: Callable = online_encoder  # the encoder written to encoder.pth
    before_step: Tuple[Callable, ...] = ()  # hooks before the forward pass
    after_backward: Tuple[Callable, ...] = ()  # hooks on the (unscaled) gradients before the optimiser step
    after_step: Tuple[Callable, ...] = ()  # hooks after the optimiser step


OBJECTIVES = {
    "stablerep": Objective(6, 1, head=True, text=False, terms=(caption_positives,)),
    "simclr": Objective(1, 2, head=True, text=False, terms=(crop_positives,)),
    "clip": Objective(1, 1, head=False, text=True, terms=(image_text,), after_step=(clamp_logit_scale,)),
    "stablerep+": Objective(6, 1, head=True, text=True, terms=(caption_positives, image_text),
                            after_step=(clamp_logit_scale,)),
    "mocov3": Objective(1, 2, head=False, text=False, terms=(momentum_contrast,), build=build_mocov3,
                        recipe=MOCOV3_RECIPE, lr_divisor=("images", 256), views="MOCOV3_VIEWS",
                        before_step=(update_momentum_encoder,)),
    "byol": Objective(1, 2, head=False, text=False, terms=(bootstrap_regression,), build=build_byol,
                      recipe=BYOL_RECIPE, lr_divisor=("images", 256), views="BYOL_VIEWS",
                      after_step=(update_target_network,)),
    "dino": Objective(1, 2, head=False, text=False, terms=(self_distillation,), build=build_dino,
                      recipe=DINO_RECIPE, lr_divisor=("images", 256), views="DINO_GLOBAL_VIEWS",
                      local_view="DINO_LOCAL_VIEW", noise=dino_noise, exported=teacher_encoder,
                      before_step=(dino_schedules,), after_backward=(dino_gradients,), after_step=(update_teacher,)),
    "mae": Objective(1, 1, head=False, text=False, terms=(masked_reconstruction,), build=build_mae,
                     recipe=MAE_RECIPE, lr_divisor=("images", 256), views="MAE_VIEWS", noise=mae_noise),
}
FAMILIES = ("mocov3", "byol", "dino", "mae")  # the paper's first question: each takes one image of a caption
# flags that only some recipes name: None unless given, refused for an objective whose recipe does not name them
RECIPE_ONLY = ({key for objective in OBJECTIVES.values() for key in objective.recipe} - set(STABLEREP_RECIPE)
               - {"epochs", "warmup_epochs"})


def recipe_values(key):
    """'stablerep/simclr/clip/stablerep+ 2e-4, mocov3/byol/mae 1.5e-4, dino 5e-4': one flag's recipe values, for
    --help."""
    groups = {}
    for name, objective in OBJECTIVES.items():
        if key in objective.recipe:
            value = objective.recipe[key]
            shown = (" ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else
                     ("on" if value else "off") if isinstance(value, bool) else _short(value)
                     if isinstance(value, (int, float)) else str(value))
            groups.setdefault(shown, []).append(name)
    return ", ".join(f"{'/'.join(names)} {value}" for value, names in groups.items())


def _short(number):
    """2e-4 rather than 0.0002; 0.04 and 4096 as they are."""
    if number == 0 or abs(number) >= 1e-3:
        return f"{number:g}"
    return f"{number:.1e}".replace(".0e", "e").replace("e-0", "e-")


def fill_recipe(args):
    """The defaults that depend on --loss: the objective's m and c, and its recipe for every flag left at None
    (a resumed run's recorded values are never None, so they stay). Returns args."""
    objective = OBJECTIVES[args.loss]
    args.images_per_caption = args.images_per_caption or objective.images_per_caption
    args.crops_per_image = args.crops_per_image or objective.crops_per_image
    for key, value in objective.recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.loss not in FAMILIES:
        schedule_epochs, schedule_warmup = SCHEDULES[args.schedule]
        args.epochs = schedule_epochs if args.epochs is None else args.epochs
        args.warmup_epochs = schedule_warmup if args.warmup_epochs is None else args.warmup_epochs
    return args


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
    if args.image_size % 16:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the patch size 16")
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
    """A flag that only other objectives' recipes name would do nothing: one line. --schedule names StableRep's."""
    recipe = OBJECTIVES[args.loss].recipe
    for key in sorted(RECIPE_ONLY - set(recipe)):
        if getattr(args, key) is not None:
            owners = "/".join(name for name, objective in OBJECTIVES.items() if key in objective.recipe)
            raise UserError(f"--{key.replace('_', '-')} is {owners}'s: it does nothing for --loss {args.loss}")
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
    if args.loss == "dino" and args.local_crops and args.local_crop_size % 16:
        raise UserError(f"--local-crop-size {args.local_crop_size} is not a multiple of the patch size 16")
    if args.loss == "dino" and args.local_crops and args.local_crop_size >= args.image_size:
        raise UserError(f"--local-crop-size {args.local_crop_size} is not smaller than --image-size "
                        f"{args.image_size}: local crops are the small ones (DINO: 96 at 224)")
    if args.loss == "mae" and (args.decoder_width % args.decoder_heads or args.decoder_width % 4):
        raise UserError(f"--decoder-width {args.decoder_width} must be divisible by --decoder-heads "
                        f"{args.decoder_heads} and by 4 (its sin-cos position embedding)")


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
    resumed = read_resume_checkpoint(args)
    check_args(args)
    run_id = check_output(args, resumed)
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
        check_same_global_batch(resumed, images_per_step, world_size)
    torch.manual_seed(args.seed)

    # ---- data ----
    tokenizer = load_tokenizer(args.tokenizer) if objective.text else None
    dataset, sampler, loader = build_data(args, tokenizer, world_size, rank, device)
    total_steps = sampler.steps_per_epoch * args.epochs
    warmup_steps = args.warmup_epochs * sampler.steps_per_epoch  # fractional, as the official epoch counter
    lr, lr_arithmetic = objective_lr(objective, args.base_lr, images_per_step, args.crops_per_image)

    # ---- model ----
    model_without_ddp, model = distributed.data_parallel(build_model(args, tokenizer).to(device), device)
    forward = torch.compile(model) if args.compile else model

    # ---- optimiser and schedule ----
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=lr,
                                  betas=tuple(args.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    # ---- resume, or initialise from other weights ----
    step = 0
    if resumed and resumed["official"]:
        step = continue_official(resumed, model_without_ddp, optimizer, scaler, sampler.steps_per_epoch)
        if is_main:
            print(f"continuing the official run of {resumed['path']} after its epoch {resumed['state']['epoch'] + 1} "
                  f"of {args.epochs}: its weights, AdamW moments{' and gradient scale' if scaler.is_enabled() else ''}"
                  " are restored; its data order is not (its loader drew images and crops from numpy's global "
                  "generator), so the next epochs draw theirs anew, on the captions its DistributedSampler deals "
                  f"(seed {args.seed})")
    elif resumed:
        step = load_training_state(resumed, model_without_ddp, optimizer, scaler)
        sampler.load_state_dict(resumed["state"].get("data"))  # a stream resumes where each of its streams stood
    elif args.init_from:
        loaded = init_from(args.init_from, model_without_ddp)
        if is_main:
            print(f"initialised {', '.join(loaded)} from {args.init_from}")
    if step >= total_steps:  # trained to the end: only the finish may be missing (killed while writing it)
        if is_main and finished(args.output, step):
            print(f"{args.output}: the run finished at step {step} of {total_steps}; nothing to do "
                  f"(summary.json and encoder.pth are there)")
        elif is_main:
            print(f"{args.output}: trained to step {step} of {total_steps}; writing encoder.pth and summary.json")
            with interrupts_as_one_line(step, step):
                finish(objective.exported(model_without_ddp), args,
                       summary_of(step, images_per_step, 0, 0.0, resumed["state"].get("loss"), 0))
        return distributed.leave()
    if is_main:
        print(f"{len(dataset)} captions; {images_per_step} images a step = {args.captions_per_gpu} captions x "
              f"{args.images_per_caption} images x {args.crops_per_image} crops x {world_size} process(es); "
              f"lr = {lr_arithmetic}; {args.epochs} epochs = {total_steps} "
              f"steps ({sampler.steps_per_epoch} per epoch, {warmup_steps:g} warmup); {precision} on {device}"
              + (f"; resumed at step {step}" if step else ""))
        print(data.describe_loader(args.workers, args.captions_per_gpu, args.images_per_caption, args.crops_per_image,
                                   args.image_size, args.gpu_augment))
        if warmup_steps >= total_steps:
            print(f"note: the warmup ({warmup_steps:g} steps) is as long as the whole run ({total_steps} steps): the "
                  "learning rate never decays; lower --warmup-epochs", file=sys.stderr)

    # ---- the first batch: data that cannot be read is refused before anything is written ----
    batches = training_batches(loader, sampler, step, total_steps)
    with data_errors_as_one_line(args):
        first_batch = next(batches)

    # ---- output ----
    log = None
    if is_main:
        atomic_write_json(os.path.join(args.output, "run.json"),
                          {"args": vars(args), "run_id": run_id, "git_commit": git_commit(), "world_size": world_size,
                           "torch": torch.__version__, "images_per_step": images_per_step, "lr": lr,
                           "total_steps": total_steps, "resumed_from": resumed["path"] if resumed else None})
        log = RunLog(args.output, step, tensorboard=args.tensorboard, wandb_project=args.wandb, config=vars(args),
                     progress=None if args.quiet else Progress(total_steps, sampler.steps_per_epoch, step))

    # ---- loop ----
    start_time, start_step, last_saved = time.time(), step, step
    loss_value, corrupt = float("nan"), 0
    model.train()
    with interrupts_as_one_line(lambda: step, lambda: last_saved, log), data_errors_as_one_line(args):
        for epoch, batch in itertools.chain([first_batch], batches):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, warmup_steps, lr)
            position = StepPosition(step, sampler.steps_per_epoch, total_steps)
            for hook in objective.before_step:
                hook(model_without_ddp, optimizer, position, args)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = compute_loss(forward, batch, objective, args, device)
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
            if log and (step % args.log_every == 0 or step == total_steps):
                log.write(step, epoch=epoch, loss=loss_value, lr=optimizer.param_groups[0]["lr"],
                          images=(step - start_step) * images_per_step, corrupt_images=corrupt,
                          logit_scale=(model_without_ddp.logit_scale.exp().item() if objective.text else None))
            if checkpoint_due(step, total_steps, sampler.steps_per_epoch, args.save_every):
                data_state = sampler.state_dict()  # streams: every rank's positions (a collective)
                if is_main:
                    save_training_state(model_without_ddp, optimizer, scaler, step, world_size, args, run_id,
                                        loss_value, data_state)
                last_saved = step

        # ---- finish: a step like the others, repeated by --resume until it is done ----
        if is_main:
            log.close()
            elapsed = time.time() - start_time
            summary = summary_of(step, images_per_step, step - start_step, elapsed, loss_value, corrupt)
            finish(objective.exported(model_without_ddp), args, summary)
            print(f"done: {step} steps, {step * images_per_step} images seen, {elapsed:.0f}s this run, final loss "
                  f"{loss_value:.4f}; encoder in {os.path.join(args.output, 'encoder.pth')}")
    distributed.leave()


def training_batches(loader, sampler, step, total_steps):
    """(epoch, batch) from `step` to the end of the run, epoch after epoch."""
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, start_step=step_in_epoch)
        for batch in loader:
            yield epoch, batch
            step += 1
            if step == total_steps:
                return


@contextlib.contextmanager
def data_errors_as_one_line(args):
    """Data with no readable image, raised here or in a loader worker, ends the run as one line."""
    try:
        yield
    except data.UnreadableData as err:
        raise UserError(f"{raised_message(err)} in --data {' '.join(args.data)}; check that its images decode (e.g. "
                        "open a few with PIL)") from None


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


def summary_of(steps, images_per_step, steps_this_run, seconds, final_loss, corrupt):
    return {"steps": steps, "images_seen": steps * images_per_step, "steps_this_run": steps_this_run,
            "seconds_this_run": seconds, "final_loss": final_loss, "corrupt_images_this_run": corrupt}


def finish(visual, args, summary):
    """The run's last step: encoder.pth, then summary.json, which says the run is finished (`finished`)."""
    export_encoder(os.path.join(args.output, "encoder.pth"), visual, args)
    atomic_write_json(os.path.join(args.output, "summary.json"), summary)


def finished(output, steps):
    """Has the run in `output` written its finish for `steps` (summary.json saying so, and encoder.pth)?"""
    try:
        with open(os.path.join(output, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("steps") == steps and os.path.isfile(
        os.path.join(output, "encoder.pth"))


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
        dataset = data.CaptionShardStream(args.data, args.stream_captions, args.captions_per_gpu, rank=rank,
                                          world_size=world_size, workers=args.workers,
                                          shuffle_buffer=args.shuffle_buffer, mix=args.stream_mix, **views)
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
        crops["views"] = getattr(augment, objective.views)
    if objective.local_view and args.local_crops:
        crops["local"] = data.LocalCrops(args.local_crops, args.local_crop_size, tuple(args.local_crop_scale),
                                         getattr(augment, objective.local_view))
    if objective.noise:
        crops["noise_per_crop"] = objective.noise(args)
    return crops


def build_model(args, tokenizer=None):
    """The encoder with the parts the objective needs (OBJECTIVES: the head, the text tower; a family's own). The
    objective's recipe fills the flags left at None first (fill_recipe), for callers that parse the flags alone."""
    objective = OBJECTIVES[fill_recipe(args).loss]
    if objective.build:
        return objective.build(args)
    visual = model_lib.build_vit(args.model, image_size=args.image_size, depth=args.depth)
    image_mlp = model_lib.ProjectionHead(visual.width, args.head_hidden_dim, args.embed_dim) if objective.head else None
    text = (model_lib.TextTransformer(len(tokenizer), tokenizer.eos_token_id, args.context_length, args.text_width,
                                      args.text_layers, args.text_heads) if objective.text else None)
    return model_lib.StableRepModel(visual, image_mlp, text, head_batchnorm=args.head_batchnorm)


def compute_loss(model, batch, objective, args, device):
    """The sum of the objective's loss terms on one batch from data.collate."""
    images = batch["images"].to(device, non_blocking=True)
    views = len(batch["image_labels"]) // len(batch["caption_labels"])  # m images x c crops of each caption
    if batch["jpegs"] is not None:  # --gpu-decode: the JPEGs decoded and cropped on the device, next to the rest
        images, failed = augment.decode_crops(images, batch["jpegs"], len(batch["image_labels"]), views)
        batch["corrupt"] += failed
    if batch["color"] is not None:  # --gpu-augment: uint8 crops [N, S, S, 3] -> float [N, 3, S, S], on the device
        images = augment.augment_crops(images, batch["color"])
    inputs = {"views": views}  # m images x c crops of each caption, caption-major
    if batch["tokens"] is not None:
        inputs["tokens"] = batch["tokens"].to(device, non_blocking=True)
    if batch.get("local_images") is not None:  # DINO's local crops
        local = batch["local_images"].to(device, non_blocking=True)
        color = batch["local_color"]
        inputs["local_images"] = augment.augment_crops(local, color) if color is not None else local
    for key in ("noise", "local_noise"):  # the crops' draws for the model's own random choices
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    out = model(images, **inputs)
    return sum(term(out, batch, args) for term in objective.terms)


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and embeddings, none on biases, norm weights and the logit scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ------------------------------------------------------------------------------------------------------------

def checkpoint_path(output, step):
    return os.path.join(output, f"checkpoint-{step:08d}.pth")


def list_checkpoints(output):
    return sorted(glob.glob(os.path.join(output, CHECKPOINT_GLOB)))


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
    for old in list_checkpoints(args.output)[:-args.keep]:
        os.remove(old)


def export_encoder(path, visual, args):
    """The encoder alone under timm's key names, with the config a later stage rebuilds it from."""
    save_checkpoint(path, {"model": visual.state_dict(),
                           "config": {"model": args.model, "image_size": args.image_size, **visual.config}})


def read_resume_checkpoint(args):
    """With --resume: the checkpoint to continue ({"path", "state"}), and args replaced by its recorded recipe.
    Flags given on this command line may differ only where RESUMABLE_FLAGS allows; None without --resume."""
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
        state = model_lib.load_checkpoint_file(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    official = is_official_checkpoint(state)
    if official:
        recorded, world_size = official_recipe(state["args"], path)
    elif not isinstance(state, dict) or not isinstance(state.get("args"), dict) or "step" not in state:
        raise UserError(f"{path} is neither a pretrain.py checkpoint nor an official StableRep one (an encoder alone "
                        "has no optimiser state to continue): start from its weights with --init-from instead")
    else:
        check_training_state(state, path)
        recorded, world_size = state["args"], state.get("world_size", 1)
    given = set(getattr(args, "flags_given", None) or changed_from_defaults(args))
    resumable = RESUMABLE_FLAGS
    if any(dataindex.is_streamed(spec) for spec in recorded.get("data") or []):
        resumable = RESUMABLE_FLAGS - {"workers"}  # a stream's steps are dealt to the workers in turn
    for key, value in recorded.items():
        if key in NEVER_RESTORED or not hasattr(args, key) or (key in resumable and key in given):
            continue
        if key in given and _comparable(getattr(args, key)) != _comparable(value):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path} was trained with {flag} {_show(value)}, not {_show(getattr(args, key))}: a "
                            f"resumed run keeps its recipe (drop {flag}, or start a new run with --init-from)")
        setattr(args, key, value)
    streamed = [spec for spec in args.data or [] if dataindex.is_streamed(spec)]
    if streamed and "data" not in given:  # a URL or pipe: runs a command: only one typed by the user may run
        raise UserError(f"{path} records the streamed --data {streamed[0]!r}; a command or URL is run only from "
                        "this command line: pass --data again (the same sources) to resume")
    if official and not args.data:
        raise UserError(f"{path} is an official checkpoint, which does not say where its images are: pass --data "
                        "(its --csv_path as --data and its --folder_list as --folder-list, or the same images in "
                        "another layout)")
    return {"path": path, "state": state, "recipe": recorded, "world_size": world_size, "official": official}


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
    weights = model_lib.model_state_dict(state)
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
        name, transposed = model_lib.our_name(official_names[index])
        moments[our_index[name]] = {key: value.T.contiguous() if transposed and value.ndim == 2 else value
                                    for key, value in values.items()}
    return {"state": moments, "param_groups": ours["param_groups"]}


def check_training_state(state, path):
    """One line naming `path` and what is wrong when a checkpoint of ours cannot continue a run (a damaged or
    hand-edited file): each part of the right kind, every recorded flag a value its flag takes."""
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
    for action in get_args_parser()._actions:
        value = state["args"].get(action.dest)
        if action.option_strings and value is not None and action.dest not in NEVER_RESTORED \
                and not _takes(action, value):
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
                action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError):
                return False
    return True


def check_output(args, resumed):
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
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(output, name))]
    present += [os.path.basename(path) for path in list_checkpoints(output)]
    if not present:
        return run_id
    if resumed:
        own_folder = os.path.samefile(os.path.dirname(os.path.abspath(resumed["path"])), output)
        recorded = _recorded_run_id(output)
        if own_folder or (recorded is not None and recorded == resumed["state"].get("run_id")):
            return run_id
        raise UserError(f"--output {output} holds another run ({', '.join(present[:3])}), not the one "
                        f"{resumed['path']} continues: choose an empty --output (or the checkpoint's own folder)")
    if args.resume == "latest":  # a run that stopped before its first checkpoint: nothing of it can be continued
        return _recorded_run_id(output) or run_id
    raise UserError(f"--output {output} already holds a run ({', '.join(present[:3])}): pass --resume to continue "
                    "it, or choose another --output")


def _recorded_run_id(output):
    """The run id run.json of `output` records, or None (no file, a damaged one, a run from before run ids)."""
    try:
        with open(os.path.join(output, "run.json"), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    return recorded.get("run_id") if isinstance(recorded, dict) else None


def changed_from_defaults(args):
    """When the command line is not known (main called directly): the flags whose value is not the default."""
    defaults = vars(get_args_parser().parse_args(["--data", "x"]))
    return {key for key, value in vars(args).items() if key in defaults and value != defaults[key]}


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


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
        state = model_lib.model_state_dict(model_lib.load_checkpoint_file(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    own = model.state_dict()
    if "visual.pos_embed" in state:  # another input size: resample the position grid as load_encoder does
        state["visual.pos_embed"] = model_lib.interpolate_pos_embed(state["visual.pos_embed"],
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
# the run's edges
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
        if received:
            raise KeyboardInterrupt


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


if __name__ == "__main__":
    run(main, get_args_parser())
