"""Fixtures shared by the tests: offline hub, small image trees in generate.py's layout, the tiny Stable Diffusion
pipeline, the handwritten digits as ImageFolders, a tiny ViT checkpoint, and stage scripts run as subprocesses."""
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from demo.digits import load_digit_images, split_digits, write_image_folder
from model import build_vit
from util import imagetree, shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: scripts run from here
os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches for the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def random_images(captions, images_per_caption, size, seed):
    """(caption id, k, PIL image) of random-noise images: caption i's images share a tint, so a model can tell
    captions apart."""
    rng = np.random.default_rng(seed)
    for caption_id in range(captions):
        tint = rng.integers(0, 255, 3)
        for k in range(images_per_caption):
            noise = rng.integers(-40, 40, (size, size, 3))
            yield caption_id, k, Image.fromarray(np.clip(tint + noise, 0, 255).astype(np.uint8))


def caption_text(caption_id):
    return f"a photo of object number {caption_id}"


def write_random_tree(root, captions=12, images_per_caption=4, size=40, seed=0):
    """A tree (imagetree's layout) of random_images."""
    for caption_id, k, image in random_images(captions, images_per_caption, size, seed):
        if k == 0:
            imagetree.write_caption(str(root), caption_id, caption_text(caption_id))
        imagetree.write_image(str(root), caption_id, k, image)
    for folder in sorted(os.listdir(root)):
        if folder.isdigit():
            imagetree.index_folder(os.path.join(root, folder))
    return str(root)


def write_random_shards(root, captions=12, images_per_caption=4, size=40, seed=0, per_shard=5):
    """The same images as write_random_tree, byte for byte, in generate.py's tar shards of per_shard captions."""
    os.makedirs(root, exist_ok=True)
    images = {}
    for caption_id, k, image in random_images(captions, images_per_caption, size, seed):
        images.setdefault(caption_id, []).append((k, "jpg", imagetree.encode_image(image)))
    for shard in range(-(-captions // per_shard)):
        ids = list(range(shard * per_shard, min(captions, (shard + 1) * per_shard)))
        writer = shards.ShardWriter(os.path.join(root, shards.shard_name(shard)), ids, images_per_caption)
        for caption_id in ids:
            writer.add(caption_id, images[caption_id], caption_text(caption_id), {"caption_id": caption_id})
        writer.finish()
    return str(root)


@pytest.fixture(scope="session")
def random_tree(tmp_path_factory):
    return write_random_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="session")
def random_shards(tmp_path_factory):
    """random_tree's captions and image bytes in three tar shards (5 + 5 + 2 captions)."""
    return write_random_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """tiny_sd's random-weight Stable Diffusion pipeline, saved once per test session (about 7 MB)."""
    from demo.tiny_sd import save_tiny_pipeline
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sd")), image_size=32)


@pytest.fixture(scope="session")
def generated_tree(tiny_sd_folder, tmp_path_factory):
    """12 captions x 4 images made by generate.py itself with the tiny pipeline (32 px, 2 DDIM steps)."""
    import generate
    folder = tmp_path_factory.mktemp("generated")
    captions = folder / "captions.txt"
    captions.write_text("".join(f"a photo of object number {i}\n" for i in range(12)))
    args = generate.get_args_parser().parse_args([
        "--captions", str(captions), "--output", str(folder / "tree"), "--model", tiny_sd_folder, "--n", "4",
        "--steps", "2", "--size", "32", "--stored-size", "32", "--batch-size", "16", "--writers", "1"])
    generate.main(args)
    return str(folder / "tree")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sd_folder):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(tiny_sd_folder, subfolder="tokenizer")


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


def leave_spawned_worker():
    """The end of a test's torch.multiprocessing worker: meet the other ranks, then exit at once. Tearing the gloo
    process group down (destroy_process_group, or the interpreter's exit) aborts now and then under load with
    "terminate called without an active exception" (gloo's threads, not our code: once in a full suite run on 2 busy
    cores, never in 96 runs of a stress loop), which would fail the test after its results are saved."""
    import torch.distributed as dist
    dist.barrier()
    os._exit(0)


def python_env(**extra):
    """The environment of every subprocess a test starts: offline, one thread, plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def run_python(*args, env=None, **kwargs):
    """`python <args>` from the repository root, as a user would run it (a script path, `-m module` or
    `-m torch.distributed.run ...`), with python_env(); returns the CompletedProcess, output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=python_env(**(env or {})),
                          capture_output=True, text=True, **kwargs)


def run_python_with_file_size_limit(limit, *args, **kwargs):
    """run_python in a process that cannot write a file past `limit` bytes: a write there fails with EFBIG, as on a
    full disk (SIGXFSZ ignored, so the write fails instead of killing the process)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return run_python(*args, preexec_fn=limit_file_size, **kwargs)


def start_python(*args, env=None, **kwargs):
    """run_python's command started in the background (subprocess.Popen), for tests that kill or interrupt it.
    Ctrl-C's SIGINT reaches it as in a terminal even when the tests themselves run with SIGINT ignored (nohup, a
    script's background job), which the child would otherwise inherit."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=python_env(**(env or {})),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def signal_when(process, ready, signum=signal.SIGKILL, timeout=120):
    """Send `signum` to a started process as soon as `ready()` is true (checked every 20 ms), or when it has exited or
    `timeout` seconds have passed; for tests that kill or interrupt a run part-way."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)
    process.send_signal(signum)


def read_terminal(master):
    """All a pty's program wrote, once its last writer has closed it."""
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: no writer left (Linux)
            return output.decode()
        if not chunk:
            return output.decode()
        output += chunk


def assert_one_line_error(result, *fragments):
    """A run that stopped on bad input: exit code 2, one line on stderr naming every fragment, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# a captions file of 8 rows: two skipped (a blank one, one not UTF-8), six usable
CAPTIONS = ["a photo of a cat", "", "the red and blue car", "a dog on the beach", "\udcff\udcfe broken bytes",
            "two birds and the sky", "an old house", "a bowl of soup"]
VALID_IDS = [0, 2, 3, 5, 6, 7]  # row 1 is blank, row 4 is not UTF-8


@pytest.fixture(scope="session")
def captions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_bytes(b"".join(c.encode("utf-8", errors="surrogateescape") + b"\n" for c in CAPTIONS))
    return str(path)
