"""Shared fixtures: offline hub, and small image trees in generate.py's layout."""
import os

import numpy as np
import pytest
from PIL import Image

import imagetree

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches for the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def write_random_tree(root, captions=12, images_per_caption=4, size=40, seed=0):
    """A tree of random-noise images: caption i's images share a tint, so a model can tell captions apart."""
    rng = np.random.default_rng(seed)
    for caption_id in range(captions):
        imagetree.write_caption(str(root), caption_id, f"a photo of object number {caption_id}")
        tint = rng.integers(0, 255, 3)
        for k in range(images_per_caption):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(tint + noise, 0, 255).astype(np.uint8)
            imagetree.write_image(str(root), caption_id, k, Image.fromarray(pixels))
    for folder in sorted(os.listdir(root)):
        if folder.isdigit():
            imagetree.index_folder(os.path.join(root, folder))
    return str(root)


@pytest.fixture(scope="session")
def random_tree(tmp_path_factory):
    return write_random_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="session")
def tiny_tokenizer_folder(tmp_path_factory):
    """A CLIP tokenizer with a byte-level vocabulary and no merges, saved as a folder."""
    import json

    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    folder = tmp_path_factory.mktemp("tokenizer")
    characters = list(bytes_to_unicode().values())
    vocab = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_folder):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(tiny_tokenizer_folder)
