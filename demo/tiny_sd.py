"""A tiny Stable Diffusion pipeline with random weights, for tests, benchmarks and the offline demo.

`save_tiny_pipeline(folder)` builds the same StableDiffusionPipeline class as Stable Diffusion v1.5 (UNet, VAE,
CLIP text encoder, CLIP tokenizer, the v1.5 noise schedule) at a toy width, and saves it with save_pretrained, so
that `StableDiffusionPipeline.from_pretrained(folder)` - generate.py's own loading code - reads it back offline.
About 7 MB on disk; 32x32 images from 16x16 latents (a two-block VAE halves the resolution once). The weights are
random, so the images are noise with structure, but every code path of the real model runs.

    python -m demo.tiny_sd --output tiny_sd   # then: python generate.py --model tiny_sd --size 32 --stored-size 32 ...

`build_pipeline(unet_config, vae_config, text_config, ...)` assembles the same pipeline at any size, e.g. v1.5's own
(bench/gpu_report.py times that architecture with random weights: weights do not change speed).
"""
import argparse
import json
import os
import tempfile

import torch

from util.cli import UserError, integer, run
from util.files import check_writable_folder

# the tokenizer's vocabulary: GPT-2's 256 printable byte characters, the same with the end-of-word mark, then
# CLIP's two special tokens; no merges beyond a few common pairs, so every word tokenizes to its characters


def _byte_characters():
    """GPT-2's reversible byte -> printable character map (the alphabet CLIP's BPE works on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + extra))
            extra += 1
    return characters


def _write_tokenizer_files(folder):
    characters = _byte_characters()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    tokens = characters + [c + "</w>" for c in characters] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file, len(vocab)


def tiny_configs(image_size):
    """(UNet, VAE, text encoder) configs of the toy pipeline: 32 and 64 channels, one layer per block, a 2-layer text
    encoder of width 32; a two-block VAE, so latents of image_size / 2."""
    unet = dict(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=32)
    vae = dict(sample_size=image_size, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
               block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32)
    return unet, vae, text


def build_pipeline(unet_config, vae_config, text_config, work_folder, seed=0, device="cpu"):
    """A StableDiffusionPipeline of these UNet2DConditionModel, AutoencoderKL and CLIPTextConfig keyword arguments,
    with random weights from `seed`, v1.5's noise schedule and the generated tokenizer (its source files go to
    `work_folder`); eval mode, float32, built on `device` (a v1.5-sized UNet initialises in a second on a GPU). The
    text encoder's special tokens are the tokenizer's; its vocabulary is the tokenizer's unless text_config asks for a
    larger one (the extra rows are never looked up)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_file, merges_file, vocab_size = _write_tokenizer_files(work_folder)
    text_config = {**text_config, "vocab_size": max(vocab_size, text_config.get("vocab_size", 0)),
                   "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}
    device = torch.device(device)
    # random weights from a fixed seed, without touching the caller's RNG
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
    # Stable Diffusion v1.5's own scheduler and noise schedule
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_pipeline(image_size, work_folder, seed=0):
    """The tiny pipeline in memory (eval mode, float32); `work_folder` receives the tokenizer's source files."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    return build_pipeline(*tiny_configs(image_size), work_folder, seed)


def save_tiny_pipeline(folder, image_size=32):
    """Build the tiny random-weight pipeline and save it to `folder` (from_pretrained-ready); returns `folder`."""
    from transformers.utils import logging as transformers_logging
    os.makedirs(folder, exist_ok=True)
    transformers_logging.disable_progress_bar()  # its "Writing model shards" bar says nothing for one 7 MB shard
    try:
        with tempfile.TemporaryDirectory() as tokenizer_sources:
            build_tiny_pipeline(image_size, work_folder=tokenizer_sources).save_pretrained(folder)
    finally:
        transformers_logging.enable_progress_bar()
    return folder


def get_args_parser():
    parser = argparse.ArgumentParser("python -m demo.tiny_sd", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Save the tiny random-weight Stable Diffusion pipeline to a "
                                                 "folder that generate.py --model reads offline.")
    parser.add_argument("--output", required=True, help="folder to save it in (created; about 7 MB)")
    parser.add_argument("--image-size", type=integer(8, 512), default=32,
                        help="image side the model is built for, a multiple of 8; 32 keeps a CPU run fast (the "
                             "tests' size)")
    return parser


def main(args):
    if args.image_size % 8:
        raise UserError(f"--image-size must be a multiple of 8, got {args.image_size}")
    import transformers

    check_writable_folder(args.output)
    transformers.utils.logging.disable_progress_bar()  # the text encoder's "Writing model shards" bar
    save_tiny_pipeline(args.output, args.image_size)
    print(f"tiny Stable Diffusion ({args.image_size} px, random weights) saved to {args.output}; use it with "
          f"generate.py --model {args.output} --size {args.image_size} --stored-size {args.image_size}")


if __name__ == "__main__":
    run(main, get_args_parser())
