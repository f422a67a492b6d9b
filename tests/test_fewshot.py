"""fewshot.py: the paper's setting as defaults, episodes (seeded, disjoint, right classes), classifiers well above
chance, an interval that shrinks with more episodes, and one-line errors on bad input."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fewshot
from conftest import assert_one_line_error, run_python
from util import evaluation as ev
from util.cli import run


def few(*argv):
    return fewshot.main(fewshot.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def digit_features():
    """L2-normalised raw pixels of the 1797 digits (64-d) and their labels."""
    data = load_digits()
    return F.normalize(torch.tensor(data.data, dtype=torch.float32), dim=-1), torch.tensor(data.target)


def test_results_are_named_after_the_episodes_classifier_and_changed_settings(tmp_path):
    def default_output(*argv):
        args = fewshot.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "encoder.pth"), "--dataset",
                                                     "flowers", *argv])
        return os.path.basename(ev.results_path(args, "fewshot", "flowers", fewshot.result_tags(args), {}, []))

    assert default_output() == "fewshot_flowers_5way5shot_logistic.json"
    assert default_output("--classifier", "prototype", "--shots", "1") == "fewshot_flowers_5way1shot_prototype.json"
    assert default_output("--C", "0.5", "--episodes", "100", "--seed", "3", "--batch-size", "8") == \
        "fewshot_flowers_5way5shot_logistic_episodes-100_C-0.5_seed-3.json"


def test_defaults_are_the_papers_setting():
    args = fewshot.get_args_parser().parse_args(["--random-init", "--model", "vit_tiny"])
    assert (args.ways, args.shots, args.queries, args.episodes) == (5, 5, 15, 600)
    assert (args.classifier, args.C, args.split, args.seed) == ("logistic", 1.0, "test", 0)


def test_episodes_are_seeded_disjoint_and_class_pure(digit_features):
    _, labels = digit_features
    episodes = fewshot.sample_episodes(labels, 50, ways=5, shots=5, queries=15, seed=3)
    assert episodes.shape == (50, 5, 20)
    assert torch.equal(episodes, fewshot.sample_episodes(labels, 50, 5, 5, 15, seed=3))
    assert not torch.equal(episodes, fewshot.sample_episodes(labels, 50, 5, 5, 15, seed=4))
    for episode in episodes:
        assert len(episode.flatten().unique()) == 100  # support and queries never share an image
        classes = labels[episode]  # (ways, shots + queries)
        assert (classes == classes[:, :1]).all() and len(classes[:, 0].unique()) == 5


@pytest.mark.parametrize("classifier", ["logistic", "prototype"])
def test_raw_pixels_are_well_above_chance(digit_features, classifier):
    features, labels = digit_features
    episodes = fewshot.sample_episodes(labels, 100, 5, 5, 15, seed=0)
    accuracies = fewshot.episode_accuracies(features, episodes, 5, classifier, C=1.0)
    assert accuracies.shape == (100,) and accuracies.mean() > 80  # chance is 20


def test_logistic_episodes_match_scikit_learn(digit_features):
    from sklearn.linear_model import LogisticRegression
    features, labels = digit_features
    episodes = fewshot.sample_episodes(labels, 5, 5, 5, 15, seed=0)
    ours = fewshot.episode_accuracies(features, episodes, 5, "logistic", C=1.0)
    for accuracy, episode in zip(ours, episodes):
        x = features[episode]  # (ways, 20, D)
        y = torch.arange(5)[:, None].expand(5, 20)
        model = LogisticRegression(C=1.0).fit(x[:, :5].flatten(0, 1).numpy(), y[:, :5].flatten().numpy())
        theirs = 100 * model.score(x[:, 5:].flatten(0, 1).numpy(), y[:, 5:].flatten().numpy())
        assert abs(accuracy.item() - theirs) <= 1.0 * 100 / 75 + 1e-6  # at most one query of 75 flips


def test_interval_shrinks_as_episodes_grow(digit_features):
    features, labels = digit_features
    half_widths = []
    for count in (25, 100, 400):
        accuracies = fewshot.episode_accuracies(features, fewshot.sample_episodes(labels, count, 5, 1, 15, 0), 1,
                                                "prototype", C=1.0)
        mean, half_width = fewshot.mean_and_interval(accuracies)
        assert half_width == pytest.approx(1.96 * accuracies.std().item() / math.sqrt(count))
        half_widths.append(half_width)
    assert half_widths[0] > half_widths[1] > half_widths[2]


@pytest.mark.slow
def test_script_on_digit_folder_same_episodes_for_two_encoders(tmp_path, digit_folders, tiny_checkpoint):
    common = ["--data-dir", digit_folders[1], "--episodes", 40, "--num-workers", 0]
    trained = few("--checkpoint", tiny_checkpoint, *common, "--output", tmp_path / "a.json")
    random = few("--random-init", "--model", "vit_tiny", "--image-size", 32, *common, "--output", tmp_path / "b.json")
    for results in (trained, random):
        assert results["accuracy"] > 40 and 0 < results["ci95"] < 10  # chance is 20
        assert len(results["episode_accuracies"]) == 40
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["protocol"] == "5-way 5-shot" and saved["encoder"]["checkpoint"] == tiny_checkpoint
    assert saved["accuracy"] == trained["accuracy"] and not saved["feature_cache"]["hit"]
    again = few("--checkpoint", tiny_checkpoint, *common, "--output", tmp_path / "a.json")
    assert again["feature_cache"]["hit"] and again["episode_accuracies"] == trained["episode_accuracies"]


# ---- bad input: one line on stderr, exit code 2, no results file ----

@pytest.mark.slow
def test_class_too_small_for_an_episode_is_named_subprocess(tmp_path, digit_folders, tiny_checkpoint):
    out = tmp_path / "fewshot.json"
    result = run_python("fewshot.py", "--checkpoint", tiny_checkpoint, "--data-dir", digit_folders[1],
                        "--shots", 40, "--num-workers", 0, "--output", out)
    assert_one_line_error(result, "fewer than 40 shots + 15 queries = 55 images: 'eight' (44)")
    assert result.stderr.startswith("fewshot.py: error: ")
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing checkpoint", "missing folder", "other architecture", "too many ways",
                                  "both data sources", "no data", "C nan", "ways 1", "episodes 0", "seed 2**64"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, digit_folders, tiny_checkpoint, case):
    data = ["--data-dir", digit_folders[1]]
    checkpoint = ["--checkpoint", tiny_checkpoint]
    argv = {"missing checkpoint": ["--checkpoint", tmp_path / "nope.pth", *data],
            "missing folder": [*checkpoint, "--data-dir", tmp_path / "nope"],
            "other architecture": [*checkpoint, "--model", "vit_large", *data],
            "too many ways": [*checkpoint, *data, "--ways", 11],
            "both data sources": [*checkpoint, *data, "--dataset", "cifar10"],
            "no data": checkpoint,
            "C nan": [*checkpoint, *data, "--C", "nan"],
            "ways 1": [*checkpoint, *data, "--ways", "1"],
            "episodes 0": [*checkpoint, *data, "--episodes", "0"],
            "seed 2**64": [*checkpoint, *data, "--seed", 2 ** 64]}[case]
    out = tmp_path / "results" / "fewshot.json"
    with pytest.raises(SystemExit) as info:
        run(fewshot.main, fewshot.get_args_parser(), [str(a) for a in argv] + ["--num-workers", "0",
                                                                                "--output", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewshot.py: error: "), err
    assert not (tmp_path / "results").exists()
