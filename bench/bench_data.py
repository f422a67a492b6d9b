"""Data loading images/s: pretrain.py's loader against a plain loop that decodes and augments the same files.

    python bench/bench_data.py                  # 48 captions x 6 of 10 images, 256 px JPEGs -> 224 crops, 2 workers
    python bench/bench_data.py --workers 0      # the loader in the main process: the Dataset's own overhead

The bench writes its own image tree in a temporary folder (imagetree's layout, as generate.py writes it: 10
JPEGs of 256 x 256 per caption, quality 95, smooth random images so they compress like real ones, and each
folder's _index.json). The loader side is built as pretrain.py builds it: CaptionImagesDataset (m images of a
caption, one crop each, pretrain_augmentation) + CaptionSampler + collate in a torch DataLoader with --workers
processes, started afresh for every pass as pretrain.py does each epoch. The loop side decodes
(data.decode_rgb) and augments (data.pretrain_augmentation) the very files the loader chose, one after the other
in this process, with the same random draws (torch's generator seeded per caption by data.item_seed, as the
Dataset seeds it), so both sides make identical crops (checked) and do the same work: the augmentation's cost varies
by 15% between one set of random crops and another, more than the loader's overhead. Both sides are timed
alternately over one pass of the captions, each pass a new epoch; the median pass is reported.

What the ratio means: with --workers 2 the loader runs two decoding processes and the loop one process (one
intra-op thread by default, as torch gives each DataLoader worker; more threads spin-wait on cores shared with other
jobs), so on a 2-core machine the ratio measures what the loader gains from parallel workers net of its overhead
(process start, pickling of the batches, seeding). With --workers 0 both run in one process and the ratio is the
Dataset's per-image overhead alone (forked generator, random choice of images, stacking, collate).
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
import shards  # noqa: E402
from data import (CaptionImagesDataset, CaptionSampler, collate, decode_rgb, item_seed,  # noqa: E402
                  pretrain_augmentation)


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


def loader_pass(dataset, sampler, workers, epoch):
    """One pass at `epoch`; returns (seconds, images, each step's caption labels, the first step's images)."""
    sampler.set_epoch(epoch)
    start = time.perf_counter()
    images, steps, first = 0, [], None
    for batch in make_loader(dataset, sampler, workers):
        images += len(batch["images"])
        steps.append(batch["caption_labels"].tolist())
        first = batch["images"] if first is None else first
    return time.perf_counter() - start, images, steps, first


def loop_pass(records, steps, augment, images_per_caption, seed, epoch):
    """Decode and augment the same files in this process, with the same random draws: torch's generator is seeded
    per caption by data.item_seed and the caption's image order drawn first, as the Dataset does, so the loop
    makes the very same crops. Stacks each step's crops as collate does; returns (seconds, images, first step)."""
    start = time.perf_counter()
    images, first = 0, None
    for step in steps:
        crops = []
        for label in step:
            torch.manual_seed(item_seed(seed, epoch, label))
            paths = records[label].image_paths
            for index in torch.randperm(len(paths)).tolist()[:images_per_caption]:
                crops.append(augment(decode_rgb(paths[index])))
        batch = torch.stack(crops)
        images += len(batch)
        first = batch if first is None else first
    return time.perf_counter() - start, images, first


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        write_tree(root, args.captions, args.images_stored, args.stored_size)
        dataset = CaptionImagesDataset([root], args.images_per_caption, 1, args.image_size, seed=0)
        sampler = CaptionSampler(len(dataset), args.captions_per_step)
        records = imagetree.read_tree(root)  # the loop's file list (the dataset keeps only a numeric index)
        augment = pretrain_augmentation(args.image_size)
        m = args.images_per_caption
        # warm-up (page cache), and the check that both sides make the same crops from the same files
        _, _, steps, loader_first = loader_pass(dataset, sampler, args.workers, epoch=0)
        _, _, loop_first = loop_pass(records, steps, augment, m, 0, epoch=0)
        difference = (loader_first - loop_first).abs().max().item()
        rates = {"loader": [], "loop": []}
        for epoch in range(1, args.repeats + 1):  # a new epoch each pass: new captions order and crops, both sides
            seconds, images, steps, _ = loader_pass(dataset, sampler, args.workers, epoch)
            rates["loader"].append(images / seconds)
            seconds, images, _ = loop_pass(records, steps, augment, m, 0, epoch)
            rates["loop"].append(images / seconds)
    per_pass = sampler.steps_per_epoch * args.captions_per_step * args.images_per_caption
    print(f"{args.captions} captions x {args.images_stored} JPEGs of {args.stored_size} px; a pass = "
          f"{sampler.steps_per_epoch} steps x {args.captions_per_step} captions x {args.images_per_caption} images = "
          f"{per_pass} images, {args.image_size} px crops; cpu cores={os.cpu_count()}, torch threads="
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    workers = f"{args.workers} worker process(es)" if args.workers else "no workers, in the main process"
    print(f"{'':7s} {'img/s':>7s}   passes (img/s)")
    for side, label in (("loader", f"DataLoader, {workers}"), ("loop", "plain loop, 1 process")):
        rounds = " ".join(f"{r:.1f}" for r in rates[side])
        print(f"{side:7s} {statistics.median(rates[side]):7.1f}   {rounds}   ({label})")
    print(f"same crops on both sides (first step of the warm-up pass): max |difference| {difference:.1e}")
    ratio = statistics.median(rates["loader"]) / statistics.median(rates["loop"])
    print(f"loader/loop images/s: {ratio:.2f}x (goal: at least 0.9x)")
    if args.workers > 1:
        print(f"note: the loader runs {args.workers} processes and the loop 1, on {os.cpu_count()} cores: the ratio "
              "includes the workers' parallelism; --workers 0 compares the Dataset's overhead at equal parallelism")


def pack_shards(tree, folder, captions, images_per_caption, per_shard=1000):
    """The tree's very files (same bytes) in generate.py's tar shard layout (shards.py)."""
    os.makedirs(folder)
    for shard in range(-(-captions // per_shard)):
        ids = list(range(shard * per_shard, min(captions, (shard + 1) * per_shard)))
        writer = shards.ShardWriter(os.path.join(folder, shards.shard_name(shard)), ids, images_per_caption)
        for caption_id in ids:
            images = []
            for k in range(images_per_caption):
                with open(imagetree.image_path(tree, caption_id, k), "rb") as f:
                    images.append((k, "jpg", f.read()))
            with open(imagetree.caption_path(tree, caption_id), encoding="utf-8") as f:
                writer.add(caption_id, images, f.read().strip(), {"caption_id": caption_id})
        writer.finish()


def shards_main(args):
    """--shards: pretrain.py's loader on tar shards against the same loader on the file tree, same images (the
    shards hold the tree's bytes), same crops (checked), passes alternating, each a new epoch."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        tree, tars = os.path.join(root, "tree"), os.path.join(root, "shards")
        write_tree(tree, args.captions, args.images_stored, args.stored_size)
        pack_shards(tree, tars, args.captions, args.images_stored)
        tar_count = len(shards.list_shards(tars))
        sides = {}
        for side, folder in (("tree", tree), ("shards", tars)):
            dataset = CaptionImagesDataset([folder], args.images_per_caption, 1, args.image_size, seed=0)
            sides[side] = (dataset, CaptionSampler(len(dataset), args.captions_per_step))
        firsts = {side: loader_pass(*sides[side], args.workers, epoch=0)[3] for side in sides}  # warm-up
        difference = (firsts["tree"] - firsts["shards"]).abs().max().item()
        rates = {"tree": [], "shards": []}
        for epoch in range(1, args.repeats + 1):
            for side in rates:
                seconds, images, _, _ = loader_pass(*sides[side], args.workers, epoch)
                rates[side].append(images / seconds)
    print(f"{args.captions} captions x {args.images_stored} JPEGs of {args.stored_size} px, as a tree and as "
          f"{tar_count} tar shard(s); DataLoader with {args.workers} worker(s); cpu cores="
          f"{os.cpu_count()}, torch threads={torch.get_num_threads()}")
    for side in rates:
        print(f"{side:7s} {statistics.median(rates[side]):7.1f} img/s   passes "
              f"{' '.join(f'{r:.1f}' for r in rates[side])}")
    print(f"same crops on both sides (first step of the warm-up pass): max |difference| {difference:.1e}")
    ratio = statistics.median(rates["shards"]) / statistics.median(rates["tree"])
    print(f"shards/tree images/s: {ratio:.2f}x (goal: at least 1.0x)")


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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the main process (default 1, as in each DataLoader worker, "
                             "which torch sets to one thread; 0: torch's default, one per core)")
    parser.add_argument("--shards", action="store_true",
                        help="compare the loader on generate.py's tar shards with the loader on the file tree (the "
                             "same images and crops) instead of the loader with the plain loop")
    args = parser.parse_args()
    shards_main(args) if args.shards else main(args)
