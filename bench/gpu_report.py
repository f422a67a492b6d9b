"""Every GPU measurement of the project in one run, as markdown rows for BENCHMARKS.md and a JSON file of every number.

    python bench/gpu_report.py --device cuda --output gpu_report.json   # one GPU, the sizes below
    python bench/gpu_report.py --device cuda --quick --output gpu_report.json   # every section in under 10 minutes
    python bench/gpu_report.py --device cpu --tiny        # toy sizes on the CPU, as tests/test_gpu_report.py runs it

Sections, in this order (--sections picks some):

  1 generation  Stable Diffusion v1.5's architecture with random weights (built from v1.5's published configs,
                written below; weights do not change speed), generate.py's dtype (float16 on a GPU), 512 px, w = 2:
                images/s of DDIM 50 steps and DPM-Solver++ 25 steps with generate.generate_batch (per-image seeds,
                each caption encoded once, as generate.py runs it) against diffusers' plain call
                pipe(prompt=..., num_images_per_prompt=..., num_inference_steps=...) at the same batch, both on the
                same pipeline loaded by generate.load_pipeline; the ratio, peak memory and the achieved TFLOP/s.
  2 train       pretrain.py's full step (build_model, compute_loss, backward, AdamW on param_groups) on ViT-B/16 at
                224 px, bf16 autocast, the official per-GPU batch of 43 captions x 6 images = 258: images/s, peak
                memory and TFLOP/s, our ViT against timm's as the encoder (bench/bench_train_step.py's two sides).
  3 loss        the multi-positive loss's forward + backward at N_local = 258 rows against N_global = 8256 columns,
                one rank of 32 simulated in one process (loss.py's autograd function on the gathered columns), time
                and peak memory; and the one-process N = 8256 loss against pytorch-metric-learning's SupConLoss
                (bench/bench_loss.py's sides; that row is skipped if the package is missing).
  4 loader      images/s per CPU core of the pretraining augmentation (data.CaptionImagesDataset with augment.py: the
                CPU path, the crop-only path of --gpu-augment, and --gpu-decode's read + header + draws) on JPEGs of
                256 px, one thread; augment_crops and decode_crops (batched nvJPEG decode + crop: its images/s) on
                the device for one step's batch, and the host-to-device copies of the batches; and from section 2's
                step how many CPU cores one GPU needs to keep up, for each path.
  5 evaluations segment.py's training step (model.Segmenter: ViT-B/16 under UperNet, 2 crops of 512 px per GPU, the
                recipe's 8 x 2, bf16 autocast, cross-entropy + 0.4 x auxiliary, AdamW over its layer-decay groups)
                and its sliding-window forward (windows/s), and compositionality.py's text tower (CLIP's, width 512,
                12 layers, 77 tokens: captions/s) as ARO and zero-shot run it (their image tower is section 2's
                encoder).
  6 parity      pretrain.py's training step from the same weights on the same batch under float32, bf16 autocast and
                fp16 autocast + GradScaler (the official setting): the loss, and how far each update is from the
                float32 one (max |update - float32 update| / lr over every parameter). With --official DIR (a
                checkout of google-research/syn-rep-learn), also the official step as its train_one_epoch runs it
                (models/StableRep.py's model, models/losses.py's MultiPosConLoss, fp16 autocast around the model,
                the loss outside it, GradScaler scale / backward / unscale_ / step / update, util/misc.py's AdamW
                groups) against ours in fp16. With 2 or more GPUs, the projection head's SyncBatchNorm over 2
                NCCL processes against one process on the whole batch (running statistics and outputs).
  7 families    the paper's first question: each self-supervised family's full pretrain.py step (its recipe's
                networks and hooks, bench/bench_train_step.py --objectives) on ViT-B/16 at 224 px, bf16 autocast, at
                the per-GPU batch of its CC3M recipe (recipes/pretrain_cc3m_<family>_synthetic.args): seconds a
                step, peak memory, and the GPU hours of that recipe on CC3M's 3.3M captions at 32 GPUs (steps x the
                step time x 32, communication left out).

Timing: every measured call is warmed up once (the first call of a shape pays for kernel selection and allocation),
then repeated the count given below, sides alternating; the median is reported, with every timed value. On a GPU a
call is timed with CUDA events after torch.cuda.synchronize (so the host's share inside the call counts too); on the
CPU with time.perf_counter. Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the rise of the
process's peak resident set (/proc), a rough figure. Each row is printed as soon as it is measured and the JSON file
rewritten, so a run cut short keeps the rows it has (SIGTERM or Ctrl-C mark it "stopped", exit code 130); a section
that fails prints its traceback and the next one runs (exit code 1 at the end); --time-limit starts no section
after its time. The full sizes have not been run yet (no GPU so far): an estimate for one H100 is 3-5
minutes, model building included.
"""
import argparse
import os
import signal
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from the hub: every model is built from configs

from util.cli import REPOSITORY, UserError, integer, run  # noqa: E402  (stdlib only: --help stays fast)
from util.files import atomic_write_json

SECTIONS = ("generation", "train", "loss", "loader", "evaluations", "parity", "families")
CC3M_CAPTIONS = 3_318_333  # CC3M's training split, the captions the recipes' epochs count
RECIPE_GPUS = 32  # the CC3M recipes' torchrun command: 4 nodes x 8 GPUs
QUICK_TIME_LIMIT = 480  # seconds: --quick starts no section after 8 minutes, inside a lent GPU's 10

# Every size and repeat count of the run: "full" is what the report means on a GPU, "tiny" the CPU smoke run.
SIZES = {
    "full": dict(
        gen_size=512, gen_captions=8, gen_images=4,  # batch 32 = generate.py's default --batch-size
        ddim_steps=50, dpm_steps=25, gen_warmup_steps=2, gen_repeats=3,
        train_model="vit_base", train_depth=None, image_size=224, captions=43, images_per_caption=6,
        train_repeats=10,
        world_size=32, loss_repeats=20,
        loader_captions=43, stored_size=256, loader_repeats=5, augment_repeats=10,
        seg_model="vit_base", seg_depth=None, seg_crop=512, seg_batch=2, eval_repeats=5, aro_captions=1024,
        # family_batch None: each CC3M recipe's own per-GPU batch; family_flags (not a flag): the tiny run's small
        # heads and decoder, on top of each family's recipe
        family_repeats=5, family_batch=None, family_flags=None),
    "tiny": dict(
        gen_size=32, gen_captions=2, gen_images=2,
        ddim_steps=3, dpm_steps=2, gen_warmup_steps=1, gen_repeats=1,
        train_model="vit_tiny", train_depth=2, image_size=32, captions=2, images_per_caption=6,
        train_repeats=2,
        world_size=4, loss_repeats=2,
        loader_captions=4, stored_size=40, loader_repeats=1, augment_repeats=2,
        seg_model="vit_tiny", seg_depth=2, seg_crop=32, seg_batch=2, eval_repeats=1, aro_captions=8,
        family_repeats=1, family_batch=4,
        family_flags=("--head-hidden-dim", "64", "--embed-dim", "32", "--out-dim", "64", "--local-crop-size", "16",
                      "--decoder-width", "32", "--decoder-depth", "1", "--decoder-heads", "2")),
}

# the run sized for a lent GPU's ten minutes (--quick): "full"'s shapes, each number measured fewer times, and a
# generation batch of 8; not yet timed on a GPU
SIZES["quick"] = {**SIZES["full"], "gen_captions": 2, "gen_repeats": 1, "train_repeats": 3, "loss_repeats": 5,
                  "loader_repeats": 1, "augment_repeats": 3, "eval_repeats": 2, "family_repeats": 2}

# Stable Diffusion v1.5's published configs (unet/, vae/ and text_encoder/config.json of
# stable-diffusion-v1-5/stable-diffusion-v1-5); the parameter counts below are v1.5's and are checked.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", center_input_sample=False, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1)
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu")
# CLIP ViT-L/14's text tower; the tokenizer is demo/tiny_sd.py's (speed does not depend on the vocabulary)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


# ---- measuring ----

def measure(fn, device):
    """(seconds, bytes allocated at the start, peak bytes during the call). CUDA: events around the call
    after a synchronize, torch's allocator statistics. CPU: perf_counter, the process's resident set (VmRSS) at the
    start and its peak (VmHWM, reset first); None for both where /proc does not allow the reset."""
    import torch

    from bench_loss import reset_peak_rss, status_kib
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, base, torch.cuda.max_memory_allocated(device)
    try:
        base = reset_peak_rss() * 1024
    except OSError:
        base = None
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, base, status_kib("VmHWM") * 1024 if base is not None else None


def count_flops(fn):
    """Floating-point operations of fn() as torch.utils.flop_counter counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def alternate(calls, repeats, device):
    """Each of calls {side: fn} `repeats` times, the sides taking turns; {side: [(seconds, base, peak), ...]}."""
    timings = {side: [] for side in calls}
    for _ in range(repeats):
        for side, call in calls.items():
            seconds, base, peak = measure(call, device)
            timings[side].append((seconds, base, peak))
    return timings


def median_seconds(timing):
    return statistics.median(seconds for seconds, _, _ in timing)


def highest(timing, extra=0):
    """The highest peak over the timed calls, minus the allocation at the call's start, plus `extra`; None on a CPU
    without /proc's peak reset."""
    rises = [peak - base for _, base, peak in timing if peak is not None]
    return max(rises) + extra if rises else None


def fmt(x):
    """A number for a table cell: about three significant digits, no exponent above 0.01."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 0.01 \
        else f"{x:.2g}"


def gib(x):
    return None if x is None else x / 2 ** 30


def mib(x):
    return None if x is None else x / 2 ** 20


def seconds_list(timing, scale=1.0):
    return " ".join(fmt(seconds * scale) for seconds, _, _ in timing)


# ---- the report: markdown on stdout, every number in the JSON file ----

class Report:
    """Prints each table's rows as they come and rewrites the JSON file (atomically) after each one."""

    def __init__(self, path, header):
        self.path = path
        self.data = {**header, "sections": {}, "skipped": [], "failed": [], "complete": False}
        self.section = None
        self.save()

    def save(self):
        if self.path:
            atomic_write_json(self.path, self.data)

    def table(self, section, title, columns):
        """Start a table of `section`: a title line and the markdown header."""
        self.section = section
        entry = self.data["sections"].setdefault(section, {"tables": []})
        entry["tables"].append({"title": title, "columns": list(columns), "rows": []})
        print(f"\n{title}\n\n| {' | '.join(columns)} |\n|{' --- |' * len(columns)}", flush=True)
        self.save()

    def row(self, cells, **numbers):
        """A markdown row (cells, already formatted) and its numbers (None where not measured)."""
        print(f"| {' | '.join(cells)} |", flush=True)
        self.data["sections"][self.section]["tables"][-1]["rows"].append({"cells": list(cells), **numbers})
        self.save()

    def skip(self, what, why):
        print(f"skipped: {what}: {why}", flush=True)
        self.data["skipped"].append({"what": what, "why": why})
        self.save()

    def fail(self, section, error, part=""):
        """Record and print a failure with its traceback (called in the `except` block); the run goes on."""
        traceback.print_exc()
        print(f"FAILED: section {section}{part}: {type(error).__name__}: {error}", flush=True)
        self.data["failed"].append({"section": section, "error": f"{type(error).__name__}: {error}"})
        self.save()


def machine(device):
    """What the numbers were measured on."""
    import diffusers
    import torch
    import transformers

    from util.cli import git_commit
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cpu": cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / 2 ** 30,
                    gpu_capability=f"{properties.major}.{properties.minor}")
    return info


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


# ---- 1. generation ----

def section_generation(report, args, device, results):
    import shutil
    import tempfile
    from types import SimpleNamespace

    import diffusers
    import torch
    import transformers

    import generate
    from bench_generate import generator_args
    from demo.tiny_sd import build_pipeline, tiny_configs

    dtype = generate.resolve_dtype("auto", device)
    dtype_name = str(dtype).replace("torch.", "")
    if dtype != torch.float16:
        report.skip("generation in float16", f"generate.py runs float16 on CUDA only; {device.type}: {dtype_name}")
    captions = {i: f"a photo of a red car parked on a beach at sunset, number {i}" for i in range(args.gen_captions)}
    items = [(i, k) for i in captions for k in range(args.gen_images)]  # prompt-major, as generate.py batches them
    batch = len(items)
    diffusers.utils.logging.set_verbosity_error()  # generate.load_pipeline does the same; this covers the saving
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" while saving the text encoder
    work = tempfile.mkdtemp(prefix="gpu_report_")
    try:
        # the architecture with random weights, saved, so that generate.load_pipeline loads it as it loads v1.5
        start = time.perf_counter()
        configs = tiny_configs(args.gen_size) if args.tiny else (SD15_UNET, SD15_VAE, SD15_TEXT)
        pipe = build_pipeline(*configs, work_folder=work, device=device)
        parameters = {part: sum(p.numel() for p in getattr(pipe, part).parameters()) for part in SD15_PARAMETERS}
        if not args.tiny and parameters != SD15_PARAMETERS:
            raise RuntimeError(f"the built pipeline has {parameters} parameters, v1.5 has {SD15_PARAMETERS}")
        folder = os.path.join(work, "model")
        pipe.to(dtype).to("cpu").save_pretrained(folder)
        del pipe
        built = time.perf_counter() - start
        model = "demo/tiny_sd.py's toy configs" if args.tiny else "Stable Diffusion v1.5's architecture"
        guidance = generate.get_args_parser().get_default("w")
        sizes = ", ".join(f"{part} {fmt(count / 1e6)}M" for part, count in parameters.items())
        report.table("generation", f"### 1. Generation: {model}, random weights ({sizes} parameters; built and "
                     f"saved in {built:.0f} s), {args.gen_size} px, {dtype_name}, w = {guidance:g} (generate.py's), a "
                     f"batch of {batch} images "
                     f"({args.gen_captions} captions x {args.gen_images}); warm-up: one call per side "
                     f"({args.gen_warmup_steps} steps), then {args.gen_repeats} timed batches per side",
                     ["sampler", "side", "images/s", "s per batch (timed)", "peak GiB", "TFLOP/s"])
        flops = None
        for scheduler, steps in (("ddim", args.ddim_steps), ("dpm-solver++", args.dpm_steps)):
            sampler = f"{'DDIM' if scheduler == 'ddim' else 'DPM-Solver++'} {steps}"
            bench_sizes = SimpleNamespace(n=args.gen_images, steps=steps, size=args.gen_size,
                                          stored_size=args.gen_size, batch_size=batch, dtype="auto")
            gen = generator_args(bench_sizes, folder, os.path.join(work, "unused"), "--scheduler", scheduler)
            pipe = generate.load_pipeline(gen, device, dtype)
            if flops is None:
                flops = generation_flops(pipe, args.gen_size)
            image_flops = flops["unet"] * steps * (2 if gen.w > 1 else 1) + flops["vae"]  # guidance doubles the UNet
            sides = generation_sides(pipe, gen, captions, items)
            for call in sides.values():
                call(args.gen_warmup_steps)
            timings = alternate(sides, args.gen_repeats, device)
            rates = {}
            for side, timing in timings.items():
                rates[side] = batch / median_seconds(timing)
                peak = max((p for _, _, p in timing if p is not None), default=None)  # the pipeline's weights included
                report.row([sampler, side, fmt(rates[side]), seconds_list(timing), fmt(gib(peak)),
                            fmt(image_flops * rates[side] / 1e12)],
                           scheduler=scheduler, steps=steps, side=side, batch=batch, images_per_s=rates[side],
                           seconds=[t for t, _, _ in timing], peak_bytes=peak, flops_per_image=image_flops,
                           tflops_per_s=image_flops * rates[side] / 1e12)
            ours_rate, plain_rate = rates.values()
            report.row([sampler, "ratio generate_batch / plain", f"{ours_rate / plain_rate:.2f}x", "", "", ""],
                       scheduler=scheduler, steps=steps, ratio=ours_rate / plain_rate)
            del pipe, sides  # the next sampler loads its own
    finally:
        shutil.rmtree(work, ignore_errors=True)


def generation_sides(pipe, gen, captions, items):
    """{side: call(steps)} generating one batch of `items` [(caption id, image index)], prompt-major, on `pipe`:
    generate.generate_batch as generate.py calls it, and diffusers' plain call with the same captions, images per
    caption, size and guidance. A fresh PromptCache per call: every batch encodes its captions, as a run's new ones."""
    import generate

    def ours(steps=gen.steps):
        run_args = argparse.Namespace(**{**vars(gen), "steps": steps})
        return generate.generate_batch(pipe, generate.PromptCache(pipe, pipe.device), items, captions, run_args)

    def plain(steps=gen.steps):
        return pipe(prompt=list(captions.values()), num_images_per_prompt=len(items) // len(captions),
                    num_inference_steps=steps, guidance_scale=gen.w, height=gen.size, width=gen.size).images

    return {"generate.generate_batch": ours, "diffusers pipe(prompt, num_images_per_prompt)": plain}


def generation_flops(pipe, size):
    """{"unet": FLOPs of one UNet call on one image's latents, "vae": of one image's VAE decode}."""
    import torch
    latent = size // pipe.vae_scale_factor
    like = dict(device=pipe.device, dtype=pipe.unet.dtype)
    sample = torch.randn(1, pipe.unet.config.in_channels, latent, latent, **like)
    context = torch.randn(1, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, **like)
    with torch.inference_mode():
        return {"unet": count_flops(lambda: pipe.unet(sample, 999, encoder_hidden_states=context)),
                "vae": count_flops(lambda: pipe.vae.decode(sample))}


# ---- 2. training step ----

def section_train(report, args, device, results):
    from types import SimpleNamespace

    from bench_train_step import build_sides, make_batch, side_bytes, train_step

    try:
        import timm  # the reference side
    except ImportError:
        report.skip("training step", "timm is not installed (pip install timm)")
        return
    amp = device.type == "cuda"
    if not amp:
        report.skip("bf16 autocast in the training step", "pretrain.py uses it on CUDA only; timed in float32")
    images = args.captions * args.images_per_caption
    run_args, models, optimizers = build_sides(args.train_model, args.image_size, images, device, args.train_depth)
    batch = make_batch(SimpleNamespace(captions=args.captions, images_per_caption=args.images_per_caption,
                                       image_size=args.image_size))
    if device.type == "cuda":
        batch["images"] = batch["images"].pin_memory()  # as pretrain.py's DataLoader hands it over
    depth = f", {args.train_depth} blocks" if args.train_depth else ""
    report.table("train", f"### 2. Training step: {args.train_model}/16{depth} at {args.image_size} px, "
                 f"{'bf16 autocast' if amp else 'float32'}, {args.captions} captions x {args.images_per_caption} "
                 f"images = {images} a step, pretrain.build_model + compute_loss + backward + AdamW; warm-up 1 step "
                 f"per side (FLOPs counted in it), then {args.train_repeats} timed steps per side, alternating",
                 ["encoder", "images/s", "s per step (timed)", "peak GiB", "TFLOP/s", "first-step loss"])

    def step(side):
        return train_step(models[side], optimizers[side], batch, run_args, device, amp)

    flops, first_loss = {}, {}
    for side in models:
        flops[side] = count_flops(lambda: first_loss.setdefault(side, step(side).item()))
    timings = alternate({side: (lambda side=side: step(side)) for side in models}, args.train_repeats, device)
    labels = {"ours": "ours (model.py)", "timm": f"timm {timm.__version__} VisionTransformer"}
    rates = {}
    for side, timing in timings.items():
        seconds = median_seconds(timing)
        rates[side] = images / seconds
        peak = highest(timing, side_bytes(models[side], optimizers[side], device.type))  # + its weights and state
        report.row([labels[side], fmt(rates[side]), seconds_list(timing), fmt(gib(peak)),
                    fmt(flops[side] / seconds / 1e12), f"{first_loss[side]:.6f}"],
                   side=side, images=images, images_per_s=rates[side], seconds=[t for t, _, _ in timing],
                   peak_bytes=peak, flops_per_step=flops[side], tflops_per_s=flops[side] / seconds / 1e12,
                   first_loss=first_loss[side])
        if side == "ours":
            results["train"] = {"images": images, "step_seconds": seconds}
    report.row(["ratio ours / timm", f"{rates['ours'] / rates['timm']:.2f}x", "", "", "",
                f"difference {abs(first_loss['ours'] - first_loss['timm']):.1e}"],
               ratio=rates["ours"] / rates["timm"], loss_difference=abs(first_loss["ours"] - first_loss["timm"]))


# ---- 3. loss ----

def section_loss(report, args, device, results):
    import importlib.util
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from bench_loss import forward_backward, loss_function, make_inputs
    from pretrain import fill_recipe, get_args_parser

    defaults = fill_recipe(get_args_parser().parse_args(["--data", "unused"]))  # the paper's tau and embedding width
    tau, dim, m = defaults.temperature, defaults.embed_dim, args.images_per_caption
    n_local = args.captions * m
    n_global = n_local * args.world_size
    rank = 1  # any rank does the same work; not 0, so the local rows are not the first columns
    generator = torch.Generator().manual_seed(0)
    columns = F.normalize(torch.randn(n_global, dim, generator=generator), dim=1).to(device)  # all ranks' z
    labels = (torch.arange(n_global) // m).to(device)  # caption ids, m images each

    def one_rank():
        return one_rank_loss(columns, labels, rank, n_local, tau)

    report.table("loss", f"### 3. Multi-positive loss, forward + backward, float32, D = {dim}, tau = {tau}, "
                 f"{m} images per caption; warm-up 1 call per side, then {args.loss_repeats} timed calls per side",
                 ["loss", "rows x columns", "ms (median)", "ms (timed)", "peak MiB", "loss value"])
    loss_value = one_rank().item()  # the warm-up
    timing = alternate({"rank": one_rank}, args.loss_repeats, device)["rank"]
    peak = highest(timing)
    report.row([f"ours, one rank of {args.world_size} simulated (loss.py's autograd function on gathered columns)",
                f"{n_local} x {n_global}", fmt(median_seconds(timing) * 1e3), seconds_list(timing, 1e3),
                fmt(mib(peak)), f"{loss_value:.6f}"],
               case="one_rank", rows=n_local, columns=n_global, world_size=args.world_size,
               seconds=[t for t, _, _ in timing], median_seconds=median_seconds(timing), peak_bytes=peak,
               loss=loss_value)

    # one process, the whole N_global batch: ours against SupConLoss (bench/bench_loss.py's sides)
    embeddings, batch_labels = make_inputs(SimpleNamespace(images=n_global, dim=dim, images_per_caption=m,
                                                           device=str(device)))
    names = {"ours": "ours, one process", "supcon": "pytorch-metric-learning SupConLoss, one process"}
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        report.skip("SupConLoss row", "pytorch-metric-learning is not installed (pip install pytorch-metric-learning)")
        del names["supcon"]
    functions = {side: loss_function(side, tau) for side in names}
    values = {side: forward_backward(fn, embeddings, batch_labels)[0].item() for side, fn in functions.items()}
    timings = alternate({side: (lambda fn=fn: forward_backward(fn, embeddings, batch_labels))
                         for side, fn in functions.items()}, args.loss_repeats, device)
    for side, timing in timings.items():
        peak = highest(timing)
        report.row([names[side], f"{n_global} x {n_global}", fmt(median_seconds(timing) * 1e3),
                    seconds_list(timing, 1e3), fmt(mib(peak)), f"{values[side]:.6f}"],
                   case=side, rows=n_global, columns=n_global, seconds=[t for t, _, _ in timing],
                   median_seconds=median_seconds(timing), peak_bytes=peak, loss=values[side])
    if "supcon" in timings:
        time_ratio = median_seconds(timings["ours"]) / median_seconds(timings["supcon"])
        peaks = highest(timings["ours"]), highest(timings["supcon"])
        memory_ratio = peaks[0] / peaks[1] if None not in peaks and peaks[1] > 0 else None
        report.row(["ratio ours / SupConLoss", "", f"{time_ratio:.2f}x", "",
                    f"{memory_ratio:.2f}x" if memory_ratio is not None else "-",
                    f"difference {abs(values['ours'] - values['supcon']):.1e}"],
                   time_ratio=time_ratio, memory_ratio=memory_ratio,
                   loss_difference=abs(values["ours"] - values["supcon"]))


def one_rank_loss(columns, labels, rank, n_local, temperature):
    """Forward + backward of the multi-positive loss as rank `rank` of a DDP run computes it, in one process: its
    n_local rows of `columns` [N_global, D] (L2-normalised, every rank's in rank order) against all N_global columns,
    through loss.py's autograd function, which multi_positive_loss calls with the gathered columns and this rank's
    first column. The gather's communication is not simulated. Returns the rank's loss (detached)."""
    import torch

    from loss import _MultiPositiveCrossEntropy

    first = rank * n_local
    rows = columns[first:first + n_local].clone().requires_grad_()
    # what the gather with gradients gives this rank: every rank's rows, its own slot holding its own tensor
    gathered = torch.cat([columns[:first], rows, columns[first + n_local:]])
    loss = _MultiPositiveCrossEntropy.apply(rows, gathered, labels[first:first + n_local], labels, first,
                                            temperature)
    loss.backward()
    return loss.detach()


# ---- 4. loader ----

def section_loader(report, args, device, results):
    import tempfile

    import torch

    from bench_data import write_tree
    from data import CaptionImagesDataset, collate

    m, images = args.images_per_caption, args.loader_captions * args.images_per_caption
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: one loader worker has one thread
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_report_loader_") as root:
            write_tree(root, args.loader_captions, 10, args.stored_size)  # 10 JPEGs per caption, as generate.py
            paths = {"CPU path (augment.PretrainAugmentation)": (False, False),
                     "--gpu-augment, the workers' share (decode + crop)": (True, False),
                     "--gpu-decode, the workers' share (read + JPEG header + draws)": (True, True)}
            datasets = {path: CaptionImagesDataset([root], m, 1, args.image_size, seed=0, augment_on_device=on,
                                                   decode_on_device=decode)
                        for path, (on, decode) in paths.items()}
            report.table("loader", f"### 4a. Augmentation per CPU core: data.CaptionImagesDataset items, "
                         f"{args.loader_captions} captions x {m} images = {images} a pass, JPEGs of "
                         f"{args.stored_size} px -> {args.image_size} px crops, one thread; warm-up 1 pass, then "
                         f"{args.loader_repeats} passes per path (new epochs), alternating",
                         ["path", "images/s per core", "ms per image, wall (passes)", "ms per image, CPU"])
            walls, cpus, last = {path: [] for path in paths}, {path: [] for path in paths}, {}
            for epoch in range(args.loader_repeats + 1):  # epoch 0: the warm-up
                for path, dataset in datasets.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    last[path] = [dataset[(epoch, i)] for i in range(args.loader_captions)]
                    if epoch:
                        walls[path].append((time.perf_counter() - start) / images)
                        cpus[path].append((time.process_time() - start_cpu) / images)
            per_core = {}
            for path in paths:
                wall, cpu = statistics.median(walls[path]), statistics.median(cpus[path])
                per_core[path] = 1 / wall
                passes = " ".join(fmt(w * 1e3) for w in walls[path])
                report.row([path, fmt(per_core[path]), f"{fmt(wall * 1e3)} ({passes})", fmt(cpu * 1e3)],
                           path=path, gpu_augment=paths[path], images_per_s_per_core=per_core[path],
                           seconds_per_image=walls[path], cpu_seconds_per_image=cpus[path])
    finally:
        torch.set_num_threads(threads)

    # the device's share under --gpu-augment and --gpu-decode, and the copies of one step's batch; a failure here
    # (these paths have never run on a GPU) still leaves the CPU path's cores per GPU below
    cpu_path, gpu_path, decode_path = paths
    try:
        augment_seconds, decode_seconds = device_share(report, args, device, collate(last[gpu_path]),
                                                       collate(last[cpu_path]), collate(last[decode_path]))
    except Exception as error:
        report.fail("loader", error, ", the device's share")
        augment_seconds = decode_seconds = None

    # how many cores one GPU needs: the step's consumption over one core's rate
    if "train" not in results:
        report.skip("CPU cores per GPU", "section 2 (train) did not run, so the step's consumption is unknown")
        return
    step_images, step_seconds = results["train"]["images"], results["train"]["step_seconds"]
    consumption = {cpu_path: step_images / step_seconds}
    if augment_seconds is not None:  # the step also runs augment_crops on its batch (and decode_crops)
        consumption[gpu_path] = step_images / (step_seconds + augment_seconds * step_images / images)
        consumption[decode_path] = step_images / (step_seconds + (augment_seconds + decode_seconds) *
                                                  step_images / images)
    else:
        report.skip("CPU cores per GPU under --gpu-augment and --gpu-decode", "augment_crops was not timed on the "
                    "device")
    report.table("loader", "### 4c. CPU cores one GPU needs = the step's images/s (section 2, ours; with "
                 "--gpu-augment the step also runs augment_crops) / images/s per core (4a)",
                 ["path", "step consumes images/s", "images/s per core", "cores per GPU"])
    for path, rate in consumption.items():
        cores = rate / per_core[path]
        report.row([path, fmt(rate), fmt(per_core[path]), fmt(cores)],
                   path=path, consumption_images_per_s=rate, images_per_s_per_core=per_core[path], cores=cores)


def device_share(report, args, device, crops, floats, jpegs):
    """Table 4b: augment_crops on `device` for the collated --gpu-augment batch `crops` (uint8 crops and their
    parameters); decode_crops for the --gpu-decode batch `jpegs` (the JPEG files and their drawn boxes: one batched
    torchvision decode_jpeg, nvJPEG on a GPU, then the crops), with its images/s; and on a GPU the pinned
    host-to-device copies of those batches and of the CPU path's float32 batch `floats`. Returns the median seconds
    of augment_crops and of decode_crops."""
    from augment import augment_crops
    from util.jpeg import decode_crops

    images = len(crops["images"])
    report.table("loader", f"### 4b. On the {device.type}: one step's batch of {images} crops of {args.image_size} px;"
                 f" warm-up 1 call, then {args.augment_repeats} timed calls",
                 ["what", "ms (median)", "ms (timed)", "MiB moved"])
    on_device = crops["images"].to(device)
    augment = lambda: augment_crops(on_device, crops["color"])  # noqa: E731
    augment()
    timing = alternate({"augment": augment}, args.augment_repeats, device)["augment"]
    augment_seconds = median_seconds(timing)
    report.row(["augment.augment_crops (colour, grayscale, blur, flip, normalise), batched", fmt(augment_seconds * 1e3),
                seconds_list(timing, 1e3), ""], what="augment_crops", images=images, median_seconds=augment_seconds,
               seconds=[t for t, _, _ in timing])
    views = len(jpegs["image_labels"]) // len(jpegs["caption_labels"])
    shipped = jpegs["images"].to(device)
    decode = lambda: decode_crops(shipped, jpegs["jpegs"], len(jpegs["image_labels"]), views)  # noqa: E731
    decode()
    timing = alternate({"decode": decode}, args.augment_repeats, device)["decode"]
    decode_seconds = median_seconds(timing)
    report.row([f"util.jpeg.decode_crops (JPEG decode, batched, + crop to {args.image_size} px): "
                f"{fmt(images / decode_seconds)} images/s", fmt(decode_seconds * 1e3), seconds_list(timing, 1e3),
                fmt(mib(jpegs["jpegs"].data.numel()))],
               what="decode_crops", images=images, median_seconds=decode_seconds, seconds=[t for t, _, _ in timing],
               images_per_s=images / decode_seconds, jpeg_bytes=jpegs["jpegs"].data.numel())
    if device.type != "cuda":
        report.skip("host-to-device copies", "no CUDA device")
        return augment_seconds, decode_seconds
    for name, tensor in (("uint8 crops (--gpu-augment)", crops["images"]),
                         ("JPEG files (--gpu-decode)", jpegs["jpegs"].data),
                         ("float32 images (CPU path)", floats["images"])):
        pinned = tensor.pin_memory()  # pretrain.py's DataLoader pins on a GPU
        copy = lambda pinned=pinned: pinned.to(device, non_blocking=True)  # noqa: E731
        copy()
        timing = alternate({"copy": copy}, args.augment_repeats, device)["copy"]
        size = tensor.numel() * tensor.element_size()
        report.row([f"host-to-device copy, pinned, {name}", fmt(median_seconds(timing) * 1e3),
                    seconds_list(timing, 1e3), fmt(mib(size))],
                   what=f"copy {name}", median_seconds=median_seconds(timing), seconds=[t for t, _, _ in timing],
                   bytes=size)
    return augment_seconds, decode_seconds


# ---- 5. evaluations ----

def section_evaluations(report, args, device, results):
    import torch
    import torch.nn.functional as F

    import model as model_lib
    import pretrain
    import segment

    amp = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    if not amp:
        report.skip("bf16 autocast in the evaluations", "segment.py and compositionality.py use it on CUDA only")
    torch.manual_seed(0)
    crop = args.seg_crop
    encoder = model_lib.build_vit(args.seg_model, image_size=crop, depth=args.seg_depth)
    depth = len(encoder.blocks)
    model = segment.Segmenter(encoder, segment.default_taps(depth), segment.NUM_CLASSES, None, 0.1).to(device)
    recipe = segment.get_args_parser().parse_args(["--random-init"])
    groups = segment.param_groups(model, recipe.weight_decay, recipe.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=recipe.lr,
                                  betas=tuple(recipe.betas))
    images = torch.randn(args.seg_batch, 3, crop, crop, device=device)
    labels = torch.randint(0, segment.NUM_CLASSES, (args.seg_batch, crop, crop), device=device)

    def train_step():
        model.train()
        with autocast:
            logits, aux = model(images)
        loss = F.cross_entropy(logits.float(), labels) + recipe.aux_weight * F.cross_entropy(aux.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def windows():
        model.eval()
        with torch.inference_mode(), autocast:
            model(images)

    depth_text = f", {args.seg_depth} blocks" if args.seg_depth else ""
    report.table("evaluations", f"### 5. Evaluations: segment.py ({args.seg_model}/16{depth_text} under UperNet, "
                 f"{args.seg_batch} crops of {crop} px) and compositionality.py's towers, "
                 f"{'bf16 autocast' if amp else 'float32'}; warm-up 1 call, then {args.eval_repeats} timed calls",
                 ["what", "items/s", "s per call (timed)", "peak GiB", "TFLOP/s"])
    for name, call, unit in (("segment.py training step (forward, both losses, backward, AdamW)", train_step, "crops"),
                             ("segment.py sliding-window forward", windows, "windows")):
        flops = count_flops(call)  # also the warm-up
        timing = alternate({"call": call}, args.eval_repeats, device)["call"]
        seconds = median_seconds(timing)
        peak = highest(timing)
        report.row([name, fmt(args.seg_batch / seconds), seconds_list(timing), fmt(gib(peak)),
                    fmt(flops / seconds / 1e12)], what=name, unit=unit, items_per_s=args.seg_batch / seconds,
                   seconds=[t for t, _, _ in timing], peak_bytes=peak, flops=flops, tflops_per_s=flops / seconds / 1e12)

    # compositionality.py: CLIP's text tower (pretrain.py's defaults) over a batch of full-length captions
    text_args = pretrain.get_args_parser().parse_args(["--data", "x"])
    width, layers = (text_args.text_width, text_args.text_layers) if not args.tiny else (32, 1)
    text = model_lib.TextTransformer(49408, 49407, text_args.context_length, width, layers,
                                     text_args.text_heads if not args.tiny else 2).to(device).eval()
    tokens = torch.randint(0, 49406, (args.aro_captions, text_args.context_length), device=device)
    tokens[:, -1] = 49407

    def captions():
        with torch.inference_mode(), autocast:
            text(tokens)

    flops = count_flops(captions)
    timing = alternate({"call": captions}, args.eval_repeats, device)["call"]
    seconds = median_seconds(timing)
    name = f"compositionality.py text tower ({args.aro_captions} captions of {text_args.context_length} tokens)"
    report.row([name, fmt(args.aro_captions / seconds), seconds_list(timing), fmt(gib(highest(timing))),
                fmt(flops / seconds / 1e12)], what=name, unit="captions", items_per_s=args.aro_captions / seconds,
               seconds=[t for t, _, _ in timing], flops=flops, tflops_per_s=flops / seconds / 1e12)


# ---- main ----

# ---- 6. parity ----

def section_parity(report, args, device, results):
    import copy

    import torch

    from bench_train_step import make_batch
    from pretrain import OBJECTIVES, build_model, compute_loss, param_groups
    from pretrain import get_args_parser as pretrain_parser

    run_args = pretrain_parser().parse_args(["--data", "unused", "--model", args.train_model, "--image-size",
                                             str(args.image_size), "--images-per-caption",
                                             str(args.images_per_caption)]
                                            + (["--depth", str(args.train_depth)] if args.train_depth else []))
    torch.manual_seed(0)
    start = build_model(run_args).to(device).train()
    batch = make_batch(argparse.Namespace(captions=args.captions, images_per_caption=args.images_per_caption,
                                          image_size=args.image_size))
    lr = 1e-4

    def our_step(precision):
        model = copy.deepcopy(start)
        optimizer = torch.optim.AdamW(param_groups(model, run_args.weight_decay), lr=lr, betas=tuple(run_args.betas))
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = compute_loss(model, batch, OBJECTIVES["stablerep"], run_args, device)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item(), dict(model.named_parameters()), scaler.get_scale() if scaler.is_enabled() else None

    report.table("parity", f"### 6. Parity of one training step: {args.train_model}/16 at {args.image_size} px, "
                 f"{args.captions} captions x {args.images_per_caption} images, lr {lr:g}, from the same weights "
                 "on the same batch", ["step", "loss", "loss - float32's", "mean, max |update - float32's| / lr",
                                       "gradient scale after"])
    sides = {precision: our_step(precision) for precision in ("fp32", "bf16", "fp16")}
    if args.official:
        try:
            sides["official fp16"] = official_step(args, run_args, start, batch, device, lr)
        except Exception as error:  # noqa: BLE001 - a checkout we cannot import is reported, the rest goes on
            report.fail("parity", error, " (the official step)")
    else:
        report.skip("the official training step", "no --official DIR (a checkout of google-research/syn-rep-learn)")
    reference_loss, reference, _ = sides["fp32"]
    before = dict(start.named_parameters())
    for name, (loss, weights, scale) in sides.items():
        gaps = torch.cat([((weights[key] - before[key]) - (reference[key] - before[key])).detach().abs().flatten()
                          for key in reference if key in weights]) / lr  # AdamW's first update is about +-lr
        skipped = scale is not None and scale < 2.0 ** 16  # GradScaler starts at 2^16 and halves on an overflow
        report.row([name if name.startswith("official") else f"ours, {name}", f"{loss:.6f}",
                    f"{loss - reference_loss:.2e}", f"{fmt(gaps.mean().item())}, {fmt(gaps.max().item())}",
                    fmt(scale) + (" (overflow: step skipped)" if skipped else "")],
                   side=name, loss=loss, loss_difference=loss - reference_loss, update_gap_mean=gaps.mean().item(),
                   update_gap_max=gaps.max().item(), scale=scale, skipped=skipped)
    if "official fp16" in sides:
        (ours_loss, ours, _), (their_loss, theirs, _) = sides["fp16"], sides["official fp16"]
        gap = max((ours[key] - theirs[key]).detach().abs().max().item() for key in ours) / lr
        report.row(["ours fp16 - official fp16", f"{ours_loss - their_loss:.2e}", "-", f"-, {fmt(gap)}", "-"],
                   side="ours - official", loss_difference=ours_loss - their_loss, update_gap_max=gap)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        sync_batchnorm_parity(report, args)
    else:
        report.skip("SyncBatchNorm across GPUs", "needs 2 or more CUDA devices")


def official_step(args, run_args, start, batch, device, lr):
    """The official train_one_epoch's body on `start`'s weights: (loss, {name: parameter}, gradient scale)."""
    import importlib
    import math
    import types

    import torch

    from util.official import official_no_decay
    folder = os.path.join(os.path.abspath(args.official), "StableRep")
    if not os.path.isdir(os.path.join(folder, "models")):
        raise FileNotFoundError(f"{folder}/models not found: --official takes a syn-rep-learn checkout")
    sizes = {"vit_small": "small", "vit_base": "base", "vit_large": "large"}
    full_depth = {None, 24 if args.train_model == "vit_large" else 12}
    if args.train_model not in sizes or args.train_depth not in full_depth or args.image_size != 224:
        raise ValueError("the official models are ViT-S/B/L/16 at their full depth and 224 px: --train-model "
                         "vit_small, vit_base or vit_large, --image-size 224")
    sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))  # util/misc.py's torch 1.x import
    sys.path.insert(0, folder)
    try:
        official_models = importlib.import_module("models.StableRep")
        official_losses = importlib.import_module("models.losses")
    finally:
        sys.path.remove(folder)
    model = official_models.model_dict[sizes[args.train_model]](ssl_mlp_dim=run_args.head_hidden_dim,
                                                               ssl_emb_dim=run_args.embed_dim)
    model.load_state_dict(start.state_dict())  # the same names: visual.* (timm's) and image_mlp.*
    if device.type != "cuda":  # SyncBatchNorm runs on GPUs only; on one process it is BatchNorm
        for name, module in list(model.image_mlp.named_children()):
            if isinstance(module, torch.nn.SyncBatchNorm):
                plain = torch.nn.BatchNorm1d(module.num_features, module.eps, module.momentum)
                plain.load_state_dict(module.state_dict())
                setattr(model.image_mlp, name, plain)
    model = model.to(device).train()
    named = list(model.named_parameters())  # util/misc.py add_weight_decay's groups
    no_decay = [p for n, p in named if official_no_decay(n, p)]
    decay = [p for n, p in named if not official_no_decay(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run_args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0}], lr=lr, betas=tuple(run_args.betas))
    scaler = torch.amp.GradScaler(device.type)
    views = args.images_per_caption
    images = batch["images"].to(device)  # [captions x m, 3, S, S], caption-major -> their [captions, 3 m, S, S]
    images = images.unflatten(0, (-1, views)).flatten(1, 2)
    labels = torch.arange(args.captions, device=device)
    criterion = official_losses.MultiPosConLoss(temperature=run_args.temperature)
    import tempfile

    import torch.distributed as dist
    with tempfile.TemporaryDirectory() as folder:  # its loss gathers across ranks: a group of one process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"file://{folder}/rendezvous")
        try:
            with torch.autocast(device.type, dtype=torch.float16):
                outputs = model(images, labels)
            loss = criterion(outputs)["loss"]  # outside autocast, on the fp16 outputs, as train_one_epoch
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        finally:
            dist.destroy_process_group()
    return loss.item(), dict(model.named_parameters()), scaler.get_scale()


def sync_batchnorm_parity(report, args):
    """The head's SyncBatchNorm on 2 NCCL processes (half the batch each) against one process on all of it."""
    import tempfile

    import torch
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    features = torch.randn(2 * args.captions, 768)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_sync_batchnorm_rank, args=(features, folder), nprocs=2)
        ranks = [torch.load(os.path.join(folder, f"{rank}.pt")) for rank in range(2)]
    from model import ProjectionHead
    torch.manual_seed(1)
    head = ProjectionHead(768, 256, 32).train()
    whole = head(features)
    gap = max((torch.cat([ranks[0]["out"], ranks[1]["out"]]) - whole).abs().max().item(),
              (ranks[0]["running_mean"] - head.bn1.running_mean).abs().max().item())
    report.row(["SyncBatchNorm, 2 GPUs vs 1 process", "-", "-", f"{gap:.2e} (outputs, running mean)", "-"],
               side="syncbn", sync_batchnorm_gap=gap)


def _sync_batchnorm_rank(rank, features, folder):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    from model import ProjectionHead
    torch.manual_seed(1)
    head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ProjectionHead(768, 256, 32)).cuda().train()
    out = head(features.chunk(2)[rank].cuda())
    torch.save({"out": out.detach().cpu(), "running_mean": head.bn1.running_mean.cpu()},
               os.path.join(folder, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ---- 7. the self-supervised families ----

def section_families(report, args, device, results):
    from pretrain import FAMILIES

    amp = device.type == "cuda"
    if not amp:
        report.skip("bf16 autocast in the families' steps", "pretrain.py uses it on CUDA only; timed in float32")
    blocks = f", {args.train_depth} blocks" if args.train_depth else ""
    report.table("families", f"### 7. The families' training steps: {args.train_model}/16{blocks} at "
                 f"{args.image_size} px, {'bf16 autocast' if amp else 'float32'}, each at its CC3M recipe's "
                 f"per-GPU batch; warm-up 1 step, then {args.family_repeats} timed steps each; GPU hours of the "
                 f"recipe at {RECIPE_GPUS} GPUs on CC3M's {CC3M_CAPTIONS} captions",
                 ["family", "images a GPU (+ local crops)", "s per step (timed)", "peak GiB", "GPU hours (recipe)"])
    for name in FAMILIES:  # one at a time: a family's model and optimiser are freed before the next is built
        family_row(report, args, device, amp, name)


def family_row(report, args, device, amp, name):
    """One family's step at its CC3M recipe's per-GPU batch (or --family-batch), and the recipe's GPU hours."""
    from bench_train_step import objective_side, objective_step, side_bytes
    from pretrain import get_args_parser as pretrain_parser

    recipe = pretrain_parser().parse_args(
        [f"@{os.path.join(REPOSITORY, 'recipes', f'pretrain_cc3m_{name}_synthetic.args')}"])
    images = args.family_batch or recipe.captions_per_gpu
    flags = [*(["--depth", str(args.train_depth)] if args.train_depth else []), *(args.family_flags or ())]
    run_args, model, optimizer, batch = objective_side(name, args.train_model, args.image_size,
                                                       images * (1 if name == "mae" else 2), device, flags)
    steps_done = iter(range(10 ** 6))

    def step():
        return objective_step(model, optimizer, batch, run_args, device, amp, next(steps_done))

    step()  # warm-up
    timing = alternate({name: step}, args.family_repeats, device)[name]
    seconds = median_seconds(timing)
    steps = run_args.epochs * (CC3M_CAPTIONS // (recipe.captions_per_gpu * RECIPE_GPUS))
    hours = steps * seconds * RECIPE_GPUS / 3600  # the recipe's only at its own per-GPU batch
    local = batch["local_images"]
    shown = f"{images}" + (f" (+ {len(local)} of {local.shape[-1]} px)" if local is not None else "")
    peak = highest(timing, side_bytes(model, optimizer, device.type))
    report.row([name, shown, seconds_list(timing), fmt(gib(peak)), fmt(hours)], family=name, images=images,
               seconds=[t for t, _, _ in timing], peak_bytes=peak, recipe_epochs=run_args.epochs,
               recipe_steps=steps, gpu_hours=hours)


def get_args_parser():
    parser = argparse.ArgumentParser(
        "gpu_report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full, quick, tiny = SIZES["full"], SIZES["quick"], SIZES["tiny"]

    def size_flag(group, flag, help_text, **kwargs):
        """A size or repeat count, None until resolve_sizes fills it from SIZES."""
        key = flag[2:].replace("-", "_")
        kwargs.setdefault("type", integer(1))
        group.add_argument(flag, default=None,
                           help=f"{help_text} (default {full[key]}; --quick: {quick[key]}; --tiny: {tiny[key]})",
                           **kwargs)

    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when there is one); sections needing CUDA for a "
                             "part (float16 generation, bf16 autocast, host-to-device copies) say what they skip")
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--tiny", action="store_true",
                         help="toy sizes (demo/tiny_sd.py's pipeline at 32 px, a 2-block ViT-Ti at 32 px, small "
                              "batches, 1-2 repeats): runs on a CPU in well under a minute; tests/test_gpu_report.py "
                              "runs it so the script cannot rot. Its numbers are not for comparison")
    profile.add_argument("--quick", action="store_true",
                         help="the full shapes, fewer repeats and a generation batch of 8, and --time-limit 480: "
                              "every section within the ten minutes a lent GPU is held (BENCHMARKS.md's command)")
    parser.add_argument("--time-limit", type=integer(0), default=None, metavar="SECONDS",
                        help="start no section after this many seconds (skipped, said in the JSON); default: none, "
                             "480 with --quick")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which sections to run, always in the order 1-7 (default: all; section 4's cores per "
                             "GPU needs section 2)")
    parser.add_argument("--output", default=None, metavar="JSON",
                        help="write every number here, rewritten after each row (default: print only)")
    group = parser.add_argument_group("1. generation")
    size_flag(group, "--gen-size", "generated size in pixels (v1.5: 512)")
    size_flag(group, "--gen-captions", "captions in a generation batch")
    size_flag(group, "--gen-images", "images per caption in a generation batch (batch = captions x images)")
    size_flag(group, "--ddim-steps", "DDIM steps (the paper's sampler: 50)")
    size_flag(group, "--dpm-steps", "DPM-Solver++ steps (the fast choice: 20-25)")
    size_flag(group, "--gen-warmup-steps", "steps of each side's warm-up call (same shapes; fewer steps save time)")
    size_flag(group, "--gen-repeats", "timed batches per side and sampler")
    group = parser.add_argument_group("2. training step (its batch is also section 3's N_local)")
    size_flag(group, "--train-model", "encoder", type=str, choices=["vit_tiny", "vit_small", "vit_base", "vit_large"])
    group.add_argument("--train-depth", type=integer(1), default=None,
                       help="encoder blocks (default: the model's own, 12; --tiny: 2)")
    size_flag(group, "--image-size", "crop size in pixels, also section 4's (paper: 224)")
    size_flag(group, "--captions", "captions per GPU per step (paper: 43)")
    size_flag(group, "--images-per-caption", "m, images per caption, also sections 3 and 4's (paper: 6)")
    size_flag(group, "--train-repeats", "timed training steps per side")
    group = parser.add_argument_group("3. loss")
    size_flag(group, "--world-size", "GPUs simulated: N_global = N_local x this (paper: 32 GPUs, 8256 images a step)")
    size_flag(group, "--loss-repeats", "timed forward + backward calls per side")
    group = parser.add_argument_group("4. loader")
    size_flag(group, "--loader-captions", "captions per timed pass (43 = one step's 258 images per GPU)")
    size_flag(group, "--stored-size", "JPEG size on disk (generate.py's --stored-size: 256)")
    size_flag(group, "--loader-repeats", "timed passes per augmentation path")
    size_flag(group, "--augment-repeats", "timed augment_crops calls and copies")
    group = parser.add_argument_group("5. evaluations")
    size_flag(group, "--seg-model", "segment.py's encoder", type=str,
              choices=["vit_tiny", "vit_small", "vit_base", "vit_large"])
    group.add_argument("--seg-depth", type=integer(1), default=None,
                       help="its blocks (default: the model's own, 12; --tiny: 2)")
    size_flag(group, "--seg-crop", "segment.py's crop and window in pixels (recipe: 512)")
    size_flag(group, "--seg-batch", "crops per GPU (recipe: 2, x 8 GPUs)")
    size_flag(group, "--eval-repeats", "timed calls of each evaluation row")
    size_flag(group, "--aro-captions", "captions per text-tower call")
    group = parser.add_argument_group("6. parity (section 2's model, size and batch)")
    group.add_argument("--official", default=None, metavar="DIR",
                       help="a checkout of google-research/syn-rep-learn: adds the official training step (its "
                            "StableRep/ folder is imported; needs timm). Its --model must be vit_small, vit_base or "
                            "vit_large")
    group = parser.add_argument_group("7. the families (section 2's model, depth and image size)")
    size_flag(group, "--family-repeats", "timed steps per family")
    group.add_argument("--family-batch", type=integer(2), default=None,
                       help="images a GPU for every family (default: each CC3M recipe's own; --tiny: 4); GPU hours "
                            "are the recipe's only at its own batch")
    return parser


def stop_on_signal(signum, frame):
    """SIGTERM ends the run as Ctrl-C does (main saves what it has)."""
    raise KeyboardInterrupt


def resolve_sizes(args):
    """Fill every size flag left unset from SIZES (tiny, quick or full), and --quick's time limit."""
    sizes = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.quick and args.time_limit is None:
        args.time_limit = QUICK_TIME_LIMIT
    for key, value in sizes.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.captions * args.images_per_caption < 2:
        raise UserError("a contrastive batch needs at least two images: raise --captions or --images-per-caption")
    if args.images_per_caption > 10:
        raise UserError(f"--images-per-caption {args.images_per_caption}: the loader section stores 10 per caption")
    if args.image_size % 16 or args.gen_size % 8 or args.seg_crop % 16:
        raise UserError("--image-size and --seg-crop must be multiples of 16, --gen-size of 8")


def main(args):
    resolve_sizes(args)
    import torch
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    header = {"machine": machine(device), "command": " ".join(["python", "bench/gpu_report.py", *sys.argv[1:]]),
              "sizes": {key: getattr(args, key) for key in SIZES["full"]}, "tiny": args.tiny, "quick": args.quick,
              "time_limit": args.time_limit}
    report = Report(args.output, header)
    info = header["machine"]
    gpu = (f"{info['gpu']} ({info['gpu_memory_gib']:.0f} GiB, compute capability {info['gpu_capability']})"
           if device.type == "cuda" else "no GPU: cpu")
    print(f"## bench/gpu_report.py, {info['date']}, git {info['git_commit'] or 'unknown'}"
          f"{' (--tiny: toy sizes, not for comparison)' if args.tiny else ''}\n\n"
          f"Machine: {gpu}; torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, diffusers "
          f"{info['diffusers']}, transformers {info['transformers']}, timm {info['timm']}; CPU {info['cpu']}, "
          f"{info['cpu_cores']} cores.\nCommand: `{header['command']}`", flush=True)
    sections = {"generation": section_generation, "train": section_train, "loss": section_loss,
                "loader": section_loader, "evaluations": section_evaluations, "parity": section_parity,
                "families": section_families}
    results, total = {}, time.perf_counter()
    signal.signal(signal.SIGTERM, stop_on_signal)  # `timeout`, a lease ending: keep what was measured, say where
    try:
        for section in SECTIONS:
            if section not in args.sections:
                report.skip(f"section {section}", "not in --sections")
                continue
            elapsed = time.perf_counter() - total
            if args.time_limit is not None and elapsed >= args.time_limit:
                report.skip(f"section {section}", f"--time-limit {args.time_limit} s reached ({elapsed:.0f} s)")
                continue
            start = time.perf_counter()
            try:
                sections[section](report, args, device, results)
            except Exception as error:  # one section's failure (out of memory, a bug) must not cost the others
                report.fail(section, error)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"\n(section {section}: {time.perf_counter() - start:.0f} s)", flush=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the JSON already holds every row measured; mark it stopped
        report.data["stopped"] = f"interrupted during section {report.section or 'setup'}"
        report.data["seconds"] = time.perf_counter() - total
        report.save()
        print(f"\ngpu_report.py: stopped after {report.data['seconds']:.0f} s; the rows measured so far are above"
              + (f" and in {args.output}" if args.output else ""), file=sys.stderr)
        sys.exit(130)
    report.data["complete"] = not report.data["failed"]
    report.data["seconds"] = time.perf_counter() - total
    report.save()
    print(f"\nDone in {report.data['seconds']:.0f} s." + (f" JSON: {args.output}" if args.output else ""))
    for entry in report.data["skipped"]:
        print(f"skipped: {entry['what']}: {entry['why']}")
    for entry in report.data["failed"]:
        print(f"FAILED: section {entry['section']}: {entry['error']}")
    if report.data["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    run(main, get_args_parser())
