"""Pretrain a ViT on synthetic image trees: StableRep and the paper's baselines from one script.

    python pretrain.py --data synthetic/cc3m --output runs/stablerep           # one process (CPU or one GPU)
    torchrun --nproc 8 pretrain.py --data synthetic/cc3m --output runs/stablerep

Objectives (--loss):
    stablerep   multi-positive contrastive loss over caption ids (Eq. 2-4), m images per caption
    simclr      the same loss, positives = the c crops of one image (m = 1, c = 2)
    clip        image-text contrastive loss with a CLIP-style text transformer
    stablerep+  the multi-positive image loss + the image-text loss (text -> image uniform over the m images)

The defaults are the paper's ViT-B/16 recipe as the official code runs it (FIDELITY.md lists every item): per
GPU 43 captions x 6 images, as on each of its 32 GPUs (8256 images a step); lr = 2e-4 x images per step / 512;
the CC12M "1x" schedule (15 epochs, 0.5 warmup); the head's BatchNorm once per view.
"""
import argparse
import glob
import json
import math
import os
import subprocess
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import distributed
from augment import augment_crops
from cli import UserError, atomic_write_json, check_writable_folder, run
from data import CaptionImagesDataset, CaptionSampler, CaptionShardStream, collate
from dataindex import is_streamed
from loss import image_text_loss, multi_positive_loss
from model import (VIT_SIZES, ProjectionHead, StableRepModel, TextTransformer, build_vit, interpolate_pos_embed,
                   load_checkpoint_file, model_state_dict)

LOSSES = ("stablerep", "simclr", "clip", "stablerep+")
# m images per caption and c crops per image when not given: SimCLR sees one image in two crops
DEFAULT_VIEWS = {"stablerep": (6, 1), "simclr": (1, 2), "clip": (1, 1), "stablerep+": (6, 1)}
CHECKPOINT_GLOB = "checkpoint-*.pth"
# the official README's schedules: name -> (epochs, warmup epochs); "1x" is the paper's 35 epochs of 2 views
SCHEDULES = {
    "cc12m-1x": (15, 0.5), "cc12m-2x": (31, 1.0), "cc12m-3x": (46, 1.5),
    "redcaps-1x": (13, 0.45), "redcaps-2x": (27, 0.9), "redcaps-3x": (40, 1.35),
}


def get_args_parser():
    parser = argparse.ArgumentParser("pretrain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- data ----
    parser.add_argument("--data", nargs="+", required=True,
                        help="one or more sources, read at random through a cached index: a folder of generate.py "
                             "(tree or tar shards), img2dataset's --output_format files or webdataset folder, tar "
                             "paths or a brace pattern (shards/{00000..00123}.tar), or the official CSV of (image "
                             "path, caption) with --folder-list; or streamed: webdataset URLs (pipe:..., http(s)://, "
                             "gs://, patterns too), shuffled per shard (see --stream-captions)")
    parser.add_argument("--folder-list", nargs="+", default=None, metavar="ROOT",
                        help="image roots of a --data CSV, one per seed (the official --folder_list): an item opens "
                             "the row's relative path under m roots drawn without replacement")
    parser.add_argument("--stream-captions", type=int, default=None,
                        help="captions in an epoch of streamed --data URLs (required for them: a stream cannot be "
                             "counted in advance; generate.py's settings.json says captions_used, img2dataset's "
                             "stats say successes)")
    parser.add_argument("--shuffle-buffer", type=int, default=500,
                        help="samples each loader worker holds to shuffle streamed shards (500: about 125 MB of "
                             "10 JPEGs of 256 px per caption; more mixes better and costs memory)")
    parser.add_argument("--images-per-caption", type=int, default=None,
                        help="m, images of a caption in the batch, drawn without replacement (paper: 6 of the 10 "
                             "generated; more positives per caption help). Default: 6, or 1 for simclr and clip")
    parser.add_argument("--crops-per-image", type=int, default=None,
                        help="c, augmented crops of each image (paper: 1 for StableRep; SimCLR: 2). Default by --loss")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                        help="area fraction RandomResizedCrop keeps (paper: 0.08 1); tiny images need larger crops")
    parser.add_argument("--downsample-prob", type=float, default=0.0,
                        help="probability that the whole image is resized down to a shorter side drawn from "
                             "--downsample-res and back up before the crop; the official README's command uses 0.05 "
                             "(--downsample-prob 0.05 with the default --downsample-res reproduces it). Default 0, "
                             "off: the official README's own table scores it lower on the ImageNet linear probe "
                             "without BN, CC12M 1x 72.8 without vs 71.4 with, 3x 75.7 vs 75.4, RedCaps 1x 73.7 vs "
                             "73.4 (with BN: equal or lower)")
    parser.add_argument("--downsample-res", type=int, nargs="+", default=(64, 128), metavar="PIXELS",
                        help="shorter sides --downsample-prob picks from, uniformly (official: 64 128)")
    parser.add_argument("--gpu-augment", action="store_true",
                        help="run the colour jitter, grayscale, blur, flip and normalisation batched on the training "
                             "device: the loader workers then only decode, crop and resize, and ship uint8 crops (4x "
                             "smaller than float) with each crop's drawn parameters. For when the CPU cores cannot "
                             "feed the GPU (bench/bench_data.py prints the cost per image of both shares). Same "
                             "distribution and the same draws as without it, so resume stays exact")
    parser.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU")
    # ---- model ----
    parser.add_argument("--model", default="vit_base", choices=list(VIT_SIZES), help="encoder (paper: vit_base)")
    parser.add_argument("--depth", type=int, default=None,
                        help="transformer blocks, to shrink the encoder for quick runs (default: the size's own, 12)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (paper: 224)")
    parser.add_argument("--head-hidden-dim", type=int, default=4096, help="projection head width (paper: 4096)")
    parser.add_argument("--embed-dim", type=int, default=256, help="embedding of the multi-positive loss (paper: 256)")
    parser.add_argument("--text-width", type=int, default=512, help="text transformer width (CLIP: 512)")
    parser.add_argument("--text-layers", type=int, default=12, help="text transformer depth (CLIP: 12)")
    parser.add_argument("--text-heads", type=int, default=8, help="text transformer heads (CLIP: 8)")
    parser.add_argument("--context-length", type=int, default=77,
                        help="text tokens; longer captions are cut (CLIP: 77)")
    parser.add_argument("--tokenizer", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="CLIPTokenizer for clip and stablerep+: a hub id or local folder, with or without a "
                             "tokenizer/ subfolder (default: the tokenizer of generate.py's Stable Diffusion)")
    parser.add_argument("--head-batchnorm", default="per-view", choices=["per-view", "joint"],
                        help="per-view (official): the head runs once per view, so each BatchNorm batch holds one "
                             "image of every caption and its statistics never mix a caption's positives; joint: "
                             "one pass over all m x c images of the batch (one BN batch, cheaper on small batches)")
    # ---- objective ----
    parser.add_argument("--loss", default="stablerep", choices=LOSSES, help="training objective (see above)")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="tau of the multi-positive loss (paper: 0.1)")
    # ---- optimisation ----
    parser.add_argument("--schedule", default="cc12m-1x", choices=list(SCHEDULES),
                        help="the official README's schedules, epochs / warmup epochs: " + ", ".join(
                            f"{name} {epochs}/{warmup:g}" for name, (epochs, warmup) in SCHEDULES.items())
                        + ". Default cc12m-1x, the paper's main setting; --epochs / --warmup-epochs override it")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the captions (default: --schedule's)")
    parser.add_argument("--warmup-epochs", type=float, default=None,
                        help="linear warmup per step, then cosine decay to 0 (default: --schedule's)")
    parser.add_argument("--captions-per-gpu", type=int, default=43,
                        help="captions per GPU per step (paper: 43 x 6 images x 32 GPUs = 8256 images a step)")
    parser.add_argument("--base-lr", type=float, default=2e-4,
                        help="the official rule: lr = base-lr x images per step / 512, where images per step = "
                             "captions x m images x c crops x GPUs (the official `blr x batch x n_img / 256 x "
                             "num_crop / 2`: the same for StableRep, SimCLR and CLIP). Paper: 2e-4, i.e. 3.225e-3 "
                             "at 8256 images a step")
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="AdamW weight decay, not on biases, norms or the logit scale (paper: 0.1)")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98), help="AdamW betas (paper: 0.9 0.98)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="autocast: auto = bf16 on GPU, fp32 on CPU; fp16 adds a gradient scaler")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU, fixed shapes)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the caption order and every crop")
    # ---- checkpoints and logs ----
    parser.add_argument("--output", default="runs/stablerep", help="folder for checkpoints, logs and the encoder")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run: alone, from the newest checkpoint in --output; or from this file")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="start a new run (step 0, fresh optimiser) from these weights: an official StableRep or "
                             "StableRep+ checkpoint, one of ours, or a timm ViT state dict (encoder only); the parts "
                             "the file lacks (e.g. the text tower) keep their initialisation")
    parser.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and every epoch end)")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept in --output (older ones are deleted)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between lines of log.jsonl")
    return parser


# ---- checkpoints ----

def checkpoint_path(output, step):
    return os.path.join(output, f"checkpoint-{step:08d}.pth")


def list_checkpoints(output):
    return sorted(glob.glob(os.path.join(output, CHECKPOINT_GLOB)))


def save_checkpoint(path, state):
    """torch.save through a temporary name and a rename: a run killed mid-write keeps its last checkpoint."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def export_encoder(path, visual, args):
    """The encoder alone under timm's key names, with the config a later stage rebuilds it from."""
    save_checkpoint(path, {"model": visual.state_dict(),
                           "config": {"model": args.model, "image_size": args.image_size, **visual.config}})


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_tokenizer(name):
    from transformers import CLIPTokenizer
    errors = []
    for subfolder in ("tokenizer", ""):
        try:
            return CLIPTokenizer.from_pretrained(name, subfolder=subfolder)
        except (OSError, ValueError) as err:
            errors.append(str(err).splitlines()[0])
    raise UserError(f"cannot load a CLIP tokenizer from {name!r} ({errors[-1]}); pass --tokenizer with a local "
                    "folder (e.g. a Stable Diffusion snapshot) when the hub is unreachable")


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and embeddings, none on biases, norm weights and the logit scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(base_lr, images_per_step):
    """The official scaling rule: base_lr x images per step / 512 (main_stablerep.py's `blr x batch x n_img / 256
    x num_crop / 2`, which is this for every objective). The paper's 2e-4 at 8256 images a step: 3.225e-3."""
    return base_lr * images_per_step / 512


def cosine_lr(step, total_steps, warmup_steps, peak_lr):
    """Linear warmup from 0 to peak_lr over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def main(args):
    # ---- arguments ----
    default_m, default_c = DEFAULT_VIEWS[args.loss]
    args.images_per_caption = args.images_per_caption or default_m
    args.crops_per_image = args.crops_per_image or default_c
    schedule_epochs, schedule_warmup = SCHEDULES[args.schedule]
    args.epochs = schedule_epochs if args.epochs is None else args.epochs
    args.warmup_epochs = schedule_warmup if args.warmup_epochs is None else args.warmup_epochs
    if args.resume and args.init_from:
        raise UserError("--resume continues a run and --init-from starts a new one: give one of them")
    if min(args.images_per_caption, args.crops_per_image, args.captions_per_gpu, args.epochs, args.save_every,
           args.keep, args.log_every) < 1:
        raise UserError("--images-per-caption, --crops-per-image, --captions-per-gpu, --epochs, --save-every, "
                        "--keep and --log-every must be at least 1")
    if args.images_per_caption * args.crops_per_image * args.captions_per_gpu < 2:
        raise UserError("a contrastive batch needs at least two images per GPU")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop-scale {args.crop_scale[0]:g} {args.crop_scale[1]:g} must satisfy "
                        "0 < MIN <= MAX <= 1")
    if not 0 <= args.downsample_prob <= 1 or min(args.downsample_res) < 1:
        raise UserError(f"--downsample-prob {args.downsample_prob:g} must be in [0, 1] and --downsample-res "
                        f"{' '.join(map(str, args.downsample_res))} at least 1 pixel")
    if args.image_size % 16:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the patch size 16")

    # ---- distributed ----
    device = distributed.init_distributed()
    world_size, rank, is_main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(args.seed)

    # ---- data ----
    tokenizer = load_tokenizer(args.tokenizer) if args.loss in ("clip", "stablerep+") else None
    views = dict(images_per_caption=args.images_per_caption, crops_per_image=args.crops_per_image,
                 image_size=args.image_size, seed=args.seed, tokenizer=tokenizer, context_length=args.context_length,
                 crop_scale=args.crop_scale, downsample_prob=args.downsample_prob,
                 downsample_res=args.downsample_res, augment_on_device=args.gpu_augment)
    streamed = [spec for spec in args.data if is_streamed(spec)]
    if args.folder_list and not any(spec.lower().endswith(".csv") for spec in args.data):
        raise UserError("--folder-list goes with a --data CSV of (image path, caption)")
    if streamed:  # webdataset URLs: shard-level shuffling, an epoch of --stream-captions captions
        if len(streamed) < len(args.data):
            raise UserError(f"--data mixes streamed URLs ({streamed[0]}) with local data: stream all or none")
        if not args.stream_captions or args.stream_captions < 1 or args.shuffle_buffer < 1:
            raise UserError("streamed --data needs --stream-captions N (the captions of an epoch) and "
                            "--shuffle-buffer >= 1")
        dataset = CaptionShardStream(args.data, args.stream_captions, args.captions_per_gpu, rank=rank,
                                     world_size=world_size, workers=args.workers, shuffle_buffer=args.shuffle_buffer,
                                     **views)
        sampler = dataset  # its own epoch schedule (set_epoch, steps_per_epoch); fresh workers copy it each epoch
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.captions_per_gpu, num_workers=args.workers,
                                             collate_fn=collate, pin_memory=device.type == "cuda")
    else:  # random access through the cached index, built once by each node's first process
        builder = int(os.environ.get("LOCAL_RANK", 0)) == 0
        if world_size > 1 and not builder:
            torch.distributed.barrier()
        try:
            dataset = CaptionImagesDataset(args.data, folder_list=args.folder_list, build_index=builder,
                                           fallback_cache=os.path.join(args.output, "index-cache"), **views)
        except ValueError as err:
            raise UserError(str(err)) from None
        if world_size > 1 and builder:
            torch.distributed.barrier()
        fewest, fewest_count = dataset.fewest_images()
        if fewest_count < args.images_per_caption:
            raise UserError(f"--images-per-caption {args.images_per_caption} is more than "
                            f"{dataset.describe(fewest)} has: {fewest_count} image(s)")
        sampler = CaptionSampler(len(dataset), args.captions_per_gpu, rank, world_size, args.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                             collate_fn=collate, pin_memory=device.type == "cuda",
                                             persistent_workers=args.workers > 0)
    if sampler.steps_per_epoch < 1:
        raise UserError(f"{len(dataset)} captions are fewer than one step needs "
                        f"({args.captions_per_gpu} per GPU x {world_size} GPUs)")
    images_per_step = args.captions_per_gpu * args.images_per_caption * args.crops_per_image * world_size
    total_steps = sampler.steps_per_epoch * args.epochs
    warmup_steps = max(1, round(args.warmup_epochs * sampler.steps_per_epoch))
    lr = scaled_lr(args.base_lr, images_per_step)

    # ---- model ----
    model = build_model(args, tokenizer).to(device)
    if world_size > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only; gloo/CPU keeps local BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trainable = model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(model) if args.compile else model

    # ---- optimiser and schedule ----
    optimizer = torch.optim.AdamW(param_groups(trainable, args.weight_decay), lr=lr, betas=tuple(args.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    # ---- resume ----
    if is_main:
        check_writable_folder(args.output)
    step = 0
    resume_path = args.resume
    if resume_path == "latest":
        found = list_checkpoints(args.output)
        resume_path = found[-1] if found else None
    elif resume_path is None and list_checkpoints(args.output):
        raise UserError(f"{args.output} already holds checkpoints: pass --resume to continue that run, or choose "
                        "another --output")
    if resume_path:
        step = resume(resume_path, trainable, optimizer, scaler, args)
    elif args.init_from:
        loaded = init_from(args.init_from, trainable)
        if is_main:
            print(f"initialised {', '.join(loaded)} from {args.init_from}")
    if is_main:
        print(f"{len(dataset)} captions; {images_per_step} images a step = {args.captions_per_gpu} captions x "
              f"{args.images_per_caption} images x {args.crops_per_image} crops x {world_size} process(es); "
              f"lr = {args.base_lr:g} x {images_per_step} / 512 = {lr:.4g}; {args.epochs} epochs = {total_steps} "
              f"steps ({sampler.steps_per_epoch} per epoch, {warmup_steps} warmup); {precision} on {device}"
              + (f"; resumed at step {step}" if step else ""))
        atomic_write_json(os.path.join(args.output, "run.json"),
                          {"args": vars(args), "git_commit": git_commit(), "world_size": world_size,
                           "torch": torch.__version__, "images_per_step": images_per_step, "lr": lr,
                           "total_steps": total_steps, "resumed_from": resume_path})

    # ---- loop ----
    log = open(os.path.join(args.output, "log.jsonl"), "a") if is_main else None
    progress = tqdm(total=total_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    start_time, start_step, loss_value, corrupt_total = time.time(), step, float("nan"), 0
    window_time, window_start = time.time(), step
    model.train()
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, start_step=step_in_epoch)
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, warmup_steps, lr)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = compute_loss(forward, batch, args, device)
            if not torch.isfinite(loss):
                raise SystemExit(f"pretrain.py: error: loss is {loss.item()} at step {step} (epoch {epoch}); stopping")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            trainable.clamp_logit_scale()
            step += 1
            loss_value, corrupt_total = loss.item(), corrupt_total + batch["corrupt"]
            progress.update(1)
            if step % args.log_every == 0 or step == total_steps:
                images_per_second = (step - window_start) * images_per_step / (time.time() - window_time)
                window_time, window_start = time.time(), step
                record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": images_per_second, "corrupt_images": corrupt_total}
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}",
                                     img_s=f"{images_per_second:.1f}")
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if step % args.save_every == 0 or step % sampler.steps_per_epoch == 0:
                if is_main:
                    save(trainable, optimizer, scaler, step, args)
            if step == total_steps:
                break
    progress.close()

    # ---- save ----
    if is_main:
        export_encoder(os.path.join(args.output, "encoder.pth"), trainable.visual, args)
        elapsed = time.time() - start_time
        summary = {"steps": step, "images_seen": step * images_per_step, "steps_this_run": step - start_step,
                   "seconds_this_run": elapsed, "final_loss": loss_value, "corrupt_images": corrupt_total}
        atomic_write_json(os.path.join(args.output, "summary.json"), summary)
        print(f"done: {step} steps, {step * images_per_step} images seen, {elapsed:.0f}s this run, final loss "
              f"{loss_value:.4f}; encoder in {os.path.join(args.output, 'encoder.pth')}")
        log.close()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def build_model(args, tokenizer=None):
    """The encoder with the heads args.loss needs (the text tower only for clip and stablerep+)."""
    visual = build_vit(args.model, image_size=args.image_size, depth=args.depth)
    image_mlp = ProjectionHead(visual.width, args.head_hidden_dim, args.embed_dim) if args.loss != "clip" else None
    text = (TextTransformer(len(tokenizer), tokenizer.eos_token_id, args.context_length, args.text_width,
                            args.text_layers, args.text_heads) if tokenizer is not None else None)
    return StableRepModel(visual, image_mlp, text, head_batchnorm=args.head_batchnorm)


def compute_loss(model, batch, args, device):
    """The objective of args.loss on one batch from data.collate."""
    images = batch["images"].to(device, non_blocking=True)
    if batch["color"] is not None:  # --gpu-augment: uint8 crops [N, S, S, 3] -> float [N, 3, S, S], on the device
        images = augment_crops(images, batch["color"])
    tokens = batch["tokens"].to(device, non_blocking=True) if batch["tokens"] is not None else None
    views = len(images) // len(batch["caption_labels"])  # m images x c crops of each caption, caption-major
    out = model(images, tokens, views=views)
    loss = 0.0
    if args.loss in ("stablerep", "stablerep+"):
        loss = multi_positive_loss(out["image"], batch["image_labels"].to(device), args.temperature)
    elif args.loss == "simclr":
        loss = multi_positive_loss(out["image"], batch["crop_labels"].to(device), args.temperature)
    if args.loss in ("clip", "stablerep+"):
        loss = loss + image_text_loss(out["image_text"], out["text"], batch["image_labels"].to(device),
                                      batch["caption_labels"].to(device), out["logit_scale"])
    return loss


def save(model, optimizer, scaler, step, args):
    """A checkpoint that continues the run exactly (all randomness after it is a function of seed and step)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "args": vars(args), "rng": {"torch": torch.get_rng_state()}}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    save_checkpoint(checkpoint_path(args.output, step), state)
    for old in list_checkpoints(args.output)[:-args.keep]:
        os.remove(old)


def init_from(path, model):
    """Load the weights of `path` (ours, official, or an encoder alone) into `model` where names and shapes
    match; returns the top-level parts loaded. UserError when the encoder does not fit or nothing matches."""
    try:
        state = model_state_dict(load_checkpoint_file(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    own = model.state_dict()
    if "visual.pos_embed" in state:  # another input size: resample the position grid as load_encoder does
        state["visual.pos_embed"] = interpolate_pos_embed(state["visual.pos_embed"], model.visual.patch_embed.grid_size)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise UserError(f"{path} does not fit this model: {mismatched[0]} is {tuple(state[mismatched[0]].shape)} "
                        f"there, {tuple(own[mismatched[0]].shape)} here (check --model, --depth, --image-size, "
                        "--embed-dim, --head-hidden-dim and the text tower's flags)")
    missing_encoder = [k for k in own if k.startswith("visual.") and k not in state]
    if missing_encoder:
        raise UserError(f"{path} lacks encoder weights this model needs, e.g. {missing_encoder[0]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted({k.split(".")[0] for k in state if k in own})


def resume(path, model, optimizer, scaler, args):
    """Load a checkpoint into model, optimizer and scaler; returns the step to continue from."""
    try:
        state = load_checkpoint_file(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict) or "step" not in state:
        raise UserError(f"{path} is not a pretrain.py checkpoint (an official StableRep checkpoint or an encoder "
                        "has no optimiser step or random state to continue): start from its weights with "
                        "--init-from instead")
    saved = state["args"]
    for key in ("model", "depth", "loss", "image_size", "embed_dim", "head_hidden_dim"):
        if saved.get(key) != getattr(args, key):
            raise UserError(f"{path} was trained with --{key.replace('_', '-')} {saved.get(key)}, not "
                            f"{getattr(args, key)}; resume with the same settings or choose another --output")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit this model ({str(err).splitlines()[0]})") from None
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


if __name__ == "__main__":
    run(main, get_args_parser())
