"""A short CPU run of the real encoder, head and multi-positive loss on random tensors (no data needed).

Stands in for the end-to-end demo until the data stages exist: it shows the pieces fit and the loss goes down.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from cli import run
from loss import multi_positive_loss
from model import ProjectionHead, build_vit


def get_args_parser():
    parser = argparse.ArgumentParser("demo.py", description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="optimisation steps on one fixed random batch")
    parser.add_argument("--captions", type=int, default=8, help="captions in the batch")
    parser.add_argument("--images-per-caption", type=int, default=6, help="m, 6 in the paper")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def main(args):
    torch.manual_seed(args.seed)
    encoder = build_vit("vit_tiny", image_size=32, depth=2)
    head = ProjectionHead(encoder.width, hidden_dim=256, out_dim=64)
    images = torch.randn(args.captions * args.images_per_caption, 3, 32, 32)
    labels = torch.arange(args.captions).repeat_interleave(args.images_per_caption)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1)
    start = time.time()
    for step in range(args.steps):
        loss = multi_positive_loss(F.normalize(head(encoder(images)), dim=1), labels, temperature=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0 or step == args.steps - 1:
            print(f"step {step:3d}  multi-positive loss {loss.item():.4f}")
    print(f"{args.steps} steps on {len(images)} random images in {time.time() - start:.1f}s")


if __name__ == "__main__":
    run(main, get_args_parser())
