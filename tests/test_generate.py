"""generate.py on a tiny random-weight Stable Diffusion pipeline (demo/tiny_sd.py), loaded through generate.py's own
from_pretrained code, offline, on the CPU: 32x32 images, 2 DDIM steps."""
import errno
import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from conftest import CAPTIONS, VALID_IDS, run_python, run_python_with_file_size_limit, signal_when, start_python
from util import distributed, files, imagetree, shards
from util.cli import run

N = 3
PER_SHARD = 4  # rows 0-3 (ids 0, 2, 3) in shard 0, rows 4-7 (ids 5, 6, 7) in shard 1: two processes' worth
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")  # numpy 2 copy= in DPM-Solver


@pytest.fixture(scope="session")
def tiny_model(tiny_sd_folder):
    return tiny_sd_folder


def argv(model, captions, output, *extra):
    return ["--captions", captions, "--model", model, "--output", str(output), "--n", str(N), "--steps", "2",
            "--size", "32", "--stored-size", "32", "--format", "png", "--captions-per-shard", str(PER_SHARD), *extra]


def generate_in_process(*args):
    return generate.main(generate.get_args_parser().parse_args(list(args)))


def pixels(root):
    """{file name: uint8 array} of every image in the tree."""
    return {os.path.basename(record_path): np.asarray(Image.open(record_path))
            for record in imagetree.read_tree(str(root)) for record_path in record.image_paths}


def assert_same_images(tree_a, tree_b, part_of_a=False):
    a, b = pixels(tree_a), pixels(tree_b)
    assert set(b) <= set(a) if part_of_a else sorted(a) == sorted(b)
    for name in b:  # CPU kernels depend on the batch size: at most one uint8 level apart
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="session")
def reference(tiny_model, captions_file, tmp_path_factory):
    """One process, batch size 8: the tree every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "tree"
    assert generate_in_process(*argv(tiny_model, captions_file, out, "--batch-size", "8")) == len(VALID_IDS) * N
    return out


# ---- defaults and captions ----

def test_defaults_are_the_papers_recipe():
    args = generate.get_args_parser().parse_args(["--captions", "x.tsv"])
    assert args.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (args.scheduler, args.steps, args.eta) == ("ddim", 50, 0.0)  # DDIM, 50 steps, eta 0
    assert (args.size, args.stored_size) == (512, 256)
    assert (args.w, args.n) == (2.0, 10)  # StableRep's w and images per caption
    assert args.preview == 0 and not args.compile
    assert args.pixels == "official"  # stored as txt2img.py stores them: truncated, bicubic


def test_flags_accept_their_edges():
    args = generate.get_args_parser().parse_args([
        "--captions", "x", "--seed", str(2 ** 63 - 1), "--w", "0", "--eta", "1", "--n", "100", "--steps", "1000",
        "--size", "8", "--stored-size", "8", "--quality", "100", "--preview", "--shard", "0", "--num-shards", "1"])
    assert (args.seed, args.w, args.eta, args.n, args.steps, args.size, args.preview) == \
        (2 ** 63 - 1, 0.0, 1.0, 100, 1000, 8, 8)
    assert generate.image_seed(args.seed, 0, 0) >= 0


def test_each_process_owns_a_contiguous_block_of_whole_shards():
    blocks = [generate.own_shards(10_500, 1000, shard, 4) for shard in range(4)]
    assert [list(block) for block in blocks] == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9, 10]]  # 11 shards
    assert list(generate.own_shards(8, 1000, 0, 3)) == [] and list(generate.own_shards(8, 1000, 2, 3)) == [0]


def test_torchrun_ranks_split_each_shard(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    args = generate.get_args_parser().parse_args(["--captions", "x", "--shard", "1", "--num-shards", "3"])
    assert generate.process_shard(args) == (3, 6)


def test_image_seeds_are_distinct_and_fixed():
    seeds = {generate.image_seed(0, i, k) for i in range(200) for k in range(10)}
    assert len(seeds) == 2000
    assert generate.image_seed(0, 12, 3) == generate.image_seed(0, 12, 3) != generate.image_seed(1, 12, 3)


# ---- the tree ----

def test_tree_layout_count_settings_and_index(reference, captions_file, tiny_model):
    records = imagetree.read_tree(str(reference))
    assert [r.caption_id for r in records] == VALID_IDS
    assert all(len(r.image_paths) == N for r in records)
    assert records[1].caption == "the red and blue car"
    assert os.path.basename(records[1].image_paths[2]) == "000000002_02.png"
    assert os.path.isfile(os.path.join(reference, "00000", imagetree.INDEX_FILE))
    assert not [f for f in listing(reference) if os.path.basename(f).startswith(".tmp")]
    settings = imagetree.read_settings(str(reference))
    assert (settings["w"], settings["n"], settings["steps"], settings["scheduler"]) == (2.0, N, 2, "ddim")
    assert settings["skipped_rows"] == [{"row": 1, "reason": "blank"}, {"row": 4, "reason": "undecodable"}]
    assert {"torch", "diffusers", "transformers", "code"} <= set(settings["versions"])
    assert (settings["model"], settings["model_revision"]) == (os.path.abspath(tiny_model), None)
    images = pixels(reference)
    assert len(images) == len(VALID_IDS) * N and images["000000000_00.png"].shape == (32, 32, 3)
    assert np.abs(images["000000000_00.png"].astype(int) - images["000000000_01.png"]).mean() > 1  # seeds differ


@pytest.mark.slow
def test_stored_size_jpeg_and_bfloat16(tiny_model, captions_file, tmp_path):
    out = tmp_path / "tree"
    generate_in_process("--captions", captions_file, "--model", tiny_model, "--output", str(out), "--n", "1",
                        "--steps", "2", "--size", "32", "--stored-size", "16", "--dtype", "bfloat16",
                        "--quality", "80", "--shard", "0", "--num-shards", "3", "--captions-per-shard", "3")
    records = imagetree.read_tree(str(out))
    assert [r.caption_id for r in records] == [0, 2]  # shard 0 of 3 = rows 0-2
    image = Image.open(records[0].image_paths[0])
    assert image.format == "JPEG" and image.size == (16, 16)
    settings = imagetree.read_settings(str(out))
    assert (settings["dtype"], settings["quality"], settings["stored_size"]) == ("bfloat16", 80, 16)


@pytest.mark.parametrize("size, stored", [(64, 32), (48, 48)])
def test_stored_pixels_are_the_official_scripts(size, stored):
    """--pixels official (the default) stores what txt2img.py stores: Image.fromarray((255. * x).astype(np.uint8))
    resized with Pillow's default filter; --pixels rounded rounds to the nearest level and resizes with Lanczos."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    x[0, :, :2] = torch.tensor([0.0, 1.0, 0.99999])[:, None, None]  # the edges of the range
    official = [Image.fromarray((255. * image.permute(1, 2, 0).numpy()).astype(np.uint8)) for image in x]
    official = [image.resize((stored, stored)) if stored != size else image for image in official]
    ours = [generate.to_stored(pixels, stored, "official")
            for pixels in generate.to_uint8(x, "official").permute(0, 2, 3, 1).numpy()]
    for a, b in zip(ours, official):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    rounded = generate.to_uint8(x, "rounded").permute(0, 2, 3, 1).numpy()
    assert np.array_equal(rounded, np.round(x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    assert generate.get_args_parser().get_default("pixels") == "official"
    assert generate.recorded_value({}, "pixels") == "rounded"  # an output made before --pixels: rounded, Lanczos


def test_ddim_timesteps_are_the_official_samplers():
    """Stable Diffusion v1.5's scheduler config under DDIM (what --scheduler ddim builds from the model's own config):
    50 steps at the timesteps of the official DDIMSampler's uniform discretisation, range(0, 1000, 20) + 1, from the
    noisiest; the last step steps to alphas_cumprod[0] (its alphas_prev), not to 1."""
    from diffusers import DDIMScheduler
    sd15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, set_alpha_to_one=False, clip_sample=False)  # the model's scheduler_config.json
    scheduler = DDIMScheduler(**sd15)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == [t + 1 for t in range(0, 1000, 20)][::-1]
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


@pytest.mark.slow
def test_stochastic_ddim_is_seeded_per_image_too(tiny_model, captions_file, tmp_path):
    # eta > 0 adds fresh noise at every step: it comes from per-image generators, not a global stream
    runs = [tmp_path / "batch6", tmp_path / "batch1"]
    for out, batch in zip(runs, ("6", "1")):
        generate_in_process(*argv(tiny_model, captions_file, out, "--eta", "1", "--n", "2", "--batch-size", batch,
                                  "--shard", "0", "--num-shards", "2"))
    assert_same_images(*runs)
    assert imagetree.read_settings(str(runs[0]))["eta"] == 1.0


def test_batch_size_does_not_change_images(reference, tiny_model, captions_file, tmp_path):
    out = tmp_path / "tree"  # half the captions keep the test short
    assert generate_in_process(*argv(tiny_model, captions_file, out, "--batch-size", "1", "--shard", "1",
                                     "--num-shards", "2")) == 9
    assert_same_images(reference, out, part_of_a=True)


def test_two_shards_write_exactly_the_single_process_tree(reference, tiny_model, captions_file, tmp_path):
    out = tmp_path / "tree"
    made = [generate_in_process(*argv(tiny_model, captions_file, out, "--shard", str(s), "--num-shards", "2",
                                      "--batch-size", "4")) for s in (0, 1)]
    assert made == [9, 9]  # ids 0, 2, 3 and 5, 6, 7: one folder each
    assert_same_images(reference, out)
    for folder in ("00000", "00001"):
        index = f"{folder}/{imagetree.INDEX_FILE}"
        assert (out / index).read_text() == (reference / index).read_text()  # each folder indexed by its process
    assert listing(out) == listing(reference)


@pytest.mark.slow
def test_torchrun_ranks_write_the_single_process_tree(reference, tiny_model, captions_file, tmp_path):
    out = tmp_path / "tree"
    args = [a if a != "--n" else "--num-images" for a in argv(tiny_model, captions_file, out)]  # torchrun owns --n
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "generate.py", *args,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_images(reference, out)
    assert listing(out) == listing(reference)
    # rank 0 speaks for both: one start line, one summary with the totals of both ranks
    assert result.stdout.count("captions:") == 1 and "over 2 processes, 2 not finished" in result.stdout
    done = [line for line in result.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and done[0].startswith(f"done: {len(VALID_IDS) * N} images made") and \
        "2 of 2 unfinished shards finished" in done[0], result.stdout


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_images(reference, tiny_model, captions_file, tmp_path):
    out = tmp_path / "tree"
    proc = start_python("generate.py", *argv(tiny_model, captions_file, out, "--batch-size", "1", "--writers", "1"),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def images_written():
        return sum(len(v) for v in imagetree.images_on_disk(str(out / "00000"), "png").values())

    try:
        signal_when(proc, lambda: images_written() >= 4)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = images_written()
    assert 4 <= written < len(VALID_IDS) * N
    assert not (out / "00000" / imagetree.INDEX_FILE).exists()  # the folder is not complete yet
    for name in os.listdir(out / "00000"):  # whole files only: partial writes are .tmp names
        if name.endswith(".png"):
            Image.open(out / "00000" / name).load()
    made = generate_in_process(*argv(tiny_model, captions_file, out, "--batch-size", "8"))
    assert made == len(VALID_IDS) * N - written  # only the missing images
    assert_same_images(reference, out)
    assert generate_in_process(*argv(tiny_model, captions_file, out)) == 0  # a finished tree: nothing to do


def tar_pixels(folder):
    """{tree file name: uint8 array} of every image in the shards of `folder`, read through each tar's __index__;
    also checks that the tar's members are in caption order and its captions and JSON match."""
    images = {}
    for name in shards.list_shards(str(folder)):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            table = shards.read_index(fd)
            assert list(table[:, 0]) == sorted(table[:, 0]) and (table[:, 2:] > 0).all()
            for caption_id, text_offset, *image_offsets in table.tolist():
                assert shards.read_member(fd, text_offset).decode() == CAPTIONS[caption_id]
                for k, offset in enumerate(image_offsets):
                    image = Image.open(io.BytesIO(shards.read_member(fd, offset)))
                    images[imagetree.image_name(caption_id, k, "png")] = np.asarray(image)
        finally:
            os.close(fd)
    return images


def assert_same_as_tree(tree, shard_folder):
    a, b = pixels(tree), tar_pixels(shard_folder)
    assert sorted(a) == sorted(b)
    for name in b:
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name


@pytest.fixture(scope="session")
def reference_shards(tiny_model, captions_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_shards") / "shards"
    made = generate_in_process(*argv(tiny_model, captions_file, out, "--output-format", "webdataset",
                                     "--batch-size", "5"))
    assert made == len(VALID_IDS) * N
    return out


def test_shards_hold_the_trees_images(reference, reference_shards):
    assert sorted(os.listdir(reference_shards)) == ["00000.tar", "00001.tar", "settings.json"]
    assert_same_as_tree(reference, reference_shards)
    settings = imagetree.read_settings(str(reference_shards))
    assert (settings["output_format"], settings["captions_per_shard"]) == ("webdataset", PER_SHARD)
    with tarfile.open(reference_shards / "00000.tar") as tar:  # a plain tar, in webdataset's sample layout
        names = tar.getnames()
        meta = json.load(tar.extractfile("000000002.json"))
    assert names[:6] == ["__index__", "000000000.00.png", "000000000.01.png", "000000000.02.png", "000000000.txt",
                         "000000000.json"]
    assert meta == {"caption_id": 2, "row": 2, "seeds": [generate.image_seed(0, 2, k) for k in range(N)]}


@pytest.mark.slow
def test_shards_do_not_depend_on_processes_or_batch(reference_shards, tiny_model, captions_file, tmp_path):
    out = tmp_path / "shards"
    made = [generate_in_process(*argv(tiny_model, captions_file, out, "--output-format", "webdataset",
                                      "--shard", str(s), "--num-shards", "2", "--batch-size", "2")) for s in (1, 0)]
    assert made == [9, 9]  # each process writes its own tar
    a, b = tar_pixels(out), tar_pixels(reference_shards)
    assert sorted(a) == sorted(b)
    assert max(np.abs(a[name].astype(int) - b[name].astype(int)).max() for name in a) <= 1


@pytest.mark.slow
def test_killed_shard_run_resumes_to_the_same_images(reference, tiny_model, captions_file, tmp_path):
    out = tmp_path / "shards"
    proc = start_python("generate.py", *argv(tiny_model, captions_file, out, "--output-format", "webdataset",
                                             "--batch-size", "1", "--writers", "1"),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".tmp-00000.tar"
    try:  # killed once caption 0 is complete
        signal_when(proc, lambda: partial.exists() and b"000000002.json" in partial.read_bytes())
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "00000.tar").exists() and partial.exists()  # no partial tar under the final name
    made = generate_in_process(*argv(tiny_model, captions_file, out, "--output-format", "webdataset",
                                     "--batch-size", "8"))
    assert N <= len(VALID_IDS) * N - made < len(VALID_IDS) * N  # the complete captions were kept, not redone
    assert (len(VALID_IDS) * N - made) % N == 0 and not partial.exists()
    assert_same_as_tree(reference, out)
    assert generate_in_process(*argv(tiny_model, captions_file, out, "--output-format", "webdataset")) == 0


def test_outputs_from_before_the_shard_settings_read_as_a_files_tree(reference, tmp_path):
    settings = imagetree.read_settings(str(reference))
    legacy = {key: value for key, value in settings.items() if key not in ("output_format", "captions_per_shard")}
    imagetree.write_settings(str(tmp_path), legacy)
    generate.check_settings(str(tmp_path), {**settings, "captions_per_shard": 1000})  # the old layout: accepted
    with pytest.raises(generate.UserError, match="output_format 'files' -> 'webdataset'"):
        generate.check_settings(str(tmp_path), {**settings, "captions_per_shard": 1000,
                                                "output_format": "webdataset"})
    # an output made before --pixels rounded its pixels: it resumes with --pixels rounded, and says so otherwise
    imagetree.write_settings(str(tmp_path), {key: value for key, value in settings.items() if key != "pixels"})
    generate.check_settings(str(tmp_path), {**settings, "pixels": "rounded"})
    with pytest.raises(generate.UserError, match="pixels 'rounded' -> 'official'"):
        generate.check_settings(str(tmp_path), settings)


def test_a_files_run_of_many_files_suggests_shards_once(reference, tiny_model, captions_file, monkeypatch, capsys):
    monkeypatch.setattr(generate, "MANY_FILES", 10)
    assert generate_in_process(*argv(tiny_model, captions_file, reference)) == 0  # finished: nothing to do
    out = capsys.readouterr().out
    assert out.count("--output-format webdataset") == 1 and "nothing to do" in out


def test_each_caption_is_encoded_once(tiny_model):
    args = generate.get_args_parser().parse_args(["--captions", "x", "--model", tiny_model])
    pipe = generate.load_pipeline(args, torch.device("cpu"), torch.float32)
    encoded = []
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda texts, *a, **k: encoded.append(list(texts)) or encode(texts, *a, **k)
    prompts = generate.PromptCache(pipe, torch.device("cpu"))
    texts = {0: "x" * 200, 1: "a short caption", 2: "y" * 300}  # the tiny tokenizer: one token per character
    cond, uncond = prompts.embeddings([0, 0, 0, 1], texts)  # caption 1 goes on into the next batch
    assert cond.shape == uncond.shape == (4, 77, 32)
    assert torch.equal(cond[0], cond[2]) and not torch.equal(cond[0], cond[3])
    prompts.embeddings([1, 1, 2, 2], texts)
    assert sorted(map(tuple, encoded)) == sorted([(texts[0], texts[1]), ("",), (texts[2],)])


def test_the_model_is_recorded_as_a_folder_path_or_a_hub_id_and_commit(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(os.path.dirname(tiny_model))
    assert generate.model_source(os.path.basename(tiny_model)) == (tiny_model, None)  # a folder: absolute
    commit = "0123456789abcdef0123456789abcdef01234567"  # a hub cache as from_pretrained leaves it
    repo = tmp_path / "hub" / "models--org--sd-model"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert generate.hub_revision("org/sd-model", cache_dir=str(tmp_path / "hub")) == commit
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert generate.model_source("org/sd-model") == ("org/sd-model", commit)
    assert generate.model_source("org/never-downloaded") == ("org/never-downloaded", None)


def test_an_output_that_recorded_the_model_folder_as_typed_still_resumes(reference, tmp_path, monkeypatch):
    settings = imagetree.read_settings(str(reference))
    model = settings["model"]
    monkeypatch.chdir(os.path.dirname(model))
    imagetree.write_settings(str(tmp_path), {**settings, "model": os.path.basename(model)})
    generate.check_settings(str(tmp_path), settings)  # the relative folder resolves to the same model


def test_truncated_captions_are_listed_and_said_once(tiny_model, tmp_path, monkeypatch, capfd):
    # the tiny tokenizer: one token per character, 77 with the start and end tokens
    long = {1: "a" * 80, 2: "b " * 80, 4: "c" * 300}
    path = tmp_path / "captions.txt"
    path.write_text("".join(long.get(row, f"short caption {row}") + "\n" for row in range(6)))
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")  # where transformers warns
    tokenizer_log.setLevel(logging.NOTSET)  # as a fresh process has it
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    tokenizer_log.addHandler(handler)
    monkeypatch.setattr(generate, "TRUNCATED_LISTED", 2)
    out = tmp_path / "tree"
    try:
        made = generate_in_process("--captions", str(path), "--model", tiny_model, "--output", str(out), "--n", "1",
                                   "--steps", "1", "--size", "32", "--stored-size", "32", "--captions-per-shard", "3")
    finally:
        tokenizer_log.removeHandler(handler)
    assert made == 6
    assert warnings == []  # not "Token indices sequence length is longer than ..."
    captured = capfd.readouterr()
    assert captured.err.count("note: captions longer than 77 tokens") == 1
    assert "3 captions cut at the token limit, listed in truncated.json" in captured.out
    record = json.loads((out / generate.TRUNCATED_FILE).read_text())
    assert record == {"max_tokens": 77, "count": 3, "caption_ids": [1, 2], "shards": {"00000": 2, "00001": 1}}
    (out / "00001" / imagetree.INDEX_FILE).unlink()  # the shard is finished again: it is not counted twice
    generate_in_process("--captions", str(path), "--model", tiny_model, "--output", str(out), "--n", "1",
                        "--steps", "1", "--size", "32", "--stored-size", "32", "--captions-per-shard", "3")
    assert json.loads((out / generate.TRUNCATED_FILE).read_text()) == record


# ---- schedulers, compile, preview ----

@pytest.mark.parametrize("name, cls", [("ddim", "DDIMScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler"),
                                       ("model", "PNDMScheduler")])
def test_scheduler_choice_keeps_the_models_schedule(tiny_model, name, cls):
    args = generate.get_args_parser().parse_args(["--captions", "x", "--model", tiny_model, "--scheduler", name])
    pipe = generate.load_pipeline(args, torch.device("cpu"), torch.float32)
    assert type(pipe.scheduler).__name__ == cls
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    if name == "dpm-solver++":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"


def test_compile_flag_compiles_the_unet(tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    args = generate.get_args_parser().parse_args(["--captions", "x", "--model", tiny_model, "--compile"])
    pipe = generate.load_pipeline(args, torch.device("cpu"), torch.float32)
    assert compiled == [pipe.unet]


def test_dpm_solver_run_writes_images(tiny_model, captions_file, tmp_path):
    out = tmp_path / "tree"
    assert generate_in_process(*argv(tiny_model, captions_file, out, "--scheduler", "dpm-solver++",
                                     "--shard", "1", "--num-shards", "2")) == 3 * N  # ids 5, 6, 7
    assert imagetree.read_settings(str(out))["scheduler"] == "dpm-solver++"


@pytest.mark.parametrize("made", ["reference", "reference_shards"])
def test_a_preview_of_an_output_reads_its_images(made, request, reference, tiny_model, captions_file, tmp_path,
                                                 monkeypatch):
    """--preview into an output made with the same settings (a tree or shards) reads its images and never loads
    the model; with other settings (another w) it draws them."""
    out = tmp_path / "made"
    shutil.copytree(request.getfixturevalue(made), out)
    monkeypatch.setattr(generate, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    path = generate_in_process(*argv(tiny_model, captions_file, out, "--preview", "2"))
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    layout, tree = generate.PreviewGrid({0: "", 2: ""}, N, 32), pixels(reference)
    for row, caption_id in enumerate((0, 2)):
        top = layout.top(row) + layout.caption
        for k in range(N):
            tile = grid[top:top + 32, layout.left(k):layout.left(k) + 32]
            # the stored pixels (the shards were made in batches of 5: within a level of the tree's, as elsewhere)
            assert np.abs(tile - tree[imagetree.image_name(caption_id, k, "png")]).max() <= (made != "reference")
    assert generate.stored_images(generate.get_args_parser().parse_args(
        argv(tiny_model, captions_file, out, "--preview", "2", "--w", "3")), [0, 2]) == {}


def test_preview_is_one_labelled_png_grid_and_no_tree(reference, tiny_model, captions_file, tmp_path):
    out = tmp_path / "preview"
    path = generate_in_process(*argv(tiny_model, captions_file, out, "--preview", "2"))
    assert path == str(out / "preview_w2.png") and os.listdir(out) == ["preview_w2.png"]
    image = Image.open(path)
    assert image.format == "PNG"
    grid = np.asarray(image.convert("RGB")).astype(int)
    layout = generate.PreviewGrid({0: "", 2: ""}, N, 32)  # rows: the first two usable captions, ids 0 and 2
    assert grid.shape == (layout.top(2), layout.left(N), 3)
    dark = grid.min(axis=2) < 100
    for k in range(N):  # the header labels each column (k = 0, 1, 2)
        assert dark[:layout.top(0), layout.left(k):layout.left(k) + 32].any()
    tree = pixels(reference)
    for row, caption_id in enumerate((0, 2)):
        assert dark[layout.top(row):layout.top(row) + layout.caption, :].any()  # the caption's lines
        top = layout.top(row) + layout.caption
        for k in range(N):
            tile = grid[top:top + 32, layout.left(k):layout.left(k) + 32]
            assert np.abs(tile - tree[imagetree.image_name(caption_id, k, "png")]).max() <= 1  # row i, column k
            gutter = grid[top:top + 32, layout.left(k) - layout.gutter:layout.left(k)]
            assert (gutter == 255).all()  # white between the tiles


def test_row_labels_wrap_to_two_lines_and_long_words_break_between_characters():
    from PIL import ImageDraw

    draw, font = ImageDraw.Draw(Image.new("RGB", (10, 10))), generate.preview_font(["a"], 10)
    text = "#12: a photo of a cat on a mat"
    assert generate.wrap_label(text, 1000, draw, font) == [text]
    width = draw.textlength("#12: a photo of a", font=font)
    assert generate.wrap_label(text, width, draw, font) == ["#12: a photo of a", "cat on a mat"]
    assert generate.wrap_label(text, draw.textlength("#12: a photo", font=font), draw, font) == \
        ["#12: a photo", "of a cat ..."]  # cut: whole words, then " ..."
    for caption in ("#3: " + "supercalifragilistic" * 5, "#1: " + "東京の夜景と桜の花" * 5):  # no word fits a line
        lines = generate.wrap_label(caption, 60, draw, font)
        assert len(lines) == 2 and lines[1].endswith(" ...")
        assert all(draw.textlength(line, font=font) <= 60 for line in lines)
        assert caption.replace(" ", "").startswith("".join(lines)[:-3].replace(" ", ""))  # its head, in order


def test_preview_font_has_accented_latin_and_says_what_it_lacks(monkeypatch):
    font = generate.preview_font(["une crêpe flambée", "Ωμέγα, Привет"], 12)
    assert font.path.endswith(os.path.join("fonts", "ttf", "DejaVuSans.ttf"))  # matplotlib's DejaVu Sans
    monkeypatch.setenv("PATH", "")  # no fontconfig to find a CJK font: DejaVu Sans, boxes for what it lacks
    assert generate.preview_font(["東京の夜景"], 12).path == font.path


# ---- bad input: one line, exit code 2, nothing written ----

def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(generate.main, generate.get_args_parser(), [str(a) for a in args])
    err = capsys.readouterr().err
    return exit_info.value.code, err


BAD_INPUTS = {
    "missing captions": (["--captions", "{tmp}/nope.txt"], "does not exist"),
    "captions a folder": (["--captions", "{tmp}"], "is not a file"),
    "empty captions": (["--captions", "{tmp}/empty.txt"], "is empty"),
    "no caption column": (["--captions", "{tmp}/nocol.csv"], "no `caption` column"),
    "stored size larger": (["--stored-size", "64"], "larger than"),
    "shard out of range": (["--shard", "2", "--num-shards", "2"], "--shard must be in 0..1"),
    "output in a file": (["--output", "{tmp}/afile/tree"], "cannot be written"),
    "output a file": (["--output", "{tmp}/afile"], "cannot be written"),
    "preview output a file": (["--preview", "--output", "{tmp}/afile"], "cannot be written"),
    "model not loadable": (["--model", "{tmp}/no-such-model"], "offline"),
    "model a single file": (["--model", "{tmp}/v1-5-pruned-emaonly.safetensors"],
                            "is a single file; generate.py loads a folder in diffusers' layout"),
}
# every numeric flag: finite, signed and bounded at parse time
BAD_NUMBERS = {
    "n < 1": (["--n", "0"], "--n"), "n > 100": (["--n", "101"], "--n"),
    "w < 0": (["--w", "-1"], "--w"), "w inf": (["--w", "inf"], "--w"), "w nan": (["--w", "nan"], "--w"),
    "w > 100": (["--w", "1e6"], "--w"),
    "eta nan": (["--eta", "nan"], "--eta"), "eta < 0": (["--eta", "-1"], "--eta"), "eta > 1": (["--eta", "2"], "--eta"),
    "steps < 1": (["--steps", "0"], "--steps"), "steps > 1000": (["--steps", "1001"], "--steps"),
    "size 0": (["--size", "0"], "--size"), "size not a multiple of 8": (["--size", "36"], "multiple of 8"),
    "size huge": (["--size", "1048576"], "--size"), "stored size 12": (["--stored-size", "12"], "--stored-size"),
    "seed < 0": (["--seed", "-1"], "--seed"), "seed 2**64": (["--seed", str(2 ** 64)], "--seed"),
    "seed not an integer": (["--seed", "1.5"], "--seed"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"), "writers 0": (["--writers", "0"], "--writers"),
    "quality 0": (["--quality", "0"], "--quality"), "quality 101": (["--quality", "101"], "--quality"),
    "preview 0": (["--preview", "0"], "--preview"), "shard < 0": (["--shard", "-1"], "--shard"),
    "num shards 0": (["--num-shards", "0"], "--num-shards"),
    "captions per shard 0": (["--captions-per-shard", "0"], "--captions-per-shard"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS) + sorted(BAD_NUMBERS))
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_model, captions_file, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "nocol.csv").write_text("url,text\nhttp://x/1.jpg,a cat\n")
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "v1-5-pruned-emaonly.safetensors").write_bytes(b"weights in one file")
    before = listing(tmp_path)
    extra, message = {**BAD_INPUTS, **BAD_NUMBERS}[case]
    args = argv(tiny_model, captions_file, tmp_path / "tree") + [a.format(tmp=tmp_path) for a in extra]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("generate.py: error:") and message in err, err
    assert listing(tmp_path) == before and not (tmp_path / "tree").exists()


def test_rerun_with_other_settings_is_refused(reference, tiny_model, captions_file, capsys):
    before = listing(reference)
    code, err = run_cli(argv(tiny_model, captions_file, reference, "--w", "8"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "w 2.0 -> 8.0" in err
    assert listing(reference) == before


@pytest.mark.parametrize("foreign", ["00000.tar", "00000", "truncated.json"])
def test_an_output_holding_foreign_images_and_no_settings_is_refused(foreign, tiny_model, captions_file, tmp_path,
                                                                    capsys):
    """settings.json is written before the first image: shards or caption folders without it are someone else's."""
    out = tmp_path / "set"
    out.mkdir()
    (out / foreign).mkdir() if foreign.isdigit() else (out / foreign).write_bytes(b"theirs")
    (out / "notes.txt").write_text("a file of theirs that no output of ours would hold")
    before = listing(tmp_path)
    for extra in ([], ["--output-format", "webdataset"]):
        code, err = run_cli(argv(tiny_model, captions_file, out, *extra), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"holds {foreign} but no settings.json" in err
    assert listing(tmp_path) == before


def test_another_snapshot_of_the_hub_model_is_noted_on_resume(reference, tmp_path, capsys):
    settings = {**imagetree.read_settings(str(reference)), "model": "org/model", "model_revision": "aaaa"}
    imagetree.write_settings(str(tmp_path), settings)
    for current in ("aaaa", None):  # the same snapshot, or none in the cache yet: nothing to say
        generate.check_settings(str(tmp_path), {**settings, "model_revision": current})
    assert capsys.readouterr().err == ""
    generate.check_settings(str(tmp_path), {**settings, "model_revision": "bbbb"})
    err = capsys.readouterr().err
    assert "note:" in err and "commit aaaa" in err and "commit bbbb" in err


@pytest.mark.parametrize("damage", ["not json", "a folder", "a list"])
def test_an_unreadable_settings_json_is_one_line(damage, tiny_model, captions_file, tmp_path, capsys):
    out = tmp_path / "tree"
    out.mkdir()
    settings = out / imagetree.SETTINGS_FILE
    if damage == "a folder":
        settings.mkdir()
    else:
        settings.write_bytes(b'{"w": 2.0, "n"' if damage == "not json" else b"[1, 2]")
    before = listing(tmp_path)
    for extra in ([], ["--output-format", "webdataset"]):
        code, err = run_cli(argv(tiny_model, captions_file, out, *extra), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "settings.json is not a readable settings file" in err
    assert listing(tmp_path) == before


def test_a_preemption_signal_writes_what_is_made_and_stops_with_one_line(reference, tiny_model, captions_file,
                                                                         tmp_path, monkeypatch, capsys):
    """SIGUSR1 (SLURM's warning) or SIGTERM: no new batch, the images made are written (the shard's temporary tar
    stays whole), one line, exit 130; the same command then finishes the same images."""
    out, make = tmp_path / "shards", generate.generate_batch
    args = argv(tiny_model, captions_file, out, "--output-format", "webdataset", "--batch-size", "3")

    def preempted(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)
        return make(*a, **k)

    monkeypatch.setattr(generate, "generate_batch", preempted)
    with pytest.raises(SystemExit) as stop:
        generate_in_process(*args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "img/s" not in line]
    assert stop.value.code == 130 and err[-1].startswith("generate.py: SIGUSR1: stopped after 3 images"), err
    assert not shards.list_shards(str(out)) and (out / ".tmp-00000.tar").exists()
    monkeypatch.setattr(generate, "generate_batch", make)
    assert generate_in_process(*args) == len(VALID_IDS) * N - 3
    assert_same_as_tree(reference, out)


def test_a_failing_first_write_leaves_no_output_folder(tiny_model, captions_file, tmp_path, capsys, monkeypatch):
    def disk_full(root, settings):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(root, imagetree.SETTINGS_FILE))

    monkeypatch.setattr(imagetree, "write_settings", disk_full)
    code, err = run_cli(argv(tiny_model, captions_file, tmp_path / "new" / "tree"), capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("generate.py: error: no space left to write")
    assert os.listdir(tmp_path) == []  # the folders the run created are gone again


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_disk_full_is_one_line_leaves_whole_files_and_resumes(output_format, reference, tiny_model, captions_file,
                                                              tmp_path):
    # 2000 bytes: settings.json and the captions fit, a 32 px PNG (about 3 KB) does not; 20000: the tar takes
    # its first caption (3 images) and not the second
    limit = 2000 if output_format == "files" else 20000
    out = tmp_path / "out"
    args = argv(tiny_model, captions_file, out, "--output-format", output_format, "--writers", "2")
    result = run_python_with_file_size_limit(limit, "generate.py", *args, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("generate.py: error: no space left to write") and "File too large" in last, last
    names = listing(out)
    assert not [name for name in names if os.path.basename(name).startswith((".lock", ".tmp"))
                and not name.endswith(".tar")]  # no lock and no temporary file but the resumable tar
    if output_format == "files":
        assert not [name for name in names if name.endswith(".png")]  # none was whole: none has its final name
    else:
        assert not shards.list_shards(str(out))  # no tar under its final name
        partial = out / ".tmp-00000.tar"
        assert partial.stat().st_size <= limit
        writer = shards.ShardWriter(str(out / "00000.tar"), [0, 2, 3], N)
        assert writer.remaining == [2, 3]  # caption 0 is whole, caption 2's partial write was cut off
        writer.close()
    made = generate_in_process(*args)  # room again: the same command finishes the output
    assert made == len(VALID_IDS) * N - (N if output_format == "webdataset" else 0)
    (assert_same_images if output_format == "files" else assert_same_as_tree)(reference, out)


# ---- files a lab can share ----

def test_every_file_gets_the_mode_open_gives(tiny_model, tmp_path, monkeypatch):
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\n" + "a" * 100 + "\n")  # the second is over the token limit: truncated.json
    previous = os.umask(0o022)
    monkeypatch.setattr(files, "UMASK", 0o022)  # what files.py reads at import in a process started with this umask
    runs = {"files": ["--output-format", "files"], "webdataset": ["--output-format", "webdataset"],
            "preview": ["--preview", "1"]}
    try:
        for name, extra in runs.items():
            generate_in_process(*argv(tiny_model, str(captions), tmp_path / name, "--n", "1", *extra))
    finally:
        os.umask(previous)
    modes = {}
    for folder, folders, file_names in os.walk(tmp_path):
        for name in folders + file_names:
            path = os.path.join(folder, name)
            modes[os.path.relpath(path, tmp_path)] = stat.S_IMODE(os.stat(path).st_mode)
    del modes["captions.txt"]
    assert {"files/settings.json", "files/truncated.json", "files/00000/_index.json", "files/00000/000000000.txt",
            "files/00000/000000000_00.png", "webdataset/00000.tar", "webdataset/settings.json",
            "webdataset/truncated.json", "preview/preview_w2.png", "files/00000"} <= set(modes)
    # the tar is its temporary file renamed; images, captions, indexes, settings and preview go through cli
    assert modes == {name: 0o755 if os.path.isdir(tmp_path / name) else 0o644 for name in modes}


# ---- concurrency ----

HOLDER = """
import fcntl, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_shard_another_process_holds_is_skipped_and_named(reference, tiny_model, captions_file, tmp_path, capfd):
    out = tmp_path / "tree"
    out.mkdir()
    lock = out / ".lock-00000"
    holder = start_python("-c", HOLDER, lock, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert generate_in_process(*argv(tiny_model, captions_file, out)) == 3 * N  # shard 1 only
        captured = capfd.readouterr()
        assert f"shard 0 skipped: pid {holder.pid} on " in captured.err
        assert "1 skipped: other processes are writing them" in captured.out
        assert not (out / "00000").exists() and (out / "00001" / imagetree.INDEX_FILE).exists()
    finally:
        holder.kill()  # a dead holder: its lock goes with it, its file stays
        holder.wait()
    assert lock.exists()
    assert generate_in_process(*argv(tiny_model, captions_file, out)) == 3 * N  # shard 0, no longer held
    assert_same_images(reference, out)
    assert listing(out) == listing(reference)  # no lock file left


@pytest.mark.slow
def test_two_processes_on_one_output_make_each_image_once(reference, tiny_model, captions_file, tmp_path):
    out = tmp_path / "tree"
    command = ["generate.py", *argv(tiny_model, captions_file, out, "--batch-size", "1", "--writers", "1")]
    procs = [start_python(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]

    def made(stdout):  # "done: 9 images made ...", or "nothing to do" if the other process had finished already
        return sum(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("done:"))

    assert sum(made(stdout) for stdout, _ in outputs) == len(VALID_IDS) * N  # each image once, whoever made it
    assert_same_images(reference, out)
    assert listing(out) == listing(reference)


def test_a_lock_file_names_its_holder_and_goes_on_release(tmp_path):
    previous = os.umask(0o022)
    try:
        lock = generate.shard_lock(str(tmp_path), 12)
        assert lock.acquire()
    finally:
        os.umask(previous)
    path = tmp_path / ".lock-00012"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text().startswith(f"pid {os.getpid()} on ")
    other = generate.shard_lock(str(tmp_path), 12)  # flock: another open file is another holder, even here
    assert not other.acquire() and other.holder().startswith(f"pid {os.getpid()}")
    lock.release()
    assert not path.exists() and other.acquire()
    other.release()
