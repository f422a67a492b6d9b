"""One full StableRep training step, images/s: our ViT against timm's VisionTransformer as the encoder.

    python bench/bench_train_step.py                                   # ViT-S/16 at 224, 4 captions x 6, CPU fp32
    python bench/bench_train_step.py --model vit_base --captions 43 --device cuda --amp   # the paper's per-GPU batch

The step is pretrain.py's own: pretrain.build_model (encoder + projection head), pretrain.compute_loss (the
multi-positive loss on caption labels), backward, and an AdamW step on pretrain.param_groups, under bf16 autocast
with --amp. The only difference between the sides is `model.visual`: ours, or timm's VisionTransformer (wrapped
to return the class token feature, forward_head(forward_features(x), pre_logits=True)). Both start from the same
weights (timm's encoder state dict loaded into ours, one projection head copied) and see the same batch, made by
data.collate from random images. The sides are timed alternately (ours, timm, ours, ...) so that drift in the
machine's speed hits both alike; the median step time is reported. On a GPU the bench also prints each side's
peak memory: its own weights, buffers and AdamW state plus the rise of torch's allocation during its step (the
other side's model, also on the GPU, is left out).
The first step's losses are printed as a check that the two sides compute the same thing. Needs `pip install timm`.

    python bench/bench_train_step.py --objectives stablerep mocov3 byol dino mae --threads 1   # the families

With --objectives, the sides are objectives instead: each one's whole pretrain.py step (its recipe's networks, its
hooks before and after the step, its loss, backward, AdamW), all on our ViT, at the same number of --crops of
--image-size a step (StableRep: captions x 6 images; SimCLR, MoCo v3, BYOL, DINO: images x 2 views, DINO also with
its 8 local crops of 96 px an image; MAE: images x 1), timed alternately, each against the first one named.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import CaptionImages, collate  # noqa: E402
from model import VIT_SIZES  # noqa: E402
from pretrain import (  # noqa: E402
    OBJECTIVES,
    StepPosition,
    build_model,
    compute_loss,
    family_crops,
    fill_recipe,
    get_args_parser,
    objective_lr,
    param_groups,
    scaled_lr,
)

TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224"}


class TimmFeatures(nn.Module):
    """timm's ViT as a drop-in `visual`: images [B, 3, H, W] -> class token feature [B, D]."""

    def __init__(self, timm_model):
        super().__init__()
        self.model = timm_model
        self.width = timm_model.num_features

    def forward(self, images):
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def make_batch(args):
    """A batch as data.collate gives it: captions x m random images, labels 0..captions-1."""
    generator = torch.Generator().manual_seed(0)
    m, size = args.images_per_caption, args.image_size
    items = [CaptionImages(torch.randn(m, 3, size, size, generator=generator), label, torch.arange(m), None, 0)
             for label in range(args.captions)]
    return collate(items)


def side_bytes(model, optimizer, device_type="cuda"):
    """Bytes one side holds between steps on devices of `device_type`: its weights, buffers and AdamW state
    (gradients are freed by zero_grad(set_to_none=True) inside the step, so they count in the step's rise)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device_type)


def build_sides(model_name, image_size, images_per_step, device, depth=None):
    """pretrain.py's arguments (its defaults, with this model, size and the stablerep loss), and per side ("ours",
    "timm") the model on `device` in train mode and its AdamW on pretrain.param_groups at the scaled lr. Both sides
    start from the same weights: timm's encoder state dict loaded into ours, one projection head copied."""
    import timm
    run_args = fill_recipe(get_args_parser().parse_args(["--data", "unused", "--model", model_name, "--image-size",
                                                         str(image_size), "--loss", "stablerep"]
                                                        + (["--depth", str(depth)] if depth else [])))
    torch.manual_seed(0)
    reference = timm.create_model(TIMM_NAMES[model_name], num_classes=0, img_size=image_size,
                                  **({"depth": depth} if depth else {}))
    ours = build_model(run_args)
    ours.visual.load_state_dict(reference.state_dict())
    theirs = copy.deepcopy(ours)  # the same projection head
    theirs.visual = TimmFeatures(reference)
    models = {"ours": ours.to(device).train(), "timm": theirs.to(device).train()}
    lr = scaled_lr(run_args.base_lr, images_per_step)  # pretrain.py's rule (base x images / 512)
    optimizers = {side: torch.optim.AdamW(param_groups(model, run_args.weight_decay), lr=lr,
                                          betas=tuple(run_args.betas)) for side, model in models.items()}
    return run_args, models, optimizers


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, batch, run_args, device, amp):
    """pretrain.py's loop body: autocast forward + loss, backward, AdamW step. Returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext():
        loss, _ = compute_loss(model, batch, OBJECTIVES[run_args.loss], run_args, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def objective_side(name, model_name, image_size, crops, device, flags=()):
    """(pretrain.py's arguments, model, AdamW, batch) of one objective at `crops` crops a step: its recipe (with
    `flags` on top), this model and size, random images in its own views (DINO's local crops, the crops' noise)."""
    run_args = fill_recipe(get_args_parser().parse_args(["--data", "unused", "--model", model_name, "--image-size",
                                                         str(image_size), "--loss", name, *flags]))
    m, c = run_args.images_per_caption, run_args.crops_per_image
    captions = crops // (m * c)
    family = family_crops(run_args)
    local, noise = family.get("local"), family.get("noise_per_crop", 0)
    generator = torch.Generator().manual_seed(0)
    size = image_size

    def random(*shape):
        return torch.randn(*shape, generator=generator)

    items = [CaptionImages(random(m * c, 3, size, size), label, torch.arange(m), None, 0,
                           local_images=random(m * local.count, 3, local.size, local.size) if local else None,
                           noise=torch.rand(m * c, noise, generator=generator) if noise else None,
                           local_noise=(torch.rand(m * local.count, noise, generator=generator) if local and noise
                                        else None))
             for label in range(captions)]
    torch.manual_seed(0)
    model = build_model(run_args).to(device).train()
    lr, _ = objective_lr(OBJECTIVES[name], run_args.base_lr, captions * m * c, c)
    optimizer = torch.optim.AdamW(param_groups(model, run_args.weight_decay), lr=lr, betas=tuple(run_args.betas))
    return run_args, model, optimizer, collate(items)


def objective_step(model, optimizer, batch, run_args, device, amp, step):
    """pretrain.py's loop body with the objective's hooks (total 1000 steps, 100 an epoch). Returns the loss."""
    objective, position = OBJECTIVES[run_args.loss], StepPosition(step, 100, 1000)
    for hook in objective.before_step:
        hook(model, optimizer, position, run_args)
    with torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext():
        loss, _ = compute_loss(model, batch, objective, run_args, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for hook in objective.after_backward:
        hook(model, optimizer, position, run_args)
    optimizer.step()
    for hook in objective.after_step:
        hook(model, optimizer, position, run_args)
    return loss.detach()


def compare_objectives(args, device):
    sides = {name: objective_side(name, args.model, args.image_size, args.crops, device)
             for name in args.objectives}
    print(f"{args.model}/16 at {args.image_size}, {args.crops} crops of {args.image_size} px a step per objective; "
          f"device={device}, amp(bf16)={args.amp}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    times = {name: [] for name in sides}
    for repeat in range(args.warmup + args.repeats):
        for name, (run_args, model, optimizer, batch) in sides.items():
            synchronize(device)
            start = time.perf_counter()
            objective_step(model, optimizer, batch, run_args, device, args.amp, repeat)
            synchronize(device)
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
    first = args.objectives[0]
    print(f"{'objective':10s} {'crops a step':>22s} {'median s/step':>14s} {'vs ' + first:>12s}   steps (s)")
    for name, (run_args, _, _, batch) in sides.items():
        local = batch["local_images"]
        crops = f"{len(batch['images'])}" + (f" + {len(local)} of {local.shape[-1]} px" if local is not None else "")
        median = statistics.median(times[name])
        print(f"{name:10s} {crops:>22s} {median:14.3f} {median / statistics.median(times[first]):11.2f}x   "
              + " ".join(f"{t:.2f}" for t in times[name]))


def main(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.amp and device.type != "cuda":
        raise SystemExit("bench_train_step.py: error: --amp (bf16 autocast) is the GPU recipe; "
                         "use it with --device cuda")
    if args.objectives:
        return compare_objectives(args, device)
    import timm
    # pretrain.py's own arguments, defaults and all, with this bench's model and batch
    images = args.captions * args.images_per_caption
    run_args, models, optimizers = build_sides(args.model, args.image_size, images, device)
    lr = optimizers["ours"].param_groups[0]["lr"]
    batch = make_batch(args)
    print(f"{args.model}/16 at {args.image_size}, {args.captions} captions x {args.images_per_caption} images = "
          f"{images} images a step, head {run_args.head_hidden_dim}-{run_args.embed_dim}, AdamW lr {lr:.3g}; "
          f"device={device}, amp(bf16)={args.amp}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
          f"timm {timm.__version__}")

    times, first_loss, peak_mib = {side: [] for side in models}, {}, {}
    for repeat in range(args.warmup + args.repeats):
        for side, model in models.items():
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loss = train_step(model, optimizers[side], batch, run_args, device, args.amp)
            synchronize(device)
            elapsed = time.perf_counter() - start
            first_loss.setdefault(side, loss.item())
            if repeat >= args.warmup:
                times[side].append(elapsed)
            if device.type == "cuda":
                step_peak = torch.cuda.max_memory_allocated() - resident + side_bytes(model, optimizers[side])
                peak_mib[side] = max(peak_mib.get(side, 0), step_peak / 2 ** 20)
    print(f"first-step loss: ours {first_loss['ours']:.6f}, timm {first_loss['timm']:.6f} "
          f"(difference {abs(first_loss['ours'] - first_loss['timm']):.1e})")
    print(f"{'':6s} {'img/s':>8s} {'median s/step':>14s} {'steps (s)':>s}" + ("   peak MiB" if peak_mib else ""))
    for side in models:
        median = statistics.median(times[side])
        rounds = " ".join(f"{t:.2f}" for t in times[side])
        print(f"{side:6s} {images / median:8.1f} {median:14.3f}   {rounds}"
              + (f"   {peak_mib[side]:.0f}" if peak_mib else ""))
    ratio = statistics.median(times["timm"]) / statistics.median(times["ours"])
    print(f"ours/timm images/s: {ratio:.2f}x (goal: at least 1.0x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small", choices=list(VIT_SIZES),
                        help="encoder (paper: vit_base; vit_small keeps a CPU run to a couple of minutes)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (paper: 224)")
    parser.add_argument("--captions", type=int, default=4, help="captions per step (paper: 43 per GPU)")
    parser.add_argument("--images-per-caption", type=int, default=6, help="m, images per caption (paper: 6)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast, as pretrain.py on a GPU")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side; the median is reported")
    parser.add_argument("--objectives", nargs="+", default=None,
                        choices=[name for name, o in OBJECTIVES.items() if not o.text],
                        help="time these objectives' steps against the first one named, instead of our ViT "
                             "against timm's")
    parser.add_argument("--crops", type=int, default=24,
                        help="with --objectives: crops of --image-size a step for every objective (24 = StableRep's "
                             "4 captions x 6 images)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core); 1 avoids spin-waiting on cores "
                             "shared with other jobs")
    main(parser.parse_args())
