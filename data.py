"""Pretraining data: one item is one caption with m of its images, each augmented into c crops.

    item = CaptionImages(images [m * c, 3, S, S], caption label, [m] image indices, tokens [77] or None, corrupt,
                         color None)

CaptionImagesDataset reads sources with random access through dataindex.py's memory-mapped index (generate.py's
trees and tar shards, img2dataset's `files` and `webdataset` output, the official CSV + per-seed roots);
CaptionShardStream reads tar shards that only open as streams (pipe:, http(s):, gs: ... URLs, through webdataset's
gopen): dealt each epoch to the loader workers' streams, each caption once, several shards read at once through a
seeded buffer, resumed exactly from where each stream stood (its position rides with the batches into checkpoints).
Each crop is augment.PretrainAugmentation's. With augment_on_device, an item holds the uint8 crops [m * c, S, S, 3]
and their drawn colour, blur and flip parameters (`color`) instead, for augment.augment_crops to finish on the
training device; with decode_on_device too, its JPEGs travel undecoded with their drawn crop boxes (`jpegs`), for
util/jpeg.py's decode_crops to decode and crop there first. All randomness of an item (which m images, every crop and
jitter) is drawn from a generator seeded by (seed, epoch, item index), so an item is the same whichever worker loads
it, and a resumed run sees exactly the batches an uninterrupted one would have seen.

The self-supervised families take other crops: a View per crop (MoCo v3's and BYOL's two asymmetric views, MAE's
crop and flip), DINO's `local` crops of a smaller size beside its two global ones (`local_images`), and
`noise_per_crop` uniform draws per crop for the model's own random choices (MAE's mask, DINO's stochastic depth),
drawn with the item's seed too: a sample's randomness travels with it, so one process and several give the same
numbers.
"""
import hashlib
import io
import random
import sys
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch

from augment import (
    DECODE_ERRORS,
    ColorParams,
    PretrainAugmentation,
    View,
    decode_rgb,
)
from util import dataindex
from util.checkpoints import end_quiet_workers_at_exit, quiet_worker
from util.jpeg import JPEG_MAGIC, DeviceJpegs, jpeg_size
from util.streams import read_stream


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
    jpegs: Optional[DeviceJpegs] = None  # decode_on_device: the JPEGs to decode and crop on the device (images then
    #                                      holds only the crops of other formats)
    stream: Optional[tuple] = None  # a stream's batch-ending item: (stream number, its position after the batch)
    local_images: Optional[torch.Tensor] = None  # [m * l, 3, s, s] DINO's local crops, image-major (or uint8 crops)
    local_color: Optional[ColorParams] = None  # augment_on_device: the local crops' parameters
    noise: Optional[torch.Tensor] = None  # [m * c, noise_per_crop] uniform draws for the model, one row per crop
    local_noise: Optional[torch.Tensor] = None  # [m * l, noise_per_crop], the local crops'


class LocalCrops(NamedTuple):
    """DINO's multi-crop: `count` more crops of each image at `size` pixels, of `scale` of its area, by `view`."""
    count: int
    size: int
    scale: tuple
    view: View


class _CaptionItems:
    """What both datasets share: the augmentation, the tokenizer, and making an item from a caption's images."""

    def __init__(self, images_per_caption, crops_per_image, image_size, seed, tokenizer, context_length, crop_scale,
                 downsample_prob, downsample_res, augment_on_device, decode_on_device=False, views=None,
                 local=None, noise_per_crop=0):
        self.images_per_caption = images_per_caption
        self.crops_per_image = crops_per_image
        self.image_size = image_size
        views = views or (View(),) * crops_per_image  # one View per crop (StableRep, SimCLR: c alike)
        if len(views) != crops_per_image:
            raise ValueError(f"{len(views)} views for {crops_per_image} crops per image")
        self.augments = [PretrainAugmentation(image_size, crop_scale, downsample_prob, downsample_res, view)
                         for view in views]
        self.local_augments = [PretrainAugmentation(local.size, local.scale, downsample_prob, downsample_res,
                                                    local.view) for _ in range(local.count)] if local else []
        self.noise_per_crop = noise_per_crop
        self.augment_on_device = augment_on_device or decode_on_device
        self.decode_on_device = decode_on_device
        self.seed = seed
        self.tokenizer, self.context_length = tokenizer, context_length

    def tokenize(self, caption):
        return self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt").input_ids[0]

    def make_item(self, label, slots, image_of, caption_of):
        """(item or None, corrupt): decode m distinct images of a caption, taken in a random order of its `slots`
        (torch's generator, seeded by the caller), `image_of(slot)` giving a path or the file's bytes; a corrupt or
        truncated one is skipped and counted, never trained on. None when fewer than m are readable. With
        decode_on_device a JPEG is not decoded: its header gives the size the crop is drawn for, and the file
        travels with the draws (util.jpeg.DeviceJpegs) to be decoded and cropped where the training runs."""
        images, colors, chosen, corrupt, jpegs, shipped = [], [], [], 0, [], []
        local_images, local_colors, noise, local_noise = [], [], [], []
        for position in torch.randperm(len(slots)).tolist():
            slot = slots[position]
            try:
                source = image_of(slot)
                size = None
                if self.decode_on_device:
                    source = source if isinstance(source, bytes) else _read_file(source)
                    size = jpeg_size(source) if source.startswith(JPEG_MAGIC) else None
                if size is None:
                    pixels = decode_rgb(io.BytesIO(source) if isinstance(source, bytes) else source)
            except DECODE_ERRORS:
                corrupt += 1
                continue
            for augment in self.augments:
                if size is not None:  # drawn now, decoded and cropped on the device
                    resolution, box, color = augment.draw(*size)
                    jpegs.append((len(images) + len(jpegs), source, box, resolution))
                    colors.append(color)
                elif self.augment_on_device:
                    crop, color = augment.crop(pixels)
                    shipped.append(len(images) + len(jpegs))
                    images.append(crop)
                    colors.append(color)
                else:
                    images.append(augment(pixels))
            for augment in self.local_augments:  # DINO's local crops (never decoded on the device: pretrain.py
                self._crop(augment, pixels, local_images, local_colors)  # refuses --gpu-decode for the families)
            if self.noise_per_crop:  # after the crops: the crops' draws are those of a run without noise
                noise.append(torch.rand(len(self.augments), self.noise_per_crop))
                local_noise.append(torch.rand(len(self.local_augments), self.noise_per_crop))
            chosen.append(slot)
            if len(chosen) == self.images_per_caption:
                tokens = None
                if self.tokenizer is not None:
                    try:
                        tokens = self.tokenize(caption_of())
                    except OSError:  # an unreadable caption file or member
                        return None, corrupt + 1
                color = ColorParams.cat(colors) if colors else None
                stacked = torch.stack(images) if images else torch.empty(
                    (0, self.image_size, self.image_size, 3), dtype=torch.uint8)
                item = CaptionImages(stacked, label, torch.tensor(chosen), tokens, corrupt, color,
                                     _device_jpegs(jpegs, shipped) if self.decode_on_device else None,
                                     local_images=torch.stack(local_images) if local_images else None,
                                     local_color=ColorParams.cat(local_colors) if local_colors else None,
                                     noise=torch.cat(noise) if noise else None,
                                     local_noise=torch.cat(local_noise) if local_images and noise else None)
                return item, corrupt
        return None, corrupt

    def _crop(self, augment, pixels, crops, colors):
        """One crop of `pixels` by `augment` onto `crops`: finished here, or (augment_on_device) uint8 with its
        drawn colour parameters onto `colors`."""
        if self.augment_on_device:
            crop, color = augment.crop(pixels)
            crops.append(crop)
            colors.append(color)
        else:
            crops.append(augment(pixels))


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def _device_jpegs(jpegs, shipped):
    """The DeviceJpegs of one item: [(row, file bytes, box, resolution)] and the rows of its shipped crops."""
    files = [data for _, data, _, _ in jpegs]
    return DeviceJpegs(rows=torch.tensor([row for row, _, _, _ in jpegs], dtype=torch.long),
                       data=torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8) if files else
                       torch.empty(0, dtype=torch.uint8),
                       lengths=torch.tensor([len(data) for data in files], dtype=torch.long),
                       boxes=torch.tensor([box for _, _, box, _ in jpegs], dtype=torch.long).reshape(-1, 4),
                       downsample=torch.tensor([resolution for _, _, _, resolution in jpegs], dtype=torch.long),
                       shipped=torch.tensor(shipped, dtype=torch.long))


class CaptionImagesDataset(_CaptionItems, torch.utils.data.Dataset):
    """All captions of one or more sources read at random (dataindex.py: image trees, local tar shards, the official
    CSV layout with `folder_list`); labels run over the sources' captions in order. The index is memory-mapped and
    cached (beside the data, or in `fallback_cache`): no Python object per caption, so forked workers do not copy
    it as they read. `build_index=False` loads a cache another process has built, or fails."""

    def __init__(self, roots, images_per_caption, crops_per_image, image_size, seed=0, tokenizer=None,
                 context_length=77, crop_scale=(0.08, 1.0), downsample_prob=0.0, downsample_res=(64, 128),
                 augment_on_device=False, folder_list=None, fallback_cache=None, build_index=True,
                 decode_on_device=False, views=None, local=None, noise_per_crop=0):
        super().__init__(images_per_caption, crops_per_image, image_size, seed, tokenizer, context_length, crop_scale,
                         downsample_prob, downsample_res, augment_on_device, decode_on_device, views, local,
                         noise_per_crop)
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


# ---- streamed shards ----


MISSING_PROBE = 16  # shards a stream finishes before it judges whether most of its shards are missing


class CaptionShardStream(_CaptionItems, torch.utils.data.IterableDataset):
    """Captions streamed from tar shards that open only as streams (webdataset's URLs: `pipe:` commands, http(s),
    gs, ...), each sample a caption with its images (shards.py's layout or img2dataset's `<key>.jpg`).

    Random access is impossible, so each epoch deals the shards out and mixes them (what webdataset and OpenCLIP
    pipelines do, made exact and resumable):
    - the shard list is permuted (seed + epoch) and dealt to the Q = world_size x workers streams, one per
      DataLoader worker of each rank: stream q reads shards order[q], order[q + Q], ... once each, as far as they
      go round evenly, and a part of one of the shards left over (_my_shards), so the streams' shares are equal
      when the shards are;
    - a stream reads `mix` of its shards at once, taking each next sample from one of them drawn at random, through
      a shuffle buffer of `shuffle_buffer` samples: a batch mixes about `mix` shards (bench/bench_io.py measures
      it against a global shuffle);
    - global step s of an epoch is built by the stream of its DataLoader worker (s % workers) from its next
      captions_per_batch samples; an epoch is whole rounds of the workers. An epoch sees each caption once when
      each stream's shards hold its share (captions_per_epoch / Q); a stream whose shards run out first reads them
      again (a second pass, with a note on stderr saying so), and the captions left when an epoch ends wait for
      the next one (a new deal).
    Every draw is a function of (seed, epoch, stream, draw number), and an item's crops of (seed, epoch, label) as
    in CaptionImagesDataset. After each batch the stream's position (its pass, its next shard, the open shards and
    how far each was read, the buffer as (shard, sample) pairs, the draw count) travels with the batch; through
    StreamLoader, `state_dict()` returns the latest of every stream, and a run resumed with `load_state_dict`
    reopens only the shards that were open or buffered and skips to where each stopped, instead of reading the
    epoch again (exact when --workers is unchanged). A caption with fewer than m readable images is replaced by
    a sample peeked from the buffer (which still yields it later), so no later step moves.
    An epoch is `captions_per_epoch` captions, a number streams cannot tell in advance."""

    def __init__(self, urls, captions_per_epoch, captions_per_batch, images_per_caption, crops_per_image, image_size,
                 seed=0, tokenizer=None, context_length=77, crop_scale=(0.08, 1.0), downsample_prob=0.0,
                 downsample_res=(64, 128), augment_on_device=False, rank=0, world_size=1, workers=0,
                 shuffle_buffer=500, mix=4, decode_on_device=False, views=None, local=None, noise_per_crop=0):
        super().__init__(images_per_caption, crops_per_image, image_size, seed, tokenizer, context_length, crop_scale,
                         downsample_prob, downsample_res, augment_on_device, decode_on_device, views, local,
                         noise_per_crop)
        self.shards = [(source, url) for source, spec in enumerate(urls) for url in dataindex.expand(spec)]
        self.captions_per_epoch, self.captions_per_batch = captions_per_epoch, captions_per_batch
        self.rank, self.world_size, self.streams = rank, world_size, max(1, workers)
        self.shuffle_buffer, self.mix = shuffle_buffer, mix
        steps = captions_per_epoch // (captions_per_batch * world_size)
        # whole rounds of the workers, so that every stream takes the same share (fewer than one round: as is)
        self.steps_per_epoch = steps if steps < self.streams else steps // self.streams * self.streams
        self.epoch, self.start_step = 0, 0
        self.positions = {}  # stream q -> its position after its last batch seen by this process (StreamLoader)
        self.samples_read = 0  # samples read from tars by this copy (in-process: the resume test counts them)
        self.failures = []  # (url, reason) of shards that failed before their first sample, not yet said
        queue = world_size * self.streams
        self.notes = [] if len(self.shards) >= queue else [  # what the user should know before the run
            f"{len(self.shards)} streamed shards for {queue} streams ({world_size} process(es) x {self.streams} "
            f"workers): each shard is read by up to {-(-queue // len(self.shards))} streams, each keeping its part "
            "(fewer --workers read less)"]

    def set_epoch(self, epoch, start_step=0):
        """Set before the DataLoader starts its (non-persistent) workers for the epoch: they copy this state."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return self.captions_per_epoch

    # ---- the position, carried by batches and checkpoints ----

    def state_dict(self):
        """The latest position of every stream of every process (a collective under torchrun: call it on every
        rank), for the checkpoint."""
        positions = {f"{q}": position for q, position in self.positions.items()}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, positions)
            positions = {q: position for part in gathered for q, position in part.items()}
        return {"streams": positions}

    def load_state_dict(self, state):
        """Positions to resume from (this process's streams are picked by number)."""
        self.positions = {int(q): position for q, position in (state or {}).get("streams", {}).items()}

    # ---- reading ----

    def _draw(self, q, counter, n):
        """A uniform draw in range(n), a function of (seed, epoch, stream, counter) alone."""
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{q}/{counter}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % n

    def _my_shards(self, q):
        """Stream q's shards this epoch, in reading order, as (shard, part, parts): the stream keeps the samples
        whose number in the shard is `part` modulo `parts`. The permuted shards are dealt whole, one per stream in
        turn, as far as they go round evenly; each of the r left over is shared by the streams q = its turn modulo
        r, each keeping its part. So every stream gets the same number of captions when the shards are of one size
        (generate.py's), at the cost of reading the r shared shards about Q / r times."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order, queue = order.tolist(), self.world_size * self.streams
        whole = len(order) // queue * queue
        mine = [(shard, 0, 1) for shard in order[q:whole:queue]]
        rest = order[whole:]
        if rest:
            mine.append((rest[q % len(rest)], q // len(rest), len(range(q % len(rest), queue, len(rest)))))
        return mine

    def _open(self, entry, taken=0, skipped=lambda sample: None):
        """[entry, its kept samples from the `taken`-th on, taken]: an open shard of the stream; `skipped` sees the
        samples passed over."""
        shard, part, parts = entry
        samples = (sample for sample in read_stream(self.shards[shard][1], shard, failures=self.failures)
                   if sample.ordinal % parts == part)
        for _ in range(taken):
            skipped(next(samples))
            self.samples_read += 1
        return [entry, samples, taken]

    def _samples(self, q, position):
        """Stream q's samples from `position` (None: the epoch's start) on, endlessly: its shards `mix` at a time,
        each next sample from one drawn at random, through the shuffle buffer; a new pass over its shards when they
        run out. Yields (sample, the buffer, a function giving the position after it)."""
        mine = self._my_shards(q)
        if position is None:
            position = {"epoch": self.epoch, "pass": 0, "next": 0, "read": 0, "open": [], "buffer": [], "draws": 0}
        passes, next_shard, draws = position["pass"], position["next"], position["draws"]
        done, empty = 0, 0  # shards this stream finished in this run, and those of them that gave no sample
        read_this_pass = position["read"]
        open_shards, buffer = self._restore(mine, position)
        try:
            while True:
                while len(buffer) < self.shuffle_buffer:  # fill: one sample from a randomly drawn open shard
                    while len(open_shards) < self.mix and next_shard < len(mine):
                        open_shards.append(self._open(mine[next_shard]))
                        next_shard += 1
                    if not open_shards:
                        break
                    j = self._draw(q, draws, len(open_shards))
                    draws += 1
                    sample = next(open_shards[j][1], None)
                    if sample is None:  # that shard is done
                        entry, samples, taken = open_shards.pop(j)
                        samples.close()
                        done, empty = done + 1, empty + (taken == 0)
                        self._check_missing(q, done, empty)
                        continue
                    open_shards[j][2] += 1
                    buffer.append(sample)
                    read_this_pass += 1
                    self.samples_read += 1
                if not buffer:  # every shard of this stream read: another pass over them
                    self._say_failures()
                    if not read_this_pass:
                        raise UnreadableData(f"no sample could be read from {self.shards[mine[0][0]][1]} ...")
                    passes, next_shard, read_this_pass = passes + 1, 0, 0
                    print(f"note: stream {q} read its {len(mine)} shard(s) and needs more captions for epoch "
                          f"{self.epoch}: pass {passes + 1} over them (--stream-captions may be more than the data "
                          "holds)", file=sys.stderr)
                    continue
                j = self._draw(q, draws, len(buffer))
                draws += 1
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                sample = buffer.pop()
                yield sample, buffer, lambda: {
                    "epoch": self.epoch, "pass": passes, "next": next_shard, "read": read_this_pass, "draws": draws,
                    "open": [(mine.index(entry), taken) for entry, _, taken in open_shards],
                    "buffer": [(held.shard, held.ordinal) for held in buffer]}
        finally:
            for _, samples, _ in open_shards:
                samples.close()

    def _check_missing(self, q, done, empty):
        """Once MISSING_PROBE shards are done: a stream whose shards mostly gave no sample (a brace pattern naming
        shards that are not there) stops the run with one line; otherwise the failures are said as notes."""
        if done < MISSING_PROBE:
            return
        if empty * 2 > done:
            url, reason = self.failures[0] if self.failures else (self.shards[0][1], "no sample")
            raise UnreadableData(f"{empty} of the first {done} shards stream {q} opened gave no sample (the first: "
                                 f"{url}: {reason}): most shards --data names are missing or unreadable")
        self._say_failures()

    def _say_failures(self):
        for url, reason in self.failures:
            print(f"note: {url}: {reason}; no sample read from it", file=sys.stderr)
        self.failures.clear()

    def _restore(self, mine, position):
        """(open shards, buffer) of a position: the open shards reopened and read up to where they stood, and the
        buffered samples read again from their shards (up to the last one needed of each)."""
        wanted, found = {}, {}
        for shard, ordinal in position["buffer"]:
            wanted.setdefault(shard, set()).add(ordinal)

        def keep(sample):
            if sample.ordinal in wanted.get(sample.shard, ()):
                found[(sample.shard, sample.ordinal)] = sample
        open_shards = [self._open(mine[index], taken, keep) for index, taken in position["open"]]
        for shard, ordinals in wanted.items():
            if all((shard, ordinal) in found for ordinal in ordinals):
                continue
            reader = read_stream(self.shards[shard][1], shard)
            for sample in reader:
                self.samples_read += 1
                if sample.ordinal in ordinals:
                    found[(shard, sample.ordinal)] = sample
                if sample.ordinal >= max(ordinals):
                    break
            reader.close()
        return open_shards, [found[(shard, ordinal)] for shard, ordinal in position["buffer"]]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.streams:
            raise RuntimeError(f"CaptionShardStream was made for {self.streams} DataLoader workers, runs in {workers}")
        stream = (self.start_step + worker) % self.streams  # the DataLoader takes batch j from worker j % workers
        q = self.rank * self.streams + stream
        position = self.positions.get(q)
        if position is None or position["epoch"] != self.epoch or not self.start_step:
            position = None  # this epoch from its start
        samples = self._samples(q, position)
        steps = len(range(self.start_step + worker, self.steps_per_epoch, workers))
        try:
            for _ in range(steps):
                for i in range(self.captions_per_batch):
                    sample, buffer, where = next(samples)
                    item = self._item(sample, buffer)
                    if i == self.captions_per_batch - 1:  # the batch's last item carries the stream's position
                        item = item._replace(stream=(q, where()))
                    yield item
        finally:
            samples.close()

    def label(self, sample):
        """A caption's label: the source number in the top bits and the sample's numeric key (its caption id for
        generate.py's shards, img2dataset's key) or a hash of a non-numeric one."""
        key = dataindex.numeric_key(sample.key.rpartition("/")[2])
        key = key if key is not None and key < 2 ** 32 else zlib.crc32(sample.key.encode())
        return (self.shards[sample.shard][0] << 32) | key

    def _item(self, sample, buffer):
        corrupt = 0
        for attempt in range(16):
            label = self.label(sample)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, label))
                item, skipped = self.make_item(label, sorted(sample.images), sample.images.__getitem__,
                                               lambda: sample.text.decode("utf-8", errors="replace").strip())
            corrupt += skipped
            if item is not None:
                return item._replace(corrupt=corrupt)
            if not buffer:
                break
            held = random.Random(f"{self.seed}/{self.epoch}/{label}/{attempt}")
            sample = buffer[held.randrange(len(buffer))]  # a stand-in left in the buffer: no later sample moves
        raise UnreadableData("the stream holds no caption with enough readable images")


class StreamLoader:
    """A DataLoader over a CaptionShardStream that keeps, as each batch reaches the training loop, the position
    of the stream that made it (for the checkpoint: CaptionShardStream.state_dict)."""

    def __init__(self, stream, **options):
        self.stream = stream
        self.loader = torch.utils.data.DataLoader(stream, batch_size=stream.captions_per_batch, collate_fn=collate,
                                                  **options)

    def __iter__(self):
        for batch in self.loader:
            q, position = batch.pop("stream")
            self.stream.positions[q] = position
            yield batch


class CaptionSampler(torch.utils.data.Sampler):
    """Yields this rank's batches of (epoch, caption index) keys, as the official loader deals them: each epoch a
    permutation seeded by seed + epoch (torch.randperm, as DistributedSampler draws it), padded by repeating its
    first captions up to a multiple of the number of ranks, rank r taking every world_size-th caption from r on,
    and the last partial batch dropped. So an epoch has ceil(captions / ranks) // captions_per_batch steps, the
    official count, and a global step s holds the captions permutation[s x B x W : (s + 1) x B x W]; only a
    padded last step repeats captions: the first (steps x B x W - captions) of the epoch's permutation (at most
    W - 1 of them), with the same images and crops as where they first appeared (an item is a function of (seed,
    epoch, caption)). `start_step` skips the batches a resumed run has already trained on in its first epoch."""

    def __init__(self, num_captions, captions_per_batch, rank=0, world_size=1, seed=0):
        self.num_captions, self.captions_per_batch = num_captions, captions_per_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_step = 0, 0
        self.steps_per_epoch = -(-num_captions // world_size) // captions_per_batch
        self.padding = max(0, self.steps_per_epoch * captions_per_batch * world_size - num_captions)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def state_dict(self):
        """Nothing beyond (seed, epoch, step) places a batch: the checkpoint needs no data state (streams do)."""
        return {}

    def load_state_dict(self, state):
        pass

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        dtype = torch.int32 if self.num_captions < 2 ** 31 else torch.int64  # the same order, half the memory
        order = torch.randperm(self.num_captions, generator=torch.Generator().manual_seed(self.seed + self.epoch),
                               dtype=dtype)
        order = torch.cat([order, order[:self.padding]])  # DistributedSampler's padding: the first ones again
        per_step = self.captions_per_batch * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            step_captions = order[step * per_step:(step + 1) * per_step]
            mine = step_captions[self.rank::self.world_size]  # [captions_per_batch], DistributedSampler's stride
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
    end_quiet_workers_at_exit()  # they ignore SIGTERM: this process ends them with SIGKILL at its exit
    return {"num_workers": workers, "pin_memory": pin_memory, "multiprocessing_context": worker_start_method(),
            "prefetch_factor": PREFETCH_FACTOR, "worker_init_fn": quiet_worker}  # a preemption: no worker traceback


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


def describe_loader(workers, captions, images_per_caption, crops_per_image, image_size, augment_on_device,
                    on_gpu=False):
    """One line for the start of a run: the workers, how they start, and the image bytes in flight (and, training
    on a GPU without --gpu-augment, what that flag would hold instead)."""
    views = (captions, images_per_caption, crops_per_image, image_size)
    flight = in_flight_bytes(workers, *views, augment_on_device)
    if not workers:
        return f"loader: in the main process, {_size(flight)} of images a batch"
    text = (f"loader: {workers} workers ({worker_start_method() or 'the platform default'}) x {PREFETCH_FACTOR} "
            f"batches ahead of {_size(batch_bytes(*views, augment_on_device))}: {_size(flight)} of images in flight "
            "per process")
    if on_gpu and not augment_on_device:
        text += f" ({_size(in_flight_bytes(workers, *views, True))} as --gpu-augment's uint8 crops)"
    return text


def _size(size):
    """Bytes as GiB, or MiB below one GiB (never a '0.00 GiB')."""
    return f"{size / 2 ** 30:.2f} GiB" if size >= 2 ** 30 else f"{size / 2 ** 20:.1f} MiB"


def collate(items):
    """Stack items into a batch: images [B * m * c, 3, S, S] (or uint8 crops [B * m * c, S, S, 3] and their
    ColorParams, "color"; with decode_on_device only the crops of non-JPEG images, and "jpegs", the DeviceJpegs
    that util.jpeg.decode_crops turns into the others) and per-image caption labels and image ids. The families'
    local crops, their colour parameters and the crops' noise likewise, each None where the items have none.

    image_labels repeat each caption's label m * c times (StableRep's positives: same caption); crop_labels give
    every (caption, image) its own id repeated c times (SimCLR's positives: crops of one image). A caption
    appears once in a global batch, so both are unique across ranks."""
    images = torch.cat([item.images for item in items])  # [B * m * c, 3, S, S] or [B * m * c, S, S, 3]
    rows = len(items[0].images) + (len(items[0].jpegs.rows) if items[0].jpegs is not None else 0)  # m * c
    crops = rows // len(items[0].image_indices)
    labels = torch.tensor([item.label for item in items])
    image_indices = torch.stack([item.image_indices for item in items])  # [B, m]
    image_labels = labels.repeat_interleave(rows)
    crop_labels = (labels[:, None] * 2 ** 20 + image_indices).flatten().repeat_interleave(crops)
    tokens = torch.stack([item.tokens for item in items]) if items[0].tokens is not None else None
    color = ColorParams.cat([item.color for item in items]) if items[0].color is not None else None
    jpegs = DeviceJpegs.cat([item.jpegs for item in items], [rows] * len(items)) if items[0].jpegs is not None \
        else None
    batch = {"images": images, "color": color, "jpegs": jpegs, "image_labels": image_labels,
             "crop_labels": crop_labels, "caption_labels": labels, "tokens": tokens,
             "corrupt": sum(item.corrupt for item in items),
             "local_images": _cat([item.local_images for item in items]),
             "local_color": (ColorParams.cat([item.local_color for item in items])
                             if items[0].local_color is not None else None),
             "noise": _cat([item.noise for item in items]), "local_noise": _cat([item.local_noise for item in items])}
    if items[-1].stream is not None:
        batch["stream"] = items[-1].stream
    return batch


def _cat(tensors):
    """torch.cat of the items' tensors, or None when they hold none."""
    return None if tensors[0] is None else torch.cat(tensors)
