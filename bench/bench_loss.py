"""Our multi-positive loss against pytorch-metric-learning's SupConLoss: same value, time and peak memory.

    python bench/bench_loss.py                      # N = 4096 images (683 captions of up to 6), D = 256, CPU
    python bench/bench_loss.py --device cuda        # on a GPU
    python bench/bench_loss.py --autocast bf16      # both forwards under autocast, as pretrain.py calls the loss

Each side computes forward + backward from the same raw embeddings, L2-normalised inside (SupConLoss's cosine
similarity normalises; ours calls F.normalize), so values and gradients are comparable. Time is the median of
--repeats runs, the two sides alternating. Peak memory is measured in a fresh process per side: on CUDA torch's
peak allocation, on the CPU the rise of the process's peak resident set (reset through /proc/self/clear_refs)
over what it held before. Needs `pip install pytorch-metric-learning`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import multi_positive_loss  # noqa: E402


def make_inputs(args):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(args.images, args.dim, generator=generator)
    labels = torch.arange(args.images) // args.images_per_caption  # the last caption may have fewer images
    return embeddings.to(args.device), labels.to(args.device)


def loss_function(name, temperature):
    if name == "ours":
        return lambda z, y: multi_positive_loss(F.normalize(z, dim=1), y, temperature)
    from pytorch_metric_learning.losses import SupConLoss
    return SupConLoss(temperature=temperature)


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward_backward(fn, embeddings, labels, autocast="none"):
    """One forward (under torch.autocast when asked, as pretrain.py calls the loss) and one backward."""
    z = embeddings.clone().requires_grad_()
    with torch.autocast(z.device.type, dtype=AUTOCAST[autocast], enabled=autocast != "none"):
        loss = fn(z, labels)
    loss.backward()
    return loss.detach(), z.grad


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory(args):
    """Runs in its own process: the peak memory of one forward + backward of `args.side`, in MiB."""
    embeddings, labels = make_inputs(args)
    fn = loss_function(args.side, args.temperature)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(fn, embeddings, labels, args.autocast)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    base = reset_peak_rss()
    forward_backward(fn, embeddings, labels, args.autocast)
    return (status_kib("VmHWM") - base) / 1024


def reset_peak_rss():
    """Reset this process's peak resident set size (VmHWM) to the current one (Linux >= 4.0); returns the current
    resident set size in KiB, the base that a later VmHWM is compared with."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def status_kib(field):
    """A KiB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main(args):
    if args.side:  # child process for one memory measurement
        print(json.dumps({"peak_mib": measure_memory(args)}))
        return
    torch.set_num_threads(args.threads or torch.get_num_threads())
    embeddings, labels = make_inputs(args)
    sides = ("ours", "supcon")
    functions = {side: loss_function(side, args.temperature) for side in sides}
    results = {}
    for side in sides:  # warm-up, and the values to compare
        value, grad = forward_backward(functions[side], embeddings, labels, args.autocast)
        results[side] = {"loss": value.item(), "grad": grad, "times": []}
    for _ in range(args.repeats):  # alternate the sides, so that load from other jobs hits both alike
        for side in sides:
            synchronize(args.device)
            start = time.perf_counter()
            forward_backward(functions[side], embeddings, labels, args.autocast)
            synchronize(args.device)
            results[side]["times"].append(time.perf_counter() - start)
    for side in sides:
        command = [sys.executable, __file__, "--side", side] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                                 vars(args).items() if k not in ("side", "repeats")]
        peak = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["peak_mib"]
        results[side].update(seconds=statistics.median(results[side]["times"]), peak_mib=peak)
    ours, theirs = results["ours"], results["supcon"]
    grad_diff = (ours["grad"] - theirs["grad"]).abs().max().item()
    print(f"N={len(labels)} ({labels.max().item() + 1} captions of up to {args.images_per_caption}), "
          f"D={args.dim}, device={args.device}, threads={torch.get_num_threads()}, autocast={args.autocast}, "
          f"torch {torch.__version__}")
    print(f"{'':8s} {'loss':>10s} {'fwd+bwd ms':>11s} {'peak MiB':>9s}")
    for side in ("ours", "supcon"):
        r = results[side]
        print(f"{side:8s} {r['loss']:10.6f} {r['seconds'] * 1e3:11.1f} {r['peak_mib']:9.1f}")
    print(f"|loss difference| {abs(ours['loss'] - theirs['loss']):.2e}, max |gradient difference| {grad_diff:.2e}")
    print(f"ratio ours/supcon: time {ours['seconds'] / theirs['seconds']:.2f}x, "
          f"peak memory {ours['peak_mib'] / theirs['peak_mib']:.2f}x (goal: time <= 0.4x, peak memory <= 0.25x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="N, images in the batch")
    parser.add_argument("--images-per-caption", type=int, default=6, help="m, images per caption")
    parser.add_argument("--dim", type=int, default=256, help="D, embedding width (256 in the paper)")
    parser.add_argument("--temperature", type=float, default=0.1, help="tau (0.1 in the paper)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--autocast", choices=list(AUTOCAST), default="none",
                        help="run both forwards under torch.autocast of this dtype (pretrain.py's bf16 on GPU); "
                             "ours computes in float32 whatever autocast says")
    parser.add_argument("--side", choices=["ours", "supcon"], help=argparse.SUPPRESS)
    main(parser.parse_args())
