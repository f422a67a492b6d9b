"""Pretraining data: one item is one caption with m of its images, each augmented into c crops.

    item = CaptionImages(images [m * c, 3, S, S], caption label, [m] image indices, tokens [77] or None, corrupt,
                         color None)

The images of a caption come from imagetree.read_tree (generate.py's tree, or img2dataset's `files` output), and
each crop is augment.PretrainAugmentation's. With augment_on_device, an item holds the uint8 crops [m * c, S, S, 3]
and their drawn colour, blur and flip parameters (`color`) instead, for augment.augment_crops to finish on the
training device. All randomness of an item (which m images, every crop and jitter) is drawn from a generator
seeded by (seed, epoch, item index), so an item is the same whichever worker loads it, and a resumed run sees
exactly the batches an uninterrupted one would have seen.
"""
from typing import NamedTuple, Optional

import torch

import imagetree
from augment import ColorParams, PretrainAugmentation, decode_rgb


def item_seed(seed, epoch, index):
    """A 63-bit seed that is a fixed function of (seed, epoch, index)."""
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index & (2 ** 63 - 1)


class CaptionImages(NamedTuple):
    images: torch.Tensor  # [m * c, 3, S, S] float, image-major: image 0 crop 0, image 0 crop 1, ..., image 1 crop 0
    #                       (augment_on_device: uint8 [m * c, S, S, 3] crops)
    label: int  # the caption's label, unique across all --data folders
    image_indices: torch.Tensor  # [m] which of the caption's images were used
    tokens: Optional[torch.Tensor]  # [context] token ids of the caption, when a tokenizer was given
    corrupt: int  # unreadable images skipped (and replaced by other images of the caption) for this item
    color: Optional[ColorParams] = None  # augment_on_device: the crops' colour, blur and flip parameters ([m * c] rows)


class CaptionImagesDataset(torch.utils.data.Dataset):
    """All captions of one or more image trees; labels run over the folders' captions in order."""

    def __init__(self, roots, images_per_caption, crops_per_image, image_size, seed=0, tokenizer=None,
                 context_length=77, crop_scale=(0.08, 1.0), downsample_prob=0.0, downsample_res=(64, 128),
                 augment_on_device=False):
        self.records = [record for root in roots for record in imagetree.read_tree(root)]
        self.images_per_caption = images_per_caption
        self.crops_per_image = crops_per_image
        self.augment = PretrainAugmentation(image_size, crop_scale, downsample_prob, downsample_res)
        self.augment_on_device = augment_on_device
        self.seed = seed
        self.tokenizer, self.context_length = tokenizer, context_length

    def fewest_images(self):
        """(caption, number of images) of the caption with the fewest images."""
        record = min(self.records, key=lambda r: len(r.image_paths))
        return record, len(record.image_paths)

    def __len__(self):
        return len(self.records)

    def tokenize(self, caption):
        return self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt").input_ids[0]

    def __getitem__(self, key):
        """key = (epoch, caption index), as CaptionSampler yields them; a bare index means epoch 0."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's global generator
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self._load(index)

    def _load(self, index):
        """Decode m distinct images of caption `index` (a corrupt one is replaced by another image of the same
        caption, never trained on); when the caption has fewer than m readable images, the next caption in a
        random order stands in for it."""
        corrupt = 0
        for attempt in range(len(self.records)):
            record = self.records[index]
            order = torch.randperm(len(record.image_paths))
            images, colors, chosen = [], [], []
            for image_index in order.tolist():
                try:
                    pixels = decode_rgb(record.image_paths[image_index])
                except (OSError, ValueError):
                    corrupt += 1
                    continue
                for _ in range(self.crops_per_image):
                    if self.augment_on_device:
                        crop, color = self.augment.crop(pixels)
                        images.append(crop)
                        colors.append(color)
                    else:
                        images.append(self.augment(pixels))
                chosen.append(image_index)
                if len(chosen) == self.images_per_caption:
                    tokens = self.tokenize(record.caption) if self.tokenizer is not None else None
                    color = ColorParams.cat(colors) if colors else None
                    return CaptionImages(torch.stack(images), index, torch.tensor(chosen), tokens, corrupt, color)
            index = int(torch.randint(len(self.records), ()))
        raise RuntimeError("no caption has enough readable images")


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
        order = torch.randperm(self.num_captions, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        per_step = self.captions_per_batch * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            step_captions = order[step * per_step:(step + 1) * per_step]
            mine = step_captions[self.rank * self.captions_per_batch:(self.rank + 1) * self.captions_per_batch]
            yield [(self.epoch, index) for index in mine.tolist()]  # the epoch travels with the key, so
            # persistent workers (which hold their own copy of the dataset) draw this epoch's crops


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
