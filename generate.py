"""Stage 1 of StableRep: a captions file -> synthetic images, n per caption (Sec. 3, 4.1), as a folder tree or tar
shards.

    python generate.py --captions cc3m.tsv --n 10 --w 2            # one GPU (w = 2: StableRep; --w 8: SimCLR)
    torchrun --nproc 8 generate.py --captions cc12m.tsv --num-images 10 --output-format webdataset
    python generate.py --captions cc12m.tsv --shard 3 --num-shards 64   # one job of a cluster array

Stable Diffusion (diffusers' StableDiffusionPipeline, `--model`) draws `--n` images per caption from different
latent noise at classifier-free guidance scale `--w`. Image k of caption i starts from noise drawn on the CPU
from a generator seeded by `image_seed(seed, i, k)`, so it is the same image whatever the batch size, the shard
or the resume. Output: imagetree.py's folder tree (`--output-format files`) or shards.py's tar shards
(`webdataset`); caption i goes to folder or tar i // --captions-per-shard, and each process of a run owns a
contiguous block of those, so a rerun skips what is on disk by looking at its own block only, and refuses to mix
settings into an output made with other ones.
"""
import argparse
import collections
import concurrent.futures
import csv
import hashlib
import itertools
import os
import subprocess
import sys
import time
import warnings
from typing import List, NamedTuple

import torch
from PIL import Image

import distributed
import imagetree
import shards
from cli import UserError, atomic_write_bytes, check_writable_folder, run

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SCHEDULERS = ("ddim", "dpm-solver++", "model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# what a rerun must share with the tree's settings.json; the rest of the file (versions, dtype, counts) is a record
RECIPE_KEYS = ("model", "scheduler", "steps", "eta", "w", "n", "size", "stored_size", "format", "quality", "seed",
               "captions_file", "caption_rows", "output_format", "captions_per_shard")
# what an output written before a key existed holds (the folder tree, 1000 captions per folder)
RECIPE_DEFAULTS = {"output_format": "files", "captions_per_shard": imagetree.CAPTIONS_PER_FOLDER}
OUTPUT_FORMATS = ("files", "webdataset")
MANY_FILES = 1_000_000  # a files run writing more than this is told about shards (cluster inode quotas)
SKIPPED_LISTED = 1000  # skipped rows listed by number in settings.json; the rest are counted


def get_args_parser():
    parser = argparse.ArgumentParser("generate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- data ----
    parser.add_argument("--captions", required=True,
                        help="captions file: CC3M's TSV (caption, url), CC12M's TSV (url, caption), a TSV/CSV whose "
                             "header has a `caption` column, or plain text with one caption per line; a caption's id "
                             "is its row number (header excluded)")
    parser.add_argument("--output", default="runs/synthetic",
                        help="output folder: the image tree (imagetree.py) or the tar shards (shards.py); a rerun "
                             "into it resumes")
    # ---- the paper's generation recipe ----
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Stable Diffusion weights, a hub id or a local folder saved with save_pretrained; the "
                             "paper uses v1.5")
    parser.add_argument("--n", "--num-images", dest="n", type=int, default=10,
                        help="images per caption, each from its own latent noise; 10 in the paper (StableRep trains "
                             "on 6 of them per step). Under torchrun write --num-images: torchrun takes --n as an "
                             "ambiguous abbreviation of its own flags")
    parser.add_argument("--w", type=float, default=2.0,
                        help="classifier-free guidance scale; 2 is StableRep's best (low w = diverse images of a "
                             "caption, which the multi-positive loss wants), SimCLR peaks at 6-8; diffusers applies "
                             "no guidance for w <= 1")
    parser.add_argument("--scheduler", default="ddim", choices=SCHEDULERS,
                        help="sampler: the paper's DDIM; dpm-solver++ (DPM-Solver++, 20-25 steps) is the fast "
                             "choice; `model` keeps the scheduler saved with the model (PNDM for v1.5)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps; 50 DDIM steps in the paper")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM's eta (0: deterministic DDIM, as in the paper); only DDIM reads it")
    parser.add_argument("--size", type=int, default=512,
                        help="generated height and width in pixels; 512, Stable Diffusion v1.5's native size")
    parser.add_argument("--stored-size", type=int, default=256,
                        help="images are resized to this before saving; 256 in the paper (pre-training crops 224)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed: image k of caption i starts from noise seeded by (seed, i, k)")
    # ---- output files ----
    parser.add_argument("--output-format", default="files", choices=OUTPUT_FORMATS,
                        help="files (the default, to look at and for small runs): a folder tree, one file per "
                             "image (imagetree.py; n + 1 files per caption: 136M at CC12M scale); webdataset: one "
                             "uncompressed tar per "
                             "--captions-per-shard captions (shards.py; the paper-scale choice, read by pretrain.py "
                             "at random offsets or streamed from object storage)")
    parser.add_argument("--captions-per-shard", type=int, default=imagetree.CAPTIONS_PER_FOLDER,
                        help="captions per tar (webdataset) or per folder (files): caption i goes to shard i // this. "
                             "1000 makes 10,000 images, a few hundred MB of 256 px JPEGs, per tar: big enough for "
                             "streaming reads and 1 file per 1000 captions (12,400 for CC12M), small enough that a "
                             "process holds one or two shards' captions in memory; a killed process loses only the "
                             "captions in flight")
    parser.add_argument("--format", default="jpg", choices=sorted(imagetree.PIL_FORMATS),
                        help="image file format; JPEG keeps 10 images x millions of captions on one disk")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (ignored by png)")
    parser.add_argument("--preview", type=int, nargs="?", const=8, default=0, metavar="ROWS",
                        help="instead of the tree, write one PNG grid <output>/preview_w<w>.png of the first ROWS "
                             "captions (rows) x their n images (columns), to see what w does; ROWS defaults to 8")
    # ---- speed ----
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per denoising batch, across captions and seeds (the UNet sees twice as many "
                             "rows with guidance); lower it if the GPU runs out of memory")
    parser.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                        help="weights and activations; auto = float16 on a GPU, float32 on the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (minutes of compilation, then faster steps on a GPU)")
    parser.add_argument("--writers", type=int, default=4,
                        help="threads that resize, encode and write images while the GPU goes on")
    # ---- distributed ----
    parser.add_argument("--shard", type=int, default=0,
                        help="this job's part of the captions (0 .. num-shards-1): a contiguous block of the output "
                             "shards (tars or folders), so each job writes and resumes whole shards of its own; "
                             "under torchrun each rank splits its part again")
    parser.add_argument("--num-shards", type=int, default=1, help="number of parts the captions are split into")
    return parser


def check_args(args):
    """Bad numbers end the run before anything is read or written."""
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.w < 0:
        raise UserError(f"--w must be >= 0, got {args.w}")
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    for flag, value in (("--size", args.size), ("--stored-size", args.stored_size)):
        if value < 8 or value % 8:
            raise UserError(f"{flag} must be a positive multiple of 8, got {value}")
    if args.stored_size > args.size:
        raise UserError(f"--stored-size {args.stored_size} is larger than the generated --size {args.size}")
    if args.batch_size < 1 or args.writers < 1 or args.captions_per_shard < 1:
        raise UserError("--batch-size, --writers and --captions-per-shard must be at least 1")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {args.quality}")
    if args.preview < 0:
        raise UserError(f"--preview needs a positive number of rows, got {args.preview}")
    if not 0 <= args.shard < args.num_shards:
        raise UserError(f"--shard must be in 0..{args.num_shards - 1} (--num-shards {args.num_shards}), "
                        f"got {args.shard}")


def process_shard(args):
    """(shard, number of shards) of this process: torchrun's ranks split each --shard again."""
    return args.shard * distributed.world_size() + distributed.rank(), args.num_shards * distributed.world_size()


# ---- captions ----

class Captions(NamedTuple):
    captions: dict  # caption id (row number) -> caption text
    valid_ids: List[int]  # the usable caption ids read, in order
    rows: int  # data rows read, skipped ones included
    skipped: List[dict]  # [{"row": id, "reason": "blank" | "undecodable" | "no caption field"}]
    layout: str  # how the file was read, for the run's record


class CaptionsSurvey(NamedTuple):
    rows: int  # data rows, skipped ones included
    used: int  # usable captions
    skipped: List[dict]  # the first SKIPPED_LISTED skipped rows, as in Captions
    skipped_count: int
    layout: str


def _looks_like_url(field):
    return field.strip().lower().startswith(("http://", "https://", "ftp://"))


def _records(path, delimiter):
    """The file's rows as lists of fields, streamed (CC12M is 2 GB); bytes that are not UTF-8 become surrogates."""
    if delimiter == ",":
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            yield from csv.reader(f)
        return
    with open(path, "rb") as f:  # rows end at b"\n" only: a stray \r inside a caption does not split it
        for number, line in enumerate(f):
            if number == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            text = line.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
            yield text.split("\t") if delimiter == "\t" else [text]


def _layout(path, first):
    """(delimiter, caption column, has a header, description) from the first non-blank row's text."""
    delimiter = "," if path.lower().endswith(".csv") else "\t" if "\t" in first else None
    header = [name.strip().lower() for name in (next(csv.reader([first])) if delimiter == "," else first.split("\t"))]
    if "caption" in header:
        kind = {",": "CSV", "\t": "TSV", None: "text"}[delimiter]
        return delimiter, header.index("caption"), True, f"{kind} with a header, column {header.index('caption')}"
    if delimiter is None:
        return None, 0, False, "text, one caption per line"
    if delimiter == "\t" and len(header) >= 2 and _looks_like_url(header[0]):
        return delimiter, 1, False, "CC12M TSV (url, caption)"
    if delimiter == "\t" and len(header) >= 2 and _looks_like_url(header[1]):
        return delimiter, 0, False, "CC3M TSV (caption, url)"
    raise UserError(f"captions file {path} has no `caption` column (a header naming it, or CC3M/CC12M's "
                    "two-column caption/url TSV)")


def _rows(path, delimiter, column, has_header):
    """(row, caption, None) for a usable row, (row, None, reason) for a skipped one; streamed."""
    records = _records(path, delimiter)
    if has_header:
        next(record for record in records if "".join(record).strip())
    for row, record in enumerate(records):
        caption = " ".join(record[column].split()) if column < len(record) else ""  # one line of text
        if not caption:
            yield row, None, "no caption field" if column >= len(record) and "".join(record).strip() else "blank"
        elif any("\udc80" <= ch <= "\udcff" for ch in caption):
            yield row, None, "undecodable"
        else:
            yield row, caption, None


def open_captions(path):
    """(layout description, the rows as _rows yields them) of a captions file (see --captions for the formats).
    UserError for a missing, empty or column-less file."""
    if not os.path.isfile(path):
        raise UserError(f"captions file {path} does not exist")
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise UserError(f"captions file {path} is empty")
    first = first.decode("utf-8", errors="surrogateescape").lstrip("\ufeff").rstrip("\r\n")
    delimiter, column, has_header, layout = _layout(path, first)
    return layout, _rows(path, delimiter, column, has_header)


def read_captions(path, max_captions=None):
    """Every usable caption of a small file, or its first `max_captions` (--preview), held in memory."""
    layout, rows = open_captions(path)
    captions, skipped, count = {}, [], 0
    for count, (row, caption, reason) in enumerate(rows, 1):
        if caption is None:
            skipped.append({"row": row, "reason": reason})
            continue
        captions[row] = caption
        if max_captions is not None and len(captions) >= max_captions:
            break
    if not captions:
        raise UserError(f"captions file {path} holds no usable caption ({len(skipped)} rows skipped)")
    return Captions(captions, list(captions), count, skipped, layout)


def survey_captions(path):
    """One streaming pass over the file: rows, usable captions, skipped rows; no caption is kept."""
    layout, rows = open_captions(path)
    count, used, skipped, skipped_count = 0, 0, [], 0
    for count, (row, caption, reason) in enumerate(rows, 1):
        if caption is not None:
            used += 1
            continue
        skipped_count += 1
        if len(skipped) < SKIPPED_LISTED:
            skipped.append({"row": row, "reason": reason})
    if not used:
        raise UserError(f"captions file {path} holds no usable caption ({skipped_count} rows skipped)")
    return CaptionsSurvey(count, used, skipped, skipped_count, layout)


def shard_captions(path, wanted, per_shard):
    """(shard, [(caption id, text)]) for each shard number of `wanted` (ascending): the usable captions of rows
    shard * per_shard .. (shard + 1) * per_shard - 1, streamed from the file, one shard's captions held at a time."""
    _, rows = open_captions(path)
    wanted = iter(wanted)
    current, captions = next(wanted, None), []
    for row, caption, _ in rows:
        while current is not None and row >= (current + 1) * per_shard:
            yield current, captions
            current, captions = next(wanted, None), []
        if current is None:
            return
        if caption is not None and row >= current * per_shard:
            captions.append((row, caption))
    while current is not None:  # the file ended inside (or before) the last wanted shards
        yield current, captions
        current, captions = next(wanted, None), []


# ---- model ----

def resolve_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_pipeline(args, device, dtype):
    """StableDiffusionPipeline.from_pretrained(--model) with the chosen scheduler, on `device` in `dtype`."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    diffusers.utils.logging.set_verbosity_error()  # no per-batch truncation warnings: we say it once ourselves
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


class PromptCache:
    """Text embeddings: each caption is encoded once for all its images, the empty prompt once for the run."""

    def __init__(self, pipe, device):
        self.pipe, self.device, self.cache = pipe, device, {}
        self.uncond = None
        self.truncated = 0

    def _encode(self, texts):
        embeds, _ = self.pipe.encode_prompt(texts, self.device, 1, False)
        return embeds

    def embeddings(self, caption_ids, captions):
        """(prompt_embeds, negative_prompt_embeds) for a batch; forgets the captions not in this batch."""
        new = sorted(set(caption_ids) - set(self.cache))
        if new:
            texts = [captions[i] for i in new]
            limit = self.pipe.tokenizer.model_max_length
            lengths = [len(ids) for ids in self.pipe.tokenizer(texts, truncation=False).input_ids]
            long = [i for i, length in zip(new, lengths) if length > limit]
            if long and not self.truncated:
                print(f"note: captions longer than {limit} tokens are truncated by the tokenizer "
                      f"(first: caption id {long[0]}); counted at the end", file=sys.stderr)
            self.truncated += len(long)
            self.cache.update(zip(new, self._encode(texts)))
        if self.uncond is None:
            self.uncond = self._encode([""])
        self.cache = {i: self.cache[i] for i in set(caption_ids)}  # a caption spans at most two batches
        prompt = torch.stack([self.cache[i] for i in caption_ids])
        return prompt, self.uncond.expand(len(caption_ids), -1, -1)


@torch.inference_mode()
def generate_batch(pipe, prompts, items, captions, args):
    """uint8 (B, H, W, 3) CPU images for items [(caption id, image index)], at the generated size."""
    prompt_embeds, negative_embeds = prompts.embeddings([i for i, _ in items], captions)
    latents = initial_noise(pipe, items, args.seed, args.size).to(pipe.device, pipe.unet.dtype)
    step_noise = [torch.Generator().manual_seed(image_seed(args.seed, i, k, "steps")) for i, k in items]
    images = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, latents=latents,
                  generator=step_noise,  # per image, on the CPU: used by DDIM only when eta > 0
                  height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.w,
                  eta=args.eta, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_stored(pixels, stored_size):
    image = Image.fromarray(pixels)
    if image.width != stored_size:
        image = image.resize((stored_size, stored_size), Image.Resampling.LANCZOS)
    return image


def batches(items, batch_size):
    """Lists of up to batch_size items from any iterable (a generator is read as the batches are taken)."""
    items = iter(items)
    while batch := list(itertools.islice(items, batch_size)):
        yield batch


# ---- outputs ----

def code_commit():
    """The git commit of this code, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions():
    import diffusers
    import transformers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "code": code_commit()}


def settings_of(args, survey, dtype):
    """settings.json's content but the library versions (library_versions(), added when the file is written)."""
    return {
        "model": args.model, "scheduler": args.scheduler, "steps": args.steps, "eta": args.eta, "w": args.w,
        "n": args.n, "size": args.size, "stored_size": args.stored_size, "format": args.format,
        "quality": args.quality, "seed": args.seed, "output_format": args.output_format,
        "captions_per_shard": args.captions_per_shard,
        "seed_rule": "sha256('stablerep/{seed}/{caption_id}/{k}/latents')[:8]",
        "captions_file": os.path.basename(args.captions), "caption_rows": survey.rows,
        "captions_layout": survey.layout, "captions_used": survey.used, "skipped_rows": survey.skipped,
        "skipped_count": survey.skipped_count, "dtype": str(dtype).replace("torch.", ""),
    }


def check_settings(root, settings):
    """Refuse to add images made one way to an output made another way (mixing w would corrupt an experiment)."""
    recorded = imagetree.read_settings(root)
    if recorded is None:
        return
    differ = [f"{key} {recorded.get(key, RECIPE_DEFAULTS.get(key))!r} -> {settings[key]!r}" for key in RECIPE_KEYS
              if recorded.get(key, RECIPE_DEFAULTS.get(key)) != settings[key]]
    if differ:
        raise UserError(f"{root} was made with other settings ({'; '.join(differ)}); use another --output or the "
                        "output's settings (settings.json)")


def check_output_creatable(path):
    """Is `path` a writable folder or creatable as one? Checked before the model loads; writes nothing."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} cannot be written ({probe} is not a writable folder)")


def own_shards(rows, per_shard, shard, num_shards):
    """This process's output shards: block `shard` of `num_shards` contiguous blocks of the ceil(rows / per_shard)
    shards (caption i is in shard i // per_shard whatever the number of processes)."""
    total = -(-rows // per_shard)
    return range(shard * total // num_shards, (shard + 1) * total // num_shards)


class TreeOutput:
    """imagetree's folder tree, folder s = shard s. The writer threads write each image file; the folder's
    _index.json, written once its last image is on disk, marks the shard finished."""

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
        imagetree.write_image(args.output, caption_id, k, to_stored(pixels, args.stored_size), args.format,
                              args.quality, args.captions_per_shard)

    def put(self, caption_id, k, _):
        shard = caption_id // self.args.captions_per_shard
        self.left[shard] -= 1
        if not self.left[shard]:
            del self.left[shard]
            imagetree.index_folder(self.folder(shard))

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
        return imagetree.encode_image(to_stored(pixels, args.stored_size), args.format, args.quality)

    def put(self, caption_id, k, data):
        args = self.args
        shard = caption_id // args.captions_per_shard
        writer, texts, images = self.open[shard]
        done = images.setdefault(caption_id, {})
        done[k] = data
        if len(done) < args.n:
            return
        seeds = [image_seed(args.seed, caption_id, j) for j in range(args.n)]
        writer.add(caption_id, [(j, args.format, done[j]) for j in range(args.n)], texts.pop(caption_id),
                   {"caption_id": caption_id, "row": caption_id, "seeds": seeds})
        del images[caption_id]
        if writer.complete:
            writer.finish()
            del self.open[shard]

    def close(self):
        for writer, _, _ in self.open.values():
            writer.close()  # the temporary tar stays: the next run resumes it


def write_preview(pipe, prompts, captions, args):
    """One PNG grid, rows = the first --preview captions, columns = their n images; no tree is written."""
    rows = list(captions)[:args.preview]
    items = [(i, k) for i in rows for k in range(args.n)]
    s = args.stored_size
    grid = Image.new("RGB", (s * args.n, s * len(rows)))
    for batch in batches(items, args.batch_size):
        for (i, k), pixels in zip(batch, generate_batch(pipe, prompts, batch, captions, args)):
            grid.paste(to_stored(pixels, s), (k * s, rows.index(i) * s))
    path = os.path.join(args.output, f"preview_w{args.w:g}.png")
    check_writable_folder(args.output)
    atomic_write_bytes(path, imagetree.encode_image(grid, "png"))
    print(f"preview: {len(rows)} captions x {args.n} images at w={args.w:g} -> {path}")
    return path


def write_shards(pipe, prompts, captions_by_shard, output, args, rows=None, total_images=None, show_progress=True):
    """Generate the missing images of the shards that `captions_by_shard` yields as (shard, [(id, text)]) into
    `output` (TreeOutput or TarOutput), in batches that run across shard boundaries; returns the images made.
    Holds the captions of the shards in flight only (the generator is read as the batches need it). The progress
    bar starts at `total_images` (n per row of the shards) and drops, as each shard begins, the images of its
    skipped rows and those already on disk (`rows`: the captions file's row count)."""
    from tqdm import tqdm

    bar = tqdm(total=total_images, unit="img", disable=not show_progress, dynamic_ncols=True, smoothing=0.1)

    def items():
        for shard, captions in captions_by_shard:
            todo = output.begin(shard, captions)
            if rows is not None and total_images is not None:
                bar.total -= min(args.captions_per_shard, rows - shard * args.captions_per_shard) * args.n - len(todo)
                bar.refresh()
            texts = dict(captions)
            for i, k in todo:
                yield i, k, texts[i]

    pool = concurrent.futures.ThreadPoolExecutor(args.writers)
    pending = collections.deque()  # (caption id, k, future), oldest first
    made = 0

    def drain(keep):
        while len(pending) > keep:
            i, k, future = pending.popleft()
            output.put(i, k, future.result())  # a failed write (disk full) stops the run here

    try:
        for batch in batches(items(), args.batch_size):
            pairs = [(i, k) for i, k, _ in batch]
            pixels = generate_batch(pipe, prompts, pairs, {i: text for i, _, text in batch}, args)
            pending.extend((i, k, pool.submit(output.encode, i, k, image)) for (i, k), image in zip(pairs, pixels))
            drain(keep=2 * args.batch_size)  # the writers work on this batch while the next one denoises
            made += len(batch)
            bar.update(len(batch))
        drain(keep=0)
    finally:
        pool.shutdown()
        output.close()
        bar.close()
    return made


def main(args):
    check_args(args)
    # ---- distributed ----
    device = distributed.init_distributed()
    shard, num_shards = process_shard(args)
    if args.preview and not distributed.is_main_process():
        return None  # one preview is enough

    # ---- data ----
    dtype = resolve_dtype(args.dtype, device)
    if args.preview:  # the first ROWS usable captions, whatever the shard
        captions = read_captions(args.captions, max_captions=args.preview)
    else:  # one streaming pass: counts for the settings; the captions themselves are read shard by shard later
        survey = survey_captions(args.captions)
        check_settings(args.output, settings_of(args, survey, dtype))
    check_output_creatable(args.output)
    if not args.preview:
        output = (TarOutput if args.output_format == "webdataset" else TreeOutput)(args)
        mine = own_shards(survey.rows, args.captions_per_shard, shard, num_shards)
        todo = [s for s in mine if not output.finished(s)]  # one stat per shard of this process, nothing else
        print(f"captions: {survey.rows} rows ({survey.layout}), {survey.used} usable, {survey.skipped_count} "
              f"skipped; process {shard}/{num_shards}: shards {mine.start}..{mine.stop - 1} of "
              f"{-(-survey.rows // args.captions_per_shard)} ({args.captions_per_shard} captions each, "
              f"{args.output_format}), {len(todo)} not finished, n={args.n}")
        files = survey.used * (args.n + 1)
        if args.output_format == "files" and files > MANY_FILES and distributed.is_main_process():
            print(f"note: the files tree will hold {files:,} files (n + 1 per caption); many cluster file systems "
                  "cap a user at a few million: --output-format webdataset writes one tar per "
                  f"{args.captions_per_shard} captions instead")
        if not todo:
            print(f"nothing to do: every shard of this process is in {args.output}")
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            return 0

    # ---- model ----
    pipe = load_pipeline(args, device, dtype)
    prompts = PromptCache(pipe, device)
    print(f"model {args.model}: {type(pipe.scheduler).__name__} {args.steps} steps, w={args.w:g}, "
          f"{args.size}px -> {args.stored_size}px {args.format}, {dtype}, {device}; batch {args.batch_size} images "
          f"= {2 * args.batch_size if args.w > 1 else args.batch_size} UNet rows per step")
    if args.preview:
        return write_preview(pipe, prompts, captions.captions, args)

    # ---- resume ----
    check_writable_folder(args.output)
    if imagetree.read_settings(args.output) is None:  # every process writes the same bytes: no race to lose
        imagetree.write_settings(args.output, {**settings_of(args, survey, dtype), "versions": library_versions()})
    rows_to_do = sum(min(args.captions_per_shard, survey.rows - s * args.captions_per_shard) for s in todo)

    # ---- generation loop ----
    started = time.time()
    made = write_shards(pipe, prompts, shard_captions(args.captions, todo, args.captions_per_shard), output, args,
                        rows=survey.rows, total_images=rows_to_do * args.n,
                        show_progress=distributed.is_main_process())
    if prompts.truncated:
        print(f"{prompts.truncated} captions were truncated to {pipe.tokenizer.model_max_length} tokens")
    print(f"done: {made} images made in {time.time() - started:.0f}s, {len(todo)} shards finished in {args.output}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return made


if __name__ == "__main__":
    run(main, get_args_parser())
