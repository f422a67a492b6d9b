"""linear_probe.py: the paper's recipe as defaults, both protocols end to end on the digits, the metrics, and
one-line errors (exit code 2, no results file) on bad input."""
import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import linear_probe
from conftest import assert_one_line_error, run_python
from demo.digits import load_digit_images, split_digits, write_image_folder
from linear_probe import LinearHeads
from util import evaluation as ev
from util.cli import UserError, run


def probe(*argv):
    return linear_probe.main(linear_probe.get_args_parser().parse_args([str(a) for a in argv]))


def test_defaults_are_the_papers_recipe():
    args = linear_probe.get_args_parser().parse_args(["--protocol", "sgd", "--random-init"])
    assert (args.epochs, args.batch_size, args.batchnorm) == (90, 1024, True)
    assert args.base_lrs == [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
    assert (args.wd_range, args.wd_steps, args.val_fraction, args.metric) == ([1e-6, 1e5], 45, 0.2, "auto")
    assert linear_probe.PAPER_METRICS == {"aircraft": "mean_per_class", "caltech101": "mean_per_class",
                                          "flowers": "mean_per_class", "pets": "mean_per_class",
                                          "voc2007": "map11", "fairface": "mean_per_class",
                                          "fairface_gender": "mean_per_class", "fairface_age": "mean_per_class",
                                          "fairface_race_gender": "mean_per_class"}


# ---- metrics ----

def test_mean_per_class_accuracy_is_balanced_accuracy():
    generator = torch.Generator().manual_seed(0)
    targets = torch.cat([torch.zeros(50, dtype=torch.long), torch.randint(1, 4, (30,), generator=generator)])
    scores = torch.randn(80, 4, generator=generator)
    expected = 100 * balanced_accuracy_score(targets.numpy(), scores.argmax(1).numpy())
    assert linear_probe.mean_per_class_accuracy(scores, targets) == pytest.approx(expected)
    assert linear_probe.top1(scores, targets) == pytest.approx(100 * (scores.argmax(1) == targets).float().mean())


def test_11_point_map_by_hand():
    # class 0 ranked: hit, miss, hit -> precision 1 up to recall 0.5, then 2/3 up to recall 1
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    ap0 = (6 * 1.0 + 5 * 2 / 3) / 11  # recall thresholds 0..0.5 (6 points) and 0.6..1.0 (5 points)
    ap1 = 1.0  # its one positive is ranked first
    assert linear_probe.map11(scores, targets) == pytest.approx(100 * (ap0 + ap1) / 2)


# ---- lbfgs protocol ----

@pytest.mark.slow
def test_lbfgs_protocol_on_digits_then_reuses_cached_features(tmp_path, digit_folders, tiny_checkpoint):
    train, test = digit_folders
    argv = ["--protocol", "lbfgs", "--checkpoint", tiny_checkpoint, "--train-dir", train, "--val-dir", test,
            "--wd-steps", "4", "--wd-range", "1e-4", "1e2", "--max-iter", "200", "--num-workers", "0",
            "--output", tmp_path / "probe.json"]
    first = probe(*argv)
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["protocol"] == "lbfgs" and saved["metric"] == "top1"
    assert saved["encoder"]["checkpoint"] == tiny_checkpoint and saved["data"]["dataset"] == "folders"
    assert [row["weight_decay"] for row in saved["sweep"]] == pytest.approx([1e-4, 1e-2, 1.0, 1e2])
    assert (saved["train_images"], saved["val_images"], saved["test_images"]) == (1078, 269, 450)  # 20% held out
    assert saved["test"] > 70  # an untrained 2-block ViT on 32-pixel digits; chance is 10
    assert saved["feature_cache"]["hits"] == {"train": False, "test": False}
    # another metric: a result of its own (probe.json holds the top-1 one), from the same cached features
    second = probe(*argv, "--metric", "mean_per_class", "--output", tmp_path / "probe_mean_per_class.json")
    assert second["feature_cache"]["hits"] == {"train": True, "test": True}
    assert second["metric"] == "mean_per_class" and abs(second["test"] - first["test"]) < 3


# ---- sgd protocol ----

@pytest.mark.slow
def test_sgd_protocol_learns_in_three_epochs_and_reports_last_and_best(tmp_path, digit_folders, tiny_checkpoint):
    train, _ = split_digits(load_digit_images(size=32), held_out_fraction=0.6, seed=1)
    small_train = write_image_folder(train, str(tmp_path / "train"))
    results = probe("--protocol", "sgd", "--checkpoint", tiny_checkpoint, "--train-dir", small_train,
                    "--val-dir", digit_folders[1], "--epochs", "3", "--eval-every", "2", "--batch-size", "32",
                    "--base-lrs", "0.05", "0.5", "--num-workers", "0", "--output", tmp_path / "sgd.json")
    assert [h["lr"] for h in results["heads"]] == pytest.approx([0.05 * 32 / 256, 0.5 * 32 / 256])
    losses = [epoch["train_loss"] for epoch in results["history"]]
    assert len(losses) == 3 and all(len(row) == 2 for row in losses)
    assert min(losses[2]) < min(losses[0]) < math.log(10)  # below the loss of a uniform guess, and falling
    # evaluated after epoch 2 (--eval-every 2) and after the last; "last" is the best head of the last evaluation,
    # "best" the best over evaluations and heads (the official probe's reported number)
    assert [e["epoch"] for e in results["evaluations"]] == [1, 2]
    assert results["last"]["epoch"] == 2
    assert results["last"]["top1"] == max(h["top1"] for h in results["heads"]) > 30  # chance is 10
    assert results["best"]["top1"] == max(max(e["top1"]) for e in results["evaluations"]) >= results["last"]["top1"]
    saved = json.loads((tmp_path / "sgd.json").read_text())
    assert saved["best"] == results["best"] and saved["last"] == results["last"]
    # the curves: one record per epoch with every head's training loss, and its top-1 where it was evaluated
    records = [json.loads(line) for line in (tmp_path / "sgd.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "train_loss/base_lr_0.5" in records[0]
    assert "top1/base_lr_0.05" in records[1] and "top1/base_lr_0.05" not in records[0]
    if importlib.util.find_spec("tensorboard"):
        assert list((tmp_path / "sgd_tensorboard").glob("events.*"))


def test_heads_share_one_frozen_pass_and_an_affine_free_batchnorm():
    heads = LinearHeads(8, 3, num_heads=4, batchnorm=True)
    assert heads(torch.randn(5, 8)).shape == (4, 5, 3)
    assert not list(heads.norm.parameters()) and isinstance(heads.norm, torch.nn.BatchNorm1d)
    assert isinstance(LinearHeads(8, 3, 2, batchnorm=False).norm, torch.nn.Identity)


# ---- bad input: one line on stderr, exit code 2, no results file ----

@pytest.mark.slow
def test_missing_checkpoint_subprocess(tmp_path, digit_folders):
    out = tmp_path / "probe.json"
    result = run_python("linear_probe.py", "--protocol", "lbfgs", "--checkpoint", tmp_path / "nope.pth",
                        "--train-dir", digit_folders[0], "--val-dir", digit_folders[1], "--output", out)
    assert_one_line_error(result, "nope.pth does not exist")
    assert not out.exists()


BAD_NUMBERS = {  # flag values that used to be accepted or crash with a traceback (issue 12)
    "epochs 0": (["--protocol", "sgd", "--epochs", "0"], "--epochs: must be >= 1"),
    "wd-range nan": (["--wd-range", "nan", "nan"], "--wd-range: must be a finite number > 0"),
    "wd-range reversed": (["--wd-range", "10", "1"], "needs MIN <= MAX"),
    "val-fraction 1": (["--val-fraction", "1"], "--val-fraction: must be a finite number > 0 and <= 0.9"),
    "image-size 0": (["--image-size", "0"], "--image-size: must be >= 16"),
    "seed 2**64": (["--seed", str(2 ** 64)], "--seed: must be >= 0"),
    "workers -1": (["--num-workers", "-1"], "--num-workers: must be >= 0"),
    "base-lrs inf": (["--protocol", "sgd", "--base-lrs", "inf"], "--base-lrs: must be a finite number > 0"),
}


@pytest.mark.parametrize("case", ["missing folder", "empty split", "other architecture", "random init without model",
                                  "different classes", "map on folders", "one class", "output is a folder",
                                  "cache-dir is a file", "random init without output", *BAD_NUMBERS])
def test_bad_input_is_one_line_and_exit_code_2_and_writes_nothing(tmp_path, capsys, digit_folders, tiny_checkpoint,
                                                                   case):
    train, test = digit_folders
    inputs = tmp_path / "inputs"
    (inputs / "empty" / "zero").mkdir(parents=True)
    one_image = open(os.path.join(test, "zero", os.listdir(os.path.join(test, "zero"))[0]), "rb").read()
    for folder in ("other/cat", "one/zero"):
        (inputs / folder).mkdir(parents=True)
        (inputs / folder / "a.png").write_bytes(one_image)
    (inputs / "one" / "zero" / "b.png").write_bytes(one_image)
    (inputs / "a_file").write_text("")
    (inputs / "a_folder").mkdir()
    out = tmp_path / "results" / "probe.json"
    base = ["--protocol", "lbfgs", "--checkpoint", tiny_checkpoint, "--num-workers", "0"]
    folders = ["--train-dir", train, "--val-dir", test]
    argv = {"missing folder": base + ["--train-dir", inputs / "nope", "--val-dir", test],
            "empty split": base + ["--train-dir", train, "--val-dir", inputs / "empty"],
            "other architecture": base + ["--model", "vit_base", *folders],
            "random init without model": ["--protocol", "lbfgs", "--random-init", *folders],
            "different classes": base + ["--train-dir", train, "--val-dir", inputs / "other"],
            "map on folders": base + [*folders, "--metric", "map11"],
            "one class": base + ["--train-dir", inputs / "one", "--val-dir", inputs / "one"],
            "output is a folder": base + [*folders, "--output", inputs / "a_folder"],
            "cache-dir is a file": base + [*folders, "--cache-dir", inputs / "a_file"],
            "random init without output": ["--protocol", "lbfgs", "--random-init", "--model", "vit_tiny", *folders],
            }.get(case) or base + folders + BAD_NUMBERS[case][0]
    if "--output" not in argv and case != "random init without output":
        argv += ["--output", out]
    with pytest.raises(SystemExit) as info:
        run(linear_probe.main, linear_probe.get_args_parser(), [str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("linear_probe.py: error: "), err
    if case in BAD_NUMBERS:
        assert BAD_NUMBERS[case][1] in err, err
    assert not (tmp_path / "results").exists()  # nothing written, not even the results folder
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


@pytest.mark.slow
def test_results_go_beside_the_checkpoint_by_default(tmp_path, digit_folders, tiny_checkpoint):
    import shutil
    checkpoint = tmp_path / "run" / "encoder.pth"
    checkpoint.parent.mkdir()
    shutil.copy(tiny_checkpoint, checkpoint)
    train, test = digit_folders
    probe("--protocol", "lbfgs", "--checkpoint", checkpoint, "--train-dir", train, "--val-dir", test,
          "--wd-steps", "1", "--wd-range", "1", "1", "--max-iter", "50", "--num-workers", "0")
    # named after the train folder, the protocol and the settings that change the number (here not the defaults)
    data = os.path.basename(os.path.dirname(train)) + "_train"
    assert [p.name for p in (tmp_path / "run").glob("linear_probe_*.json")] == [
        f"linear_probe_{data}_lbfgs_wd-range-1,1_wd-steps-1_max-iter-50.json"]
    assert (tmp_path / "run" / "feature_cache").is_dir()


def test_results_of_other_protocols_and_settings_get_names_of_their_own(tmp_path):
    def default_output(*argv):
        args = linear_probe.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "encoder.pth"),
                                                          "--dataset", "flowers", *argv])
        return os.path.basename(ev.results_path(args, "linear_probe", "flowers", linear_probe.result_tags(args), {},
                                                []))

    assert default_output("--protocol", "sgd") == "linear_probe_flowers_sgd.json"
    assert default_output("--protocol", "lbfgs") == "linear_probe_flowers_lbfgs.json"
    assert default_output("--protocol", "sgd", "--no-batchnorm", "--epochs", "100", "--seed", "1") == \
        "linear_probe_flowers_sgd_epochs-100_no-batchnorm_seed-1.json"
    assert default_output("--protocol", "lbfgs", "--metric", "top1", "--image-size", "112") == \
        "linear_probe_flowers_lbfgs_metric-top1_image-size-112.json"
    # settings that do not change the number (workers, the feature cache) leave the name alone
    assert default_output("--protocol", "lbfgs", "--num-workers", "0", "--epochs", "5") == \
        "linear_probe_flowers_lbfgs.json"
    assert default_output("--protocol", "lbfgs", "--output", str(tmp_path / "mine.json")) == "mine.json"


def test_a_best_strength_at_the_edge_of_the_sweep_is_flagged(capsys):
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=generator)

    def split(n):
        targets = torch.randint(0, 4, (n,), generator=generator)
        return centres[targets] + torch.randn(n, 16, generator=generator), targets

    args = linear_probe.get_args_parser().parse_args(["--protocol", "lbfgs", "--random-init", "--wd-steps", "3",
                                                      "--wd-range", "1e-6", "1e-4"])  # all far too weak to matter
    results = linear_probe.sweep_and_refit(split(200), split(100), split(100), 4, "top1", args, torch.device("cpu"))
    assert results["best_at_edge_of_sweep"] and results["best_weight_decay"] == pytest.approx(1e-6)  # ties: weakest
    assert "at the edge of --wd-range 1e-06 0.0001" in capsys.readouterr().err


@pytest.mark.slow
def test_sgd_protocol_under_torchrun_two_processes(tmp_path, digit_folders, tiny_checkpoint):
    """DDP on CPU (gloo): the batch splits over 2 processes and every held-out image is scored exactly once."""
    out = tmp_path / "ddp.json"
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "linear_probe.py",
                        "--protocol", "sgd", "--checkpoint", tiny_checkpoint, "--train-dir", digit_folders[1],
                        "--val-dir", digit_folders[1], "--epochs", "1", "--batch-size", "64", "--base-lrs", "0.5",
                        "--num-workers", "0", "--output", out)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "Error" in line)
    assert "batch 64 = 32 x 2 processes" in result.stdout
    top1 = json.loads(out.read_text())["heads"][0]["top1"]
    assert top1 * 450 / 100 == pytest.approx(round(top1 * 450 / 100), abs=1e-3)  # a whole number of the 450
    assert top1 > 20  # chance is 10


def test_sweep_picks_a_strength_and_scores_multilabel_map(tmp_path):
    """The VOC2007 path: multi-hot targets, one-vs-rest heads, 11-point mAP on validation and test."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 16, generator=generator)

    def split(n):
        targets = (torch.rand(n, 3, generator=generator) < 0.4).float()
        return targets @ directions + 0.8 * torch.randn(n, 16, generator=generator), targets

    args = linear_probe.get_args_parser().parse_args(["--protocol", "lbfgs", "--random-init", "--wd-steps", "3",
                                                      "--wd-range", "1e-4", "1e2"])
    results = linear_probe.sweep_and_refit(split(300), split(100), split(200), 3, "map11", args,
                                           torch.device("cpu"))
    assert len(results["sweep"]) == 3
    assert any(results["best_weight_decay"] == pytest.approx(w) for w in (1e-4, 1e-1, 1e2))
    assert results["best_val"] == max(row["val"] for row in results["sweep"])
    assert results["test"] > 80  # chance (random scores) is about 40


# ---- FairFace: its CSV layout, per-class accuracy, the worst class ----

def test_per_class_accuracy_by_hand():
    scores = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    targets = torch.tensor([0, 0, 1, 1, 1])
    per_class = linear_probe.per_class_accuracy(scores, targets, 4)
    # class 0: both right; class 1: one of three (the third image is scored as class 2); classes 2, 3: no image
    assert per_class[0] == 100.0 and per_class[1] == pytest.approx(100 / 3) and per_class[2:] == [None, None]


def write_fairface(root, per_race_train=6, per_race_val=2, size=32):
    """A tiny FairFace (its CSVs and train/, val/ folders): each race's faces share a tint, so a probe can learn it."""
    from util.evaluation import FAIRFACE_CLASSES
    rng = np.random.default_rng(0)
    folder = root / "fairface"
    for split, count in (("train", per_race_train), ("val", per_race_val)):
        (folder / split).mkdir(parents=True)
        rows = ["file,age,gender,race,service_test"]
        for r, race in enumerate(FAIRFACE_CLASSES["race"]):
            tint = np.array([(37 * r) % 256, (91 * r) % 256, (151 * r) % 256])
            for k in range(count):
                name = f"{split}/{len(rows)}.jpg"
                pixels = np.clip(tint + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / name)
                gender = FAIRFACE_CLASSES["gender"][k % 2]
                rows.append(f"{name},20-29,{gender},{race},{k % 2 == 0}")
        (folder / f"fairface_label_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_fairface_probe_reports_every_class_and_the_worst(tmp_path, tiny_checkpoint, capsys):
    root = write_fairface(tmp_path / "data")
    results = probe("--protocol", "lbfgs", "--checkpoint", tiny_checkpoint, "--dataset", "fairface",
                    "--data-root", root, "--wd-steps", "2", "--wd-range", "1e-3", "1", "--max-iter", "100",
                    "--num-workers", "0", "--output", tmp_path / "fairface.json")
    saved = json.loads((tmp_path / "fairface.json").read_text())
    assert saved["num_classes"] == 7 and saved["metric"] == "mean_per_class" and saved["test_images"] == 14
    per_class = saved["test_per_class"]
    assert len(per_class) == 7 and all(value in (0.0, 50.0, 100.0) for value in per_class)  # 2 images a race
    assert saved["test"] == pytest.approx(sum(per_class) / 7) and saved["test_worst_class"] == min(per_class)
    assert results["test"] > 50  # the tints tell the races apart; chance is 14
    printed = capsys.readouterr().out
    assert "test accuracy: Latino_Hispanic" in printed and "test worst-class accuracy" in printed


def test_fairface_reads_each_attribute_from_its_csv(tmp_path):
    from util.evaluation import FairFace, open_torchvision_split
    root = write_fairface(tmp_path / "data", per_race_train=2, per_race_val=1)
    races = FairFace(str(root / "fairface"), "train", "race", None)
    assert len(races) == 14 and races.classes[3] == "East Asian" and races.targets[:4] == [0, 0, 1, 1]
    both = open_torchvision_split("fairface_race_gender", str(root), "test", None, False)
    assert len(both.classes) == 14 and both.classes[:2] == ["White Male", "White Female"]
    assert [both.classes[t] for t in both.targets][:2] == ["White Male", "Black Male"]
    image, label = both[1]
    assert image.size == (32, 32) and label == both.classes.index("Black Male")
    assert open_torchvision_split("fairface_age", str(root), "val", None, False) is None  # train holds val out


def test_fairface_damage_is_one_line_and_doubtful_data_is_noted(tmp_path, capsys):
    """Paths leaving the folder, a header-only CSV, a header lacking a column: one line each. A BOM before the header
    reads; duplicate rows are scored once, validation images also in training and absent races are noted, and the
    notes say over how many classes the figures are taken."""
    from util.evaluation import FairFace, fairface_notes, open_torchvision_split
    root = write_fairface(tmp_path / "data", per_race_train=2, per_race_val=1)
    folder = root / "fairface"
    train, val = folder / "fairface_label_train.csv", folder / "fairface_label_val.csv"
    original = train.read_text()
    for damage, message in ((lambda t: t.replace("train/1.jpg", "../../secret.jpg"), "line 2: file "
                             "'../../secret.jpg' is not a path inside"),
                            (lambda t: t.replace("train/1.jpg", "/etc/passwd"), "is not a path inside"),
                            (lambda t: t.splitlines()[0] + "\n", "has a header and no rows"),
                            (lambda t: t.replace("race,", "ethnicity,", 1), "its header lacks the column(s) race")):
        train.write_text(damage(original))
        with pytest.raises(UserError, match=re.escape(message)) as error:
            open_torchvision_split("fairface", str(root), "train", None, False)
        assert "--download" not in str(error.value) and "\n" not in str(error.value)
    lines = original.splitlines()
    train.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines + [lines[1]]).encode() + b"\n")  # a BOM, a duplicate row
    dataset = FairFace(str(folder), "train", "race", None)
    assert len(dataset) == 14 and dataset.notes == [f"{train}: 1 duplicate row(s) of a file already listed dropped "
                                                    "(the first at line 16)"]
    val_lines = [line for line in val.read_text().splitlines() if ",Indian," not in line]
    val.write_text("\n".join(val_lines + [lines[1]]) + "\n")  # no Indian face; a training image
    dataset = FairFace(str(folder), "test", "race", None)
    assert dataset.notes == [f"{val}: 1 validation image(s) are also in training (the first: train/1.jpg): the test "
                             "accuracy is not on unseen faces",
                             f"{val}: no image of Indian: the mean and the worst class are over the 6 classes it has"]
    fairface_notes(dataset)
    assert capsys.readouterr().err.count("note: ") == 2
    (folder / "fairface_label_train.csv").unlink()
    with pytest.raises(UserError, match="get it from github.com/joojs/fairface") as error:
        open_torchvision_split("fairface", str(root), "train", None, False)
    assert "--download" not in str(error.value)


@pytest.mark.parametrize("case", ["absent", "download", "unknown race"])
def test_fairface_bad_input_is_one_line(tmp_path, capsys, tiny_checkpoint, case):
    root = tmp_path / "data"
    if case == "unknown race":
        write_fairface(root, per_race_train=1, per_race_val=1)
        csv = root / "fairface" / "fairface_label_train.csv"
        csv.write_text(csv.read_text().replace("Indian", "Martian"))
    out = tmp_path / "out.json"
    argv = ["--protocol", "lbfgs", "--checkpoint", tiny_checkpoint, "--dataset", "fairface", "--data-root", root,
            "--num-workers", "0", "--output", out] + (["--download"] if case == "download" else [])
    with pytest.raises(SystemExit) as info:
        run(linear_probe.main, linear_probe.get_args_parser(), [str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert {"absent": "fairface_label_train.csv", "download": "github.com/joojs/fairface",
            "unknown race": "'Martian' is not one of FairFace's"}[case] in err
    assert not out.exists()
