"""The paper's findings in miniature: SimCLR, StableRep (m = 2, 4, 8), CLIP and StableRep+ at equal budget, and the
self-supervised families of its first question (MoCo v3, BYOL, DINO, MAE).

Every objective is pretrained on the same handwritten-digits caption tree (80 captions: each digit's training
images dealt into 8 captions of the same text, about 17 images each; images of one digit under another caption
are negatives, as near-duplicate captions are in real data) with the same images per step (80) and the same
number of steps, then scored on held-out digits by linear_probe.py (L-BFGS protocol, trained on the training
digits) and fewshot.py (5-way 5-shot episodes). A random-init encoder of the same architecture is the floor.

    config        loss         captions x images x crops per step
    simclr        simclr       40 x 1 x 2    (two crops of one image are the only positives)
    stablerep_m2  stablerep    40 x 2 x 1
    stablerep_m4  stablerep    20 x 4 x 1
    stablerep_m8  stablerep    10 x 8 x 1
    clip          clip         80 x 1 x 1    (image-text contrastive, a small character-level text tower)
    stablerep+    stablerep+   10 x 8 x 1    (multi-positive image loss + image-text loss)
    mocov3        mocov3       40 x 1 x 2    (its two views, momentum encoder, InfoNCE)
    byol          byol         40 x 1 x 2    (its two views, target network, regression)
    dino          dino         40 x 1 x 2    (two global crops, 4 local crops of 16 px, teacher)
    mae           mae          80 x 1 x 1    (75% of the 4 patches of a 32 px image removed, 1 kept)
    random_init   -            no training

The families run their own recipes (weight decay, momentum, DINO's schedules, their views) at the digits' scale
(FAMILY_FLAGS: smaller heads and decoder, DINO's local crops at 16 px), at the same learning rate as the others:
their rule, lr = base x images / 256, is given the base that makes it equal to the StableRep rule's lr here.

Epochs in pretrain.py are passes over the 80 captions, so a config with fewer captions a step takes more steps
per epoch; --epochs is chosen per config so that every config runs exactly --steps steps. Every stage script is
run as a subprocess, as a user would run it; each seed repeats pretraining and evaluation. The table reports
mean and standard deviation over seeds; it is printed and written to <output>/findings.json.

    python experiments/findings.py                                     # every config, 3 seeds
    python experiments/findings.py --configs simclr stablerep_m8 --seeds 1 --steps 40
"""
import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from demo.digits import load_digit_images, split_digits, write_caption_tree, write_image_folder  # noqa: E402
from demo.stages import DIGIT_ENCODER_FLAGS, DIGIT_PRETRAIN_FLAGS, probe_and_fewshot, run_stage  # noqa: E402
from util.cli import UserError, run  # noqa: E402
from util.files import atomic_write_json, check_writable_folder  # noqa: E402

IMAGES_PER_STEP = 80  # every config sees 80 images (crops) a step
CAPTIONS_PER_DIGIT = 8  # 10 digits x 8 = 80 captions in the tree
# name: (--loss, captions per step, images per caption m, crops per image c); captions x m x c = 80
CONFIGS = {
    "simclr": ("simclr", 40, 1, 2),
    "stablerep_m2": ("stablerep", 40, 2, 1),
    "stablerep_m4": ("stablerep", 20, 4, 1),
    "stablerep_m8": ("stablerep", 10, 8, 1),
    "clip": ("clip", 80, 1, 1),
    "stablerep+": ("stablerep+", 10, 8, 1),
    "mocov3": ("mocov3", 40, 1, 2),
    "byol": ("byol", 40, 1, 2),
    "dino": ("dino", 40, 1, 2),
    "mae": ("mae", 80, 1, 1),
    "random_init": (None, 0, 0, 0),
}
FAMILIES = ("mocov3", "byol", "dino", "mae")
# the families at the digits' scale: per-view BatchNorm in MoCo v3's and BYOL's MLPs (their official batches; 40
# images a view here), DINO's head to 4096 prototypes and 4 local crops of 16 px (one patch) at 0.2-0.5 of a 32 px
# image, MAE's decoder 128 wide
FAMILY_FLAGS = {"mocov3": ["--head-batchnorm", "per-view"], "byol": ["--head-batchnorm", "per-view"],
                "dino": ["--out-dim", "4096", "--local-crops", "4", "--local-crop-size", "16",
                         "--local-crop-scale", "0.2", "0.5"],
                "mae": ["--decoder-width", "128", "--decoder-depth", "2", "--decoder-heads", "4"]}
TEXT_FLAGS = ["--context-length", "48", "--text-width", "128", "--text-layers", "2", "--text-heads", "4"]
# the projection head's flags of DIGIT_PRETRAIN_FLAGS each objective reads (pretrain.py refuses the others)
HEAD_FLAGS_READ = {"stablerep": ("--head-hidden-dim", "--embed-dim", "--head-batchnorm"),
                   "simclr": ("--head-hidden-dim", "--embed-dim", "--head-batchnorm"),
                   "stablerep+": ("--head-hidden-dim", "--embed-dim", "--head-batchnorm"),
                   "mocov3": ("--head-hidden-dim", "--embed-dim", "--head-batchnorm"),
                   "byol": ("--head-hidden-dim", "--embed-dim", "--head-batchnorm"),
                   "dino": ("--head-hidden-dim", "--embed-dim")}


def digit_pretrain_flags(loss):
    """DIGIT_PRETRAIN_FLAGS without the head flags `loss` does not read."""
    head = ("--head-hidden-dim", "--embed-dim", "--head-batchnorm")
    flags, kept = list(DIGIT_PRETRAIN_FLAGS), HEAD_FLAGS_READ.get(loss, ())
    for flag in head:
        if flag in flags and flag not in kept:
            del flags[flags.index(flag):flags.index(flag) + 2]
    return flags


def get_args_parser():
    parser = argparse.ArgumentParser("findings.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # experiment
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configs to run (default: all, see the table above)")
    parser.add_argument("--steps", type=int, default=160,
                        help="training steps of every config (a multiple of 8, so that every config's epochs are "
                             "whole: 80 captions / 10 captions a step = 8 steps an epoch for m = 8); 160 steps x "
                             "80 images = 12800 images seen, about 150 passes over the 1347 training digits")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds 0 .. N-1; each seeds pretraining (weights, caption order, crops), the probe's "
                             "validation split and the few-shot episodes")
    # model
    parser.add_argument("--depth", type=int, default=None,
                        help="transformer blocks of the ViT-Ti (default: its own 12); fewer make a CPU run "
                             "faster. The random-init floor gets the same depth (saved as a state dict, since the "
                             "probe scripts' --random-init builds the full depth)")
    parser.add_argument("--base-lr", type=float, default=6.4e-3,
                        help="pretrain.py's base lr (lr = base x images per step / 512, the official rule); 6.4e-3 "
                             "gives lr = 1e-3 at 80 images a step, what the digits demo trains well with")
    parser.add_argument("--warmup-fraction", type=float, default=0.1,
                        help="share of the steps spent in linear warmup (then cosine decay to 0)")
    # evaluation
    parser.add_argument("--probe-wd-steps", type=int, default=45,
                        help="L2 strengths the linear probe sweeps (linear_probe.py --wd-steps; 45, the paper's); "
                             "each is one L-BFGS fit, so fewer make a CPU run faster")
    parser.add_argument("--episodes", type=int, default=600,
                        help="few-shot episodes per encoder (600, the paper's; 5-way 5-shot, 15 queries)")
    # run
    parser.add_argument("--workers", type=int, default=2,
                        help="data-loading processes of every stage script (2: a laptop's cores)")
    parser.add_argument("--output", default="runs/findings",
                        help="folder for the data, every run and findings.json; runs already finished there "
                             "(their result files exist) are reused, so an interrupted sweep continues")
    return parser


def pretrain(config, seed, args, tree, tokenizer, folder):
    """Pretrain one config for exactly args.steps steps; returns the encoder checkpoint."""
    loss, captions, m, crops = CONFIGS[config]
    encoder = os.path.join(folder, "encoder.pth")
    if os.path.isfile(encoder):
        print(f"\n==> {config} seed {seed}: reusing {encoder}", flush=True)
        return encoder
    steps_per_epoch = 80 // captions  # the tree has 80 captions; every config's captions divide it
    epochs = args.steps // steps_per_epoch
    base_lr = args.base_lr
    if loss in FAMILIES:  # the same lr by the families' rule: base x images / 256 = args.base_lr x 80 / 512
        base_lr = args.base_lr * IMAGES_PER_STEP / 512 * 256 / (captions * m)
    command = ["pretrain.py", "--data", tree, "--output", folder, "--loss", loss, *digit_pretrain_flags(loss),
               *FAMILY_FLAGS.get(loss, []),
               "--captions-per-gpu", str(captions), "--images-per-caption", str(m), "--crops-per-image", str(crops),
               "--base-lr", f"{base_lr:g}", "--epochs", str(epochs),
               "--warmup-epochs", f"{args.warmup_fraction * epochs:g}", "--workers", str(args.workers),
               "--seed", str(seed), "--log-every", str(max(1, args.steps // 8)), "--save-every", str(args.steps)]
    if args.depth is not None:
        command += ["--depth", str(args.depth)]
    if loss in ("clip", "stablerep+"):
        command += ["--tokenizer", tokenizer, *TEXT_FLAGS]
    run_stage(f"{config} seed {seed}: {captions} captions x {m} images x {crops} crops = {IMAGES_PER_STEP} images a "
              f"step, {epochs} epochs x {steps_per_epoch} steps = {args.steps} steps", *command)
    return encoder


def evaluate(name, encoder_flags, seed, args, train_folder, test_folder, folder):
    """Linear probe and few-shot accuracy of one encoder; results files already there are reused."""
    workers = ["--num-workers", str(args.workers), "--seed", str(seed)]
    return probe_and_fewshot(f"{name} seed {seed}", encoder_flags, train_folder, test_folder, folder,
                             probe_flags=[*workers, "--wd-steps", str(args.probe_wd_steps)],
                             fewshot_flags=[*workers, "--episodes", str(args.episodes)])


def random_init_flags(seed, depth, folder):
    """Probe flags for an untrained ViT-Ti of the trained configs' depth, seeded by `seed`.

    At the full depth the probes' own --random-init builds it; a shallower one is built here as the probes build
    theirs (seed, then build_vit) and saved as a plain state dict, whose depth load_encoder reads from the keys."""
    if depth is None:
        return ["--random-init", *DIGIT_ENCODER_FLAGS, "--seed", str(seed)]
    import torch

    from model import build_vit

    path = os.path.join(folder, "encoder.pth")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(build_vit("vit_tiny", image_size=32, depth=depth).state_dict(), path)
    return ["--checkpoint", path]


def mean_std(values):
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(args):
    if args.steps < 8 or args.steps % 8:
        raise UserError(f"--steps must be a positive multiple of 8 (whole epochs for every config), got {args.steps}")
    if min(args.seeds, args.episodes, args.probe_wd_steps) < 1 or args.workers < 0 or (args.depth or 1) < 1:
        raise UserError("--seeds, --episodes, --probe-wd-steps and --depth must be at least 1, --workers at least 0")
    if not 0.0 <= args.warmup_fraction < 1.0:
        raise UserError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    check_writable_folder(args.output)
    out = os.path.abspath(args.output)
    start = time.time()
    print(f"{IMAGES_PER_STEP} images a step x {args.steps} steps = {IMAGES_PER_STEP * args.steps} images seen per "
          f"config; lr = {args.base_lr:g} x {IMAGES_PER_STEP} / 512 = {args.base_lr * IMAGES_PER_STEP / 512:g}; "
          f"{len(args.configs)} configs x {args.seeds} seeds", flush=True)

    # ---- data ----
    tree, tokenizer = os.path.join(out, "digits_tree"), os.path.join(out, "tiny_sd")
    train_folder, test_folder = os.path.join(out, "digits", "train"), os.path.join(out, "digits", "test")
    if not os.path.isfile(os.path.join(out, "data_ready")):
        train, held_out = split_digits(load_digit_images(size=32))
        write_caption_tree(train, tree, captions_per_digit=CAPTIONS_PER_DIGIT)
        write_image_folder(train, train_folder)
        write_image_folder(held_out, test_folder)
        from demo.tiny_sd import save_tiny_pipeline  # its character-level tokenizer feeds the text tower
        save_tiny_pipeline(tokenizer)
        open(os.path.join(out, "data_ready"), "w").close()

    # ---- pretraining and evaluation ----
    results = {config: [] for config in args.configs}
    for seed in range(args.seeds):  # seeds outermost: a sweep cut short still has every config at seed 0
        for config in args.configs:
            folder = os.path.join(out, config, f"seed{seed}")
            if config == "random_init":
                encoder_flags = random_init_flags(seed, args.depth, folder)
            else:
                encoder_flags = ["--checkpoint", pretrain(config, seed, args, tree, tokenizer, folder)]
            results[config].append(evaluate(config, encoder_flags, seed, args, train_folder, test_folder, folder))

    # ---- summary ----
    table = {}
    for config, runs in results.items():
        probe_mean, probe_std = mean_std([r["linear_probe_top1"] for r in runs])
        shot_mean, shot_std = mean_std([r["fewshot_5way_5shot"] for r in runs])
        table[config] = {"linear_probe_mean": probe_mean, "linear_probe_std": probe_std,
                         "fewshot_mean": shot_mean, "fewshot_std": shot_std, "seeds": runs}
    summary = {"table": table, "args": vars(args), "images_per_step": IMAGES_PER_STEP,
               "seconds": time.time() - start}
    atomic_write_json(os.path.join(out, "findings.json"), summary)
    depth = f"depth {args.depth}" if args.depth else "12 blocks"
    print(f"\nheld-out digits, ViT-Ti/16 ({depth}) at 32 px, {args.steps} steps x {IMAGES_PER_STEP} images, "
          f"{args.seeds} seed(s), mean +- std over seeds:")
    print(f"| {'config':12s} | {'linear probe top-1':>18s} | {'5-way 5-shot':>14s} |")
    print(f"| {'-' * 12} | {'-' * 18} | {'-' * 14} |")
    for config, row in table.items():
        print(f"| {config:12s} | {row['linear_probe_mean']:11.2f} +- {row['linear_probe_std']:4.2f} | "
              f"{row['fewshot_mean']:7.2f} +- {row['fewshot_std']:4.2f} |")
    print(f"\n{summary['seconds']:.0f}s; numbers in {os.path.join(out, 'findings.json')}")


if __name__ == "__main__":
    run(main, get_args_parser())
