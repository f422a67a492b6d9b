"""The paper's findings in miniature, on 2 CPU cores: every objective pretrained at equal budget on the images of a
procedural text-to-image stand-in (demo/shapes.py), then scored on a task raw pixels do badly on.

Data (demo/shapes.py): 1536 captions from a grammar of shapes and places ("a star below a small ring and left of a
small cross"; 4000 in all), each rendered n = 10 times at guidance w = 2 into generate.py's folder tree; the same
captions' renderings at w = 0 and 8 (RQ5), one world rendering per caption as the "real" images (RQ1), and the w = 2
images filed under random captions (`broken`: a generator whose images do not match their captions). The evaluation
images are world renderings of 2000 other captions, labelled by the large object's shape (10 classes), under the
nuisances no caption names (position, size, rotation, colours, background, clutter, noise): linear_probe.py
(L-BFGS, trained on 1000 of them, tested on the other 1000) and fewshot.py (5-way 5-shot episodes on the test 1000).

Every trained config runs --steps steps of 96 images with a ViT-Ti of 4 blocks and 8 px patches (16 patches of a
32 px image, so MAE keeps 4 at 75% masking) and the same lr (the families' rule, base x images / 256, is given the
base that makes it equal to the StableRep rule's). Gaussian blur is scaled to the image size (the recipes' 0.1-2 px
at 224 px is 0.014-0.29 px at 32 px). The caption-grouped objectives (StableRep, StableRep+, CLIP) train without
colour jitter: their positives are other renderings of one caption, which already differ in the colours the
caption leaves open (BENCHMARKS.md measures the jitter's cost at 32 px); the single-image families keep their own
colour augmentations, without which two crops of one image match by colour alone.

    config          loss        data            captions x images x crops per step
    stablerep       stablerep   synthetic w=2   16 x 6 x 1   (Eq. 2-4: the 6 renderings of a caption are positives)
    broken          stablerep   scrambled w=2   16 x 6 x 1   (the same images filed under random captions)
    simclr          simclr      synthetic w=2   48 x 1 x 2   (two crops of one image are the only positives)
    mocov3 / byol / dino        synthetic w=2   48 x 1 x 2   (their own views, heads, momentum, schedules)
    mae             mae         synthetic w=2   96 x 1 x 1   (75% of the 16 patches removed)
    raw_pixels      -           -               the 3072 pixels themselves (the floor under every encoder)
    random_init     -           -               the untrained ViT of the same shape
  and, in --study (RQ1-RQ5; not in --quick):
    stablerep_m2 / _m3          synthetic w=2   48 x 2 x 1, 32 x 3 x 1          RQ2, more positives
    clip, stablerep+            synthetic w=2   96 x 1 x 1, 16 x 6 x 1          RQ3, RQ4, language
    stablerep_w0 / _w8          synthetic w=0/8 16 x 6 x 1                      RQ5, guidance
    simclr_w8                   synthetic w=8   48 x 1 x 2                      RQ5 (the paper's SimCLR best is w=8)
    <family>_real               real            as the family                   RQ1, synthetic vs real

    python experiments/findings.py --quick --output runs/findings_quick   # one seed, the core configs (<= 15 min)
    python experiments/findings.py --output runs/findings                 # three seeds, the core configs
    python experiments/findings.py --study --seeds 1 --output runs/findings   # adds RQ1-RQ5's configs

Each stage script runs as a subprocess, as a user would run it; runs finished in --output are reused, so an
interrupted sweep continues and --study adds to a finished core run. <output>/findings.json holds, per config, the
linear probe and few-shot accuracy of each seed with mean and standard deviation and the run's last logged
collapse signals; <output>/findings.png draws the table.
"""
import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from demo import shapes  # noqa: E402
from demo.stages import probe_and_fewshot, run_stage  # noqa: E402
from util.cli import UserError, run  # noqa: E402
from util.files import atomic_write_json, check_writable_folder  # noqa: E402
from util.runlog import read_records  # noqa: E402

CAPTIONS = 1536  # pretraining captions: every config's captions a step divides it (whole epochs)
IMAGES_PER_CAPTION = 10  # n, as the paper generates
PROBE_CAPTIONS = 1000  # world renderings the linear probe trains on; as many more are the test images
IMAGES_PER_STEP = 96
MODEL, IMAGE_SIZE, PATCH_SIZE, DEPTH = "vit_tiny", 32, 8, 4  # 16 patches a 32 px image
ENCODER = ["--model", MODEL, "--image-size", str(IMAGE_SIZE), "--patch-size", str(PATCH_SIZE), "--depth", str(DEPTH)]
BLUR = ["--blur-sigma", "0.014", "0.29"]  # the recipes' 0.1-2 px at 224, at 32 px
HEAD = ["--head-hidden-dim", "512", "--embed-dim", "128"]
CAPTION_VIEWS = ["--crop-scale", "0.6", "1", "--no-color-augment"]
CAPTION_GROUPED = [*HEAD, "--head-batchnorm", "joint", *CAPTION_VIEWS]
TEXT = ["--context-length", "48", "--text-width", "128", "--text-layers", "2", "--text-heads", "4"]
FAMILY = {"simclr": [*HEAD, "--head-batchnorm", "joint", "--crop-scale", "0.3", "1"],
          "mocov3": [*HEAD, "--head-batchnorm", "per-view", "--crop-scale", "0.3", "1"],
          "byol": [*HEAD, "--head-batchnorm", "per-view", "--crop-scale", "0.3", "1"],
          "dino": ["--head-hidden-dim", "512", "--embed-dim", "128", "--out-dim", "1024", "--local-crops", "4",
                   "--local-crop-size", "16", "--local-crop-scale", "0.2", "0.5", "--crop-scale", "0.4", "1"],
          "mae": ["--decoder-width", "128", "--decoder-depth", "2", "--decoder-heads", "4"]}
FAMILIES = ("mocov3", "byol", "dino", "mae")  # their lr rule divides by 256, StableRep's by 512


def config(loss, data, captions, m, crops, flags=()):
    return {"loss": loss, "data": data, "captions": captions, "m": m, "crops": crops, "flags": list(flags)}


CORE = {
    "stablerep": config("stablerep", "w2", 16, 6, 1, CAPTION_GROUPED),
    "broken": config("stablerep", "scrambled_w2", 16, 6, 1, CAPTION_GROUPED),
    "simclr": config("simclr", "w2", 48, 1, 2, FAMILY["simclr"]),
    "mocov3": config("mocov3", "w2", 48, 1, 2, FAMILY["mocov3"]),
    "byol": config("byol", "w2", 48, 1, 2, FAMILY["byol"]),
    "dino": config("dino", "w2", 48, 1, 2, FAMILY["dino"]),
    "mae": config("mae", "w2", 96, 1, 1, FAMILY["mae"]),
    "raw_pixels": None,
    "random_init": None,
}
STUDY = {
    "stablerep_m2": config("stablerep", "w2", 48, 2, 1, CAPTION_GROUPED),
    "stablerep_m3": config("stablerep", "w2", 32, 3, 1, CAPTION_GROUPED),
    "clip": config("clip", "w2", 96, 1, 1, [*CAPTION_VIEWS, *TEXT]),
    "stablerep+": config("stablerep+", "w2", 16, 6, 1, [*CAPTION_GROUPED, *TEXT]),
    "stablerep_w0": config("stablerep", "w0", 16, 6, 1, CAPTION_GROUPED),
    "stablerep_w8": config("stablerep", "w8", 16, 6, 1, CAPTION_GROUPED),
    "simclr_w8": config("simclr", "w8", 48, 1, 2, FAMILY["simclr"]),
    **{f"{name}_real": {**CORE[name], "data": "real"} for name in ("simclr", "mocov3", "byol", "dino", "mae")},
}
CONFIGS = {**CORE, **STUDY}


def get_args_parser():
    parser = argparse.ArgumentParser("findings.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one seed of the core configs (at most 15 minutes on 2 cores); sets --seeds 1")
    parser.add_argument("--study", action="store_true", help="add the configs of RQ1-RQ5 (see the table above)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                        help="exactly these configs instead (default: the core ones, plus the study's with --study)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds 0 .. N-1 (3); each seeds pretraining and the evaluations; --quick: 1")
    parser.add_argument("--steps", type=int, default=192,
                        help="training steps of every config, a multiple of 96 (whole epochs for every config); 192 "
                             "x 96 images: each image of the w = 2 tree seen about 1.2 times")
    parser.add_argument("--base-lr", type=float, default=1e-2,
                        help="pretrain.py's base lr (lr = base x images a step / 512 = 1.9e-3 at 96 images)")
    parser.add_argument("--probe-wd-steps", type=int, default=15,
                        help="L2 strengths the linear probe sweeps (the paper's 45 cost 3x more for the same pick)")
    parser.add_argument("--episodes", type=int, default=600, help="few-shot episodes (600, the paper's)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes of every stage (2)")
    parser.add_argument("--output", default="runs/findings",
                        help="folder for the data, every run, findings.json and findings.png; finished runs there "
                             "are reused")
    return parser


# ---- data ----

def build_data(out, datasets):
    """The trees and probe folders `datasets` names (w0, w2, w8, scrambled_w2, real), those not yet there."""
    scenes = shapes.sample_scenes(CAPTIONS, seed=0)
    probe = shapes.sample_scenes(2 * PROBE_CAPTIONS, seed=1, exclude=scenes)
    for name in ("probe_train", "probe_test", *datasets):
        root, done = os.path.join(out, "data", name), os.path.join(out, "data", name + ".done")
        if os.path.isfile(done):
            continue
        started = time.time()
        if name == "probe_train":
            shapes.write_labelled(probe[:PROBE_CAPTIONS], root, seed=1)
        elif name == "probe_test":
            shapes.write_labelled(probe[PROBE_CAPTIONS:], root, seed=2)
        elif name == "real":
            shapes.write_real(scenes, root)
        else:
            w = float(name.rsplit("_w", 1)[-1] if "_w" in name else name[1:])
            shapes.write_synthetic(scenes, root, n=IMAGES_PER_CAPTION, w=w, scrambled=name.startswith("scrambled"))
        open(done, "w").close()
        print(f"data: {name} in {time.time() - started:.0f}s", flush=True)


# ---- runs ----

def pretrain(name, seed, args, out, folder):
    """Pretrain one config for exactly args.steps steps; returns the encoder checkpoint."""
    spec = CONFIGS[name]
    encoder = os.path.join(folder, "encoder.pth")
    if os.path.isfile(encoder):
        print(f"\n==> {name} seed {seed}: reusing {encoder}", flush=True)
        return encoder
    steps_per_epoch = CAPTIONS // spec["captions"]
    epochs = args.steps // steps_per_epoch
    images = spec["captions"] * spec["m"] * spec["crops"]
    base_lr = args.base_lr
    if spec["loss"] in FAMILIES:  # the same lr by their rule: base x images / 256 = args.base_lr x 96 / 512
        base_lr = args.base_lr * IMAGES_PER_STEP / 512 * 256 / (spec["captions"] * spec["m"])
    command = ["pretrain.py", "--data", os.path.join(out, "data", spec["data"]), "--output", folder,
               "--loss", spec["loss"], *ENCODER, *BLUR, *spec["flags"],
               "--captions-per-gpu", str(spec["captions"]), "--images-per-caption", str(spec["m"]),
               "--crops-per-image", str(spec["crops"]), "--base-lr", f"{base_lr:g}", "--epochs", str(epochs),
               "--warmup-epochs", f"{0.1 * epochs:g}", "--workers", str(args.workers), "--seed", str(seed),
               "--log-every", str(max(1, args.steps // 8)), "--save-every", str(args.steps)]
    if spec["loss"] in ("clip", "stablerep+"):
        command += ["--tokenizer", os.path.join(out, "data", "tokenizer")]
    run_stage(f"{name} seed {seed}: {spec['captions']} captions x {spec['m']} images x {spec['crops']} crops = "
              f"{images} images a step, {epochs} epochs x {steps_per_epoch} steps = {args.steps} steps", *command)
    return encoder


def random_init_checkpoint(seed, folder):
    """An untrained ViT of the trained configs' shape, seeded by `seed`, saved as a state dict (the probes'
    --random-init builds a full-depth one)."""
    path = os.path.join(folder, "encoder.pth")
    if not os.path.isfile(path):
        import torch

        from model import build_vit

        os.makedirs(folder, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(build_vit(MODEL, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, depth=DEPTH).state_dict(), path)
    return path


def last_signals(folder):
    """The run's last logged record without step, epoch and lr: its loss and collapse signals ({} if none)."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        return {}
    records = [r for r in read_records(path)[0] if "loss" in r]
    return {key: value for key, value in (records[-1] if records else {}).items()
            if key not in ("step", "epoch", "lr", "images_per_s", "corrupt_images")}


def mean_std(values):
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(args):
    if args.quick:
        args.seeds = 1
    names = args.configs or [*CORE, *(STUDY if args.study else ())]
    if args.steps < 96 or args.steps % 96:
        raise UserError(f"--steps must be a positive multiple of 96 (whole epochs for every config), got {args.steps}")
    if min(args.seeds, args.episodes, args.probe_wd_steps) < 1 or args.workers < 0:
        raise UserError("--seeds, --episodes and --probe-wd-steps must be at least 1, --workers at least 0")
    check_writable_folder(args.output)
    out = os.path.abspath(args.output)
    start = time.time()
    print(f"{len(names)} configs x {args.seeds} seed(s), {args.steps} steps x {IMAGES_PER_STEP} images each; "
          f"lr = {args.base_lr:g} x {IMAGES_PER_STEP} / 512 = {args.base_lr * IMAGES_PER_STEP / 512:.3g}", flush=True)

    build_data(out, sorted({CONFIGS[name]["data"] for name in names if CONFIGS[name]}))
    if any(CONFIGS[name] and CONFIGS[name]["loss"] in ("clip", "stablerep+") for name in names):
        tokenizer = os.path.join(out, "data", "tokenizer")
        if not os.path.isdir(tokenizer):
            from demo.tiny_sd import save_tiny_pipeline  # its character-level tokenizer feeds the text tower
            save_tiny_pipeline(tokenizer)
    train, test = os.path.join(out, "data", "probe_train"), os.path.join(out, "data", "probe_test")

    results, signals = {name: [] for name in names}, {name: [] for name in names}
    for seed in range(args.seeds):  # seeds outermost: a sweep cut short has every config at seed 0
        for name in names:
            folder = os.path.join(out, name, f"seed{seed}")
            if name == "raw_pixels":
                encoder = ["--raw-pixels", "--image-size", str(IMAGE_SIZE)]
            elif name == "random_init":
                encoder = ["--checkpoint", random_init_checkpoint(seed, folder)]
            else:
                encoder = ["--checkpoint", pretrain(name, seed, args, out, folder)]
                signals[name].append(last_signals(folder))
            workers = ["--num-workers", str(args.workers), "--seed", str(seed)]
            results[name].append(probe_and_fewshot(
                f"{name} seed {seed}", encoder, train, test, folder,
                probe_flags=[*workers, "--wd-steps", str(args.probe_wd_steps)],
                fewshot_flags=[*workers, "--episodes", str(args.episodes)]))

    table = {}
    for name, runs in results.items():
        probe_mean, probe_std = mean_std([r["linear_probe_top1"] for r in runs])
        shot_mean, shot_std = mean_std([r["fewshot_5way_5shot"] for r in runs])
        table[name] = {"linear_probe_mean": probe_mean, "linear_probe_std": probe_std, "fewshot_mean": shot_mean,
                       "fewshot_std": shot_std, "seeds": runs, "last_logged": signals[name],
                       "setup": CONFIGS[name]}
    summary = {"table": table, "args": vars(args), "images_per_step": IMAGES_PER_STEP, "captions": CAPTIONS,
               "evaluation": f"large object's shape, {len(shapes.SHAPES)} classes, world renderings of held-out "
                             "captions",
               "seconds": time.time() - start}
    atomic_write_json(os.path.join(out, "findings.json"), summary)
    title = (f"shapes miniature: ViT-Ti/8 (4 blocks) at 32 px, {args.steps} steps x {IMAGES_PER_STEP} images, "
             f"{args.seeds} seed(s), mean +- std")
    from plots import plot_findings

    plot_findings(table, os.path.join(out, "findings.png"), title)
    print(f"\n{title}; held-out captions, the large object's shape ({len(shapes.SHAPES)} classes):")
    print(f"| {'config':14s} | {'linear probe top-1':>18s} | {'5-way 5-shot':>14s} |")
    print(f"| {'-' * 14} | {'-' * 18} | {'-' * 14} |")
    for name, row in table.items():
        print(f"| {name:14s} | {row['linear_probe_mean']:11.2f} +- {row['linear_probe_std']:4.2f} | "
              f"{row['fewshot_mean']:7.2f} +- {row['fewshot_std']:4.2f} |")
    print(f"\n{summary['seconds']:.0f}s; {os.path.join(out, 'findings.json')}, {os.path.join(out, 'findings.png')}")


if __name__ == "__main__":
    run(main, get_args_parser())
