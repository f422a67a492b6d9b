"""pretrain.py's loader at the disk: bytes read per image (cold and warm), workers' memory per start method, the
images in flight, and for streams the shard mix of a batch and the captions repeated in an epoch.

    python bench/bench_io.py                     # prints each table, then one JSON object of every number

What is measured (a temporary folder on the bench's disk, `--work`; nothing is run as root):
- disk: `--captions` captions x 10 JPEGs of 256 px (bench_data.write_tree: smooth random images, about 20 KB each)
  as generate.py's tree and the same bytes as its tar shards (`--captions-per-shard` a tar). Each side reads one
  epoch through pretrain.py's loader (CaptionImagesDataset, m = 6 of the 10 images, `--workers` forked workers),
  cold (every data file's pages evicted first with posix_fadvise DONTNEED: no root, no effect on other files)
  and then warm (the same epoch again, from the page cache). Bytes read from the disk = the kernel's read_bytes
  of this process (/proc/self/io), which includes those of the children it has reaped (the loader's workers, once
  it has joined them; a `pipe:cat` once its worker has), against the bytes of the images the epoch decoded (their
  file sizes, from each batch's crop labels). Sides: the tree; the shards as pretrain.py reads them (members at
  their offsets, POSIX_FADV_RANDOM); the shards without that advice (the kernel's readahead, as before issue 21);
  and the shards streamed (`pipe:cat`, data.CaptionShardStream), which read whole tars: all 10 images of a caption
  for the 6 used. The index pass (dataindex.open_source building the tars' table, cold) is measured the same way,
  against the `__index__` members' bytes, with random (ours), sequential and no advice.
- workers: each worker's private memory (USS, /proc/<pid>/smaps_rollup) after a few batches, started by fork
  (pretrain.py's choice), forkserver (Python 3.14's default on Linux) and spawn (macOS's).
- in flight: one batch's image bytes as the loader ships it (float32, or --gpu-augment's uint8 crops), measured on
  a real batch and checked against data.batch_bytes, then x workers x data.PREFETCH_FACTOR; and the paper's batch.
- streams: `--stream-captions` captions of 16 px images in shards of `--stream-shard-size`, streamed over
  `pipe:cat` by data.CaptionShardStream with `--workers` workers and each `--stream-mix`, one epoch: the share of
  each batch that comes from its most frequent shard (1.0: every batch from one tar), against the same for a global
  shuffle (CaptionSampler's permutation over the same captions), and how many captions the epoch saw more than once.
- cc12m: the above extrapolated to CC12M (12.4M captions x 10 images) on 4 nodes x 8 GPUs: disk bytes per epoch,
  workers' memory per node, images in flight per node, and the streamed epoch's repeats from the stream's own deal
  of 12,400 shards (arithmetic, equal shards).
"""
import argparse
import collections
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
from bench_data import pack_shards, smooth_image, write_tree  # noqa: E402
from bench_scale import private_bytes  # noqa: E402
from util import dataindex, imagetree, shards  # noqa: E402

M = 6  # images of a caption in a batch (the paper's), of the 10 stored


def read_bytes():
    """Bytes this process and its finished (waited-for) children have read from the disk, as the kernel counts
    them (task I/O accounting: page cache misses, readahead included; a reaped child's count is added to its
    parent's /proc/<pid>/io, so the loader's workers are in it once the loader has joined them)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def evict(paths):
    """Drop the clean page-cache pages of these files (they were synced when written)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def data_files(folder):
    return [os.path.join(top, name) for top, folders, names in os.walk(folder) if dataindex.CACHE_FOLDER not in top
            for name in names]


def image_sizes(tree, captions):
    """{(caption, image): bytes} of the tree's JPEGs (the shards hold the same bytes)."""
    return {(c, k): os.path.getsize(imagetree.image_path(tree, c, k)) for c in range(captions) for k in range(10)}


def wanted(batch, sizes):
    """Bytes of the images a batch decoded: its crop labels are label x 2^20 + image, and a label is the caption id
    (a stream's has its source's number above bit 32)."""
    return sum(sizes[((label >> 20) & (2 ** 32 - 1), label & (2 ** 20 - 1))] for label in batch["crop_labels"].tolist())


def with_advice(pattern):
    """Make shards.advise give `pattern` ("random", "sequential") whatever it is asked, or nothing (None); returns
    the original to restore. Forked workers inherit the choice."""
    original = shards.advise

    def advise(fd, _):
        if pattern:
            original(fd, pattern)
    shards.advise = advise
    return original


def loader_epoch(dataset, args, epoch):
    """One epoch of pretrain.py's random-access loader (fresh forked workers, joined at the end): batches."""
    sampler = data.CaptionSampler(len(dataset), args.batch)
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate,
                                         **data.loader_options(args.workers, False))
    return list(loader)


def stream_epoch(urls, captions, args, epoch, image_size, batch, mix=4, m=M):
    stream = data.CaptionShardStream(urls, captions, batch, m, 1, image_size, seed=0, workers=args.workers,
                                     shuffle_buffer=args.shuffle_buffer, mix=mix)
    stream.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, collate_fn=data.collate,
                                         **data.loader_options(args.workers, False))
    return list(loader)


def measure_pass(read_epoch, files, sizes, cold):
    if cold:
        evict(files)
    before, start = read_bytes(), time.perf_counter()
    batches = read_epoch()
    seconds = time.perf_counter() - start
    disk = read_bytes() - before
    images = sum(len(batch["crop_labels"]) for batch in batches)
    want = sum(wanted(batch, sizes) for batch in batches)
    return {"disk_bytes": disk, "image_bytes": want, "images": images, "disk_per_image_bytes": disk / images,
            "ratio": disk / want, "seconds": seconds}


def section_disk(args, work, report):
    tree, tars = os.path.join(work, "tree"), os.path.join(work, "shards")
    write_tree(tree, args.captions, 10, 256)
    pack_shards(tree, tars, args.captions, 10, per_shard=args.captions_per_shard)
    os.sync()
    sizes = image_sizes(tree, args.captions)
    tar_paths = [os.path.join(tars, name) for name in shards.list_shards(tars)]
    index_bytes = 0
    for path in tar_paths:
        fd = os.open(path, os.O_RDONLY)
        index_bytes += next(shards.scan_members(fd)).size
        os.close(fd)

    # the index pass, cold: the tars' table built from their __index__ members
    rows = {}
    for name, pattern in (("random (ours)", "random"), ("sequential", "sequential"), ("none (readahead)", None)):
        original = with_advice(pattern)
        try:
            ratios = []
            for _ in range(args.repeats):
                evict(tar_paths)
                before = read_bytes()
                dataindex.build_tars(tar_paths)
                ratios.append((read_bytes() - before) / index_bytes)
        finally:
            shards.advise = original
        rows[name] = statistics.median(ratios)
    report["index_pass"] = {"index_member_bytes": index_bytes, "tars": len(tar_paths), "disk_per_index_byte": rows}
    print(f"\n## Index pass, cold: {len(tar_paths)} tars of {args.captions_per_shard} captions, {index_bytes} bytes of "
          f"__index__ members; disk bytes read / __index__ bytes (median of {args.repeats})")
    for name, ratio in rows.items():
        print(f"  advice {name:18s} {ratio:6.2f}x")

    # one epoch per side, cold then warm
    m = args.images_per_caption
    datasets = {"tree": data.CaptionImagesDataset([tree], m, 1, args.image_size, seed=0),
                "shards": data.CaptionImagesDataset([tars], m, 1, args.image_size, seed=0)}
    sides = {
        "tree": (lambda epoch: loader_epoch(datasets["tree"], args, epoch), data_files(tree), "random"),
        "shards, advice random (ours)": (lambda epoch: loader_epoch(datasets["shards"], args, epoch), tar_paths,
                                         "random"),
        "shards, no advice (before)": (lambda epoch: loader_epoch(datasets["shards"], args, epoch), tar_paths, None),
        "shards streamed (pipe:cat)": (lambda epoch: stream_epoch([f"pipe:cat {path}" for path in tar_paths],
                                                                  args.captions, args, epoch, args.image_size,
                                                                  args.batch, m=m),
                                       tar_paths, "random"),
    }
    results = {side: {"cold": [], "warm": []} for side in sides}
    for repeat in range(args.repeats):
        for side, (read_epoch, files, pattern) in sides.items():
            original = with_advice(pattern)
            try:
                for state in ("cold", "warm"):
                    results[side][state].append(measure_pass(lambda: read_epoch(repeat), files, sizes,
                                                             state == "cold"))
            finally:
                shards.advise = original
    mean_image = statistics.mean(sizes.values())
    print(f"\n## Disk bytes per image: {args.captions} captions x 10 JPEGs of 256 px (mean {mean_image / 1e3:.1f} KB), "
          f"one epoch of m = {m} images per caption, {args.workers} forked workers; median of {args.repeats} epochs")
    print(f"  {'side':30s} {'cold: disk/image bytes':>24s} {'KB per image':>13s} {'warm: disk/image bytes':>24s}")
    summary = {}
    for side, states in results.items():
        cold = statistics.median(r["ratio"] for r in states["cold"])
        warm = statistics.median(r["ratio"] for r in states["warm"])
        per_image = statistics.median(r["disk_per_image_bytes"] for r in states["cold"])
        summary[side] = {"cold_ratio": cold, "warm_ratio": warm, "cold_kb_per_image": per_image / 1e3,
                         "passes": states}
        print(f"  {side:30s} {cold:23.2f}x {per_image / 1e3:13.1f} {warm:23.2f}x")
    report["disk"] = {"captions": args.captions, "images_per_caption": m, "mean_image_bytes": mean_image,
                      "sides": summary}


def section_workers(args, work, report):
    tree = os.path.join(work, "tree")
    dataset = data.CaptionImagesDataset([tree], M, 1, args.image_size, seed=0)
    print(f"\n## Loader workers' private memory (USS) after {args.worker_batches} batches, {args.workers} workers, "
          "by start method")
    rows = {}
    for method in ("fork", "forkserver", "spawn"):
        sampler = data.CaptionSampler(len(dataset), args.batch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate,
                                             num_workers=args.workers, multiprocessing_context=method,
                                             persistent_workers=True)
        iterator = iter(loader)
        for _ in range(args.worker_batches):
            next(iterator)
        uss = [private_bytes(worker.pid)[0] / 2 ** 20 for worker in iterator._workers]
        iterator._shutdown_workers()
        rows[method] = uss
        print(f"  {method:10s} " + ", ".join(f"{value:.1f}" for value in uss) + " MiB")
    report["workers_uss_mib"] = rows


def section_in_flight(args, work, report):
    tree = os.path.join(work, "tree")
    print(f"\n## Images in flight: one batch x {args.workers} workers x {data.PREFETCH_FACTOR} batches ahead")
    rows = {}
    for name, on_device in (("float32 (CPU augmentation)", False), ("uint8 crops (--gpu-augment)", True)):
        dataset = data.CaptionImagesDataset([tree], M, 1, args.image_size, seed=0, augment_on_device=on_device)
        batch = data.collate([dataset[(0, i)] for i in range(args.batch)])
        measured = batch["images"].nbytes
        formula = data.batch_bytes(args.batch, M, 1, args.image_size, on_device)
        assert measured == formula, (measured, formula)
        flight = data.in_flight_bytes(args.workers, args.batch, M, 1, args.image_size, on_device)
        paper = data.in_flight_bytes(14, 43, 6, 1, 224, on_device)
        rows[name] = {"batch_bytes": measured, "in_flight_bytes": flight, "paper_14_workers_bytes": paper}
        print(f"  {name:28s} batch {measured / 2 ** 20:7.2f} MiB (measured = data.batch_bytes), in flight "
              f"{flight / 2 ** 20:7.1f} MiB; the paper's 43 x 6 at 224 px with 14 workers: {paper / 2 ** 30:.2f} GiB")
    report["in_flight"] = rows


def write_stream_shards(folder, captions, per_shard):
    """Captions of 10 small JPEGs each (16 px: the stream's order is measured, not its decoding) in generate.py's
    shard layout."""
    rng = np.random.default_rng(1)
    images = [imagetree.encode_image(smooth_image(rng, 16)) for _ in range(10)]
    os.makedirs(folder)
    for shard in range(-(-captions // per_shard)):
        ids = list(range(shard * per_shard, min(captions, (shard + 1) * per_shard)))
        writer = shards.ShardWriter(os.path.join(folder, shards.shard_name(shard)), ids, 10)
        for caption_id in ids:
            writer.add(caption_id, [(k, "jpg", images[k]) for k in range(10)], f"caption {caption_id}", {})
        writer.finish()
    return [os.path.join(folder, name) for name in shards.list_shards(folder)]


def shard_mix(batches_of_captions, per_shard):
    """Mean over batches of the share of a batch's captions that come from its most frequent shard."""
    return statistics.mean(max(collections.Counter((c & (2 ** 32 - 1)) // per_shard for c in batch).values()) /
                           len(batch)
                           for batch in batches_of_captions)


def section_streams(args, work, report):
    folder = os.path.join(work, "stream_shards")
    paths = write_stream_shards(folder, args.stream_captions, args.stream_shard_size)
    urls = [f"pipe:cat {path}" for path in paths]
    sampler = data.CaptionSampler(args.stream_captions, args.stream_batch)
    sampler.set_epoch(0)
    global_mix = shard_mix([[index for _, index in batch] for batch in sampler], args.stream_shard_size)
    print(f"\n## Streams: {args.stream_captions} captions in {len(paths)} shards of {args.stream_shard_size}, "
          f"batches of {args.stream_batch}, {args.workers} workers, shuffle buffer {args.shuffle_buffer}")
    rows = []
    for mix in args.stream_mix:
        for epoch in range(args.repeats):
            batches = [batch["caption_labels"].tolist() for batch in stream_epoch(
                urls, args.stream_captions, args, epoch, 16, args.stream_batch, mix)]
            seen = collections.Counter(label for batch in batches for label in batch)
            rows.append({"mix": mix, "epoch": epoch, "captions": sum(seen.values()), "distinct": len(seen),
                         "repeated": sum(seen.values()) - len(seen),
                         "shard_mix": shard_mix(batches, args.stream_shard_size)})
            print(f"  --stream-mix {mix}, epoch {epoch}: {rows[-1]['captions']} captions, {rows[-1]['distinct']} "
                  f"distinct ({rows[-1]['repeated']} repeats); the most frequent shard of a batch holds "
                  f"{rows[-1]['shard_mix']:.2f} of it (a global shuffle: {global_mix:.2f})")
    # a resume at half an epoch (one stream, in this process, so that its reads can be counted): what it reads
    # again to stand where it stopped, against the half epoch a resume by skipping would read
    def stream():
        return data.CaptionShardStream(urls, args.stream_captions, args.stream_batch, M, 1, 16, seed=0,
                                       shuffle_buffer=args.shuffle_buffer)
    whole, states, read = stream(), [], []
    for _ in data.StreamLoader(whole, num_workers=0):
        states.append(copy.deepcopy(whole.state_dict()))
        read.append(whole.samples_read)
    half = len(states) // 2
    resumed = stream()
    resumed.load_state_dict(states[half - 1])
    resumed.set_epoch(0, half)
    for _ in data.StreamLoader(resumed, num_workers=0):
        pass
    again = resumed.samples_read - (whole.samples_read - read[half - 1])
    print(f"  resume at step {half} of {len(states)} (one stream, --stream-mix 4): {again} samples read again to stand "
          f"where it stopped, against {half * args.stream_batch} consumed before it (a resume by skipping reads "
          f"those; issue 21)")
    report["streams"] = {"captions": args.stream_captions, "shards": len(paths), "epochs": rows,
                         "global_shuffle_mix": global_mix, "resume_read_again": again,
                         "resume_consumed_before": half * args.stream_batch}


def stream_deal(captions, per_shard, ranks, workers, batch):
    """(repeats, unseen) of one streamed epoch by arithmetic, with CaptionShardStream's own deal (_my_shards) of
    equal shards: each stream's captions against its share of the epoch's steps."""
    shards_count = -(-captions // per_shard)
    stream = data.CaptionShardStream([f"pipe:cat {{0..{shards_count - 1}}}.tar"], captions, batch, M, 1, 16,
                                     world_size=ranks, workers=workers)
    quota = stream.steps_per_epoch // workers * batch
    repeats = unseen = 0
    for q in range(ranks * workers):
        have = sum(len(range(part, min(per_shard, captions - shard * per_shard), parts))
                   for shard, part, parts in stream._my_shards(q))
        repeats, unseen = repeats + max(0, quota - have), unseen + max(0, have - quota)
    return repeats, unseen, stream.steps_per_epoch


def section_cc12m(args, work, report):
    """The measured rates, extrapolated to CC12M on 4 nodes x 8 GPUs (arithmetic on the numbers above)."""
    captions, ranks, workers, image_bytes = 12_400_000, 32, args.cc12m_workers, args.cc12m_image_bytes
    m = report.get("disk", {}).get("images_per_caption", M)
    images = captions * m  # decoded per epoch
    print(f"\n## Extrapolated to CC12M: {captions / 1e6:.1f}M captions x 10 images of {image_bytes / 1e3:.0f} KB, "
          f"m = {m} a caption, 4 nodes x 8 GPUs, {workers} workers per GPU, 43 captions per GPU a step")
    rows = {}
    if "disk" in report:
        for side, values in report["disk"]["sides"].items():
            tb = images * image_bytes * values["cold_ratio"] / 1e12
            rows[f"disk read per epoch, cold, {side} (TB)"] = tb
            print(f"  disk read per epoch, cold, {side:30s} {tb:6.2f} TB ({values['cold_ratio']:.2f}x the "
                  f"{images * image_bytes / 1e12:.2f} TB of images decoded)")
    if "workers_uss_mib" in report:
        for method, uss in report["workers_uss_mib"].items():
            gib = statistics.mean(uss) * workers * 8 / 1024
            rows[f"workers' private memory per node, {method} (GiB)"] = gib
            print(f"  workers' private memory per 8-GPU node, {method:10s} {gib:6.1f} GiB ({workers} x 8 workers)")
    for on_device, name in ((False, "float32"), (True, "uint8 crops (--gpu-augment)")):
        gib = data.in_flight_bytes(workers, 43, M, 1, 224, on_device) * 8 / 2 ** 30
        rows[f"images in flight per node, {name} (GiB)"] = gib
        print(f"  images in flight per 8-GPU node, {name:28s} {gib:6.1f} GiB")
    repeats, unseen, steps = stream_deal(captions, 1000, ranks, workers, 43)
    rows["streamed epoch: repeats, unseen, steps"] = [repeats, unseen, steps]
    print(f"  streamed epoch (12,400 shards of 1000 dealt to {ranks * workers} streams): {steps} steps, {repeats} "
          f"captions read twice ({repeats / captions:.3%}), {unseen} left for the next epoch ({unseen / captions:.2%})")
    report["cc12m"] = rows


SECTIONS = {"disk": section_disk, "workers": section_workers, "in_flight": section_in_flight,
            "streams": section_streams, "cc12m": section_cc12m}


def main(args):
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench_io_", dir=args.work)
    report = {"machine": f"{os.cpu_count()} cores, python {sys.version.split()[0]}, torch {torch.__version__}",
              "load_average_before": os.getloadavg()}
    try:
        for name, section in SECTIONS.items():
            if name in args.sections:
                section(args, work, report)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=240, help="captions of 10 JPEGs of 256 px for the disk side")
    parser.add_argument("--captions-per-shard", type=int, default=60, help="captions per tar of the disk side")
    parser.add_argument("--image-size", type=int, default=64,
                        help="crop size (64: the bytes read do not depend on it, the time does)")
    parser.add_argument("--batch", type=int, default=8, help="captions per batch")
    parser.add_argument("--images-per-caption", type=int, default=6,
                        help="m of the disk section (the paper's 6; 1 for SimCLR and CLIP, where readahead costs most)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per side; medians are reported")
    parser.add_argument("--worker-batches", type=int, default=6, help="batches each start method's workers read")
    parser.add_argument("--stream-captions", type=int, default=16000, help="captions of the streamed side")
    parser.add_argument("--stream-shard-size", type=int, default=1000,
                        help="captions per streamed tar (generate.py's: larger than the shuffle buffer)")
    parser.add_argument("--shuffle-buffer", type=int, default=500, help="pretrain.py's --shuffle-buffer")
    parser.add_argument("--stream-mix", type=int, nargs="+", default=[1, 4, 8],
                        help="pretrain.py's --stream-mix values to measure (shards each worker reads at once)")
    parser.add_argument("--stream-batch", type=int, default=43, help="captions per batch of the streamed side "
                        "(the paper's per GPU: what a batch mixes is measured)")
    parser.add_argument("--sections", nargs="+", choices=["disk", "workers", "in_flight", "streams", "cc12m"],
                        default=["disk", "workers", "in_flight", "streams", "cc12m"],
                        help="which to run (workers and in_flight read the disk section's tree; cc12m extrapolates "
                             "the others)")
    parser.add_argument("--cc12m-workers", type=int, default=8, help="loader workers per GPU in the extrapolation "
                        "(pretrain.py's default)")
    parser.add_argument("--cc12m-image-bytes", type=int, default=29_000,
                        help="bytes of one stored image in the extrapolation (a 256 px JPEG of Stable Diffusion)")
    parser.add_argument("--work", default=None, help="folder for the temporary data, on the disk to measure")
    main(parser.parse_args())
