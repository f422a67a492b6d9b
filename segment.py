"""Semantic segmentation on ADE20k: a pretrained ViT fine-tuned end to end under UperNet, the BEiT/MAE recipe.

The encoder's blocks 4, 6, 8 and 12 (of 12; indices 3, 5, 7, 11) are tapped, their patch tokens laid back on the
patch grid (1/16 of the input) and resampled to a pyramid: two 2x deconvolutions (1/4), one (1/8), as they are
(1/16), 2x max-pooling (1/32). UperNet (a pyramid pooling module on the coarsest level, an FPN top-down path, all
levels fused) predicts the 150 classes at 1/4 of the input, upsampled to it; an auxiliary FCN head on the 1/16 level
adds 0.4 x its loss. Everything trains: AdamW with layer-wise lr decay (block i of 12 gets lr x 0.65^(12 - i)), a
linear warmup of 1500 iterations then a poly (power 1) decay to 0, 160k iterations of 16 crops of 512 x 512.

    python segment.py --checkpoint runs/stablerep/encoder.pth --data ADEChallengeData2016
    torchrun --nproc-per-node 8 segment.py --checkpoint runs/stablerep/encoder.pth --data ADEChallengeData2016
    python segment.py --checkpoint runs/stablerep/encoder.pth --data ADEChallengeData2016 --resume

--data is ADEChallengeData2016 as distributed: images/{training,validation}/*.jpg, annotations/{training,validation}/
*.png (0 = "other", ignored; 1-150 the classes), objectInfo150.txt (class names, optional). Training crops: a random
rescale to 0.5-2x of a 2048 x 512 box, a 512 crop where no class covers more than 75% (10 tries), a flip, photometric
distortion. Evaluation: each validation image rescaled into the 2048 x 512 box, 512-pixel windows slid with stride 341,
logits resized back to the image: single-scale mIoU, pixel accuracy and per-class IoU over the whole validation set
(--test-scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip for the multi-scale + flip number). The output folder holds
checkpoint-*.pth (resume is exact), log.jsonl and results.json. FIDELITY.md lists every recipe item and its source.
"""
import argparse
import glob
import itertools
import math
import os
import sys
import time

from tqdm import tqdm

from util.catalog import VIT_SIZES, vit_name
from util.cli import SEED, ArgumentParser, UserError, first_line, git_commit, integer, number, parse_command_line, run
from util.files import atomic_write_json, check_creatable
from util.runlog import RunLog, check_loggers

NUM_CLASSES = 150  # ADE20k's SceneParsing classes; label 0 ("other") is ignored
IGNORE = 255  # the label of ignored pixels (ADE's 0 after reduce_zero_label, and crop padding)
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # BEiT's and mmsegmentation's test-time scales
# flags a resumed run may change: they do not change what is trained
# flags a resumed run may change (else it keeps every recorded setting), and those about a launch alone
RESUMABLE = {"num_workers", "save_every", "keep", "log_every", "tensorboard", "output", "eval_every", "test_scales",
             "flip"}
NEVER_RESTORED = {"resume", "flags_given"}


def get_args_parser():
    parser = ArgumentParser("segment.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- encoder ----
    group = parser.add_argument_group("encoder")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="encoder to fine-tune: a pretrain.py checkpoint or encoder.pth, an "
                        "official StableRep checkpoint, or a timm ViT state dict (required unless --resume)")
    source.add_argument("--random-init", action="store_true", help="fine-tune an untrained --model from timm's "
                        "initialisation (seeded by --seed): the floor a pretrained encoder must beat")
    group.add_argument("--model", choices=list(VIT_SIZES), default=None,
                       help="architecture; default what the checkpoint says (required with --random-init)")
    group.add_argument("--taps", type=integer(0), nargs=4, default=None, metavar="BLOCK",
                       help="the four blocks (0-based) whose outputs feed the pyramid; default 3 5 7 11 for 12 "
                            "blocks, 7 11 15 23 for 24 (BEiT's and MAE's), depth/3-1 depth/2-1 2depth/3-1 depth-1")
    group.add_argument("--rel-pos-bias", action="store_true",
                       help="add a relative position bias per block (the MAE paper's transfer setting; off: "
                            "mmsegmentation's MAE config)")
    group.add_argument("--drop-path", type=number(0, below=1), default=0.1,
                       help="stochastic depth, rising linearly to this over the blocks; 0.1, BEiT's and MAE's "
                            "for ViT-B (0.2 for ViT-L)")
    group.add_argument("--head-channels", type=integer(1), default=None,
                       help="UperNet's width; default the encoder's (768 for ViT-B, 1024 for ViT-L: BEiT's)")
    group.add_argument("--aux-weight", type=number(0), default=0.4,
                       help="weight of the auxiliary FCN head's loss; 0.4, mmsegmentation's UperNet")
    # ---- data ----
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None, help="the ADEChallengeData2016 folder, as distributed (see above)")
    group.add_argument("--crop-size", type=integer(16), default=512,
                       help="training crop and sliding window, a multiple of 16; 512, the recipe's (the position "
                            "embedding is interpolated to its grid)")
    group.add_argument("--num-workers", type=integer(0), default=4, help="data-loading processes per GPU")
    # ---- optimisation ----
    group = parser.add_argument_group("optimisation")
    group.add_argument("--iterations", type=integer(1), default=160000, help="160k, BEiT's and MAE's ADE20k recipe")
    group.add_argument("--batch-size", type=integer(2), default=16,
                       help="crops per iteration over all processes; 16 (8 GPUs x 2), the recipe's")
    group.add_argument("--lr", type=number(above=0), default=1e-4,
                       help="peak learning rate of the head, the blocks less by --layer-decay (1e-4, mmsegmentation's "
                            "MAE ADE20k config)")
    group.add_argument("--layer-decay", type=number(above=0, maximum=1), default=0.65,
                       help="layer-wise lr decay: block i (1-based) of n gets lr x decay^(n + 1 - i), the patch and "
                            "position embeddings decay^(n + 1), the pyramid and heads lr; 0.65, the recipe's")
    group.add_argument("--weight-decay", type=number(0), default=0.05,
                       help="AdamW weight decay, not on biases, norms, the class token, position embedding and "
                            "relative position tables; 0.05, the recipe's")
    group.add_argument("--betas", type=number(0, below=1), nargs=2, default=(0.9, 0.999),
                       help="AdamW betas; 0.9 0.999, the recipe's")
    group.add_argument("--warmup-iterations", type=integer(0), default=1500,
                       help="linear warmup from 1e-6 x lr; 1500, the recipe's; then poly decay (power 1) to 0")
    group.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                       help="autocast: auto = bf16 on GPU, fp32 on CPU (the recipe's fp16 with loss scaling is "
                            "replaced by bf16, which needs no scaler)")
    # ---- evaluation ----
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-every", type=integer(1), default=16000,
                       help="evaluate on the validation set every N iterations and at the end; 16000, BEiT's")
    group.add_argument("--test-scales", type=number(above=0), nargs="+", default=[1.0],
                       help="rescalings of the 2048 x 512 box at test time, logits averaged over them; 1.0, the "
                            "single-scale number; 0.5 0.75 1.0 1.25 1.5 1.75 with --flip, the multi-scale one")
    group.add_argument("--flip", action="store_true", help="also average over horizontally flipped images")
    group.add_argument("--stride", type=integer(1), default=None,
                       help="sliding-window stride; default 2/3 of --crop-size (341 for 512, the recipe's)")
    # ---- run ----
    group = parser.add_argument_group("run")
    group.add_argument("--output", default=None,
                       help="folder for checkpoints, log.jsonl and results.json; default segment_ade20k/ beside "
                            "--checkpoint (required with --random-init)")
    group.add_argument("--resume", action="store_true", help="continue the run in --output from its newest "
                       "checkpoint, with its recorded recipe")
    group.add_argument("--save-every", type=integer(1), default=4000,
                       help="checkpoint every N iterations and at the end; resume is exact from any of them")
    group.add_argument("--keep", type=integer(1), default=2, help="checkpoints kept (older ones are deleted)")
    group.add_argument("--log-every", type=integer(1), default=50, help="iterations between lines of log.jsonl")
    group.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                       help="TensorBoard curves in <output>/tensorboard (default: on when tensorboard is installed)")
    group.add_argument("--seed", type=SEED, default=0, help="seeds the heads, the crop order and every augmentation")
    return parser


if __name__ == "__main__":  # the command line is read before torch loads (2 s): --help and a bad flag answer at once
    command_line = parse_command_line(get_args_parser())

# the imports below load torch: after the command line, see above
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
from model import build_vit
from util import checkpoints, distributed
from util import evaluation as ev
from util.checkpoints import check_recorded_settings
from util.resume import take_recorded_settings

# ------------------------------------------------------------------------------------------------------------
# model: ViT backbone -> pyramid -> UperNet
# ------------------------------------------------------------------------------------------------------------


def drop_path(x, rate, training):
    """Stochastic depth: each sample's residual branch is dropped with probability `rate`, kept ones scaled by
    1 / (1 - rate); the identity outside training."""
    if not training or rate == 0:
        return x
    keep = torch.rand(x.shape[0], *(1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) >= rate
    return x * keep / (1 - rate)


def conv_bn_relu(in_channels, out_channels, kernel_size):
    """mmsegmentation's ConvModule: convolution (no bias), BatchNorm, ReLU; Kaiming init (fan out)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def segmentation_classifier(in_channels, num_classes):
    """Dropout2d(0.1) then a 1x1 convolution to the classes, N(0, 0.01) weights (mmsegmentation's cls_seg)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(0.1), conv)


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias of one block: a learned table with one entry per head for every 2-d offset
    between two patches ((2g - 1)^2 of them) and three for the class token (to a patch, from a patch, to itself).
    forward() -> the additive attention bias [heads, 1 + g^2, 1 + g^2]. Zero at the start (the MAE paper's
    transfer setting)."""

    def __init__(self, grid, heads):
        super().__init__()
        offsets = (2 * grid - 1) ** 2
        self.table = nn.Parameter(torch.zeros(offsets + 3, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
        delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + grid - 1  # (g^2, g^2, 2), >= 0
        index = torch.empty(1 + grid * grid, 1 + grid * grid, dtype=torch.long)
        index[1:, 1:] = delta[..., 0] * (2 * grid - 1) + delta[..., 1]
        index[0, 1:], index[1:, 0], index[0, 0] = offsets, offsets + 1, offsets + 2
        self.register_buffer("index", index, persistent=False)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1)  # (heads, 1 + g^2, 1 + g^2)


class ViTBackbone(nn.Module):
    """The encoder's blocks with stochastic depth (rising linearly to `drop_path` over the blocks, timm's rule) and,
    optionally, a relative position bias per block; returns the patch tokens of the tapped blocks laid on the patch
    grid, [B, D, g, g] each. The encoder's final LayerNorm is not used: BEiT's backbone taps the blocks' outputs as
    they are (and a module without gradient would stop DDP)."""

    def __init__(self, encoder, taps, drop_path=0.0, rel_pos_bias=False):
        super().__init__()
        self.encoder = encoder
        encoder.norm = nn.Identity()
        self.taps = list(taps)
        depth = len(encoder.blocks)
        self.drop_rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        grid, heads = encoder.patch_embed.grid_size, encoder.blocks[0].attn.num_heads
        self.rel_pos = (nn.ModuleList(RelativePositionBias(grid, heads) for _ in range(depth)) if rel_pos_bias
                        else None)

    def forward(self, images):
        x = self.encoder.embed(images)  # [B, 1 + g^2, D]
        batch, grid = len(x), self.encoder.patch_embed.grid_size
        maps = []
        for i, block in enumerate(self.encoder.blocks):
            bias = self.rel_pos[i]() if self.rel_pos is not None else None
            x = x + drop_path(block.attn(block.norm1(x), attn_mask=bias), self.drop_rates[i], self.training)
            x = x + drop_path(block.mlp(block.norm2(x)), self.drop_rates[i], self.training)
            maps.extend(x[:, 1:].transpose(1, 2).reshape(batch, -1, grid, grid) for tap in self.taps if tap == i)
        return maps  # 4 x [B, D, g, g], in the order of taps


class Pyramid(nn.Module):
    """BEiT's multi-level neck: the four tapped maps (1/16 of the input) to 1/4, 1/8, 1/16 and 1/32:
    ConvTranspose 2x - BatchNorm - GELU - ConvTranspose 2x; ConvTranspose 2x; identity; MaxPool 2x."""

    def __init__(self, width):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                                 nn.ConvTranspose2d(width, width, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps):
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class PyramidPooling(nn.Module):
    """PSPNet's module: the map average-pooled to 1x1, 2x2, 3x3 and 6x6, each projected (1x1 conv-BN-ReLU) and
    upsampled back, concatenated with the map and fused by a 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels, channels, scales=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                    for s in scales)
        self.bottleneck = conv_bn_relu(in_channels + len(scales) * channels, channels, 3)

    def forward(self, x):
        pooled = [upsample(stage(x), x.shape[2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018) over four levels, finest first: 1x1 laterals on the three finer levels and
    pyramid pooling on the coarsest; a top-down path adding each coarser level, upsampled, into the next finer one;
    a 3x3 conv on each of the three; all four upsampled to the finest, concatenated, fused (3x3 conv-BN-ReLU) and
    classified: [B, classes, H/4, W/4] for BEiT's pyramid."""

    def __init__(self, in_channels, channels, num_classes):
        super().__init__()
        self.laterals = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in range(3))
        self.ppm = PyramidPooling(in_channels, channels)
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.classify = segmentation_classifier(channels, num_classes)

    def forward(self, levels):
        lateral = [conv(level) for conv, level in zip(self.laterals, levels)] + [self.ppm(levels[3])]
        for i in range(3, 0, -1):  # top-down: coarse to fine
            lateral[i - 1] = lateral[i - 1] + upsample(lateral[i], lateral[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lateral[:3])] + [lateral[3]]
        size = outs[0].shape[2:]
        return self.classify(self.fuse(torch.cat([outs[0]] + [upsample(x, size) for x in outs[1:]], dim=1)))


class FCNHead(nn.Module):
    """The auxiliary head: 3x3 conv-BN-ReLU to 256 channels, then classified."""

    def __init__(self, in_channels, num_classes, channels=256):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.classify = segmentation_classifier(channels, num_classes)

    def forward(self, x):
        return self.classify(self.conv(x))


class Segmenter(nn.Module):
    """ViT backbone -> Pyramid -> UperNetHead, and the auxiliary FCNHead on the 1/16 level (training only).

    forward(images [B, 3, S, S]) -> logits [B, classes, S, S] (UperNet's, upsampled bilinearly); in training, the
    pair (those, the auxiliary head's likewise upsampled)."""

    def __init__(self, encoder, taps, num_classes, channels=None, drop_path=0.0, rel_pos_bias=False):
        super().__init__()
        self.backbone = ViTBackbone(encoder, taps, drop_path, rel_pos_bias)
        self.neck = Pyramid(encoder.width)
        self.decode_head = UperNetHead(encoder.width, channels or encoder.width, num_classes)
        self.auxiliary_head = FCNHead(encoder.width, num_classes)

    def forward(self, images):
        levels = self.neck(self.backbone(images))
        logits = upsample(self.decode_head(levels), images.shape[2:])
        if not self.training:
            return logits
        return logits, upsample(self.auxiliary_head(levels[2]), images.shape[2:])


def default_taps(depth):
    """BEiT's and MAE's tapped blocks: 3 5 7 11 of 12, 7 11 15 23 of 24 (0-based), i.e. depth/3 - 1, depth/2 - 1,
    2 depth/3 - 1, depth - 1 (clamped at block 0 for toy depths)."""
    return [max(0, depth // 3 - 1), max(0, depth // 2 - 1), max(0, 2 * depth // 3 - 1), depth - 1]


def build_segmenter(args, encoder):
    """The Segmenter around `encoder` with the run's taps, drop path, position bias and head width."""
    depth = len(encoder.blocks)
    taps = args.taps or default_taps(depth)
    if max(taps) >= depth:
        raise UserError(f"--taps {' '.join(map(str, taps))}: the encoder has {depth} blocks (0 to {depth - 1})")
    return Segmenter(encoder, taps, NUM_CLASSES, args.head_channels, args.drop_path, args.rel_pos_bias)


def layer_id(name, depth):
    """BEiT's layer of a parameter for the lr decay: 0 for the embeddings (patch, position, class token), i + 1 for
    block i, depth + 1 for everything after the blocks (pyramid, heads)."""
    if name.startswith("backbone.encoder.") and name.split(".")[2] in ("patch_embed", "pos_embed", "cls_token"):
        return 0
    if name.startswith("backbone.encoder.blocks.") or name.startswith("backbone.rel_pos."):
        return int(name.split(".")[3 if name.startswith("backbone.encoder.") else 2]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups with a per-group `lr_scale` = layer_decay^(depth + 1 - layer): 1 for the heads, layer_decay^13
    for the embeddings of a 12-block ViT. No weight decay on 1-d parameters (biases, norms), the class token, the
    position embedding and the relative position tables."""
    depth = len(model.backbone.encoder.blocks)
    groups = {}
    for name, parameter in model.named_parameters():
        layer = layer_id(name, depth)
        no_decay = parameter.ndim == 1 or name.endswith((".cls_token", ".pos_embed", ".table"))
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - layer)}
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def poly_lr(iteration, total, warmup, peak, warmup_ratio=1e-6, power=1.0):
    """mmsegmentation's schedule: linear from warmup_ratio x peak to peak over `warmup` iterations, then poly decay
    peak x (1 - progress)^power to 0 at `total`."""
    if iteration < warmup:
        return peak * (warmup_ratio + (1 - warmup_ratio) * iteration / warmup)
    return peak * (1 - (iteration - warmup) / max(1, total - warmup)) ** power


# ------------------------------------------------------------------------------------------------------------
# data: ADEChallengeData2016 as distributed
# ------------------------------------------------------------------------------------------------------------

SPLITS = {"train": "training", "val": "validation"}


def list_split(root, split):
    """[(image path, annotation path)] of one split, sorted; UserError if the folder is not ADE20k's layout."""
    image_dir, label_dir = (os.path.join(root, kind, SPLITS[split]) for kind in ("images", "annotations"))
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise UserError(f"--data {root}: no folder {folder} (expected ADEChallengeData2016's images/ and "
                            "annotations/, each with training/ and validation/; the zip, and where to get it: "
                            "docs/RUNNING.md, Evaluation data)")
    images = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
    if not images:
        raise UserError(f"--data {root}: {image_dir} holds no .jpg image")
    pairs = [(path, os.path.join(label_dir, os.path.basename(path)[:-4] + ".png")) for path in images]
    missing = [label for _, label in pairs if not os.path.isfile(label)]
    if missing:
        raise UserError(f"--data {root}: {len(missing)} image(s) of {SPLITS[split]} have no annotation, e.g. "
                        f"{missing[0]}")
    return pairs


def class_names(root):
    """The 150 names from objectInfo150.txt (tab-separated: Idx, Ratio, Train, Val, Name), or class_1 ... ."""
    path = os.path.join(root, "objectInfo150.txt")
    names = [f"class_{i}" for i in range(1, NUM_CLASSES + 1)]
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split("\t")
                if len(fields) >= 5 and fields[0].strip().isdigit() and 1 <= int(fields[0]) <= NUM_CLASSES:
                    names[int(fields[0]) - 1] = fields[4].split(";")[0].strip()
    return names


def read_pair(image_path, label_path):
    """(image float [3, H, W] in [0, 1], labels long [H, W] with 0 -> IGNORE and k -> k - 1: reduce_zero_label)."""
    from PIL import Image
    try:
        pixels = augment.decode_rgb(image_path)
        with Image.open(label_path) as label_image:
            labels = torch.from_numpy(np.array(label_image)).long()
    except augment.DECODE_ERRORS as err:
        raise ev.UnreadableImage(f"{image_path} or its annotation: {first_line(err)}") from None
    if labels.ndim != 2 or labels.shape != pixels.shape[:2]:
        raise ev.UnreadableImage(f"{label_path}: a {tuple(labels.shape)} label map for a "
                                 f"{tuple(pixels.shape[:2])} image")
    if labels.max() > NUM_CLASSES:
        raise ev.UnreadableImage(f"{label_path}: label {int(labels.max())} is not one of ADE20k's 0-150")
    labels = torch.where(labels == 0, IGNORE, labels - 1)
    return pixels.permute(2, 0, 1).float() / 255, labels


def box_scale(height, width, long_side, short_side):
    """mmsegmentation's keep-ratio rescale into a (long_side, short_side) box: the factor that fits both sides."""
    return min(long_side / max(height, width), short_side / min(height, width))


def rescale(image, labels, factor):
    """Bilinear for the image (OpenCV's INTER_LINEAR, no antialiasing: mmcv's), nearest for the labels."""
    size = (max(1, int(image.shape[1] * factor + 0.5)), max(1, int(image.shape[2] * factor + 0.5)))  # 1x2000: 1
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    if labels is not None:
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, labels


def photometric_distortion(image, generator):
    """mmsegmentation's PhotoMetricDistortion, each step with probability 1/2: brightness +- 32/255, then contrast
    x [0.5, 1.5] either first or last (one coin), saturation (HSV's S) x [0.5, 1.5], hue +- 18/180 of a turn."""
    def coin():
        return torch.rand((), generator=generator).item() < 0.5

    def uniform(low, high):
        return low + (high - low) * torch.rand((), generator=generator).item()

    if coin():
        image = (image + uniform(-32, 32) / 255).clamp_(0, 1)
    contrast_first = coin()
    if contrast_first and coin():
        image = (image * uniform(0.5, 1.5)).clamp_(0, 1)
    if coin():  # HSV saturation: every channel moves away from the max (V) by the factor; S is capped at 1
        top, bottom = image.amax(0, keepdim=True), image.amin(0, keepdim=True)
        factor = torch.minimum(torch.tensor(uniform(0.5, 1.5)), top / (top - bottom).clamp_min(1e-12))
        image = (top - (top - image) * factor).clamp_(0, 1)
    if coin():
        shift = torch.randint(-18, 19, (), generator=generator).item() / 180
        image = augment.adjust_hue(image[None], torch.tensor([shift]))[0].clamp_(0, 1)
    if not contrast_first and coin():
        image = (image * uniform(0.5, 1.5)).clamp_(0, 1)
    return image


def normalise(image):
    mean = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


class TrainCrops:
    """Training items: key (index, seed) -> (image [3, S, S] normalised, labels [S, S]), every draw from `seed`
    alone (so a resumed run sees the same crops). The recipe's pipeline: rescale into (4S, S) x U(0.5, 2) keeping
    the aspect, a random S x S crop in which no class covers more than 75% of the labelled pixels (10 tries), a
    flip with probability 1/2, photometric distortion, ImageNet normalisation, padding to S (image 0, labels
    IGNORE)."""

    def __init__(self, pairs, crop_size):
        self.pairs, self.crop_size = pairs, crop_size

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, key):
        index, seed = key
        generator = torch.Generator().manual_seed(seed)
        image, labels = read_pair(*self.pairs[index])
        size = self.crop_size
        ratio = 0.5 + 1.5 * torch.rand((), generator=generator).item()
        factor = box_scale(image.shape[1], image.shape[2], 4 * size * ratio, size * ratio)
        image, labels = rescale(image, labels, factor)
        top, left = self.crop_box(labels, generator)
        image, labels = image[:, top:top + size, left:left + size], labels[top:top + size, left:left + size]
        if torch.rand((), generator=generator).item() < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        image = normalise(photometric_distortion(image, generator))
        pad_bottom, pad_right = size - image.shape[1], size - image.shape[2]
        image = F.pad(image, (0, pad_right, 0, pad_bottom), value=0.0)
        labels = F.pad(labels, (0, pad_right, 0, pad_bottom), value=IGNORE)
        return image, labels

    def crop_box(self, labels, generator, cat_max_ratio=0.75, tries=10):
        """mmsegmentation's RandomCrop: redraw (up to 10 times) while one class holds > 75% of the crop's labels."""
        height, width = labels.shape
        size = self.crop_size
        for _ in range(tries):
            top = torch.randint(0, max(height - size, 0) + 1, (), generator=generator).item()
            left = torch.randint(0, max(width - size, 0) + 1, (), generator=generator).item()
            counts = torch.bincount(labels[top:top + size, left:left + size].flatten(), minlength=IGNORE + 1)[:IGNORE]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
        return top, left


class ValImages:
    """Evaluation items: index -> (image [3, h, w] in [0, 1] at its original size, labels [H, W], index)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, labels = read_pair(*self.pairs[index])
        return image, labels, index


class CropSampler:
    """Iteration t takes items t x B ... t x B + B - 1 of an endless stream: epoch e is a permutation of the
    training images drawn from (seed, e), and every item carries its own augmentation seed (seed, position). This
    process yields its share, [(index, item seed)] x B / processes, from iteration `start` on."""

    def __init__(self, num_images, batch_size, rank, world_size, seed, start):
        self.num_images, self.batch_size, self.seed, self.start = num_images, batch_size, seed, start
        self.per_rank = batch_size // world_size
        self.offset = rank * self.per_rank
        self.permutation = (-1, None)

    def item(self, position):
        epoch, within = divmod(position, self.num_images)
        if self.permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.permutation = (epoch, torch.randperm(self.num_images, generator=generator))
        return int(self.permutation[1][within]), (self.seed * 1_000_003 + position) % 2 ** 63

    def __iter__(self):
        iteration = self.start
        while True:
            first = iteration * self.batch_size + self.offset
            yield [self.item(position) for position in range(first, first + self.per_rank)]
            iteration += 1


# ------------------------------------------------------------------------------------------------------------
# evaluation: sliding windows, mIoU
# ------------------------------------------------------------------------------------------------------------


def slide_logits(predict, image, crop_size, stride, num_classes):
    """mmsegmentation's slide inference: windows of crop_size every `stride` pixels (the last flush with the edge),
    the logits of overlapping windows averaged. image [3, h, w] (zero-padded to at least crop_size) ->
    [classes, h, w]. predict: [B, 3, S, S] -> [B, classes, S, S]."""
    height, width = image.shape[1:]
    padded = F.pad(image, (0, max(crop_size - width, 0), 0, max(crop_size - height, 0)))
    full_h, full_w = padded.shape[1:]
    logits = torch.zeros(num_classes, full_h, full_w, device=image.device)
    counts = torch.zeros(1, full_h, full_w, device=image.device)
    rows = max(full_h - crop_size + stride - 1, 0) // stride + 1
    cols = max(full_w - crop_size + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + crop_size, full_h), min(c * stride + crop_size, full_w)
            boxes.append((bottom - crop_size, right - crop_size))
    windows = torch.stack([padded[:, top:top + crop_size, left:left + crop_size] for top, left in boxes])
    out = predict(windows).float()  # (windows, classes, S, S)
    for (top, left), window_logits in zip(boxes, out):
        logits[:, top:top + crop_size, left:left + crop_size] += window_logits
        counts[:, top:top + crop_size, left:left + crop_size] += 1
    return (logits / counts)[:, :height, :width]


def predict_image(predict, image, crop_size, stride, scales, flip, num_classes):
    """Class probabilities [classes, H, W] of one image at its original size: for each test scale (of the box
    (4S, S)) and flip, the image rescaled, slid over, its logits resized back (bilinear) and softmaxed; averaged."""
    height, width = image.shape[1:]
    total = torch.zeros(num_classes, height, width, device=image.device)
    for scale in scales:
        factor = box_scale(height, width, 4 * crop_size * scale, crop_size * scale)
        scaled, _ = rescale(image, None, factor)
        scaled = normalise(scaled.cpu()).to(image.device)
        for flipped in ([False, True] if flip else [False]):
            view = scaled.flip(-1) if flipped else scaled
            logits = slide_logits(predict, view, crop_size, stride, num_classes)
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            total += logits.softmax(0)
    return total / (len(scales) * (2 if flip else 1))


def area_counts(prediction, labels, num_classes=NUM_CLASSES):
    """Per class, over the labelled pixels (labels != IGNORE): (intersection, predicted area, labelled area),
    int64 [classes] each: what mIoU accumulates over a dataset (mmsegmentation's IoUMetric)."""
    valid = labels != IGNORE
    predicted, truth = prediction[valid], labels[valid]
    intersection = torch.bincount(truth[predicted == truth], minlength=num_classes)
    return (intersection, torch.bincount(predicted, minlength=num_classes),
            torch.bincount(truth, minlength=num_classes))


def summarise(intersection, predicted_area, labelled_area, names):
    """mIoU (mean over classes with a non-empty union, the others are NaN and left out), pixel accuracy (aAcc:
    correct / labelled pixels), mean class accuracy, and per-class IoU, in percent."""
    union = (predicted_area + labelled_area - intersection).double()
    iou = intersection.double() / union  # NaN where the class is neither labelled nor predicted
    accuracy = intersection.double() / labelled_area.double()
    per_class = {name: (None if math.isnan(v) else 100 * v) for name, v in zip(names, iou.tolist())}
    return {"mIoU": 100 * iou.nanmean().item(), "aAcc": 100 * (intersection.sum() / labelled_area.sum()).item(),
            "mAcc": 100 * accuracy.nanmean().item(), "per_class_iou": per_class}


def evaluate(predict, dataset, names, crop_size, stride, scales, flip, device, num_workers=0):
    """mIoU and pixel accuracy of `predict` on `dataset` (ValImages); each process scores its share of the images
    and the areas are summed over processes."""
    shard = torch.utils.data.Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=num_workers,
                                         generator=torch.Generator())  # leaves the global random stream alone
    counts = torch.zeros(3, len(names), dtype=torch.long, device=device)
    show = distributed.is_main_process()
    for image, labels, _ in tqdm(ev.batches(loader), total=len(shard), desc="evaluation", unit="image",
                                    disable=not show):
        with torch.inference_mode():
            probabilities = predict_image(predict, image.to(device), crop_size, stride, scales, flip, len(names))
        counts += torch.stack(area_counts(probabilities.argmax(0), labels.to(device), len(names)))
    counts = distributed.all_gather_no_grad(counts[None]).sum(0)
    return summarise(*counts.cpu(), names)


# ------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ------------------------------------------------------------------------------------------------------------


def save_checkpoint(model, optimizer, iteration, args, encoder_id, evaluations, scores):
    """The state that continues the run exactly, with what a resume needs besides: the encoder's architecture and
    identity (so the --checkpoint file it started from is not needed again), the evaluations so far and the last
    one's full scores (so results.json can be written from the last checkpoint)."""
    encoder = model.backbone.encoder
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
             "args": {k: v for k, v in vars(args).items() if k != "flags_given"},
             "rng": {"torch": torch.get_rng_state()},
             "encoder": {"model": vit_name(encoder.width), "patch_size": encoder.config["patch_size"],
                         "depth": encoder.config["depth"], "identity": encoder_id},
             "evaluations": evaluations, "scores": scores}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    checkpoints.save_checkpoint(checkpoints.checkpoint_path(args.output, iteration), state)
    checkpoints.remove_all_but_newest(args.output, args.keep)


def read_resume_checkpoint(args):
    """With --resume: the newest checkpoint in --output, and args replaced by its recorded recipe (flags given on
    this command line may differ only in RESUMABLE ones). None without --resume, or when there is none yet."""
    if not args.resume:
        if args.output and checkpoints.list_checkpoints(args.output):
            raise UserError(f"{args.output} already holds checkpoints: pass --resume to continue that run, or "
                            "choose another --output")
        return None
    if args.output is None:
        raise UserError("--resume needs --output, the folder of the run to continue")
    found = checkpoints.list_checkpoints(args.output)
    if not found:
        return None  # nothing to continue yet: start, as a first run
    try:
        state = checkpoints.load_checkpoint_file(found[-1])
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict) or "iteration" not in state:
        raise UserError(f"{found[-1]} is not a segment.py checkpoint")
    iteration = state["iteration"]
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise UserError(f"{found[-1]} cannot be resumed: its iteration {iteration!r} is damaged")
    check_recorded_settings(state["args"], get_args_parser(), found[-1], NEVER_RESTORED)
    take_recorded_settings(args, state["args"], found[-1], set(getattr(args, "flags_given", None) or []),
                           resumable=RESUMABLE, never_restored=NEVER_RESTORED)
    return {"path": found[-1], "state": state}


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def check_args(args):
    """Inputs checked, nothing written: UserError on anything that cannot work."""
    if not args.checkpoint and not args.random_init:
        raise UserError("give --checkpoint (or --random-init with --model), or --resume with --output")
    if args.data is None:
        raise UserError("the following arguments are required: --data")
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data} is not a folder")
    if args.crop_size % 16:
        raise UserError(f"--crop-size {args.crop_size} is not a multiple of the patch size 16")
    if args.output is None:
        if args.random_init:
            raise UserError("--random-init has no checkpoint folder to write beside: pass --output")
        args.output = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "segment_ade20k")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a file, not a folder")
    data, output = os.path.realpath(args.data), os.path.realpath(args.output)
    if output == data or output.startswith(data.rstrip(os.sep) + os.sep):
        raise UserError(f"--output {args.output} is inside --data {args.data}: the run's files would mix with the "
                        "dataset's; write it elsewhere")
    check_creatable(args.output)
    check_loggers(args.tensorboard, None)


def check_readable(pairs):
    """Every (image, annotation) pair's header, before anything is written: a file that is not an image, or a label
    map whose size is not its image's, is one line now rather than at the first evaluation, after checkpoints
    exist. (A JPEG cut short after its header shows only when decoded: that is still one line, when read.)"""
    from PIL import Image
    for image_path, label_path in pairs:
        try:
            with Image.open(image_path) as image, Image.open(label_path) as label:
                sizes = image.size, label.size
        except augment.DECODE_ERRORS as err:
            raise UserError(f"cannot read image {image_path} or its annotation ({first_line(err)}); remove or "
                            "replace the file") from None
        if sizes[0] != sizes[1]:
            raise UserError(f"{label_path}: a {sizes[1][0]}x{sizes[1][1]} label map for a {sizes[0][0]}x"
                            f"{sizes[0][1]} image")


def main(args):
    # ---- arguments (and, when resuming, the run's recorded recipe) ----
    resumed = read_resume_checkpoint(args)
    check_args(args)
    args.data, args.output = os.path.abspath(args.data), os.path.abspath(args.output)
    stride = args.stride or round(args.crop_size * 2 / 3)

    # ---- distributed ----
    device = distributed.init_distributed()
    world_size, rank, is_main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} does not split over {world_size} processes")
    if args.batch_size // world_size < 2 and device.type != "cuda":  # SyncBatchNorm (GPUs only) would pool them
        raise UserError(f"--batch-size {args.batch_size} over {world_size} CPU processes is 1 image each: the "
                        "pyramid pooling's BatchNorm needs at least 2 per process on CPUs (its 1x1 map has one value "
                        f"per channel); give --batch-size {2 * world_size} or more")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    # ---- data ----
    train_pairs, val_pairs = list_split(args.data, "train"), list_split(args.data, "val")
    names = class_names(args.data)
    check_readable(val_pairs)  # read at the first evaluation, long after the first checkpoint: checked now

    # ---- model ----
    recorded_encoder = resumed["state"].get("encoder") if resumed else None
    if recorded_encoder:  # its weights are in the checkpoint: the architecture alone is built here
        encoder = build_vit(recorded_encoder["model"], image_size=args.crop_size,
                            patch_size=recorded_encoder["patch_size"], depth=recorded_encoder["depth"])
        encoder_id = recorded_encoder["identity"]
    else:
        encoder_args = argparse.Namespace(checkpoint=args.checkpoint, random_init=args.random_init, raw_pixels=False,
                                          model=args.model, image_size=args.crop_size, seed=args.seed)
        encoder, encoder_id = ev.build_encoder(encoder_args, torch.device("cpu"))
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)  # fine-tuned end to end (build_encoder freezes it for the probes)
    torch.manual_seed(args.seed)
    model = build_segmenter(args, encoder).to(device)
    model_without_ddp, model = distributed.data_parallel(model, device)

    # ---- optimiser and schedule ----
    groups = param_groups(model_without_ddp, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=args.lr,
                                  betas=tuple(args.betas))

    # ---- resume ----
    iteration, evaluations, scores = 0, [], None
    if resumed:
        state = resumed["state"]
        try:
            model_without_ddp.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"{resumed['path']} does not fit this model ({first_line(err)})") from None
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        iteration, evaluations, scores = state["iteration"], state.get("evaluations") or [], state.get("scores")
    finished = iteration >= args.iterations
    if finished and os.path.isfile(os.path.join(args.output, "results.json")):
        if is_main:
            print(f"{args.output}: the run finished at iteration {iteration}; nothing to do (results.json is there)")
        return distributed.leave()
    if is_main:
        print(f"{len(train_pairs)} training, {len(val_pairs)} validation images; {args.batch_size} crops of "
              f"{args.crop_size} px an iteration = {args.batch_size // world_size} x {world_size} process(es); "
              f"lr {args.lr:g} x layer decay {args.layer_decay:g}^(depth + 1 - layer); {args.iterations} iterations "
              f"({args.warmup_iterations} warmup); {precision} on {device}"
              + (f"; resumed at iteration {iteration}" if iteration else ""))

    # ---- the first batch: images that cannot be read are refused before anything is written ----
    sampler = CropSampler(len(train_pairs), args.batch_size, rank, world_size, args.seed, iteration)
    checkpoints.end_quiet_workers_at_exit()  # its workers ignore SIGTERM (quiet_worker)
    loader = torch.utils.data.DataLoader(TrainCrops(train_pairs, args.crop_size), batch_sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=checkpoints.quiet_worker,  # a preemption: no worker traceback
                                         generator=torch.Generator())  # its seed draw must not move torch's stream
    batches = ev.batches(loader)
    if not finished:
        batches = itertools.chain([next(batches)], batches)

    # ---- output: created only now that every input has been checked ----
    log = None
    if is_main:
        os.makedirs(args.output, exist_ok=True)
        log = RunLog(args.output, iteration, tensorboard=args.tensorboard, config=vars(args))

    # ---- loop ----
    val_set = ValImages(val_pairs)
    start_time, start_iteration = time.time(), iteration

    def evaluate_now():
        """Score the model at this iteration (every process takes part), record it, log it."""
        model.eval()
        with autocast:
            now = evaluate(model_without_ddp, val_set, names, args.crop_size, stride, args.test_scales, args.flip,
                           device, args.num_workers)
        model.train()
        evaluations.append({"iteration": iteration, **{k: v for k, v in now.items() if k != "per_class_iou"}})
        if log:
            log.write(iteration, mIoU=now["mIoU"], aAcc=now["aAcc"], mAcc=now["mAcc"])
            print(f"iteration {iteration}: mIoU {now['mIoU']:.2f}, pixel accuracy {now['aAcc']:.2f}")
        return now

    model.train()
    with checkpoints.stop_at_step_boundary() as preemption:  # SIGTERM or SIGUSR1: save at the next iteration, stop
        try:
            if 0 < iteration < args.iterations and iteration % args.eval_every == 0 and (
                    not evaluations or evaluations[-1]["iteration"] != iteration):
                scores = evaluate_now()  # due when a preempted run stopped: done now, never lost
            while iteration < args.iterations:
                images, labels = next(batches)
                lr = poly_lr(iteration, args.iterations, args.warmup_iterations, args.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                with autocast:
                    logits, aux_logits = model(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True)
                decode_loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
                aux_loss = F.cross_entropy(aux_logits.float(), labels, ignore_index=IGNORE)
                loss = decode_loss + args.aux_weight * aux_loss
                if not torch.isfinite(loss):
                    raise UserError(f"loss is {loss.item()} at iteration {iteration}; stopping")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                iteration += 1
                if log and (iteration % args.log_every == 0 or iteration == args.iterations):
                    log.write(iteration, loss=loss.item(), decode_loss=decode_loss.item(), aux_loss=aux_loss.item(),
                              lr=lr, images=(iteration - start_iteration) * args.batch_size)
                stopping = iteration < args.iterations and preemption.due(device)
                save_due = iteration % args.save_every == 0 or iteration == args.iterations or stopping
                # an evaluation due when stopping is left to the resume (it runs first there)
                evaluation_due = (iteration % args.eval_every == 0 or iteration == args.iterations) and not stopping
                if save_due or evaluation_due:  # what is saved and scored has the same statistics on every process
                    distributed.average_batchnorm_statistics(model_without_ddp)
                if evaluation_due:  # before the checkpoint, which then holds it (a resume never loses one)
                    scores = evaluate_now()
                if save_due and is_main:
                    save_checkpoint(model_without_ddp, optimizer, iteration, args, encoder_id, evaluations, scores)
                if stopping:
                    if is_main:
                        log.close()
                        print(f"\nsegment.py: {preemption.name()} at iteration {iteration}: saved "
                              f"{checkpoints.checkpoint_path(args.output, iteration)}; rerun with --resume --output "
                              f"{args.output} to continue", file=sys.stderr)
                    distributed.leave()
                    sys.exit(130)
            # the final evaluation, unless the last checkpoint holds it (a run killed while writing results.json)
            if not evaluations or evaluations[-1]["iteration"] != iteration:
                scores = evaluate_now()
        except KeyboardInterrupt:
            if is_main:
                log.close()
                print(f"\nsegment.py: stopped at iteration {iteration}; rerun with --resume --output {args.output} to "
                      "continue from the last checkpoint", file=sys.stderr)
            sys.exit(130)

    # ---- save ----
    results = None
    if is_main:
        log.close()
        results = {"encoder": encoder_id, "data": {"dataset": "ade20k", "root": args.data,
                                                   "train_images": len(train_pairs), "val_images": len(val_pairs)},
                   "iterations": iteration, "test_scales": args.test_scales, "flip": args.flip,
                   "mIoU": scores["mIoU"], "aAcc": scores["aAcc"], "mAcc": scores["mAcc"],
                   "per_class_iou": scores["per_class_iou"], "evaluations": evaluations,
                   "seconds_this_run": time.time() - start_time, "git_commit": git_commit(),
                   "args": {k: v for k, v in vars(args).items() if k != "flags_given"}}
        atomic_write_json(os.path.join(args.output, "results.json"), results)
        scales = "single-scale" if args.test_scales == [1.0] and not args.flip else \
            f"scales {' '.join(f'{s:g}' for s in args.test_scales)}{' + flip' if args.flip else ''}"
        print(f"ADE20k semantic segmentation ({scales}) of {encoder_id['checkpoint'] or 'random init'} after "
              f"{iteration} iterations")
        print(f"  mIoU            {scores['mIoU']:6.2f}\n  pixel accuracy  {scores['aAcc']:6.2f}")
        print(f"results: {os.path.join(args.output, 'results.json')}")
    distributed.leave()
    return results


if __name__ == "__main__":
    run(main, get_args_parser(), args=command_line)
