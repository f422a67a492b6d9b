"""Paper-scale data, simulated: pretrain.py's index, its loader workers' memory, generate.py's memory and resume.

    python bench/bench_scale.py --captions 1000000        # prints one JSON object

What is simulated and measured (each measurement in a fresh Python process, so one does not inherit another's
memory):
- `--captions` N captions in generate.py's tar shard layout (shards.py: `--captions-per-shard` captions per tar,
  an `__index__` member first), n = `--images-per-caption` images each, every image the same 16 px JPEG in a
  member of its own (the loader checks that the member at an index's offset is the one the index names, so index
  rows can no longer share one member): about 17 KiB per caption on disk, 1.7 GB at N = 10^5 (so 10^6 needs
  17 GB of scratch space). What is measured is the index and the metadata.
- index: seconds to build dataindex's table from the tars (no cache), seconds to load it from the cache, and the
  process's resident-memory rise per caption once every page of the table has been read (the table is a
  memory-mapped file: its pages are the page cache's, shared by all ranks and workers of a node).
- workers: a DataLoader with `--workers` persistent workers over CaptionImagesDataset (m = 6 images of 16 px
  crops per caption), as pretrain.py builds it; each worker's USS (its private pages: what copy-on-read of a
  Python index would grow) after `--warmup-items` (a worker grows once by about 100 MB over its first few thousand
  augmentations, torch warming up, then stays flat), then after `--items` more items across epochs: the growth per
  item, and the USS every 1000 items. glibc's heap moves a worker's USS up and down by tens of MB between passes
  (its dynamic mmap threshold), so the same is measured again with the threshold pinned
  (MALLOC_MMAP_THRESHOLD_=131072), and a third time with workers started by forkserver instead of fork: a forked
  worker also grows by copy-on-write of the parent's heap pages that the allocator reuses (bounded by the parent's
  private memory, slowing down as it goes), which a forkserver worker, sharing nothing, does not; what remains
  there is the growth the loading code itself causes.
- generate.py: main() on a captions file of G captions (`--generate-captions`, and G / 10, to separate the fixed
  cost from the per-caption one) writing webdataset shards of 8 px images, with the diffusion model replaced by a
  stub that returns black images (the bookkeeping is what is measured, not the model); the peak resident-memory
  rise, per caption of the process's own captions; then the same command again on the finished output, which must
  find nothing to do: seconds in-process (main() alone) and as a whole command (interpreter and imports too);
  and the files written per 1000 captions.
"""
import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from util import shards  # noqa: E402

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # every process this bench starts


def rss_bytes():
    """This process's resident set (bench_loss.status_kib would import torch into the index child)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def private_bytes(pid):
    """(USS, private dirty) of a process in bytes, from /proc/<pid>/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Private_Dirty"]


def child_pids(pid="self"):
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(child) for child in f.read().split()]
    return children


def worker_pids(start_method):
    """The DataLoader workers: this process's children when forked, the forkserver's children otherwise."""
    if start_method == "fork":
        return child_pids()
    return [worker for server in child_pids() for worker in child_pids(server)]


def simulate_shards(folder, captions, n, per_shard):
    """generate.py's shard layout for `captions` captions, written by shards.ShardWriter: every image its own
    member (the index checks that the member at each offset is the one it names), all of them the same 16 px JPEG;
    about 17 KiB per caption at n = 10 (with its text and JSON members)."""
    from PIL import Image
    image = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 200)).save(image, format="JPEG")
    images = [(k, "jpg", image.getvalue()) for k in range(n)]
    os.makedirs(folder, exist_ok=True)
    for shard in range(-(-captions // per_shard)):
        ids = list(range(shard * per_shard, min(captions, (shard + 1) * per_shard)))
        writer = shards.ShardWriter(os.path.join(folder, shards.shard_name(shard)), ids, n)
        for caption_id in ids:
            writer.add(caption_id, images, "a simulated caption", {"caption_id": caption_id})
        writer.finish()


def run_child(*args, env=None):
    """This script in a fresh process with `args` (and extra environment variables); its last stdout line parsed
    as JSON."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], capture_output=True,
                            text=True, env={**CHILD_ENV, **(env or {})}, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- children ----

def child_index(folder, captions):
    from util import dataindex
    shutil.rmtree(os.path.join(folder, dataindex.CACHE_FOLDER), ignore_errors=True)
    start = time.perf_counter()
    built = dataindex.open_source(folder)
    build_seconds = time.perf_counter() - start
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del built
    before = rss_bytes()
    start = time.perf_counter()
    source = dataindex.open_source(folder, build=False)
    load_seconds = time.perf_counter() - start
    table = source.table
    checksum = sum(int(np.asarray(table[name]).sum()) for name in table.dtype.names)  # read every page
    rise = rss_bytes() - before
    print(json.dumps({"index_build_s": build_seconds, "index_load_s": load_seconds,
                      "index_rss_bytes_per_caption": rise / captions,
                      "index_table_bytes_per_caption": table.dtype.itemsize,
                      "index_table_fields": {name: str(table.dtype[name]) for name in table.dtype.names},
                      "index_build_peak_rss_mb": build_peak / 2 ** 20, "checksum": checksum % 1000}))


def child_workers(folder, items, workers, warmup, start_method):
    import torch

    from data import CaptionImagesDataset, CaptionSampler, collate
    dataset = CaptionImagesDataset([folder], 6, 1, 16, crop_scale=(0.5, 1.0))
    sampler = CaptionSampler(len(dataset), 50)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         persistent_workers=True, multiprocessing_context=start_method)
    marks, total = [], [0]  # (items read, [USS of each worker in MiB]) every 1000 items

    def run(count, epoch):
        done = 0
        while done < count:
            sampler.set_epoch(epoch)
            for batch in loader:
                done += len(batch["caption_labels"])
                total[0] += len(batch["caption_labels"])
                if total[0] % 1000 == 0:
                    marks.append((total[0], [round(private_bytes(pid)[0] / 2 ** 20, 1)
                                             for pid in worker_pids(start_method)]))
                if done >= count:
                    break
            epoch += 1
        return done, epoch

    _, epoch = run(warmup, 0)
    pids = worker_pids(start_method)
    before = [private_bytes(pid) for pid in pids]
    measured, _ = run(items, epoch)
    after = [private_bytes(pid) for pid in pids]
    uss = sum(a[0] - b[0] for a, b in zip(after, before))
    dirty = sum(a[1] - b[1] for a, b in zip(after, before))
    print(json.dumps({"worker_items_measured": measured, "worker_warmup_items": warmup, "workers": len(pids),
                      "worker_uss_mb_every_1000_items": marks,
                      "worker_uss_growth_bytes_per_item": uss / measured,
                      "worker_private_dirty_growth_bytes_per_item": dirty / measured}))


def child_generate(captions_file, output, n, per_shard):
    import types

    import diffusers  # noqa: F401  imported before the baseline: settings.json records their versions
    import tqdm  # noqa: F401
    import transformers  # noqa: F401

    import generate

    class StubTokenizer:  # every caption one token: none is over the limit
        model_max_length = 77

        def __call__(self, texts, **_):
            return types.SimpleNamespace(input_ids=[[0]] * len(texts))

    class StubPipeline:  # what main() reads of a pipeline; the images come from the stubbed generate_batch
        scheduler = object()
        tokenizer = StubTokenizer()

    generate.load_pipeline = lambda args, device, dtype: StubPipeline()
    generate.generate_batch = lambda pipe, prompts, items, captions, args: np.zeros(
        (len(items), args.size, args.size, 3), dtype=np.uint8)
    argv = ["--captions", captions_file, "--output", output, "--n", str(n), "--size", "8", "--stored-size", "8",
            "--output-format", "webdataset", "--captions-per-shard", str(per_shard), "--batch-size", "64",
            "--writers", "2", "--model", "stub"]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    made = generate.main(generate.get_args_parser().parse_args(argv))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    again = generate.main(generate.get_args_parser().parse_args(argv))
    resume = time.perf_counter() - start
    print(json.dumps({"images": made, "seconds": seconds, "peak_rise_bytes": peak - baseline,
                      "resume_made": again, "resume_in_process_s": resume, "argv": argv}))


# ---- the bench ----

def measure_generate(work, captions, n, per_shard):
    path = os.path.join(work, f"captions_{captions}.txt")
    with open(path, "w") as f:
        f.writelines(f"a simulated caption number {i} with a few more words in it\n" for i in range(captions))
    output = os.path.join(work, f"generated_{captions}")
    result = run_child("--child", "generate", path, output, n, per_shard)
    assert result["resume_made"] == 0 and result["images"] == captions * n
    start = time.perf_counter()
    command = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *result["argv"]],
                             capture_output=True, text=True, env=CHILD_ENV, cwd=REPO)
    result["resume_command_s"] = time.perf_counter() - start
    assert command.returncode == 0 and "nothing to do" in command.stdout, command.stderr[-2000:]
    files = sum(len(names) for _, _, names in os.walk(output))
    result["files_per_1000_captions"] = 1000 * files / captions
    shutil.rmtree(output)
    return result


def main(args):
    work = tempfile.mkdtemp(prefix="bench_scale_", dir=args.work)
    try:
        folder = os.path.join(work, "shards")
        start = time.perf_counter()
        simulate_shards(folder, args.captions, args.images_per_caption, args.captions_per_shard)
        report = {"captions": args.captions, "images_per_caption": args.images_per_caption,
                  "captions_per_shard": args.captions_per_shard, "simulate_s": time.perf_counter() - start}
        report.update(run_child("--child", "index", folder, args.captions))
        report.update(run_child("--child", "workers", folder, args.items, args.workers, args.warmup_items, "fork"))
        pinned = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        for name, start_method in (("pinned_mmap_threshold", "fork"), ("forkserver_pinned", "forkserver")):
            other = run_child("--child", "workers", folder, args.items, args.workers, args.warmup_items, start_method,
                              env=pinned)
            report.update({f"{key}_{name}": value for key, value in other.items()
                           if key.startswith("worker_uss") or key.startswith("worker_private")})
        small = max(1, args.generate_captions // 10)
        runs = {count: measure_generate(work, count, args.images_per_caption, args.captions_per_shard)
                for count in (small, args.generate_captions)}
        big = runs[args.generate_captions]
        report.update({
            "generate_captions": [small, args.generate_captions],
            "generate_peak_rise_mb": [runs[count]["peak_rise_bytes"] / 2 ** 20
                                      for count in (small, args.generate_captions)],
            "generate_bytes_per_caption": big["peak_rise_bytes"] / args.generate_captions,
            "generate_slope_bytes_per_caption": (big["peak_rise_bytes"] - runs[small]["peak_rise_bytes"]) /
                                                (args.generate_captions - small),
            "generate_images_per_s": big["images"] / big["seconds"],
            "resume_nothing_to_do_s": big["resume_in_process_s"], "resume_command_s": big["resume_command_s"],
            "resume_captions": args.generate_captions,
            "files_per_1000_captions": big["files_per_1000_captions"],
            "machine": f"{os.cpu_count()} cores, python {sys.version.split()[0]}"})
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "index":
            child_index(rest[0], int(rest[1]))
        elif kind == "workers":
            child_workers(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        else:
            child_generate(rest[0], rest[1], int(rest[2]), int(rest[3]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=10_000, help="captions simulated in the shard layout")
    parser.add_argument("--images-per-caption", type=int, default=10, help="n (paper: 10)")
    parser.add_argument("--captions-per-shard", type=int, default=1000, help="generate.py's default")
    parser.add_argument("--workers", type=int, default=2, help="persistent DataLoader workers")
    parser.add_argument("--items", type=int, default=5000, help="items read after the warm-up to measure the workers")
    parser.add_argument("--warmup-items", type=int, default=5000,
                        help="items read before the measurement: a worker's first few thousand augmentations grow it "
                             "once by about 100 MB (torch's kernels and allocator warming up), then it stays flat")
    parser.add_argument("--generate-captions", type=int, default=100_000,
                        help="G, captions of the generate.py run (and G / 10); 1e5 is the resume goal's size")
    parser.add_argument("--work", default=None, help="folder for the temporary data (default: the system's)")
    main(parser.parse_args())
