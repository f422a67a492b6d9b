"""generate.py's batched generator against a one-image-at-a-time loop of the same pipeline.

    python bench/bench_generate.py                       # the tiny random-weight pipeline (demo/tiny_sd.py) on the CPU
    python bench/bench_generate.py --model sd15-folder --size 512 --stored-size 256 --steps 50   # a real model

Both sides make the same images (same pipeline object, scheduler, seeds, w) and write them to disk at the stored
size: the loop calls `pipe(caption, generator=...)` once per image, as a first script would; the batched side is
generate.write_shards (captions and seeds in one batch, each caption encoded once, a writer pool). Each side is
warmed up on one call of its batch shape first. Prints images/s side by side, the ratio and the largest pixel
difference between the two sets (CPU batch kernels: at most a level or so).
"""
import argparse
import itertools
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import generate  # noqa: E402
from demo.tiny_sd import save_tiny_pipeline  # noqa: E402
from util import imagetree  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("bench_generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder or id; default: a fresh demo/tiny_sd.py pipeline")
    parser.add_argument("--captions", type=int, default=12, help="captions to generate for")
    parser.add_argument("--n", type=int, default=4, help="images per caption")
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps")
    parser.add_argument("--size", type=int, default=32, help="generated size (32 for the tiny pipeline)")
    parser.add_argument("--stored-size", type=int, default=32, help="stored size")
    parser.add_argument("--batch-size", type=int, default=48, help="images per batch on the batched side")
    parser.add_argument("--dtype", default="auto", choices=("auto",) + tuple(generate.DTYPES))
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds, the two sides alternating; the best round of each is reported (the "
                             "machine is shared: the best round is the least disturbed one)")
    return parser


def generator_args(args, model, output, *extra):
    """generate.py's arguments for this bench's sizes (args: n, steps, size, stored_size, batch_size, dtype), plus
    `extra` flags (e.g. "--scheduler", "dpm-solver++")."""
    return generate.get_args_parser().parse_args([
        "--captions", "unused", "--model", model, "--output", output, "--n", str(args.n), "--steps", str(args.steps),
        "--size", str(args.size), "--stored-size", str(args.stored_size), "--format", "png",
        "--batch-size", str(args.batch_size), "--dtype", args.dtype, *extra])


def one_at_a_time(pipe, captions, gen, output):
    """The naive loop: one pipeline call per image, prompt re-encoded each time, written before the next."""
    for i, caption in captions.items():
        for k in range(gen.n):
            generator = torch.Generator().manual_seed(generate.image_seed(gen.seed, i, k))  # the same latents
            image = pipe(caption, height=gen.size, width=gen.size, num_inference_steps=gen.steps,
                         guidance_scale=gen.w, eta=gen.eta, generator=generator).images[0]
            image = image.resize((gen.stored_size, gen.stored_size), Image.Resampling.LANCZOS) \
                if image.width != gen.stored_size else image
            imagetree.write_caption(output, i, caption)
            imagetree.write_image(output, i, k, image, gen.format)


def batched(pipe, captions, gen):
    os.makedirs(gen.output, exist_ok=True)  # write_shards writes into an existing output (its shard locks first)
    prompts = generate.PromptCache(pipe, pipe.device)
    by_shard = itertools.groupby(sorted(captions.items()), key=lambda item: item[0] // gen.captions_per_shard)
    generate.write_shards(pipe, prompts, ((shard, list(items)) for shard, items in by_shard),
                          generate.TreeOutput(gen), gen, show_progress=False)


def main(args):
    work = tempfile.mkdtemp(prefix="bench_generate_")
    model = args.model or save_tiny_pipeline(os.path.join(work, "tiny_sd"), image_size=args.size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = generator_args(args, model, os.path.join(work, "batched"))
    pipe = generate.load_pipeline(gen, device, generate.resolve_dtype(args.dtype, device))
    words = "a photo of the red cat dog car house on beach with blue sky and two old birds".split()
    captions = {i: " ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(args.captions)}
    images = args.captions * args.n
    print(f"{images} images ({args.captions} captions x {args.n}), {args.size}px, DDIM {args.steps} steps, "
          f"w={gen.w:g}, {device}, {torch.get_num_threads()} CPU threads, model {args.model or 'demo/tiny_sd.py'}")

    # warm-up: the first call of each batch shape pays for kernel selection
    one_at_a_time(pipe, {0: captions[0]}, gen, os.path.join(work, "warmup_loop"))
    warm = generator_args(args, model, os.path.join(work, "warmup_batched"))
    batched(pipe, {i: captions[i] for i in list(captions)[:max(1, args.batch_size // args.n)]}, warm)

    loop_times, batch_times = [], []
    for round_ in range(args.repeats):
        loop_folder = os.path.join(work, f"loop{round_}")
        start = time.perf_counter()
        one_at_a_time(pipe, captions, gen, loop_folder)
        loop_times.append(time.perf_counter() - start)
        gen.output = os.path.join(work, f"batched{round_}")
        start = time.perf_counter()
        batched(pipe, captions, gen)
        batch_times.append(time.perf_counter() - start)
    loop_rate, batch_rate = images / min(loop_times), images / min(batch_times)

    diff = max(np.abs(np.asarray(Image.open(imagetree.image_path(loop_folder, i, k, "png")), dtype=int) -
                      np.asarray(Image.open(imagetree.image_path(gen.output, i, k, "png")), dtype=int)).max()
               for i in captions for k in range(args.n))
    rounds = lambda times: ", ".join(f"{images / t:.1f}" for t in times)  # noqa: E731
    print(f"one image at a time : {loop_rate:7.2f} images/s   (rounds: {rounds(loop_times)})")
    print(f"batched ({args.batch_size:3d} images): {batch_rate:7.2f} images/s   (rounds: {rounds(batch_times)})")
    print(f"ratio               : {batch_rate / loop_rate:7.2f}x   (largest pixel difference between the two: {diff})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
