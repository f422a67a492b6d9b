"""Trying a recipe small (README, "Try any recipe small"): --max-steps caps a run at the first N steps of its full
schedule, the families' heads and decoder follow a ViT-Ti and DINO's local crops a small --image-size, and every
recipes/pretrain_*.args file runs that way for two steps, writing its family's collapse signals into log.jsonl."""
import glob
import json
import os
import shutil

import pytest
import torch

import pretrain
from conftest import REPO, write_random_tree
from util.cli import parse_command_line, run

# the scale-down the README shows: a 2-block ViT-Ti at 32 px, 4 captions a step, two steps (a text tower of 2 layers)
SMALL = ["--model", "vit_tiny", "--depth", "2", "--image-size", "32", "--captions-per-gpu", "4", "--max-steps", "2"]
TEXT_SMALL = ["--text-layers", "2"]
RECIPES = sorted(os.path.basename(path) for path in glob.glob(os.path.join(REPO, "recipes", "pretrain_*.args")))
# what each family's log.jsonl records beside loss and lr (families/*.py `monitor`)
COLLAPSE_SIGNALS = {"mocov3": {"momentum", "embedding_std"}, "byol": {"momentum", "embedding_std"},
                    "dino": {"teacher_entropy", "teacher_student_kl", "teacher_temperature", "momentum"},
                    "mae": {"masked_patch_loss", "visible_patch_loss"}}


def filled(*argv):
    return vars(pretrain.fill_recipe(pretrain.get_args_parser().parse_args(["--data", "x", *argv])))


def test_family_sizes_follow_a_vit_tiny_and_a_small_image_but_never_a_given_flag_or_vit_base():
    for loss in pretrain.FAMILIES:  # ViT-S to ViT-L at 224: the recipe's own sizes, as the official codes use them
        for model in ("vit_small", "vit_base", "vit_large"):
            recipe = pretrain.OBJECTIVES[loss].recipe
            args = filled("--loss", loss, "--model", model)
            assert {key: args[key] for key in recipe} == recipe, (loss, model)
    assert filled("--loss", "mocov3", "--model", "vit_tiny")["head_hidden_dim"] == 1024  # 4096 x 192 / 768
    assert filled("--loss", "byol", "--model", "vit_tiny")["head_hidden_dim"] == 1024
    dino = filled("--loss", "dino", "--model", "vit_tiny", "--image-size", "32")
    assert (dino["head_hidden_dim"], dino["out_dim"], dino["local_crop_size"]) == (512, 16384, 16)
    assert filled("--loss", "dino", "--image-size", "128")["local_crop_size"] == 96  # 96 fits: the recipe's
    assert filled("--loss", "dino", "--image-size", "96")["local_crop_size"] == 48  # 96 x 96 / 224 in patches
    assert filled("--loss", "mae", "--model", "vit_tiny")["decoder_width"] == 128
    given = filled("--loss", "dino", "--model", "vit_tiny", "--out-dim", "65536", "--head-hidden-dim", "2048",
                   "--image-size", "32", "--local-crop-size", "96")
    assert (given["out_dim"], given["head_hidden_dim"], given["local_crop_size"]) == (65536, 2048, 96)
    # StableRep's objectives keep the paper's head at every size (the demo's ViT-Ti sets its own)
    assert filled("--model", "vit_tiny")["head_hidden_dim"] == 4096


def test_max_steps_help_and_bad_values(capsys):
    assert "--max-steps" in pretrain.get_args_parser().format_help()
    with pytest.raises(SystemExit) as stopped:
        parse_command_line(pretrain.get_args_parser(), ["--max-steps", "0"])
    assert stopped.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert "max_steps" in pretrain.NEVER_RESTORED  # each launch's own: --resume alone continues to the end


@pytest.fixture(scope="module")
def six_image_tree(tmp_path_factory):
    """12 captions of 6 images: StableRep's m = 6 fits, as on generate.py's output."""
    return write_random_tree(tmp_path_factory.mktemp("six") / "tree", captions=12, images_per_caption=6, size=40)


def train(*argv):
    run(pretrain.main, pretrain.get_args_parser(), [str(a) for a in argv])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_pretrain_recipe_runs_small_for_two_steps(recipe, six_image_tree, tiny_sd_folder, tmp_path):
    text = open(os.path.join(REPO, "recipes", recipe), encoding="utf-8").read()
    loss = next(line.split()[1] for line in text.splitlines() if line.startswith("--loss"))
    extra = TEXT_SMALL + ["--tokenizer", tiny_sd_folder] if loss in ("clip", "stablerep+") else []
    output = tmp_path / "run"
    cwd = os.getcwd()
    os.chdir(REPO)  # @recipes/... as the README's command reads it
    try:
        train(f"@recipes/{recipe}", "--data", six_image_tree, "--output", output, *SMALL, *extra,
              "--workers", "0", "--log-every", "1", "--no-tensorboard")
    finally:
        os.chdir(cwd)
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert json.loads((output / "summary.json").read_text())["steps"] == 2
    checkpoint = output / "checkpoint-00000002.pth"
    assert checkpoint.exists() and (output / "encoder.pth").exists()
    for record in records:
        assert COLLAPSE_SIGNALS.get(loss, set()) <= record.keys(), (recipe, record)
        assert all(isinstance(record[key], float) for key in COLLAPSE_SIGNALS.get(loss, ()))
    if loss in pretrain.FAMILIES:  # the heads followed the ViT-Ti: no checkpoint of hundreds of MB
        assert checkpoint.stat().st_size < 80e6, checkpoint.stat().st_size


@pytest.mark.slow
def test_a_capped_run_is_the_start_of_the_whole_run_and_resume_continues_it_exactly(six_image_tree, tmp_path):
    common = ["--data", six_image_tree, "--model", "vit_tiny", "--depth", "2", "--image-size", "32",
              "--head-hidden-dim", "64", "--embed-dim", "32", "--images-per-caption", "2", "--captions-per-gpu", "4",
              "--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--log-every", "1", "--no-tensorboard"]
    whole, capped = tmp_path / "whole", tmp_path / "capped"
    train(*common, "--output", whole)
    train(*common, "--output", capped, "--max-steps", "2")
    assert json.loads((capped / "summary.json").read_text())["steps"] == 2
    assert json.loads((capped / "run.json").read_text())["total_steps"] == 6  # the schedule is the whole run's
    logged = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (capped / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in first] == [r["lr"] for r in logged[:2]]  # warmup over 3 steps, not over the cap
    train("--output", capped, "--resume")  # without --max-steps: to the schedule's end
    final = torch.load(whole / "checkpoint-00000006.pth", weights_only=True)["model"]
    again = torch.load(capped / "checkpoint-00000006.pth", weights_only=True)["model"]
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    assert json.loads((capped / "summary.json").read_text())["steps"] == 6
    shutil.rmtree(whole)
