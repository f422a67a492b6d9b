"""Our hand-written ViT against timm's at the same configuration: forward + backward images/s.

    python bench/bench_vit.py                          # ViT-S/16 and ViT-B/16 at 224, CPU, fp32
    python bench/bench_vit.py --device cuda --amp      # GPU, bf16 autocast

Both models get the same weights (timm's state dict loaded into ours), the same input batch and the same
loss (sum of the class-token features), timed alternately (ours, timm, ours, ...) so that drift in the machine's
speed hits both sides alike; the median step time is reported. Needs `pip install timm`.
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_vit  # noqa: E402

TIMM_NAMES = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def step(model, images, amp, device):
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if amp else nullcontext():
        features = model(images)
    features.float().sum().backward()


def timm_features(timm_model):
    return lambda images: timm_model.forward_head(timm_model.forward_features(images), pre_logits=True)


def main(args):
    import timm
    torch.manual_seed(0)
    print(f"device={args.device}, batch={args.batch}, image={args.image_size}, amp(bf16)={args.amp}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}, timm {timm.__version__}")
    print(f"{'model':10s} {'ours img/s':>11s} {'timm img/s':>11s} {'ours/timm':>10s}")
    for name in args.models:
        reference = timm.create_model(TIMM_NAMES[name], num_classes=0, img_size=args.image_size).to(args.device)
        ours = build_vit(name, image_size=args.image_size).to(args.device)
        ours.load_state_dict(reference.state_dict())
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
        sides = {"ours": ours, "timm": timm_features(reference)}
        times = {side: [] for side in sides}
        for repeat in range(args.warmup + args.repeats):
            for side, model in sides.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(model, images, args.amp, args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if repeat >= args.warmup:
                    times[side].append(time.perf_counter() - start)
        ours_rate, timm_rate = (args.batch / statistics.median(times[side]) for side in ("ours", "timm"))
        print(f"{name:10s} {ours_rate:11.1f} {timm_rate:11.1f} {ours_rate / timm_rate:9.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small", "vit_base"], choices=list(TIMM_NAMES))
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (the GPU recipe)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side; the median is reported")
    main(parser.parse_args())
