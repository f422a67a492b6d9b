"""Data loading images/s: pretrain.py's loader against a plain loop that decodes and augments the same files.

    python bench/bench_data.py                  # 48 captions x 6 of 10 images, 256 px JPEGs -> 224 crops, 2 workers
    python bench/bench_data.py --workers 0      # the loader in the main process: the Dataset's own overhead

The bench writes its own image tree in a temporary folder (imagetree's layout, as generate.py writes it: 10
JPEGs of 256 x 256 per caption, quality 95, smooth random images so they compress like real ones, and each
folder's _index.json). The loader side is built as pretrain.py builds it: CaptionImagesDataset (m images of a
caption, one crop each, pretrain_augmentation) + CaptionSampler + collate in a torch DataLoader with --workers
processes, started afresh for every pass as pretrain.py does each epoch. The loop side decodes
(data.decode_rgb) and augments (data.pretrain_augmentation) the very files the loader chose, one after the other
in this process, and stacks each step's crops. Both sides are timed alternately over one pass of the captions;
the median pass is reported.

What the ratio means: with --workers 2 the loader runs two decoding processes, the loop one process (with torch's
default intra-op threads, which the augmentations barely use), so on a 2-core machine the ratio measures what
the loader gains from parallel workers net of its overhead (process start, pickling of the batches, seeding). With
--workers 0 both run in one process and the ratio is the Dataset's per-image overhead alone (forked generator,
random choice of images, stacking, collate).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imagetree  # noqa: E402
from data import CaptionImagesDataset, CaptionSampler, collate, decode_rgb, pretrain_augmentation  # noqa: E402


def smooth_image(rng, size):
    """A random but smooth RGB image: 8 x 8 random colours upsampled bicubically, plus mild noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
    pixels = pixels + rng.integers(-8, 9, pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_tree(root, captions, images_per_caption, size):
    rng = np.random.default_rng(0)
    for caption_id in range(captions):
        imagetree.write_caption(root, caption_id, f"a synthetic caption number {caption_id}")
        for k in range(images_per_caption):
            imagetree.write_image(root, caption_id, k, smooth_image(rng, size))
    for folder in sorted(os.listdir(root)):
        imagetree.index_folder(os.path.join(root, folder))


def make_loader(dataset, sampler, workers):
    """As pretrain.py builds it (CPU: no pinned memory)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                       pin_memory=False, persistent_workers=False)


def loader_pass(dataset, sampler, workers):
    """One pass; returns (seconds, images, the (caption, image index) pairs of every step)."""
    start = time.perf_counter()
    images, chosen = 0, []
    for batch in make_loader(dataset, sampler, workers):
        images += len(batch["images"])
        labels = batch["crop_labels"]  # caption label * 2**20 + image index, one per crop
        chosen.append(list(zip((labels // 2 ** 20).tolist(), (labels % 2 ** 20).tolist())))
    return time.perf_counter() - start, images, chosen


def loop_pass(records, chosen, augment):
    """Decode and augment the same files in this process, stacking each step's crops as collate does."""
    start = time.perf_counter()
    images = 0
    for step in chosen:
        crops = [augment(decode_rgb(records[label].image_paths[index])) for label, index in step]
        images += len(torch.stack(crops))
    return time.perf_counter() - start, images


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        write_tree(root, args.captions, args.images_stored, args.stored_size)
        dataset = CaptionImagesDataset([root], args.images_per_caption, 1, args.image_size, seed=0)
        sampler = CaptionSampler(len(dataset), args.captions_per_step)
        augment = pretrain_augmentation(args.image_size)
        _, _, chosen = loader_pass(dataset, sampler, args.workers)  # warm-up (page cache), and the files chosen
        loop_pass(dataset.records, chosen, augment)
        rates = {"loader": [], "loop": []}
        for _ in range(args.repeats):
            seconds, images, _ = loader_pass(dataset, sampler, args.workers)
            rates["loader"].append(images / seconds)
            seconds, images = loop_pass(dataset.records, chosen, augment)
            rates["loop"].append(images / seconds)
    per_pass = sum(len(step) for step in chosen)
    print(f"{args.captions} captions x {args.images_stored} JPEGs of {args.stored_size} px; a pass = "
          f"{sampler.steps_per_epoch} steps x {args.captions_per_step} captions x {args.images_per_caption} images = "
          f"{per_pass} images, {args.image_size} px crops; cpu cores={os.cpu_count()}, torch threads="
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    workers = f"{args.workers} worker process(es)" if args.workers else "no workers, in the main process"
    print(f"{'':7s} {'img/s':>7s}   passes (img/s)")
    for side, label in (("loader", f"DataLoader, {workers}"), ("loop", "plain loop, 1 process")):
        rounds = " ".join(f"{r:.1f}" for r in rates[side])
        print(f"{side:7s} {statistics.median(rates[side]):7.1f}   {rounds}   ({label})")
    ratio = statistics.median(rates["loader"]) / statistics.median(rates["loop"])
    print(f"loader/loop images/s: {ratio:.2f}x (goal: at least 0.9x)")
    if args.workers > 1:
        print(f"note: the loader runs {args.workers} processes and the loop 1, on {os.cpu_count()} cores: the ratio "
              "includes the workers' parallelism; --workers 0 compares the Dataset's overhead at equal parallelism")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=48, help="captions in the temporary tree")
    parser.add_argument("--images-stored", type=int, default=10, help="images per caption on disk (paper: 10)")
    parser.add_argument("--stored-size", type=int, default=256, help="JPEG size (generate.py's --stored-size)")
    parser.add_argument("--images-per-caption", type=int, default=6, help="m, images of a caption a step (paper: 6)")
    parser.add_argument("--captions-per-step", type=int, default=8, help="captions per step (paper: 43 per GPU)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (paper: 224)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: the main process)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: default)")
    main(parser.parse_args())
