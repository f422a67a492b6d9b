"""scikit-learn's handwritten digits as real RGB images, for tests and the end-to-end demo (no download).

`sklearn.datasets.load_digits` ships 1797 greyscale 8x8 scans of handwritten digits (values 0-16) inside the
package. Here they become RGB PIL images upscaled to `size` pixels (white digit on black, as scanned), with a
deterministic per-class split, and can be written as an ImageFolder tree that every stage script reads.

    samples = load_digit_images(size=32)             # [(PIL.Image RGB 32x32, label 0-9), ...] x 1797
    train, held_out = split_digits(samples)           # 75% / 25% of every class, the same on every machine
    write_image_folder(train, "digits/train")         # digits/train/zero/00000.png, ..., digits/train/nine/...
    write_caption_tree(train, "digits/tree")          # generate.py's layout: one caption per digit, its images

The caption tree is the paper's structure on real pixels: one caption ("a photo of the handwritten digit seven")
with many images, so the multi-positive loss treats every image of a digit as a positive of the others.
"""
import os

import numpy as np
from PIL import Image

from util import imagetree

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digit_images(size=32):
    """All 1797 digits, in scikit-learn's order, as (RGB PIL image of size x size, label) pairs.

    The 0-16 grey levels are scaled to 0-255 and the 8x8 image is upscaled with bilinear interpolation."""
    from sklearn.datasets import load_digits  # imported here: only callers of this function need scikit-learn

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    samples = []
    for image, label in zip(pixels, digits.target):
        grey = Image.fromarray(image).resize((size, size), Image.BILINEAR)
        samples.append((grey.convert("RGB"), int(label)))
    return samples


def split_digits(samples, held_out_fraction=0.25, seed=0):
    """Split (image, label) pairs into (train, held_out), taking `held_out_fraction` of every class.

    Deterministic: the same seed gives the same split on every machine (NumPy's PCG64 permutation)."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in samples])
    train, held_out = [], []
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_held_out = max(1, int(round(held_out_fraction * len(indices))))
        held_out.extend(int(i) for i in indices[:n_held_out])
        train.extend(int(i) for i in indices[n_held_out:])
    return [samples[i] for i in sorted(train)], [samples[i] for i in sorted(held_out)]


def write_image_folder(samples, root, class_names=CLASS_NAMES):
    """Write (image, label) pairs as PNGs into root/<class name>/<index>.png (torchvision's ImageFolder layout).

    Class folders are named by `class_names[label]` (digit words by default, so ImageFolder's alphabetical class
    order differs from the digit order; only consistency between folders matters). Returns `root`."""
    for index, (image, label) in enumerate(samples):
        folder = os.path.join(root, class_names[label])
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{index:05d}.png"))
    return root


def caption_of(label):
    return f"a photo of the handwritten digit {CLASS_NAMES[label]}"


def write_caption_tree(samples, root, captions_per_digit=1):
    """Write (image, label) pairs in imagetree's layout and index it; returns `root`.

    With captions_per_digit = 1, caption id = label and every image of a digit is under its caption. With k > 1,
    a digit's images are dealt round-robin into k captions (id = label * k + j, the same text), so a batch can
    hold more captions than there are digits; images of one digit under other captions are then negatives, as
    near-duplicate captions are in real data."""
    seen = {}
    for image, label in samples:
        count = seen.get(label, 0)
        caption_id = label * captions_per_digit + count % captions_per_digit
        if count < captions_per_digit:
            imagetree.write_caption(root, caption_id, caption_of(label))
        imagetree.write_image(root, caption_id, count // captions_per_digit, image, "png")
        seen[label] = count + 1
    for folder in {imagetree.folder_of(root, label * captions_per_digit) for label in seen}:
        imagetree.index_folder(folder)
    imagetree.write_settings(root, {"source": "scikit-learn load_digits", "captions": len(seen) * captions_per_digit,
                                    "images": len(samples)})
    return root
