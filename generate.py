"""Stage 1 of StableRep: a captions file -> synthetic images, n per caption (Sec. 3, 4.1), as a folder tree or tar
shards.

    python generate.py --captions cc3m.tsv --n 10 --w 2            # one GPU (w = 2: StableRep; --w 8: SimCLR)
    torchrun --nproc-per-node 8 generate.py --captions cc12m.tsv --num-images 10 --output-format webdataset
    python generate.py --captions cc12m.tsv --shard 3 --num-shards 64   # one job of a cluster array

Stable Diffusion (diffusers' StableDiffusionPipeline, `--model`) draws `--n` images per caption from different
latent noise at classifier-free guidance scale `--w`. Image k of caption i starts from noise drawn on the CPU
from a generator seeded by `image_seed(seed, i, k)`, so it is the same image whatever the batch size, the shard
or the resume. Output: imagetree.py's folder tree (`--output-format files`) or shards.py's tar shards
(`webdataset`); caption i goes to folder or tar i // --captions-per-shard, and each process of a run owns a
contiguous block of those, so a rerun skips what is on disk by looking at its own block only, and refuses to mix
settings into an output made with other ones. A process locks each shard while it writes it, so processes started
on the same output by mistake share the shards instead of making every image twice.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys
import time
import warnings

from PIL import Image, ImageDraw, ImageFont

from util import imagetree, shards
from util.captions import read_captions, shard_captions, survey_captions
from util.cli import SEED, ArgumentParser, UserError, git_commit, integer, number, parse_command_line, run
from util.files import atomic_write_bytes, atomic_write_json, check_creatable, no_space_error, output_folder
from util.locks import LockFile

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SCHEDULERS = ("ddim", "dpm-solver++", "model")
DTYPES = ("float32", "float16", "bfloat16")  # --dtype: torch's dtypes by name
# what a rerun must share with the tree's settings.json; the rest of the file (versions, dtype, counts) is a record
RECIPE_KEYS = ("model", "scheduler", "steps", "eta", "w", "n", "size", "stored_size", "pixels", "format", "quality",
               "seed", "captions_file", "caption_rows", "output_format", "captions_per_shard")
# what an output written before a key existed holds (the folder tree, 1000 captions per folder)
RECIPE_DEFAULTS = {"output_format": "files", "captions_per_shard": imagetree.CAPTIONS_PER_FOLDER, "pixels": "rounded"}
# --pixels: how the decoder's [0, 1] floats become stored uint8 pixels, and the filter of the resize to --stored-size.
# official: the official txt2img.py's, `Image.fromarray((255. * x).astype(np.uint8)).resize((s, s))`: truncated, and
# Pillow's default filter for RGB (bicubic); rounded: rounded to the nearest level, and Lanczos
PIXEL_RULES = {"official": ("truncate", Image.Resampling.BICUBIC), "rounded": ("round", Image.Resampling.LANCZOS)}
OUTPUT_FORMATS = ("files", "webdataset")
MANY_FILES = 1_000_000  # a files run writing more than this is told about shards (cluster inode quotas)
TRUNCATED_FILE = "truncated.json"  # beside settings.json: the captions cut at the text encoder's token limit
TRUNCATED_LISTED = 1000  # truncated captions listed by id in truncated.json; the rest are counted
LOCK_PREFIX = ".lock-"  # <output>/.lock-00012: held (flock) by the process writing shard 12
# ranks of a torchrun run meet only at the start and the end; one may finish its block days before another
SUMMARY_TIMEOUT = datetime.timedelta(days=365)
MAX_SIZE = 2048  # pixels; Stable Diffusion v1.5 draws at 512, and UNet memory grows with the square of the side


def pixel_size(text):
    """An argparse `type`: an image side in pixels, a multiple of 8 (the VAE's downsampling) up to MAX_SIZE."""
    value = integer(8, MAX_SIZE)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {text}")
    return value


def get_args_parser():
    parser = ArgumentParser("generate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- data ----
    parser.add_argument("--captions", required=True,
                        help="captions file: CC3M's or CC12M's TSV, a TSV/CSV with a `caption` header, or one caption "
                             "a line; a caption's id is its row")
    parser.add_argument("--output", default="runs/synthetic",
                        help="output folder: the image tree (imagetree.py) or the tar shards (shards.py); a rerun "
                             "into it resumes")
    # ---- the paper's generation recipe ----
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Stable Diffusion weights, a hub id or a local folder saved with save_pretrained (a "
                             "single .safetensors file: convert it, docs/RUNNING.md); the paper uses v1.5")
    parser.add_argument("--n", "--num-images", dest="n", type=integer(1, 100), default=10,
                        help="images per caption, each from its own latent noise (paper: 10; 1-100). Under torchrun "
                             "write --num-images")
    parser.add_argument("--w", type=number(0, 100), default=2.0,
                        help="classifier-free guidance scale (paper: 2 for StableRep, 8 for SimCLR; 0-100)")
    parser.add_argument("--scheduler", default="ddim", choices=SCHEDULERS,
                        help="sampler: the paper's DDIM; dpm-solver++ (DPM-Solver++, 20-25 steps) is the fast "
                             "choice; `model` keeps the scheduler saved with the model (PNDM for v1.5)")
    parser.add_argument("--steps", type=integer(1, 1000), default=50,
                        help="denoising steps, 1-1000 (the model's training timesteps); 50 DDIM steps in the paper")
    parser.add_argument("--eta", type=number(0, 1), default=0.0,
                        help="DDIM's eta, 0-1 (0: deterministic DDIM, as in the paper; 1: DDPM's noise); only DDIM "
                             "reads it")
    parser.add_argument("--size", type=pixel_size, default=512,
                        help="generated height and width in pixels, a multiple of 8; 512, Stable Diffusion v1.5's "
                             "native size")
    parser.add_argument("--stored-size", type=pixel_size, default=256,
                        help="images are resized to this before saving (a multiple of 8, at most --size); 256 in the "
                             "paper (pre-training crops 224)")
    parser.add_argument("--pixels", choices=list(PIXEL_RULES), default="official",
                        help="official: truncated to uint8 and resized bicubically, as the official script stores "
                             "them; rounded: rounded, Lanczos")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="base seed (0 .. 2**63-1): image k of caption i starts from noise seeded by (seed, i, k)")
    # ---- output files ----
    parser.add_argument("--output-format", default="files", choices=OUTPUT_FORMATS,
                        help="files: a folder tree, one file per image; webdataset: tar shards, the paper-scale choice "
                             "(docs/RUNNING.md)")
    parser.add_argument("--captions-per-shard", type=integer(1), default=imagetree.CAPTIONS_PER_FOLDER,
                        help="captions per tar (webdataset) or per folder (files): caption i goes to shard i // this "
                             "(1000)")
    parser.add_argument("--format", default="jpg", choices=sorted(imagetree.PIL_FORMATS),
                        help="image file format; JPEG keeps 10 images x millions of captions on one disk")
    parser.add_argument("--quality", type=integer(1, 100), default=95,
                        help="JPEG/WebP quality, 1-100 (ignored by png)")
    parser.add_argument("--preview", type=integer(1, 100), nargs="?", const=8, default=0, metavar="ROWS",
                        help="write one PNG grid <output>/preview_w<w>.png of the first ROWS captions x their n images "
                             "instead (ROWS: 8)")
    # ---- speed ----
    parser.add_argument("--batch-size", type=integer(1), default=32,
                        help="images per denoising batch, across captions and seeds (the UNet sees twice as many "
                             "rows with guidance); lower it if the GPU runs out of memory")
    parser.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES,
                        help="weights and activations; auto = float16 on a GPU, float32 on the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (minutes of compilation, then faster steps on a GPU)")
    parser.add_argument("--writers", type=integer(1), default=4,
                        help="threads that resize, encode and write images while the GPU goes on")
    # ---- distributed ----
    parser.add_argument("--shard", type=integer(0), default=0,
                        help="this job's part of the captions (0 .. num-shards - 1): a contiguous block of whole "
                             "output shards")
    parser.add_argument("--num-shards", type=integer(1), default=1,
                        help="number of parts the captions are split into")
    return parser


if __name__ == "__main__":  # the command line is read before torch loads (2 s): --help and a bad flag answer at once
    command_line = parse_command_line(get_args_parser())

# the imports below load torch: after the command line, see above
import torch

from util import distributed


def check_args(args):
    """What no single flag's type can check: flags that must agree."""
    if args.stored_size > args.size:
        raise UserError(f"--stored-size {args.stored_size} is larger than the generated --size {args.size}")
    if args.shard >= args.num_shards:
        raise UserError(f"--shard must be in 0..{args.num_shards - 1} (--num-shards {args.num_shards}), "
                        f"got {args.shard}")
    if os.path.isfile(args.model):  # v1-5-pruned-emaonly.safetensors, a .ckpt: diffusers needs its configs too
        raise UserError(f"--model {args.model} is a single file; generate.py loads a folder in diffusers' layout (or "
                        "a hub id): convert it once, online (diffusers fetches SD v1.5's configs), with `python -c "
                        "\"from diffusers import StableDiffusionPipeline as P; P.from_single_file('"
                        f"{args.model}').save_pretrained('sd15')\"` and pass --model sd15 (or `hf download "
                        "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir sd15`)")


def process_shard(args):
    """(shard, number of shards) of this process: torchrun's ranks split each --shard again."""
    return args.shard * distributed.world_size() + distributed.rank(), args.num_shards * distributed.world_size()




# ---- model ----

def resolve_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_pipeline(args, device, dtype):
    """StableDiffusionPipeline.from_pretrained(--model) with the chosen scheduler, on `device` in `dtype`."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    # no truncation warnings from diffusers' encode_prompt (per batch) or the tokenizer ("Token indices sequence
    # length is longer than ..."): long_captions says it once and truncated.json lists them
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.get_logger("transformers.tokenization_utils_base").setLevel(
        transformers.utils.logging.ERROR)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only this
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            # no safety checker: it blacks out flagged images, and a black image would be a wrong positive
            pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
    except Exception as err:  # OSError, ValueError, hub errors ...: all mean "these weights are not usable here"
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"cannot load the model {args.model} ({type(err).__name__}: {reason}); offline, pass "
                        "--model a local folder (e.g. `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 "
                        "--local-dir sd15` on a machine with internet, then copy it) or set HF_HOME to a cache "
                        "that holds the model, with HF_HUB_OFFLINE=1") from None
    if args.scheduler == "ddim":  # from the model's own config: keeps its noise schedule and steps_offset
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif args.scheduler == "dpm-solver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.type == "cuda":
        pipe.vae.enable_slicing()  # decode one image at a time: a 512px batch of 32 would not fit otherwise
        pipe.unet.to(memory_format=torch.channels_last)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe  # attention runs through PyTorch's fused scaled_dot_product_attention (diffusers' default)


def model_source(name):
    """(model, revision) as settings.json records --model: a local folder's absolute path (revision None), or the
    hub id and the commit of the snapshot that from_pretrained loads from the hub cache (None before a download)."""
    if os.path.isdir(name):
        return os.path.abspath(name), None
    return name, hub_revision(name)


def hub_revision(repo_id, cache_dir=None):
    """The commit hash of the hub cache's current snapshot of `repo_id` (refs/main resolved, as from_pretrained
    resolves it: `<cache>/models--org--name/snapshots/<commit>/`), or None when the cache does not hold it."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
    except ValueError:  # not a repo id at all: loading the model says so
        return None
    return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else None


def describe_model(args, pipe, dtype, device):
    """The line that says what the run generates with, and the UNet rows a step sees (users get that wrong)."""
    return (f"model {args.model}: {type(pipe.scheduler).__name__} {args.steps} steps, w={args.w:g}, "
            f"{args.size}px -> {args.stored_size}px {args.format}, {dtype}, {device}; batch {args.batch_size} "
            f"images = {2 * args.batch_size if args.w > 1 else args.batch_size} UNet rows per step")


# ---- generation ----

def image_seed(seed, caption_id, image_index, stream="latents"):
    """The seed of image `image_index` of caption `caption_id`: a hash, so no two (i, k) share noise. `stream`
    separates the initial latents from the noise a stochastic sampler (DDIM with eta > 0) adds at each step."""
    digest = hashlib.sha256(f"stablerep/{seed}/{caption_id}/{image_index}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def initial_noise(pipe, items, seed, size):
    """(len(items), C, size/f, size/f) float32 CPU noise; item j = (caption id, image index)."""
    shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i, k)))
             for i, k in items]
    return torch.cat(noise)


def long_captions(tokenizer, captions):
    """The ids of the captions [(id, text)] longer than the tokenizer's `model_max_length` (77 tokens for Stable
    Diffusion): the text encoder sees only their first tokens."""
    if not captions:
        return []
    token_ids = tokenizer([text for _, text in captions], truncation=False).input_ids
    return [i for (i, _), ids in zip(captions, token_ids) if len(ids) > tokenizer.model_max_length]


def truncation_note(first, tokenizer):
    """The one note a run prints about captions over the token limit, naming the first."""
    return (f"note: captions longer than {tokenizer.model_max_length} tokens are cut there by the text encoder "
            f"(first: caption id {first})")


class PromptCache:
    """Text embeddings: each caption is encoded once for all its images, the empty prompt once for the run."""

    def __init__(self, pipe, device):
        self.pipe, self.device, self.cache = pipe, device, {}
        self.uncond = None

    def _encode(self, texts):
        embeds, _ = self.pipe.encode_prompt(texts, self.device, 1, False)
        return embeds

    def embeddings(self, caption_ids, captions):
        """(prompt_embeds, negative_prompt_embeds) for a batch; forgets the captions not in this batch."""
        new = sorted(set(caption_ids) - set(self.cache))
        if new:
            self.cache.update(zip(new, self._encode([captions[i] for i in new])))
        if self.uncond is None:
            self.uncond = self._encode([""])
        self.cache = {i: self.cache[i] for i in set(caption_ids)}  # a caption spans at most two batches
        prompt = torch.stack([self.cache[i] for i in caption_ids])
        return prompt, self.uncond.expand(len(caption_ids), -1, -1)


def generate_batch(pipe, prompts, items, captions, args):
    """uint8 (B, H, W, 3) CPU images for items [(caption id, image index)], at the generated size."""
    with torch.inference_mode():
        prompt_embeds, negative_embeds = prompts.embeddings([i for i, _ in items], captions)
        latents = initial_noise(pipe, items, args.seed, args.size).to(pipe.device, pipe.unet.dtype)
        step_noise = [torch.Generator().manual_seed(image_seed(args.seed, i, k, "steps")) for i, k in items]
        images = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, latents=latents,
                      generator=step_noise,  # per image, on the CPU: used by DDIM only when eta > 0
                      height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.w,
                      eta=args.eta, output_type="pt").images  # (B, 3, H, W) in [0, 1]
        return to_uint8(images, args.pixels).permute(0, 2, 3, 1).cpu().numpy()


def to_uint8(images, rule):
    """Decoded images in [0, 1] (any float dtype) -> uint8 by --pixels `rule`: 255 x, truncated (the official
    script's numpy astype) or rounded to the nearest level."""
    scaled = images.float().clamp(0, 1) * 255
    return (scaled.floor() if PIXEL_RULES[rule][0] == "truncate" else scaled.round()).to(torch.uint8)


def to_stored(pixels, stored_size, rule):
    """A uint8 [H, W, 3] image as it is stored: resized to stored_size by --pixels `rule`'s filter."""
    image = Image.fromarray(pixels)
    if image.width != stored_size:
        image = image.resize((stored_size, stored_size), PIXEL_RULES[rule][1])
    return image


def batches(items, batch_size):
    """Lists of up to batch_size items from any iterable (a generator is read as the batches are taken)."""
    items = iter(items)
    while batch := list(itertools.islice(items, batch_size)):
        yield batch


# ---- outputs ----

def library_versions():
    import diffusers
    import transformers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "code": git_commit()}


def settings_of(args, survey):
    """settings.json's content but the library versions and the dtype (added when the file is written: they need
    torch, which a run with nothing to do never imports)."""
    model, revision = model_source(args.model)
    return {
        "model": model, "model_revision": revision, "scheduler": args.scheduler, "steps": args.steps,
        "eta": args.eta, "w": args.w, "n": args.n, "size": args.size, "stored_size": args.stored_size,
        "pixels": args.pixels,
        "format": args.format, "quality": args.quality, "seed": args.seed, "output_format": args.output_format,
        "captions_per_shard": args.captions_per_shard,
        "seed_rule": "sha256('stablerep/{seed}/{caption_id}/{k}/latents')[:8]",
        "captions_file": os.path.basename(args.captions), "caption_rows": survey.rows,
        "captions_layout": survey.layout, "captions_used": survey.used, "skipped_rows": survey.skipped,
        "skipped_count": survey.skipped_count,
    }


def recorded_value(recorded, key):
    """A recipe value of an output's settings.json as this version writes it: a key added later reads as what
    outputs held before it existed, and a model folder recorded as typed (before paths were made absolute) is
    resolved."""
    value = recorded.get(key, RECIPE_DEFAULTS.get(key))
    if key == "model" and isinstance(value, str) and os.path.isdir(value):
        return os.path.abspath(value)
    return value


def made_files(root):
    """What of an output generate.py writes (tar shards, caption folders, the truncation list) `root` holds."""
    if not os.path.isdir(root):
        return []
    tars = set(shards.list_shards(root))
    return [name for name in sorted(os.listdir(root)) if name in tars or name == TRUNCATED_FILE
            or (name.isdigit() and os.path.isdir(os.path.join(root, name)))]


def check_settings(root, settings):
    """Refuse to add images made one way to an output made another way (mixing w would corrupt an experiment), an
    output whose settings.json cannot be read, and a folder holding shards or caption folders but no settings.json
    (settings.json is written before the first image, so those are not this recipe's)."""
    try:
        recorded = imagetree.read_settings(root)
    except ValueError as err:
        raise UserError(f"{err}; it records how the output was made: restore it, or choose another --output") \
            from None
    if recorded is None:
        theirs = made_files(root)
        if theirs:
            raise UserError(f"{root} holds {', '.join(theirs[:3])} but no {imagetree.SETTINGS_FILE}: images this run "
                            "did not make (or whose settings were lost) would be mixed with its own; choose another "
                            "--output")
        return
    differ = [f"{key} {recorded_value(recorded, key)!r} -> {settings[key]!r}" for key in RECIPE_KEYS
              if recorded_value(recorded, key) != settings[key]]
    if differ:
        raise UserError(f"{root} was made with other settings ({'; '.join(differ)}); use another --output or the "
                        "output's settings (settings.json)")
    revisions = recorded.get("model_revision"), settings["model_revision"]
    if None not in revisions and revisions[0] != revisions[1]:  # same hub id, another snapshot of its weights
        print(f"note: {root} was made with {settings['model']} at commit {revisions[0]}; the hub cache now holds "
              f"commit {revisions[1]}, so images made from here on may differ from the earlier ones", file=sys.stderr)


def shard_lock(root, shard):
    """The lock of output shard `shard`: <root>/.lock-00012, whichever the output format."""
    return LockFile(os.path.join(root, f"{LOCK_PREFIX}{shard:05d}"))


def record_truncated(root, shard, caption_ids, max_tokens):
    """Add the ids of shard `shard`'s captions over the token limit to <root>/truncated.json: {"max_tokens",
    "count", "caption_ids" (the first TRUNCATED_LISTED, ascending), "shards" ({shard: count})}. The processes of a
    run take turns (a lock); a shard already counted (by an earlier run) is not counted twice. An unreadable file
    is started afresh: it is a record, not part of the data."""
    path, lock = os.path.join(root, TRUNCATED_FILE), LockFile(os.path.join(root, LOCK_PREFIX + "truncated"))
    lock.acquire(wait=True)
    try:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            count, listed, counted = record["count"], record["caption_ids"], record["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            count, listed, counted = 0, [], {}
        key = f"{shard:05d}"
        if key not in counted:
            counted[key] = len(caption_ids)
            atomic_write_json(path, {"max_tokens": max_tokens, "count": count + len(caption_ids),
                                     "caption_ids": sorted(set(listed) | set(caption_ids))[:TRUNCATED_LISTED],
                                     "shards": counted})
    finally:
        lock.release()


def own_shards(rows, per_shard, shard, num_shards):
    """This process's output shards: block `shard` of `num_shards` contiguous blocks of the ceil(rows / per_shard)
    shards (caption i is in shard i // per_shard whatever the number of processes)."""
    total = -(-rows // per_shard)
    return range(shard * total // num_shards, (shard + 1) * total // num_shards)


class TreeOutput:
    """imagetree's folder tree, folder s = shard s. The writer threads write each image file; the folder's
    _index.json, written once its last image is on disk, marks the shard finished.

    An output (this class or TarOutput): `begin(shard, captions)` lists the images to make (none: the shard is
    now finished), `encode` runs on a writer thread, `put` takes its result in image order and returns the shard
    it finished, if any; `close` leaves unfinished shards resumable."""

    def __init__(self, args):
        self.args = args
        self.left = {}  # shard -> images still to write into its folder

    def folder(self, shard):
        return os.path.join(self.args.output, f"{shard:05d}")

    def finished(self, shard):
        return os.path.isfile(os.path.join(self.folder(shard), imagetree.INDEX_FILE))

    def begin(self, shard, captions):
        """The images [(caption id, k)] of the shard's captions [(id, text)] not on disk yet (one listing of the
        folder); their caption files are written now."""
        args, folder = self.args, self.folder(shard)
        os.makedirs(folder, exist_ok=True)
        present = imagetree.images_on_disk(folder, args.format)
        todo = [(i, k) for i, _ in captions for k in range(args.n) if k not in present.get(i, ())]
        for i, text in captions:
            if len(present.get(i, ())) < args.n and not os.path.isfile(
                    imagetree.caption_path(args.output, i, args.captions_per_shard)):
                imagetree.write_caption(args.output, i, text, args.captions_per_shard)
        if todo:
            self.left[shard] = len(todo)
        else:  # complete, but killed before its index was written (or no usable caption in these rows)
            imagetree.index_folder(folder)
        return todo

    def encode(self, caption_id, k, pixels):
        """On a writer thread: resize, encode and write the image file."""
        args = self.args
        stored = to_stored(pixels, args.stored_size, args.pixels)
        imagetree.write_image(args.output, caption_id, k, stored, args.format, args.quality, args.captions_per_shard)

    def put(self, caption_id, k, _):
        shard = caption_id // self.args.captions_per_shard
        self.left[shard] -= 1
        if self.left[shard]:
            return None
        del self.left[shard]
        imagetree.index_folder(self.folder(shard))
        return shard

    def close(self):
        pass


class TarOutput:
    """shards.py's tar shards: the writer threads encode the images, the main thread appends each caption to its
    shard's temporary tar once its n images are encoded (in caption order), and renames the tar when its last
    caption is in."""

    def __init__(self, args):
        self.args = args
        self.open = {}  # shard -> (ShardWriter, {caption id: text}, {caption id: {k: encoded image}})

    def path(self, shard):
        return os.path.join(self.args.output, shards.shard_name(shard))

    def finished(self, shard):
        return os.path.isfile(self.path(shard))

    def begin(self, shard, captions):
        """The images [(caption id, k)] of the captions [(id, text)] not yet in the shard: all n images of every
        caption after those an interrupted run completed in its temporary tar."""
        writer = shards.ShardWriter(self.path(shard), [i for i, _ in captions], self.args.n)
        remaining = writer.remaining
        if not remaining:
            writer.finish()
            return []
        texts = dict(captions)
        self.open[shard] = (writer, {i: texts[i] for i in remaining}, {})
        return [(i, k) for i in remaining for k in range(self.args.n)]

    def encode(self, caption_id, k, pixels):
        """On a writer thread: resize and encode the image; the bytes go into the tar in put()."""
        args = self.args
        return imagetree.encode_image(to_stored(pixels, args.stored_size, args.pixels), args.format, args.quality)

    def put(self, caption_id, k, data):
        args = self.args
        shard = caption_id // args.captions_per_shard
        writer, texts, images = self.open[shard]
        done = images.setdefault(caption_id, {})
        done[k] = data
        if len(done) < args.n:
            return None
        seeds = [image_seed(args.seed, caption_id, j) for j in range(args.n)]
        writer.add(caption_id, [(j, args.format, done[j]) for j in range(args.n)], texts.pop(caption_id),
                   {"caption_id": caption_id, "row": caption_id, "seeds": seeds})
        del images[caption_id]
        if not writer.complete:
            return None
        writer.finish()
        del self.open[shard]
        return shard

    def close(self):
        for writer, _, _ in self.open.values():
            writer.close()  # the temporary tar stays: the next run resumes it


class PreviewGrid:
    """The --preview picture: one row per caption, one column per image index k (each image its own seed). A
    header line labels the columns with k, two lines above each row give the caption id and the caption (wrapped,
    "..." where it is cut), and white gutters separate the tiles. The font is preview_font's."""

    def __init__(self, captions, n, size):
        self.rows = {i: row for row, i in enumerate(captions)}  # caption id -> row
        self.size, self.gutter = size, max(4, size // 32)
        font = preview_font(captions.values(), max(10, size // 16))
        ascent, descent = font.getmetrics()
        self.line = ascent + descent  # one line of text, accents and descenders included
        self.caption = 2 * self.line + self.gutter  # the caption's two lines and the gap under them
        width = self.gutter + n * (size + self.gutter)
        self.image = Image.new("RGB", (width, self.top(len(captions))), "white")
        draw = ImageDraw.Draw(self.image)
        for k in range(n):
            label = f"k={k}"
            draw.text((self.left(k) + (size - draw.textlength(label, font=font)) / 2, self.gutter), label,
                      fill="black", font=font)
        for i, text in captions.items():
            for row_line, line in enumerate(wrap_label(f"#{i}: {text}", width - 2 * self.gutter, draw, font)):
                draw.text((self.gutter, self.top(self.rows[i]) + row_line * self.line), line, fill="black", font=font)

    def left(self, k):
        return self.gutter + k * (self.size + self.gutter)

    def top(self, row):
        """The y of row `row`'s caption (of the bottom edge for row = the number of rows)."""
        return self.gutter + self.line + self.gutter + row * (self.caption + self.size + self.gutter)

    def paste(self, caption_id, k, image):
        self.image.paste(image, (self.left(k), self.top(self.rows[caption_id]) + self.caption))


def wrap_label(text, width, draw, font, max_lines=2):
    """`text` in at most `max_lines` lines of `width` pixels: whole words where they fit, a word wider than a line
    broken between characters (a CJK caption has no spaces), " ..." ending the last line when text is left over."""
    def fits(line):
        return draw.textlength(line, font=font) <= width

    lines, line, words = [], "", text.split()
    while words:
        joined = f"{line} {words[0]}" if line else words[0]
        if fits(joined):
            line, words = joined, words[1:]
        elif line:  # the word starts the next line
            lines.append(line)
            line = ""
        else:  # alone and still too wide: its longest head that fits (at least one character)
            head = next(n for n in range(len(joined), 0, -1) if n == 1 or fits(joined[:n]))
            lines.append(joined[:head])
            words[0] = joined[head:]
    lines.append(line)
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and not fits(last + " ..."):  # drop whole words, then characters of a single long one
        last = last.rsplit(" ", 1)[0] if " " in last else last[:-1]
    return lines[:max_lines - 1] + [last.rstrip() + " ..."]


def preview_font(texts, size):
    """The preview's font: DejaVu Sans, the font matplotlib ships (requirements.txt; found without importing
    matplotlib), which has accented Latin, Greek and Cyrillic. When the captions hold characters it lacks (CJK,
    say), the first installed font that has every character of the grid, as fontconfig's fc-list finds it (on
    Debian, e.g. fonts-noto-cjk; a CJK-only font such as fonts-droid-fallback has no Latin and does not qualify);
    with none, DejaVu Sans draws the characters it lacks as boxes. Pillow's built-in font (ASCII only) when
    matplotlib is absent."""
    spec = importlib.util.find_spec("matplotlib")
    dejavu = spec and os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
    if not dejavu or not os.path.isfile(dejavu):
        return ImageFont.load_default(size=size)
    try:
        from fontTools.ttLib import TTFont  # matplotlib's own dependency
        covered = TTFont(dejavu, lazy=True).getBestCmap()
    except ImportError:
        return ImageFont.truetype(dejavu, size)
    needed = {ord(ch) for text in [*texts, "#0123456789:k=."] for ch in text if not ch.isspace()}
    if needed - set(covered):
        try:
            charset = ":charset=" + " ".join(f"{c:x}" for c in sorted(needed))
            found = subprocess.run(["fc-list", "--format", "%{file}\\n", charset], capture_output=True, text=True,
                                   timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError):  # no fontconfig (macOS, Windows)
            found = []
        for path in sorted(found):
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.truetype(dejavu, size)


# with the model, what decides an image's pixels
PIXEL_KEYS = ("scheduler", "steps", "eta", "w", "size", "stored_size", "pixels", "seed")


def stored_images(args, caption_ids):
    """{(caption id, k): image} of these captions' images that --output already holds, made with the settings that
    decide their pixels (settings.json's model and PIXEL_KEYS): a preview reads them rather than drawing them
    again. {} when --output holds no such output."""
    try:
        recorded = imagetree.read_settings(args.output) if os.path.isdir(args.output) else None
    except ValueError:
        return {}
    if not recorded or recorded_value(recorded, "model") != model_source(args.model)[0] or any(
            recorded_value(recorded, key) != getattr(args, key) for key in PIXEL_KEYS):
        return {}
    image_format, per_shard = recorded.get("format", "jpg"), recorded_value(recorded, "captions_per_shard")
    found = {}
    for i in caption_ids:
        for k in range(args.n):
            try:
                if recorded_value(recorded, "output_format") == "webdataset":
                    data = _shard_image(os.path.join(args.output, shards.shard_name(i // per_shard)), i, k)
                else:
                    path = imagetree.image_path(args.output, i, k, image_format, per_shard)
                    data = open(path, "rb").read() if os.path.isfile(path) else None
                if data is not None:
                    with Image.open(io.BytesIO(data)) as image:
                        found[i, k] = image.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError):
                continue  # not there, or damaged: drawn again
    return found


def _shard_image(path, caption_id, k):
    """The encoded image k of a caption from one of generate.py's shards (by its index), or None."""
    if not os.path.isfile(path):
        return None
    fd = shards.open_tar(path)
    try:
        table = shards.read_index(fd)
        rows = [] if table is None else [row for row in table if row[0] == caption_id]
        if not rows or 2 + k >= len(rows[0]) or not rows[0][2 + k]:
            return None
        return shards.read_member(fd, int(rows[0][2 + k]), key=caption_id, slot=k)
    finally:
        os.close(fd)


def write_preview(args, device):
    """--preview: one PNG grid of the first --preview usable captions x their n images; no tree. The images an
    earlier run made with the same settings are read from --output, the others drawn. Returns its path."""
    # ---- data ----
    captions = read_captions(args.captions, max_captions=args.preview).captions
    check_creatable(args.output)
    grid = PreviewGrid(captions, args.n, args.stored_size)
    stored = stored_images(args, list(captions))
    for (i, k), image in stored.items():
        grid.paste(i, k, image)
    missing = [(i, k) for i in captions for k in range(args.n) if (i, k) not in stored]
    if stored:
        print(f"preview: {len(stored)} of {len(captions) * args.n} images read from {args.output}")
    if missing:
        # ---- model ----
        dtype = resolve_dtype(args.dtype, device)
        pipe = load_pipeline(args, device, dtype)
        print(describe_model(args, pipe, dtype, device))
        long = long_captions(pipe.tokenizer, list(captions.items()))
        if long:
            print(truncation_note(long[0], pipe.tokenizer), file=sys.stderr)
        # ---- the grid ----
        prompts = PromptCache(pipe, device)
        for batch in batches(missing, args.batch_size):
            for (i, k), pixels in zip(batch, generate_batch(pipe, prompts, batch, captions, args)):
                grid.paste(i, k, to_stored(pixels, args.stored_size, args.pixels))
    path = os.path.join(args.output, f"preview_w{args.w:g}.png")
    with output_folder(args.output):
        atomic_write_bytes(path, imagetree.encode_image(grid.image, "png"))
    print(f"preview: {len(captions)} captions x {args.n} images at w={args.w:g} -> {path}")
    return path


@dataclasses.dataclass
class Tally:
    """What a process did: images made, shards finished, shards skipped because another process holds them,
    captions of its shards cut at the token limit."""
    made: int = 0
    finished: int = 0
    held: int = 0
    truncated: int = 0


def write_shards(pipe, prompts, captions_by_shard, output, args, rows=None, total_images=None, show_progress=True,
                 preemption=None):
    """Generate the missing images of the shards that `captions_by_shard` yields as (shard, [(id, text)]) into
    `output` (TreeOutput or TarOutput), in batches that run across shard boundaries; returns a Tally. Once
    `preemption` (checkpoints.stop_at_step_boundary) has received SIGTERM or SIGUSR1, no batch is started: those
    in flight are written and the open shards closed (a tar shard's temporary file is resumed by the next run).

    A shard is locked (shard_lock) before it begins: one that another process holds is skipped and its holder
    named, one finished meanwhile is left alone, so processes started on the same output share the work. When a
    shard is finished its captions over the token limit go into truncated.json and its lock is released. Holds
    the captions of the shards in flight only (the generator is read as the batches need it). The progress bar
    starts at `total_images` (n per row of the shards) and drops, as each shard begins, the images of its skipped
    rows and those already on disk (`rows`: the captions file's row count)."""
    from tqdm import tqdm

    bar = tqdm(total=total_images, unit="img", disable=not show_progress, dynamic_ncols=True, smoothing=0.1)
    tally, locks, long = Tally(), {}, {}  # locks and long: shard -> its LockFile, its captions over the limit

    def drop_from_bar(shard, images_to_make):
        if rows is not None and total_images is not None:
            bar.total -= min(args.captions_per_shard, rows - shard * args.captions_per_shard) * args.n - images_to_make
            bar.refresh()

    def finish(shard):
        if long[shard]:
            record_truncated(args.output, shard, long[shard], pipe.tokenizer.model_max_length)
        del long[shard]
        locks.pop(shard).release()
        tally.finished += 1

    def items():
        for shard, captions in captions_by_shard:
            lock = shard_lock(args.output, shard)
            if not lock.acquire():
                tally.held += 1
                bar.write(f"shard {shard} skipped: {lock.holder()} is writing it", file=sys.stderr)
                drop_from_bar(shard, 0)
                continue
            if output.finished(shard):  # by another process, after this one looked
                lock.release()
                drop_from_bar(shard, 0)
                continue
            locks[shard], long[shard] = lock, long_captions(pipe.tokenizer, captions)
            if long[shard] and not tally.truncated and distributed.is_main_process():
                bar.write(truncation_note(long[shard][0], pipe.tokenizer) + f"; listed in {TRUNCATED_FILE}",
                          file=sys.stderr)
            tally.truncated += len(long[shard])
            todo = output.begin(shard, captions)
            drop_from_bar(shard, len(todo))
            if not todo:
                finish(shard)
            texts = dict(captions)
            for i, k in todo:
                yield i, k, texts[i]

    pool = concurrent.futures.ThreadPoolExecutor(args.writers)
    pending = collections.deque()  # (caption id, k, future), oldest first

    def drain(keep):
        while len(pending) > keep:
            i, k, future = pending.popleft()
            finished = output.put(i, k, future.result())  # a failed write (disk full) stops the run here
            if finished is not None:
                finish(finished)

    try:
        for batch in batches(items(), args.batch_size):
            if preemption is not None and preemption.received:  # SIGTERM or SIGUSR1: write what is made, then stop
                break
            pairs = [(i, k) for i, k, _ in batch]
            pixels = generate_batch(pipe, prompts, pairs, {i: text for i, _, text in batch}, args)
            pending.extend((i, k, pool.submit(output.encode, i, k, image)) for (i, k), image in zip(pairs, pixels))
            drain(keep=2 * args.batch_size)  # the writers work on this batch while the next one denoises
            tally.made += len(batch)
            bar.update(len(batch))
        drain(keep=0)
    finally:
        pool.shutdown(cancel_futures=True)
        output.close()
        for lock in locks.values():
            lock.release()
        bar.close()
    return tally


def summary_group():
    """A gloo process group for the run's counts under torchrun (None in one process): CPU tensors whatever the
    device, and a timeout long enough for ranks that finish their blocks days apart (the default would stop them)."""
    if not distributed.joined():
        return None
    return torch.distributed.new_group(backend="gloo", timeout=SUMMARY_TIMEOUT)


def summed(values, group):
    """The integers `values` summed over the ranks of `group` (as they are in one process)."""
    if group is None:
        return list(values)
    total = torch.tensor(list(values), dtype=torch.int64)
    torch.distributed.all_reduce(total, group=group)
    return total.tolist()


def write_dataset(args):
    """The images of this process's shards that are not on disk yet; returns how many it made. Under torchrun,
    rank 0 prints the run's lines, with the counts of every rank. One process with nothing to do never imports
    torch (a resumed, finished output answers in a fraction of a second)."""
    if distributed.launched():
        distributed.init_distributed()  # the ranks meet at the start (shards) and at the end (the summary)
    group = summary_group()
    shard, num_shards = process_shard(args)
    main_process = distributed.is_main_process()

    # ---- data ----
    survey = survey_captions(args.captions)  # one streaming pass: counts; the captions are read shard by shard later
    check_settings(args.output, settings_of(args, survey))
    check_creatable(args.output)
    output = (TarOutput if args.output_format == "webdataset" else TreeOutput)(args)
    todo = [s for s in own_shards(survey.rows, args.captions_per_shard, shard, num_shards) if not output.finished(s)]
    unfinished, = summed([len(todo)], group)  # one stat per shard of this process, nothing else
    if main_process:
        job = own_shards(survey.rows, args.captions_per_shard, args.shard, args.num_shards)  # all ranks of this job
        ranks = f" over {distributed.world_size()} processes" if group else ""
        print(f"captions: {survey.rows} rows ({survey.layout}), {survey.used} usable, {survey.skipped_count} "
              f"skipped; job {args.shard} of {args.num_shards}: shards {job.start}..{job.stop - 1} of "
              f"{-(-survey.rows // args.captions_per_shard)} ({args.captions_per_shard} captions each, "
              f"{args.output_format}){ranks}, {unfinished} not finished, n={args.n}")
        files = survey.used * (args.n + 1)
        if args.output_format == "files" and files > MANY_FILES:
            print(f"note: the files tree will hold {files:,} files (n + 1 per caption); many cluster file systems "
                  "cap a user at a few million: --output-format webdataset writes one tar per "
                  f"{args.captions_per_shard} captions instead")
    if not unfinished:
        if main_process:
            print(f"nothing to do: every shard of this job is in {args.output}")
        return 0
    tally, started = Tally(), time.time()
    if todo:  # a rank whose shards are all on disk goes straight to the summary
        # ---- model ----
        device = distributed.init_distributed()
        dtype = resolve_dtype(args.dtype, device)
        pipe = load_pipeline(args, device, dtype)
        prompts = PromptCache(pipe, device)
        if main_process:
            print(describe_model(args, pipe, dtype, device))

        # ---- resume ----
        with output_folder(args.output):
            if imagetree.read_settings(args.output) is None:  # every process writes the same bytes: no race to lose
                imagetree.write_settings(args.output, {**settings_of(args, survey), "versions": library_versions(),
                                                       "dtype": str(dtype).replace("torch.", "")})
            rows_to_do = sum(min(args.captions_per_shard, survey.rows - s * args.captions_per_shard) for s in todo)

            # ---- generation loop ----
            from util.checkpoints import stop_at_step_boundary
            try:
                with stop_at_step_boundary() as preemption:
                    tally = write_shards(pipe, prompts, shard_captions(args.captions, todo, args.captions_per_shard),
                                         output, args, rows=survey.rows, total_images=rows_to_do * args.n,
                                         show_progress=main_process, preemption=preemption)
                stop = preemption.name()
            except KeyboardInterrupt:  # Ctrl-C, or a second SIGTERM: the shards' temporary files stay, whole
                stop, tally = "interrupted", None
            if stop:
                made = f" after {tally.made} images ({tally.finished} shards finished)" if tally else ""
                print(f"\ngenerate.py: {stop}: stopped{made}; the images written are kept: rerun the same command "
                      "to continue", file=sys.stderr)
                sys.exit(130)

    # ---- summary ----
    made, finished, held, truncated = summed(dataclasses.astuple(tally), group)
    if main_process:
        line = (f"done: {made} images made in {time.time() - started:.0f}s, {finished} of {unfinished} unfinished "
                f"shards finished in {args.output}")
        if held:
            line += f"; {held} skipped: other processes are writing them (named above)"
        if truncated:
            line += f"; {truncated} captions cut at the token limit, listed in {TRUNCATED_FILE}"
        print(line)
    return tally.made


@contextlib.contextmanager
def file_errors_as_one_line():
    """An OSError about a file (a full disk, a folder where a file belongs, no permission, a link where none
    belongs) ends the run as a UserError: one line naming the file. Other errors keep their traceback."""
    try:
        yield
    except OSError as err:
        full = no_space_error(err, err.filename or "the output")
        if full:
            raise full from None
        if err.filename is None:
            raise
        raise UserError(f"{err.filename}: {err.strerror}") from None


def main(args):
    check_args(args)
    try:
        with file_errors_as_one_line():
            if args.preview:  # one grid: the other ranks have nothing to do
                device = distributed.init_distributed()
                return write_preview(args, device) if distributed.is_main_process() else None
            return write_dataset(args)
    finally:
        distributed.leave(meet=False)


if __name__ == "__main__":
    run(main, get_args_parser(), args=command_line)
