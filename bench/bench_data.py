"""Data loading: pretrain.py's loader, our augmentation in a plain loop, and the official pipeline, side by side.

    python bench/bench_data.py                  # 48 captions x 6 of 10 images, 256 px JPEGs -> 224 crops, 2 workers
    python bench/bench_data.py --workers 0      # the loader in the main process: the Dataset's own overhead
    python bench/bench_data.py --shards         # the loader on generate.py's tar shards vs on the same file tree

--shards writes the same images as tar shards too and times pretrain.py's loader on each layout, taking turns
(the same crops on both sides, checked); shards/tree is the images/s ratio (goal: at least 1.0).

The bench writes its own image tree in a temporary folder (imagetree's layout, as generate.py writes it: 10
JPEGs of 256 x 256 per caption, quality 95, smooth random images so they compress like real ones, and each
folder's _index.json). Five sides, each pass a new epoch: the loader's pass, then the other four sides over the same
files, taking turns step by step; the median pass is reported:

    loader    pretrain.py's loader: CaptionImagesDataset (m images of a caption, one crop each) + CaptionSampler +
              collate in a torch DataLoader with --workers processes, started afresh every pass as each epoch does
    ours      a plain loop in this process: augment.decode_rgb + augment.PretrainAugmentation on the very files the
              loader chose, with the same random draws (torch's generator seeded per caption by data.item_seed, as
              the Dataset seeds it), so it makes the loader's crops (checked) and does the same work
    official  the same loop with the official pipeline: PIL decode + augment.official_augmentation (torchvision's
              v1 transforms on PIL images, PIL's blur), seeded the same way (same distribution, other draws)
    crop      the same loop doing only the CPU share of pretrain.py --gpu-augment: decode, crop, resize to uint8,
              draw the colour parameters
    header    the CPU share of pretrain.py --gpu-decode: read the file, check its JPEG header and end, make the
              crop's draws (the decoding and the crop then happen on the GPU)

The single-process sides report wall time and CPU time (time.process_time) per image: on a machine shared with
other jobs, CPU time leaves out the time this process waited for a core. ours/official is the cost per image of
our augmentation relative to the official pipeline's on one core (goal: at most 0.5).

What loader/ours means: with --workers 2 the loader runs two decoding processes and the loop one process (one
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
from augment import PretrainAugmentation, decode_rgb, official_augmentation  # noqa: E402
from data import CaptionImagesDataset, CaptionSampler, collate, item_seed  # noqa: E402
from util import imagetree, shards  # noqa: E402
from util.jpeg import jpeg_size  # noqa: E402


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


def loop_pass(records, steps, sides, images_per_caption, seed, epoch):
    """Each side's augment_file(path) on the files the loader chose, in this process, with the loader's random draws
    (torch's generator seeded per caption by data.item_seed and the caption's image order drawn first, as the
    Dataset does), stacking each step's crops as collate does. The sides take turns step by step, the first one
    rotating, so a change in the machine's load, and what a side leaves in the caches, falls on all of them alike.
    Returns {side: [wall seconds, CPU seconds, images, first step]}."""
    totals = {side: [0.0, 0.0, 0, None] for side in sides}
    names = list(sides)
    for step_index, step in enumerate(steps):
        for side in names[step_index % len(names):] + names[:step_index % len(names)]:
            augment_file = sides[side]
            start, start_cpu = time.perf_counter(), time.process_time()
            crops = []
            for label in step:
                torch.manual_seed(item_seed(seed, epoch, label))
                paths = records[label].image_paths
                for index in torch.randperm(len(paths)).tolist()[:images_per_caption]:
                    crops.append(augment_file(paths[index]))
            batch = torch.stack(crops)
            total = totals[side]
            total[0] += time.perf_counter() - start
            total[1] += time.process_time() - start_cpu
            total[2] += len(batch)
            total[3] = batch if total[3] is None else total[3]
    return totals


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def pil_rgb(path):
    """The official dataset's decode: a PIL image converted to RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(args):
    load_before = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        write_tree(root, args.captions, args.images_stored, args.stored_size)
        dataset = CaptionImagesDataset([root], args.images_per_caption, 1, args.image_size, seed=0)
        sampler = CaptionSampler(len(dataset), args.captions_per_step)
        records = imagetree.read_tree(root)  # the loop's file list (the dataset keeps only a numeric index)
        ours, official = PretrainAugmentation(args.image_size), official_augmentation(args.image_size)
        loops = {"ours": lambda path: ours(decode_rgb(path)),
                 "official": lambda path: official(pil_rgb(path)),
                 "crop": lambda path: ours.crop(decode_rgb(path))[0],
                 "header": lambda path: torch.tensor(ours.draw(*jpeg_size(read_file(path)))[1])}
        m = args.images_per_caption
        # warm-up (page cache), and the check that the loader and our loop make the same crops from the same files
        _, _, steps, loader_first = loader_pass(dataset, sampler, args.workers, epoch=0)
        warm_up = loop_pass(records, steps, loops, m, 0, epoch=0)
        difference = (loader_first - warm_up["ours"][3]).abs().max().item()
        wall = {side: [] for side in ("loader", *loops)}  # seconds per image, one entry per pass
        cpu = {side: [] for side in loops}
        for epoch in range(1, args.repeats + 1):  # a new epoch each pass: new captions order and crops, all sides
            seconds, images, steps, _ = loader_pass(dataset, sampler, args.workers, epoch)
            wall["loader"].append(seconds / images)
            for side, (seconds, cpu_seconds, images, _) in loop_pass(records, steps, loops, m, 0,
                                                                      epoch).items():
                wall[side].append(seconds / images)
                cpu[side].append(cpu_seconds / images)
    per_pass = sampler.steps_per_epoch * args.captions_per_step * args.images_per_caption
    print(f"{args.captions} captions x {args.images_stored} JPEGs of {args.stored_size} px; a pass = "
          f"{sampler.steps_per_epoch} steps x {args.captions_per_step} captions x {args.images_per_caption} images = "
          f"{per_pass} images, {args.image_size} px crops; cpu cores={os.cpu_count()}, torch threads="
          f"{torch.get_num_threads()}, torch {torch.__version__}; load average before/after: {load_before} / "
          f"{load_average()}")
    workers = f"DataLoader, {args.workers} worker process(es)" if args.workers else "DataLoader, in the main process"
    labels = {"loader": workers, "ours": "decode + PretrainAugmentation, 1 process",
              "official": "PIL decode + official pipeline, 1 process",
              "crop": "decode + crop only (the CPU share of --gpu-augment), 1 process",
              "header": "read + JPEG header + draws (the CPU share of --gpu-decode), 1 process"}
    median = {side: statistics.median(values) for side, values in wall.items()}
    median_cpu = {side: statistics.median(values) for side, values in cpu.items()}
    print(f"{'':9s} {'img/s':>7s} {'ms/img':>7s} {'cpu ms/img':>10s}   passes (ms/img, wall)")
    for side, values in wall.items():
        cpu_ms = f"{median_cpu[side] * 1e3:10.2f}" if side in cpu else f"{'':10s}"
        passes = " ".join(f"{v * 1e3:.2f}" for v in values)
        print(f"{side:9s} {1 / median[side]:7.1f} {median[side] * 1e3:7.2f} {cpu_ms}   {passes}   ({labels[side]})")
    print(f"loader and ours make the same crops (first step of the warm-up pass): max |difference| {difference:.1e}")
    print(f"ours/official time per image on one core: {median['ours'] / median['official']:.2f}x wall, "
          f"{median_cpu['ours'] / median_cpu['official']:.2f}x CPU (goal: at most 0.5x)")
    print(f"crop/official (the CPU share of --gpu-augment): {median['crop'] / median['official']:.2f}x wall, "
          f"{median_cpu['crop'] / median_cpu['official']:.2f}x CPU")
    print(f"header/official (the CPU share of --gpu-decode): {median['header'] / median['official']:.2f}x wall, "
          f"{median_cpu['header'] / median_cpu['official']:.2f}x CPU")
    print(f"loader/ours images/s: {median['ours'] / median['loader']:.2f}x (goal: at least 0.9x)")
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
    arguments = parser.parse_args()
    shards_main(arguments) if arguments.shards else main(arguments)
