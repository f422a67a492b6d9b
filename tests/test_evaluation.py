"""evaluation.py: encoder loading (every format, bad files), datasets, transforms, feature extraction and cache,
and the torch L-BFGS logistic regression against scikit-learn."""
import argparse
import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from torch.utils.data import TensorDataset

from util import evaluation as ev
from util.cli import UserError

timm = pytest.importorskip("timm")


def encoder_args(**overrides):
    return argparse.Namespace(**{"checkpoint": None, "random_init": False, "raw_pixels": False, "model": None,
                                 "image_size": None, "seed": 0, **overrides})


@pytest.fixture(scope="module")
def raw_digits():
    """Raw 8x8 pixels of the digits (64-d), standardised on train: a 1347 / 450 split."""
    data = load_digits()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1347], order[1347:]
    x_train, x_test = ev.standardise(x[train], x[test])
    return x_train, y[train], x_test, y[test]


# ---- encoder ----

def _features(model, images):
    with torch.no_grad():
        return model(images)


def test_every_checkpoint_format_loads_to_the_same_features(tmp_path, tiny_encoder, tiny_checkpoint):
    images = torch.randn(2, 3, 32, 32)
    expected = _features(tiny_encoder, images)
    state = tiny_encoder.state_dict()
    official = tmp_path / "official.pth"  # DDP-wrapped names and a Namespace of args, as the official code saves
    torch.save({"model": {f"module.visual.{k}": v for k, v in state.items()},
                "args": argparse.Namespace(model="base"), "epoch": 15}, official)
    timm_model = timm.models.vision_transformer.VisionTransformer(img_size=32, embed_dim=192, depth=2,
                                                                  num_heads=3, num_classes=7)
    timm_model.load_state_dict({**state, "head.weight": torch.zeros(7, 192), "head.bias": torch.zeros(7)})
    timm_file = tmp_path / "timm.pth"
    torch.save(timm_model.state_dict(), timm_file)
    for path, model in [(tiny_checkpoint, None), (official, "vit_tiny"), (timm_file, None)]:
        encoder, identity = ev.build_encoder(encoder_args(checkpoint=str(path), model=model), torch.device("cpu"))
        torch.testing.assert_close(_features(encoder, images), expected)
        assert identity["model"] == "vit_tiny" and identity["image_size"] == 32 and identity["depth"] == 2
        assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_random_init_is_seeded_and_needs_a_model():
    args = encoder_args(random_init=True, model="vit_tiny", image_size=32)
    first, identity = ev.build_encoder(args, torch.device("cpu"))
    second, _ = ev.build_encoder(args, torch.device("cpu"))
    torch.testing.assert_close(first.pos_embed, second.pos_embed)
    assert identity["checkpoint"] is None and identity["image_size"] == 32
    with pytest.raises(UserError, match="--random-init needs --model"):
        ev.build_encoder(encoder_args(random_init=True), torch.device("cpu"))


def test_raw_pixels_are_the_transformed_image_flattened(tmp_path):
    encoder, identity = ev.build_encoder(encoder_args(raw_pixels=True, image_size=16), torch.device("cpu"))
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(encoder(images), images.reshape(2, 3 * 16 * 16))
    assert identity == {"checkpoint": None, "raw_pixels": True, "model": "raw pixels", "image_size": 16}
    assert ev.encoder_name(identity) == "raw pixels"
    with pytest.raises(UserError, match="--raw-pixels needs --image-size"):
        ev.build_encoder(encoder_args(raw_pixels=True), torch.device("cpu"))
    args = encoder_args(raw_pixels=True, image_size=16, output=None, cache_dir=None)
    with pytest.raises(UserError, match="--raw-pixels has no checkpoint folder"):
        ev.results_path(args, "fewshot", "digits", [], {}, [])
    made = ev.made_by(encoder_args(raw_pixels=True, image_size=16), "fewshot.py", "digits", ())
    assert made["raw_pixels"] is True and "raw_pixels" not in ev.made_by(encoder_args(), "fewshot.py", "d", ())


def test_bad_checkpoints_become_one_line_user_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="does not exist"):
        ev.build_encoder(encoder_args(checkpoint=str(tmp_path / "missing.pth")), torch.device("cpu"))
    with pytest.raises(UserError, match="width 192.*not vit_small") as info:
        ev.build_encoder(encoder_args(checkpoint=tiny_checkpoint, model="vit_small"), torch.device("cpu"))
    assert "\n" not in str(info.value)


# ---- datasets and transforms ----

def test_eval_transform_is_resize_256_center_crop_224_scaled():
    from PIL import Image
    image = Image.new("L", (300, 200))
    assert ev.eval_transform(224)(image).shape == (3, 224, 224)
    assert ev.eval_transform(32)(image).shape == (3, 32, 32)
    resize = [t for t in ev.eval_transform(224).transforms if type(t).__name__ == "Resize"][0]
    assert resize.size == 256


def test_missing_or_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ev.open_image_folder(str(tmp_path / "nope"), None)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="is empty"):
        ev.open_image_folder(str(tmp_path / "empty"), None)


def test_changed_settings_name_each_non_default_value_in_order():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--base-lrs", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--no-batchnorm", dest="batchnorm", action="store_false")
    parser.add_argument("--image-size", type=int, default=None)
    dests = ("epochs", "base_lrs", "batchnorm", "image_size")
    assert ev.changed_settings(parser.parse_args([]), parser, dests) == []
    args = parser.parse_args(["--image-size", "32", "--base-lrs", "0.05", "1e-5", "--no-batchnorm", "--epochs", "90"])
    assert ev.changed_settings(args, parser, dests) == ["base-lrs-0.05,1e-05", "no-batchnorm", "image-size-32"]
    assert ev.changed_settings(args, parser, ("image_size",)) == ["image-size-32"]  # only the dests asked for


def test_absent_torchvision_dataset_is_a_user_error_without_download(tmp_path):
    with pytest.raises(UserError) as raised:
        ev.open_torchvision_split("cifar10", str(tmp_path), "train", None, download=False)
    assert str(raised.value) == (f"cifar10 train split under {tmp_path}: Dataset not found or corrupted; add "
                                 f"--download to fetch it into --data-root {tmp_path}")  # our flag, not torchvision's
    assert ev.open_torchvision_split("cifar10", str(tmp_path), "val", None, download=False) is None
    assert set(ev.TORCHVISION_DATASETS) == {"cifar10", "cifar100", "aircraft", "cars", "dtd", "flowers", "pets",
                                           "sun397", "caltech101", "food101", "voc2007", "fairface",
                                           "fairface_gender", "fairface_age", "fairface_race_gender"}


# ---- features ----

def test_extract_features_keeps_order_and_refuses_empty_splits(tiny_encoder):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    features, targets = ev.extract_features(tiny_encoder, TensorDataset(images, labels), 4, 0, torch.device("cpu"))
    torch.testing.assert_close(features, _features(tiny_encoder, images), atol=1e-5, rtol=1e-5)
    assert torch.equal(targets, labels)
    with pytest.raises(UserError, match="no images"):
        ev.extract_features(tiny_encoder, TensorDataset(images[:0], labels[:0]), 4, 0, torch.device("cpu"))


def test_feature_cache_is_reused_by_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(5, 3), torch.arange(5)

    first = ev.cached_features(str(tmp_path), {"checkpoint": "a"}, compute)
    second = ev.cached_features(str(tmp_path), {"checkpoint": "a"}, compute)
    third = ev.cached_features(str(tmp_path), {"checkpoint": "b"}, compute)
    assert (first[2], second[2], third[2]) == (False, True, False) and len(calls) == 2
    torch.testing.assert_close(first[0], second[0])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


class _Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "code-carrying pickle", "another key"])
def test_a_damaged_feature_cache_is_recomputed(tmp_path, capsys, damage):
    compute = lambda: (torch.arange(10.0).view(5, 2), torch.arange(5))  # noqa: E731
    ev.cached_features(str(tmp_path), {"checkpoint": "a"}, compute)
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".pt"]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint")
    elif damage == "code-carrying pickle":
        torch.save({"features": _Payload(), "targets": torch.arange(5)}, path)
    else:
        torch.save({"features": torch.zeros(5, 2), "targets": torch.arange(5), "key": "{}"}, path)
    features, targets, hit = ev.cached_features(str(tmp_path), {"checkpoint": "a"}, compute)
    assert not hit and torch.equal(features, torch.arange(10.0).view(5, 2))
    assert "recomputing" in capsys.readouterr().err
    assert ev.cached_features(str(tmp_path), {"checkpoint": "a"}, compute)[2]  # the rewritten file is good


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("bad", ["truncated", "not an image", "decompression bomb"])
@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_a_one_line_error_naming_it(tmp_path, tiny_encoder, bad, workers, monkeypatch):
    from PIL import Image
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / name / "ok.png")
    broken = tmp_path / "dog" / "broken.png"
    if bad == "truncated":
        Image.new("RGB", (64, 64), (200, 10, 10)).save(broken)
        broken.write_bytes(broken.read_bytes()[:74])
    elif bad == "not an image":
        broken.write_bytes(b"GIF89a but not really")
    else:  # more pixels than twice PIL's decompression-bomb limit (lowered here; forked workers inherit it)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        Image.new("RGB", (64, 64)).save(broken)
    dataset = ev.open_image_folder(str(tmp_path), ev.eval_transform(32))
    with pytest.raises(UserError) as info:
        ev.extract_features(tiny_encoder, dataset, 2, workers, torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message and "broken.png" in message and "cannot read image" in message


# ---- logistic regression ----

@pytest.mark.slow
def test_raw_pixels_give_sane_accuracy(raw_digits):
    x_train, y_train, x_test, y_test = raw_digits
    weight, bias = ev.fit_logistic_regression(x_train, y_train, 10, weight_decay=1e-2)
    accuracy = (ev.predict_logits(x_test, weight, bias).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.93  # chance is 0.10


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_lbfgs_probe_matches_scikit_learn(raw_digits, weight_decay):
    x_train, y_train, x_test, y_test = raw_digits
    weight, bias = ev.fit_logistic_regression(x_train, y_train, 10, weight_decay)
    ours = (ev.predict_logits(x_test, weight, bias).argmax(1) == y_test).float().mean().item()
    C = 1.0 / (weight_decay * len(x_train))  # scikit-learn's C multiplies a sum of losses
    reference = LogisticRegression(C=C, max_iter=5000, tol=1e-7).fit(x_train.numpy(), y_train.numpy())
    theirs = reference.score(x_test.numpy(), y_test.numpy())
    assert abs(ours - theirs) <= 0.01
    # the same optimum, not just the same accuracy (softmax logits are defined up to a per-sample constant)
    ours_logits = ev.predict_logits(x_test, weight, bias).double()
    theirs_logits = torch.tensor(reference.decision_function(x_test.numpy()))
    centred = [z - z.mean(1, keepdim=True) for z in (ours_logits, theirs_logits)]
    assert (centred[0] - centred[1]).abs().max() <= 0.05 * centred[1].abs().max()


def test_batched_problems_equal_separate_fits(raw_digits):
    x_train, y_train = raw_digits[:2]
    x, y = x_train[:200].view(4, 50, 64), y_train[:200].view(4, 50)
    weight, bias = ev.fit_logistic_regression(x, y, 10, 1.0)
    for i in range(4):
        single_w, single_b = ev.fit_logistic_regression(x[i], y[i], 10, 1.0)
        torch.testing.assert_close(weight[i], single_w, atol=2e-3, rtol=0)


def test_multilabel_targets_fit_one_vs_rest_like_scikit_learn(raw_digits):
    x_train, y_train = raw_digits[:2]
    targets = torch.stack([(y_train == 3), (y_train % 2 == 0)], dim=1).float()  # two binary labels per image
    weight, bias = ev.fit_logistic_regression(x_train, targets, 2, weight_decay=1e-2)
    for c in range(2):
        reference = LogisticRegression(C=1.0 / (1e-2 * len(x_train)), max_iter=5000, tol=1e-8)
        reference.fit(x_train.numpy(), targets[:, c].numpy())
        np.testing.assert_allclose(weight[:, c].numpy(), reference.coef_[0], atol=0.02)


def test_standardise_uses_the_statistics_of_the_first_set():
    fit, other = torch.randn(100, 4) * 3 + 5, torch.randn(10, 4)
    fit_std, other_std = ev.standardise(fit, other)
    torch.testing.assert_close(fit_std.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(other_std, (other - fit.mean(0)) / (fit.std(0) + 1e-6))


def test_eval_transform_is_the_official_probes():
    """main_linear.py's val transform: Resize(256) and CenterCrop(224) with torchvision's defaults on a PIL image
    (bilinear), then ImageNet mean/std. Ours must give the same tensor."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    official = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    torch.testing.assert_close(ev.eval_transform(224, "bilinear")(image), official(image))
