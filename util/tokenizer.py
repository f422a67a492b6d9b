"""The caption tokenizer of the models with a text tower (pretrain.py's clip and stablerep+, compositionality.py):
a CLIPTokenizer found by name, checked to be a real one, and captions turned into token ids."""
import os

from util.cli import UserError, hub_reachable


def load_tokenizer(name):
    """The CLIPTokenizer of --tokenizer: a local folder, or a hub id (from the local cache first, then the hub when
    it answers), checked to be a real one: offline, transformers returns an empty tokenizer (two tokens, every word
    the same id) instead of raising, which would train on nothing and crash in the embedding."""
    tokenizer = _clip_tokenizer(name, local_files_only=True)
    if not _usable(tokenizer) and not os.path.isdir(name) and not os.environ.get("HF_HUB_OFFLINE"):
        if not hub_reachable():
            raise UserError(f"the tokenizer {name!r} is not in the local cache and the Hugging Face hub does not "
                            "answer: pass --tokenizer a local folder (e.g. a Stable Diffusion snapshot)")
        tokenizer = _clip_tokenizer(name, local_files_only=False)
    if not _usable(tokenizer):
        found = f"{len(tokenizer)} tokens" if tokenizer is not None else "nothing"
        raise UserError(f"cannot load a usable CLIP tokenizer from {name!r} (found {found}); pass --tokenizer a "
                        "folder holding one (with or without a tokenizer/ subfolder, e.g. a Stable Diffusion "
                        "snapshot)")
    return tokenizer


def _clip_tokenizer(name, local_files_only):
    from transformers import CLIPTokenizer
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    for subfolder in ("tokenizer", ""):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(name, subfolder=subfolder, local_files_only=local_files_only)
        except (OSError, ValueError):
            continue
        if _usable(tokenizer):
            return tokenizer
    return None


def _usable(tokenizer):
    """A byte-level BPE vocabulary (>= 256 tokens) that tells two captions apart and decodes back to the words."""
    if tokenizer is None or len(tokenizer) < 256:
        return False
    cat, bus = (tokenizer(text).input_ids for text in ("a photo of a cat", "a painting of a red bus"))
    return cat != bus and "cat" in tokenizer.decode(cat)


def tokenize(tokenizer, captions, context_length):
    """Token ids [len(captions), context_length]: padded and cut to the context, as data.py tokenizes in training."""
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=context_length,
                     return_tensors="pt").input_ids
