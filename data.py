"""Pretraining data: one item is one caption with m of its images, each augmented into c crops.

    item = CaptionImages(images [m * c, 3, S, S], caption label, [m] image indices, tokens [77] or None, corrupt,
                         color None)

CaptionImagesDataset reads sources with random access through dataindex.py's memory-mapped index (generate.py's
trees and tar shards, img2dataset's `files` and `webdataset` output, the official CSV + per-seed roots);
CaptionShardStream reads tar shards that only open as streams (pipe:, http(s):, gs: ... URLs, through webdataset),
shuffled per epoch at the shard level and in a seeded buffer, resumed exactly by skipping whole steps. Each crop
is augment.PretrainAugmentation's. With augment_on_device, an item holds the uint8 crops [m * c, S, S, 3] and
their drawn colour, blur and flip parameters (`color`) instead, for augment.augment_crops to finish on the
training device. All randomness of an item (which m images, every crop and jitter) is drawn from a generator
seeded by (seed, epoch, item index), so an item is the same whichever worker loads it, and a resumed run sees
exactly the batches an uninterrupted one would have seen.
"""
import io
import itertools
import random
import sys
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch

import dataindex
import shards
from augment import DECODE_ERRORS, ColorParams, PretrainAugmentation, decode_rgb


def item_seed(seed, epoch, index):
    """A 63-bit seed that is a fixed function of (seed, epoch, index)."""
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index & (2 ** 63 - 1)


class UnreadableData(RuntimeError):
    """No caption has enough readable images (every image tried failed to decode): the data, not the code, is
    wrong. Raised in a DataLoader worker, it reaches the main process with the worker's traceback in its text
    (cli.raised_message finds the message again)."""


class CaptionImages(NamedTuple):
    images: torch.Tensor  # [m * c, 3, S, S] float, image-major: image 0 crop 0, image 0 crop 1, ..., image 1 crop 0
    #                       (augment_on_device: uint8 [m * c, S, S, 3] crops)
    label: int  # the caption's label, unique across all --data sources
    image_indices: torch.Tensor  # [m] which of the caption's images were used
    tokens: Optional[torch.Tensor]  # [context] token ids of the caption, when a tokenizer was given
    corrupt: int  # unreadable images skipped (and replaced by other images of the caption) for this item
    color: Optional[ColorParams] = None  # augment_on_device: the crops' colour, blur and flip parameters ([m * c] rows)


class _CaptionItems:
    """What both datasets share: the augmentation, the tokenizer, and making an item from a caption's images."""

    def __init__(self, images_per_caption, crops_per_image, image_size, seed, tokenizer, context_length, crop_scale,
                 downsample_prob, downsample_res, augment_on_device):
        self.images_per_caption = images_per_caption
        self.crops_per_image = crops_per_image
        self.augment = PretrainAugmentation(image_size, crop_scale, downsample_prob, downsample_res)
        self.augment_on_device = augment_on_device
        self.seed = seed
        self.tokenizer, self.context_length = tokenizer, context_length

    def tokenize(self, caption):
        return self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt").input_ids[0]

    def make_item(self, label, slots, image_of, caption_of):
        """(item or None, corrupt): decode m distinct images of a caption, taken in a random order of its `slots`
        (torch's generator, seeded by the caller), `image_of(slot)` giving a path or the file's bytes; a corrupt or
        truncated one is skipped and counted, never trained on. None when fewer than m are readable."""
        images, colors, chosen, corrupt = [], [], [], 0
        for position in torch.randperm(len(slots)).tolist():
            slot = slots[position]
            try:
                source = image_of(slot)
                pixels = decode_rgb(io.BytesIO(source) if isinstance(source, bytes) else source)
            except DECODE_ERRORS:
                corrupt += 1
                continue
            for _ in range(self.crops_per_image):
                if self.augment_on_device:
                    crop, color = self.augment.crop(pixels)
                    images.append(crop)
                    colors.append(color)
                else:
                    images.append(self.augment(pixels))
            chosen.append(slot)
            if len(chosen) == self.images_per_caption:
                tokens = None
                if self.tokenizer is not None:
                    try:
                        tokens = self.tokenize(caption_of())
                    except OSError:  # an unreadable caption file or member
                        return None, corrupt + 1
                color = ColorParams.cat(colors) if colors else None
                item = CaptionImages(torch.stack(images), label, torch.tensor(chosen), tokens, corrupt, color)
                return item, corrupt
        return None, corrupt


class CaptionImagesDataset(_CaptionItems, torch.utils.data.Dataset):
    """All captions of one or more sources read at random (dataindex.py: image trees, local tar shards, the official
    CSV layout with `folder_list`); labels run over the sources' captions in order. The index is memory-mapped and
    cached (beside the data, or in `fallback_cache`): no Python object per caption, so forked workers do not copy
    it as they read. `build_index=False` loads a cache another process has built, or fails."""

    def __init__(self, roots, images_per_caption, crops_per_image, image_size, seed=0, tokenizer=None,
                 context_length=77, crop_scale=(0.08, 1.0), downsample_prob=0.0, downsample_res=(64, 128),
                 augment_on_device=False, folder_list=None, fallback_cache=None, build_index=True):
        super().__init__(images_per_caption, crops_per_image, image_size, seed, tokenizer, context_length, crop_scale,
                         downsample_prob, downsample_res, augment_on_device)
        streamed = [spec for spec in roots if dataindex.is_streamed(spec)]
        if streamed:
            raise ValueError(f"{streamed[0]} opens only as a stream: read it with CaptionShardStream")
        # what the user should know about the data (damaged or empty shards, CSV rows skipped, mixed settings)
        self.sources, self.notes = dataindex.open_sources(roots, folder_list, fallback_cache, build_index)
        self.starts = np.cumsum([0] + [len(source) for source in self.sources])  # first label of each source

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, index):
        """(source, caption number within it) of a dataset index."""
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sources[s], index - int(self.starts[s])

    def fewest_images(self, chunk=1 << 20):
        """(index, number of images) of the caption with the fewest images."""
        best = (0, None)
        for s, source in enumerate(self.sources):
            for start in range(0, len(source), chunk):
                counts = source.image_counts(start, min(len(source), start + chunk))
                j = int(counts.argmin())
                if best[1] is None or counts[j] < best[1]:
                    best = (int(self.starts[s]) + start + j, int(counts[j]))
        return best

    def describe(self, index):
        """`caption <key> (<where its first image is>)`, for messages."""
        source, j = self.locate(index)
        return source.describe(j)

    def __getitem__(self, key):
        """key = (epoch, caption index), as CaptionSampler yields them; a bare index means epoch 0."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's global generator
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self._load(index)

    def _load(self, index):
        """The item of caption `index`; when the caption has fewer than m readable images, the next caption in a
        random order stands in for it."""
        corrupt = 0
        for _ in range(len(self)):
            source, j = self.locate(index)
            with source.open(j) as files:
                item, skipped = self.make_item(index, files.slots, files.image, files.caption)
            corrupt += skipped
            if item is not None:
                return item._replace(corrupt=corrupt)
            index = int(torch.randint(len(self), ()))
        raise UnreadableData("no caption has enough readable images")


class _ShuffleBuffer:
    """Samples from `samples` in a shuffled order: keeps `size` of them and yields one drawn by `rng` each time
    (webdataset's shuffle, with our own seeded generator so that the order is a function of the seed)."""

    def __init__(self, samples, size, rng):
        self.samples, self.size, self.rng, self.held = samples, size, rng, []

    def __iter__(self):
        return self

    def __next__(self):
        while len(self.held) < self.size:
            self.held.append(next(self.samples))
        j = self.rng.randrange(len(self.held))
        self.held[j], self.held[-1] = self.held[-1], self.held[j]
        return self.held.pop()

    def peek(self, rng):
        """A sample still in the buffer, left there (a stand-in that moves no later sample), or None."""
        return self.held[rng.randrange(len(self.held))] if self.held else None


class CaptionShardStream(_CaptionItems, torch.utils.data.IterableDataset):
    """Captions streamed from tar shards that open only as streams (webdataset's URLs: `pipe:` commands, http(s),
    gs, ...), each sample a caption with its images (shards.py's layout or img2dataset's `<key>.jpg`).

    Random access is impossible, so the order is shuffled at two levels: each epoch permutes the shard list
    (seed + epoch), and each of the rank's `streams` (one per DataLoader worker) reads shards order[q], order[q + Q],
    ... (q = rank * streams + stream, Q = world_size * streams, cycling) through a shuffle buffer of
    `shuffle_buffer` samples seeded by (seed, epoch, q). Global step s of an epoch is built by stream s % streams
    from its next captions_per_batch samples, and every draw of an item is seeded by (seed, epoch, label) as in
    CaptionImagesDataset, so a resumed run reproduces the uninterrupted one by skipping, undecoded, the samples of
    the steps already done (exact when --workers is unchanged). A caption with fewer than m readable images is
    replaced by a sample peeked from the buffer (which still yields it later), so no later step moves.
    An epoch is `captions_per_epoch` captions, a number streams cannot tell in advance."""

    def __init__(self, urls, captions_per_epoch, captions_per_batch, images_per_caption, crops_per_image, image_size,
                 seed=0, tokenizer=None, context_length=77, crop_scale=(0.08, 1.0), downsample_prob=0.0,
                 downsample_res=(64, 128), augment_on_device=False, rank=0, world_size=1, workers=0,
                 shuffle_buffer=500):
        super().__init__(images_per_caption, crops_per_image, image_size, seed, tokenizer, context_length, crop_scale,
                         downsample_prob, downsample_res, augment_on_device)
        self.shards = [(source, url) for source, spec in enumerate(urls) for url in dataindex.expand(spec)]
        self.source_of = {url: source for source, url in self.shards}
        self.captions_per_epoch, self.captions_per_batch = captions_per_epoch, captions_per_batch
        self.rank, self.world_size, self.streams = rank, world_size, max(1, workers)
        self.shuffle_buffer = shuffle_buffer
        self.steps_per_epoch = captions_per_epoch // (captions_per_batch * world_size)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        """Set before the DataLoader starts its (non-persistent) workers for the epoch: they copy this state."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return self.captions_per_epoch

    def label(self, sample):
        """A caption's label: the source number in the top bits and the sample's numeric key (its caption id for
        generate.py's shards, img2dataset's key) or a hash of a non-numeric one."""
        base = sample["__key__"].rpartition("/")[2]
        key = int(base) if base.isdigit() and int(base) < 2 ** 32 else zlib.crc32(sample["__key__"].encode())
        return (self.source_of.get(sample["__url__"], 0) << 32) | key

    def _samples(self, q):
        """The endless sample sequence of stream q: its shards in this epoch's order, through webdataset's tar
        reader (a truncated or unreadable shard ends early, with a warning)."""
        from webdataset.handlers import warn_and_continue
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        queue = self.world_size * self.streams
        seen = [0]  # samples read: a full cycle of shards without one means none can be read

        def urls():
            for t in itertools.count():
                if t >= len(self.shards) and not seen[0]:
                    raise UnreadableData(f"no sample could be read from {self.shards[0][1]} ...")
                yield {"url": self.shards[int(order[(q + t * queue) % len(self.shards)])][1]}

        files = tar_file_expander(url_opener(urls(), handler=warn_and_continue), handler=warn_and_continue)
        for sample in group_by_keys(files, handler=warn_and_continue):
            seen[0] += 1
            yield sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.streams:
            raise RuntimeError(f"CaptionShardStream was made for {self.streams} DataLoader workers, runs in {workers}")
        stream = (self.start_step + worker) % self.streams  # the DataLoader takes batch j from worker j % workers
        q = self.rank * self.streams + stream
        buffer = _ShuffleBuffer(self._samples(q), self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{q}"))
        batch = self.captions_per_batch
        for _ in range((self.start_step + worker - stream) // self.streams * batch):  # steps done before a resume
            next(buffer)
        for _ in range(len(range(self.start_step + worker, self.steps_per_epoch, workers)) * batch):
            yield self._item(next(buffer), buffer)

    def _item(self, sample, buffer):
        corrupt = 0
        for attempt in range(16):
            label = self.label(sample)
            members = {}
            for name, value in sample.items():
                slot = shards.image_slot(name) if not name.startswith("__") else None
                if slot is not None:
                    members.setdefault(slot, value)
            text = sample.get("txt", b"")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, label))
                item, skipped = self.make_item(label, sorted(members), members.__getitem__,
                                               lambda: text.decode("utf-8", errors="replace").strip())
            corrupt += skipped
            if item is not None:
                return item._replace(corrupt=corrupt)
            sample = buffer.peek(random.Random(f"{self.seed}/{self.epoch}/{label}/{attempt}"))
            if sample is None:
                break
        raise UnreadableData("the stream holds no caption with enough readable images")


class CaptionSampler(torch.utils.data.Sampler):
    """Yields this rank's batches of (epoch, caption index) keys: a fresh permutation each epoch (seed + epoch),
    split evenly across ranks, the remainder dropped so every rank takes the same number of steps.
    `start_step` skips the batches a resumed run has already trained on in its first epoch."""

    def __init__(self, num_captions, captions_per_batch, rank=0, world_size=1, seed=0):
        self.num_captions, self.captions_per_batch = num_captions, captions_per_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_step = 0, 0
        self.steps_per_epoch = num_captions // (captions_per_batch * world_size)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        dtype = torch.int32 if self.num_captions < 2 ** 31 else torch.int64  # the same order, half the memory
        order = torch.randperm(self.num_captions, generator=torch.Generator().manual_seed(self.seed + self.epoch),
                               dtype=dtype)
        per_step = self.captions_per_batch * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            step_captions = order[step * per_step:(step + 1) * per_step]
            mine = step_captions[self.rank * self.captions_per_batch:(self.rank + 1) * self.captions_per_batch]
            yield [(self.epoch, index) for index in mine.tolist()]  # the epoch travels with the key, so
            # persistent workers (which hold their own copy of the dataset) draw this epoch's crops


# ---- the DataLoader's workers ----

PREFETCH_FACTOR = 2  # batches each worker builds ahead: one being consumed while the next is made (torch's default)


def worker_start_method():
    """How pretrain.py starts its DataLoader workers, chosen rather than inherited from Python's default (which
    is forkserver from Python 3.14 on Linux): fork on Linux, because a forked worker shares the parent's imported
    modules and pages copy-on-write (about 20-30 MiB private each) where a forkserver or spawn worker imports torch
    again (about 370 MiB each; BENCHMARKS.md); the platform's default elsewhere (spawn on macOS, where fork is
    unsafe with the system's frameworks). The workers never touch CUDA, so forking a process that has is safe."""
    return "fork" if sys.platform.startswith("linux") else None


def loader_options(workers, pin_memory):
    """The DataLoader arguments both of pretrain.py's loaders share: the workers, their start method
    (worker_start_method) and what each builds ahead (PREFETCH_FACTOR), so that at most workers x PREFETCH_FACTOR
    batches are in flight (in_flight_bytes)."""
    if not workers:
        return {"num_workers": 0, "pin_memory": pin_memory}
    return {"num_workers": workers, "pin_memory": pin_memory, "multiprocessing_context": worker_start_method(),
            "prefetch_factor": PREFETCH_FACTOR}


def batch_bytes(captions, images_per_caption, crops_per_image, image_size, augment_on_device):
    """Bytes of one batch's images as the loader ships them: float32 [N, 3, S, S], or with augment_on_device the
    uint8 crops [N, S, S, 3] (4x smaller; their colour parameters add 55 bytes a crop)."""
    crops = captions * images_per_caption * crops_per_image
    return crops * 3 * image_size * image_size * (1 if augment_on_device else 4)


def in_flight_bytes(workers, captions, images_per_caption, crops_per_image, image_size, augment_on_device):
    """The most image bytes the loader holds at once: workers x PREFETCH_FACTOR batches (one batch in the main
    process without workers)."""
    batches = workers * PREFETCH_FACTOR if workers else 1
    return batches * batch_bytes(captions, images_per_caption, crops_per_image, image_size, augment_on_device)


def describe_loader(workers, captions, images_per_caption, crops_per_image, image_size, augment_on_device):
    """One line for the start of a run: the workers, how they start, and the image bytes in flight."""
    views = (captions, images_per_caption, crops_per_image, image_size)
    flight = in_flight_bytes(workers, *views, augment_on_device) / 2 ** 30
    if not workers:
        return f"loader: in the main process, {flight:.2f} GiB of images a batch"
    text = (f"loader: {workers} workers ({worker_start_method() or 'the platform default'}) x {PREFETCH_FACTOR} "
            f"batches ahead of {batch_bytes(*views, augment_on_device) / 2 ** 20:.0f} MiB: {flight:.2f} GiB of images "
            "in flight per process")
    if not augment_on_device:
        text += f" ({in_flight_bytes(workers, *views, True) / 2 ** 30:.2f} GiB as --gpu-augment's uint8 crops)"
    return text


def collate(items):
    """Stack items into a batch: images [B * m * c, 3, S, S] (or uint8 crops [B * m * c, S, S, 3] and their
    ColorParams, "color") and per-image caption labels and image ids.

    image_labels repeat each caption's label m * c times (StableRep's positives: same caption); crop_labels give
    every (caption, image) its own id repeated c times (SimCLR's positives: crops of one image). A caption
    appears once in a global batch, so both are unique across ranks."""
    images = torch.cat([item.images for item in items])  # [B * m * c, 3, S, S] or [B * m * c, S, S, 3]
    crops = items[0].images.shape[0] // len(items[0].image_indices)
    labels = torch.tensor([item.label for item in items])
    image_indices = torch.stack([item.image_indices for item in items])  # [B, m]
    image_labels = labels.repeat_interleave(items[0].images.shape[0])
    crop_labels = (labels[:, None] * 2 ** 20 + image_indices).flatten().repeat_interleave(crops)
    tokens = torch.stack([item.tokens for item in items]) if items[0].tokens is not None else None
    color = ColorParams.cat([item.color for item in items]) if items[0].color is not None else None
    return {"images": images, "color": color, "image_labels": image_labels, "crop_labels": crop_labels,
            "caption_labels": labels, "tokens": tokens, "corrupt": sum(item.corrupt for item in items)}
