"""The whole method end to end on a laptop CPU, offline, in a few minutes: every stage script, run as you would.

    python -m demo                       # from the repository root; --output demo_output
    python -m demo --resume              # continue an interrupted demo in demo_output (each stage resumes)

1. generate.py on demo/captions.tsv (CC3M-style captions we wrote) with a tiny Stable Diffusion whose weights are
   random: its images are structured noise, and the point is the stage itself (the real model is one
   `--model stable-diffusion-v1-5/stable-diffusion-v1-5` away). Also its --preview grid.
2. Real images in generate.py's own layout: scikit-learn's handwritten digits, one caption per digit ("a photo
   of the handwritten digit seven") with that digit's training images as the caption's images, the paper's
   many-images-per-caption structure on real pixels. The held-out digits become an ImageFolder.
3. pretrain.py with the multi-positive loss on that tree (a ViT-Ti at 32 pixels).
4. linear_probe.py (L-BFGS protocol) and fewshot.py (5-way 5-shot) on the held-out digits, for the trained
   encoder and for a randomly initialised one of the same architecture.
5. A table of those numbers, also written as <output>/results.json, and a figure, <output>/results.png (the
   pretraining loss curve and both encoders' numbers as bars; needs matplotlib).
"""
import argparse
import os
import time

from demo.digits import load_digit_images, split_digits, write_caption_tree, write_image_folder
from demo.stages import DIGIT_ENCODER_FLAGS, DIGIT_PRETRAIN_FLAGS, probe_and_fewshot, read_json, run_stage
from plots import plot_demo, read_log
from util.cli import ArgumentParser, UserError, integer, run
from util.files import atomic_write_json, check_writable_folder

HERE = os.path.dirname(os.path.abspath(__file__))  # the demo folder: its captions.tsv


def get_args_parser():
    parser = ArgumentParser("python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for every stage's files (made anew)")
    parser.add_argument("--captions", default=os.path.join(HERE, "captions.tsv"),
                        help="captions for the generation stage (CC3M's TSV: caption, url)")
    parser.add_argument("--epochs", type=integer(1), default=200,
                        help="pretraining epochs over the 10 digit captions; one step each (all 10 captions x "
                             "--images-per-caption images a step)")
    parser.add_argument("--images-per-caption", type=integer(2), default=8, help="m, positives per caption and step")
    parser.add_argument("--episodes", type=integer(1), default=600, help="few-shot episodes (600, the paper's)")
    parser.add_argument("--seed", type=integer(0, 2 ** 63 - 1), default=0, help="seed of the pretraining run")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted demo in --output (the same settings): each stage resumes")
    return parser


SETTINGS = ("captions", "epochs", "images_per_caption", "episodes", "seed")  # what demo.json records


def check_output(args):
    """An empty (or new) --output; with --resume, one holding a demo of the same settings (demo.json)."""
    if not (os.path.exists(args.output) and os.listdir(args.output)):
        return
    recorded_path = os.path.join(args.output, "demo.json")
    if not args.resume:
        hint = " (an interrupted demo: pass --resume)" if os.path.isfile(recorded_path) else ""
        raise UserError(f"{args.output} is not empty: remove it or pass another --output{hint}")
    try:
        recorded = read_json(recorded_path)
    except (OSError, ValueError):
        raise UserError(f"{args.output} holds no demo to resume (no readable demo.json): choose another --output") \
            from None
    changed = [key for key in SETTINGS if recorded.get(key) != getattr(args, key)]
    if changed:
        raise UserError(f"{args.output} holds a demo with other settings (--{changed[0].replace('_', '-')} "
                        f"{recorded.get(changed[0])}): resume it with those, or choose another --output")


def main(args):
    if not os.path.isfile(args.captions):
        raise UserError(f"captions file {args.captions} does not exist")
    args.captions = os.path.abspath(args.captions)
    check_output(args)
    check_writable_folder(args.output)
    out = os.path.abspath(args.output)
    atomic_write_json(os.path.join(out, "demo.json"), {key: getattr(args, key) for key in SETTINGS})
    start = time.time()

    # ---- 1. synthetic images ----
    from demo.tiny_sd import save_tiny_pipeline
    print("==> a tiny Stable Diffusion with random weights (its images are noise; the real model is a download "
          "away)", flush=True)
    tiny_model = os.path.join(out, "tiny_sd")
    if not os.path.isfile(os.path.join(tiny_model, "model_index.json")):  # a resumed demo keeps its own
        save_tiny_pipeline(tiny_model)
    generate_args = ["--captions", args.captions, "--model", tiny_model, "--n", "4", "--size", "32",
                     "--stored-size", "32", "--steps", "10", "--batch-size", "16", "--writers", "1"]
    run_stage("generate.py: 4 images per caption", "generate.py", *generate_args,
              "--output", os.path.join(out, "synthetic"))
    run_stage("generate.py --preview: captions x seeds in one PNG", "generate.py", *generate_args,
              "--output", os.path.join(out, "preview"), "--preview", "4")

    # ---- 2. real images in the same layout ----
    train, held_out = split_digits(load_digit_images(size=32))
    tree = write_caption_tree(train, os.path.join(out, "digits_tree"))
    train_folder = write_image_folder(train, os.path.join(out, "digits", "train"))
    test_folder = write_image_folder(held_out, os.path.join(out, "digits", "test"))
    print(f"\n==> digits: {len(train)} training images under 10 captions in {tree}; {len(held_out)} held out in "
          f"{test_folder}", flush=True)

    # ---- 3. pretraining ----
    images_per_step = 10 * args.images_per_caption
    run_stage("pretrain.py: multi-positive loss on the digit captions", "pretrain.py", "--data", tree,
              "--output", os.path.join(out, "pretrain"), *DIGIT_PRETRAIN_FLAGS,
              "--captions-per-gpu", "10", "--images-per-caption", str(args.images_per_caption),
              "--epochs", str(args.epochs), "--warmup-epochs", str(max(1, args.epochs // 10)),
              "--base-lr", f"{1e-3 * 512 / images_per_step:g}", "--workers", "2", "--seed", str(args.seed),
              "--log-every", "5", "--save-every", str(args.epochs), *(["--resume"] if args.resume else []))

    # ---- 4. evaluation ----
    encoders = {"pretrained": ["--checkpoint", os.path.join(out, "pretrain", "encoder.pth")],
                "random init": ["--random-init", *DIGIT_ENCODER_FLAGS, "--seed", str(args.seed)]}
    results = {name: probe_and_fewshot(name, encoder, train_folder, test_folder,
                                       os.path.join(out, "eval_" + name.replace(" ", "_")),
                                       probe_flags=["--num-workers", "2"],
                                       fewshot_flags=["--num-workers", "2", "--episodes", str(args.episodes)])
               for name, encoder in encoders.items()}

    # ---- 5. summary ----
    summary = {"encoders": results, "seconds": time.time() - start, "args": vars(args),
               "pretrain": read_json(os.path.join(out, "pretrain", "summary.json"))}
    atomic_write_json(os.path.join(out, "results.json"), summary)
    figure = os.path.join(out, "results.png")
    try:
        plot_demo(read_log(os.path.join(out, "pretrain", "log.jsonl")), results, figure)
    except UserError as err:  # matplotlib is optional: the table and results.json say it all too
        figure = None
        print(f"note: no figure ({err})")
    print(f"\nheld-out digits ({len(held_out)} images), ViT-Ti/16 at 32 px, {args.epochs} pretraining steps:")
    print(f"{'encoder':12s} {'linear probe top-1':>19s} {'5-way 5-shot':>16s}")
    for name, row in results.items():
        print(f"{name:12s} {row['linear_probe_top1']:19.2f} {row['fewshot_5way_5shot']:9.2f} +- "
              f"{row['fewshot_ci95']:.2f}")
    print(f"\nall stages in {summary['seconds']:.0f}s; numbers in {os.path.join(out, 'results.json')}"
          + (f", the figure in {figure}" if figure else "") + f", the synthetic tree in "
          f"{os.path.join(out, 'synthetic')}, its preview in {os.path.join(out, 'preview')}")


if __name__ == "__main__":
    run(main, get_args_parser())
