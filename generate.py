"""Stage 1 of StableRep: a captions file -> a folder tree of synthetic images, n per caption (Sec. 3, 4.1).

    python generate.py --captions cc3m.tsv --n 10 --w 2            # one GPU (w = 2: StableRep; --w 8: SimCLR)
    torchrun --nproc 8 generate.py --captions cc12m.tsv --num-images 10   # each rank takes a disjoint part
    python generate.py --captions cc12m.tsv --shard 3 --num-shards 64   # one job of a cluster array

Stable Diffusion (diffusers' StableDiffusionPipeline, `--model`) draws `--n` images per caption from different
latent noise at classifier-free guidance scale `--w`. Image k of caption i starts from noise drawn on the CPU
from a generator seeded by `image_seed(seed, i, k)`, so it is the same image whatever the batch size, the shard
or the resume. The tree's layout is imagetree.py's; a rerun skips the images already on disk and refuses to mix
settings into a tree made with other ones.
"""
import argparse
import array
import collections
import concurrent.futures
import csv
import hashlib
import os
import subprocess
import sys
import warnings
from typing import List, NamedTuple

import torch
from PIL import Image

import distributed
import imagetree
from cli import UserError, atomic_write_bytes, check_writable_folder, run

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SCHEDULERS = ("ddim", "dpm-solver++", "model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# what a rerun must share with the tree's settings.json; the rest of the file (versions, dtype, counts) is a record
RECIPE_KEYS = ("model", "scheduler", "steps", "eta", "w", "n", "size", "stored_size", "format", "quality", "seed",
               "captions_file", "caption_rows")


def get_args_parser():
    parser = argparse.ArgumentParser("generate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- data ----
    parser.add_argument("--captions", required=True,
                        help="captions file: CC3M's TSV (caption, url), CC12M's TSV (url, caption), a TSV/CSV whose "
                             "header has a `caption` column, or plain text with one caption per line; a caption's id "
                             "is its row number (header excluded)")
    parser.add_argument("--output", default="runs/synthetic",
                        help="root of the image tree (imagetree.py's layout); a rerun into it resumes")
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
                        help="this job's part of the captions (0 .. num-shards-1); caption i belongs to shard "
                             "i %% num-shards; under torchrun each rank splits its shard again")
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
    if args.batch_size < 1 or args.writers < 1:
        raise UserError("--batch-size and --writers must be at least 1")
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
    captions: dict  # caption id (row number) -> caption text, for the rows this process keeps
    valid_ids: array.array  # every usable caption id of the file, in order (all shards')
    rows: int  # data rows read, skipped ones included
    skipped: List[dict]  # [{"row": id, "reason": "blank" | "undecodable" | "no caption field"}]
    layout: str  # how the file was read, for the run's record


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


def read_captions(path, keep=None, max_captions=None):
    """The rows of a captions file (see --captions for the formats), streamed. The text of caption id i is kept
    when keep(i) is true (default: all), reading stops after `max_captions` usable rows. UserError for a missing,
    empty or column-less file."""
    if not os.path.isfile(path):
        raise UserError(f"captions file {path} does not exist")
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise UserError(f"captions file {path} is empty")
    first = first.decode("utf-8", errors="surrogateescape").lstrip("\ufeff").rstrip("\r\n")
    delimiter, column, has_header, layout = _layout(path, first)
    captions, valid_ids, skipped, rows = {}, array.array("q"), [], 0
    records = _records(path, delimiter)
    if has_header:
        next(record for record in records if "".join(record).strip())
    for row, record in enumerate(records):
        rows = row + 1
        caption = " ".join(record[column].split()) if column < len(record) else ""  # one line of text
        if not caption:
            reason = "no caption field" if column >= len(record) and "".join(record).strip() else "blank"
            skipped.append({"row": row, "reason": reason})
        elif any("\udc80" <= ch <= "\udcff" for ch in caption):
            skipped.append({"row": row, "reason": "undecodable"})
        else:
            valid_ids.append(row)
            if keep is None or keep(row):
                captions[row] = caption
            if max_captions is not None and len(valid_ids) >= max_captions:
                break
    if not valid_ids:
        raise UserError(f"captions file {path} holds no usable caption ({len(skipped)} rows skipped)")
    return Captions(captions, valid_ids, rows, skipped, layout)


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
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


# ---- the tree ----

def code_commit():
    """The git commit of this code, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def settings_of(args, captions, dtype):
    import diffusers
    import transformers
    return {
        "model": args.model, "scheduler": args.scheduler, "steps": args.steps, "eta": args.eta, "w": args.w,
        "n": args.n, "size": args.size, "stored_size": args.stored_size, "format": args.format,
        "quality": args.quality, "seed": args.seed,
        "seed_rule": "sha256('stablerep/{seed}/{caption_id}/{k}/latents')[:8]",
        "captions_file": os.path.basename(args.captions), "caption_rows": captions.rows,
        "captions_layout": captions.layout, "captions_used": len(captions.valid_ids),
        "skipped_rows": captions.skipped, "dtype": str(dtype).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "code": code_commit()},
    }


def check_settings(root, settings):
    """Refuse to add images made one way to a tree made another way (mixing w would corrupt an experiment)."""
    recorded = imagetree.read_settings(root)
    if recorded is None:
        return
    differ = [f"{key} {recorded.get(key)!r} -> {settings[key]!r}" for key in RECIPE_KEYS
              if recorded.get(key) != settings[key]]
    if differ:
        raise UserError(f"{root} was made with other settings ({'; '.join(differ)}); use another --output or the "
                        "tree's settings (settings.json)")


def check_output_creatable(path):
    """Is `path` a writable folder or creatable as one? Checked before the model loads; writes nothing."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} cannot be written ({probe} is not a writable folder)")


def folder_complete(root, folder_id, ids_in_folder, n, image_format):
    """Do all these captions of the folder have their caption file and n images on disk?"""
    folder = os.path.join(root, f"{folder_id:05d}")
    present = imagetree.images_on_disk(folder, image_format)
    return all(len(present.get(i, ())) >= n and os.path.isfile(imagetree.caption_path(root, i))
               for i in ids_in_folder)


class TreeWriter:
    """Resizes, encodes and writes images on a thread pool; indexes each folder once all its captions are in."""

    def __init__(self, args, texts, valid_ids):
        self.args, self.texts = args, texts
        self.pool = concurrent.futures.ThreadPoolExecutor(args.writers)
        self.pending = collections.deque()  # (future, folder id), oldest first
        self.left = {}  # folder id -> images of this process still to write there
        self.captioned = set()  # caption ids whose .txt is on disk
        self.ids_by_folder = {}  # folder id -> every valid caption id of the folder (all shards')
        for i in valid_ids:
            self.ids_by_folder.setdefault(i // imagetree.CAPTIONS_PER_FOLDER, []).append(i)

    def expect(self, items):
        for i, _ in items:
            folder = i // imagetree.CAPTIONS_PER_FOLDER
            self.left[folder] = self.left.get(folder, 0) + 1

    def _write(self, caption_id, k, pixels):
        args = self.args
        imagetree.write_image(args.output, caption_id, k, to_stored(pixels, args.stored_size), args.format,
                              args.quality)

    def submit(self, items, pixels):
        for (i, k), image in zip(items, pixels):
            if i not in self.captioned:  # the caption goes to disk before its first image
                if not os.path.isfile(imagetree.caption_path(self.args.output, i)):
                    imagetree.write_caption(self.args.output, i, self.texts[i])
                self.captioned.add(i)
            self.pending.append((self.pool.submit(self._write, i, k, image), i // imagetree.CAPTIONS_PER_FOLDER))

    def drain(self, keep=0):
        """Wait until at most `keep` writes are pending; index the folders this process has finished."""
        while len(self.pending) > keep:
            future, folder = self.pending.popleft()
            future.result()  # a failed write (disk full) stops the run here
            self.left[folder] -= 1
            if self.left[folder] == 0:
                self.finish_folder(folder)

    def finish_folder(self, folder):
        """Index the folder if every shard's captions there are complete (the last shard to finish does it)."""
        args = self.args
        if folder_complete(args.output, folder, self.ids_by_folder[folder], args.n, args.format):
            imagetree.index_folder(os.path.join(args.output, f"{folder:05d}"))

    def close(self):
        self.drain()
        self.pool.shutdown()


def missing_images(root, caption_ids, n, image_format):
    """[(caption id, image index)] of the images not yet on disk, in caption order."""
    present = {}
    for folder in sorted({i // imagetree.CAPTIONS_PER_FOLDER for i in caption_ids}):
        present.update(imagetree.images_on_disk(os.path.join(root, f"{folder:05d}"), image_format))
    return [(i, k) for i in caption_ids for k in range(n) if k not in present.get(i, ())]


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


def write_tree(pipe, prompts, texts, valid_ids, todo, args, show_progress=True):
    """Generate the images `todo` [(caption id, k)] of the captions `texts` {id: text} batch by batch into
    args.output; index each of their folders once it is complete (`valid_ids`: every usable id of the file)."""
    from tqdm import tqdm

    writer = TreeWriter(args, texts, valid_ids)
    writer.expect(todo)
    for folder in sorted({i // imagetree.CAPTIONS_PER_FOLDER for i in texts} - set(writer.left)):
        if not os.path.isfile(os.path.join(args.output, f"{folder:05d}", imagetree.INDEX_FILE)):
            writer.finish_folder(folder)  # finished by an earlier run that was killed before indexing
    bar = tqdm(total=len(todo), unit="img", disable=not show_progress or not todo, dynamic_ncols=True,
               smoothing=0.1)
    for batch in batches(todo, args.batch_size):
        writer.submit(batch, generate_batch(pipe, prompts, batch, texts, args))
        writer.drain(keep=2 * args.batch_size)  # the writers work on this batch while the next one denoises
        bar.update(len(batch))
    writer.close()
    bar.close()


def main(args):
    check_args(args)
    # ---- distributed ----
    device = distributed.init_distributed()
    shard, num_shards = process_shard(args)
    if args.preview and not distributed.is_main_process():
        return None  # one preview is enough

    # ---- data ----
    if args.preview:  # the first ROWS usable captions, whatever the shard
        captions = read_captions(args.captions, max_captions=args.preview)
    else:  # the text of this shard's captions, the ids of all (to know when a shared folder is complete)
        captions = read_captions(args.captions, keep=lambda i: i % num_shards == shard)
    dtype = resolve_dtype(args.dtype, device)
    settings = settings_of(args, captions, dtype)
    if not args.preview:
        check_settings(args.output, settings)
    check_output_creatable(args.output)
    mine = list(captions.captions)
    print(f"captions: {captions.rows} rows ({captions.layout}), {len(captions.valid_ids)} usable, "
          f"{len(captions.skipped)} skipped; shard {shard}/{num_shards}: {len(mine)} captions x n={args.n}")

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
    if imagetree.read_settings(args.output) is None:
        imagetree.write_settings(args.output, settings)  # every shard writes the same bytes: no race to lose
    todo = missing_images(args.output, mine, args.n, args.format)
    print(f"{len(mine) * args.n - len(todo)} images already on disk, {len(todo)} to make")

    # ---- generation loop ----
    write_tree(pipe, prompts, captions.captions, captions.valid_ids, todo, args,
               show_progress=distributed.is_main_process())
    if prompts.truncated:
        print(f"{prompts.truncated} captions were truncated to {pipe.tokenizer.model_max_length} tokens")
    print(f"done: {len(todo)} images written to {args.output}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return len(todo)


if __name__ == "__main__":
    run(main, get_args_parser())
