"""Fixtures shared by the evaluation tests: the handwritten digits as ImageFolders and a tiny ViT checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from digits import load_digit_images, split_digits, write_image_folder
from model import build_vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CI machines have 2 cores shared with other jobs: two spinning intra-op threads then slow the small matrix
# products of L-BFGS down 25-fold (measured), so tests and their subprocesses use one thread.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digit_folders(tmp_path_factory):
    """(train, test) ImageFolders of the 32-pixel digits: 1347 and 450 images, 10 classes."""
    root = tmp_path_factory.mktemp("digits")
    train, held_out = split_digits(load_digit_images(size=32))
    return write_image_folder(train, str(root / "train")), write_image_folder(held_out, str(root / "test"))


@pytest.fixture(scope="session")
def tiny_encoder():
    torch.manual_seed(0)
    return build_vit("vit_tiny", image_size=32, depth=2).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_encoder):
    """The tiny encoder in pretrain.py's format: {"model": {"visual.*": ...}, "args": {...}}."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"model": {f"visual.{k}": v for k, v in tiny_encoder.state_dict().items()},
                "args": {"model": "vit_tiny", "image_size": 32}}, path)
    return str(path)


@pytest.fixture(scope="session")
def run_script():
    """run_script(script, *args): the stage script as a subprocess (offline), returning the CompletedProcess."""
    def run(script, *args):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=REPO)
    return run
