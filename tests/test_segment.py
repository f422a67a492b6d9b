"""segment.py: the BEiT/MAE recipe as defaults, the network's shapes and parameter groups, the metrics against
hand-computed values (a perfect segmenter scores mIoU 100, a constant one its class's share), training end to end on
a tiny ADEChallengeData2016 with an exact resume, every checkpoint kind, and one-line errors on bad input."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import model as model_lib
import segment
from conftest import run_python
from util import checkpoints
from util.cli import run

# the fixture's classes (ADE's labels: 0 "other" is ignored) and the colour each is painted with
PALETTE = {0: (128, 128, 128), 1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 7: (255, 255, 0)}
CROP = 32  # the tests' crop and window: fixture images are 32 x 48, so the 2048 x 512 box (128 x 32) keeps them


def label_map(index, height=32, width=48):
    """Blocks of 8 x 8 pixels (JPEG's block, so colours stay clean) with classes drawn from PALETTE."""
    rng = np.random.default_rng(index)
    blocks = rng.choice(list(PALETTE), size=(height // 8, width // 8), p=[0.1, 0.4, 0.25, 0.15, 0.1])
    return np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)


def write_ade20k(root, train=4, val=3):
    """A tiny ADEChallengeData2016: images/{training,validation}/*.jpg painted by class, annotations/*.png."""
    for split, count, offset in (("training", train, 0), ("validation", val, 100)):
        for kind in ("images", "annotations"):
            os.makedirs(os.path.join(root, kind, split), exist_ok=True)
        for i in range(count):
            labels = label_map(offset + i)
            pixels = np.array([PALETTE[c] for c in labels.flatten()], dtype=np.uint8).reshape(*labels.shape, 3)
            name = f"ADE_{split[:5]}_{offset + i:08d}"
            Image.fromarray(pixels).save(os.path.join(root, "images", split, name + ".jpg"), quality=100,
                                         subsampling=0)
            Image.fromarray(labels).save(os.path.join(root, "annotations", split, name + ".png"))
    with open(os.path.join(root, "objectInfo150.txt"), "w") as f:
        f.write("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding;edifice\n")
    return str(root)


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return write_ade20k(tmp_path_factory.mktemp("ADEChallengeData2016"))


def parse(*argv):
    return segment.get_args_parser().parse_args([str(a) for a in argv])


def test_defaults_are_the_recipe():
    args = parse("--random-init")
    assert (args.iterations, args.batch_size, args.crop_size, args.warmup_iterations) == (160000, 16, 512, 1500)
    assert (args.lr, args.layer_decay, args.weight_decay, args.betas) == (1e-4, 0.65, 0.05, (0.9, 0.999))
    assert (args.drop_path, args.aux_weight, args.test_scales, args.flip, args.rel_pos_bias) == (0.1, 0.4, [1.0],
                                                                                                 False, False)
    assert round(args.crop_size * 2 / 3) == 341  # the default stride
    assert segment.default_taps(12) == [3, 5, 7, 11] and segment.default_taps(24) == [7, 11, 15, 23]
    assert segment.MULTI_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


# ---- the network ----

def tiny_segmenter(rel_pos_bias=False, depth=2, image_size=64):
    torch.manual_seed(0)
    encoder = model_lib.build_vit("vit_tiny", image_size=image_size, depth=depth)
    return segment.Segmenter(encoder, segment.default_taps(depth), 150, 32, 0.1, rel_pos_bias)


def test_pyramid_is_a_quarter_to_a_thirty_second_and_logits_come_back_at_input_size():
    model = tiny_segmenter().eval()
    images = torch.randn(2, 3, 64, 64)
    levels = model.neck(model.backbone(images))
    assert [level.shape[2] for level in levels] == [16, 8, 4, 2]  # 1/4, 1/8, 1/16, 1/32 of 64
    assert model(images).shape == (2, 150, 64, 64)
    model.train()
    logits, aux = model(images)
    assert logits.shape == aux.shape == (2, 150, 64, 64)


def test_relative_position_bias_has_one_entry_per_offset_and_starts_at_zero():
    bias = segment.RelativePositionBias(grid=3, heads=2)
    assert bias.table.shape == ((2 * 3 - 1) ** 2 + 3, 2) and bias.index.unique().numel() == 28
    # the same 2-d offset between two patches reads the same entry: patch (0, 0) -> (1, 1) and (1, 1) -> (2, 2)
    assert bias.index[1 + 0, 1 + 4] == bias.index[1 + 4, 1 + 8] != bias.index[1 + 4, 1 + 0]
    with torch.no_grad():  # zero-initialised: the network computes what it computes without the bias
        plain, biased = tiny_segmenter(False).eval(), tiny_segmenter(True).eval()
        biased.load_state_dict(plain.state_dict(), strict=False)
        images = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(biased(images), plain(images))


def test_layer_decay_gives_each_block_its_scale_and_spares_norms_from_weight_decay():
    model = tiny_segmenter(rel_pos_bias=True)
    groups = segment.param_groups(model, 0.05, 0.5)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert scale["backbone.encoder.patch_embed.proj.weight"] == scale["backbone.encoder.pos_embed"] == 0.5 ** 3
    assert scale["backbone.encoder.blocks.0.attn.qkv.weight"] == scale["backbone.rel_pos.0.table"] == 0.5 ** 2
    assert scale["backbone.encoder.blocks.1.mlp.fc2.weight"] == 0.5
    assert scale["decode_head.classify.1.weight"] == scale["neck.up2.weight"] == 1.0
    assert decay["backbone.encoder.blocks.0.attn.qkv.weight"] == decay["decode_head.fuse.0.weight"] == 0.05
    for name in ("backbone.encoder.blocks.0.norm1.weight", "backbone.encoder.blocks.0.attn.qkv.bias",
                 "backbone.encoder.cls_token", "backbone.encoder.pos_embed", "backbone.rel_pos.1.table",
                 "decode_head.fuse.1.weight"):
        assert decay[name] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_schedule_warms_up_linearly_then_decays_to_zero():
    assert segment.poly_lr(0, 100, 10, 1.0) == pytest.approx(1e-6)
    assert segment.poly_lr(5, 100, 10, 1.0) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert segment.poly_lr(10, 100, 10, 1.0) == 1.0
    assert segment.poly_lr(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert segment.poly_lr(100, 100, 10, 1.0) == 0.0


# ---- metrics ----

def test_miou_and_pixel_accuracy_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 2, segment.IGNORE]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 3]])
    scores = segment.summarise(*segment.area_counts(prediction, labels, 5), [f"c{i}" for i in range(5)])
    # class 0: intersection 1, union 3 (two labelled + one more predicted); class 1: 2 / 3; class 2: 2 / 3;
    # class 3: predicted only on the ignored pixel, which does not count: absent like class 4 (NaN, left out)
    assert scores["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert scores["aAcc"] == pytest.approx(100 * 5 / 7)
    assert scores["mAcc"] == pytest.approx(100 * (1 / 2 + 2 / 2 + 2 / 3) / 3)
    assert scores["per_class_iou"]["c3"] is None and scores["per_class_iou"]["c0"] == pytest.approx(100 / 3)


def test_sliding_windows_cover_the_image_and_average_overlaps():
    def predict(windows):  # pixelwise: any tiling gives the same answer where windows overlap
        return torch.cat([windows, -windows], dim=1)

    image = torch.randn(3, 40, 70)
    out = segment.slide_logits(predict, image, crop_size=32, stride=21, num_classes=6)
    torch.testing.assert_close(out, torch.cat([image, -image]))
    small = torch.randn(3, 20, 25)  # smaller than a window: padded, then cropped back
    torch.testing.assert_close(segment.slide_logits(predict, small, 32, 21, 6), torch.cat([small, -small]))


def palette_predictor():
    """A perfect segmenter of the fixture: each pixel gets the class whose (normalised) colour is nearest."""
    colours = segment.normalise(torch.tensor([PALETTE[c] for c in PALETTE if c], dtype=torch.float).T[:, :, None]
                                / 255)[:, :, 0].T  # (classes, 3)
    classes = [c - 1 for c in PALETTE if c]  # ADE label k is class k - 1

    def predict(windows):
        distance = ((windows[:, None] - colours[None, :, :, None, None]) ** 2).sum(2)  # (B, classes, S, S)
        logits = torch.full((len(windows), 150, *windows.shape[2:]), -1e4)
        logits[:, classes] = -distance
        return logits
    return predict


def labelled_pixels(ade):
    labels = np.concatenate([np.array(Image.open(p)).flatten() for _, p in segment.list_split(ade, "val")])
    return labels[labels > 0]


def test_a_perfect_segmenter_scores_100_and_a_constant_one_its_class_share(ade):
    val = segment.ValImages(segment.list_split(ade, "val"))
    names = segment.class_names(ade)
    assert names[:3] == ["wall", "building", "class_3"]
    device = torch.device("cpu")
    perfect = segment.evaluate(palette_predictor(), val, names, CROP, 21, [1.0], False, device)
    assert perfect["mIoU"] == pytest.approx(100) and perfect["aAcc"] == pytest.approx(100)
    assert perfect["per_class_iou"]["wall"] == pytest.approx(100) and perfect["per_class_iou"]["class_5"] is None
    flipped = segment.evaluate(palette_predictor(), val, names, CROP, 21, [0.5, 1.0, 1.5], True, device)
    assert flipped["aAcc"] > 95  # rescaled views blur the block edges a little

    def constant(windows):  # always ADE label 2 (class index 1)
        logits = torch.zeros(len(windows), 150, *windows.shape[2:])
        logits[:, 1] = 1
        return logits
    scores = segment.evaluate(constant, val, names, CROP, 21, [1.0], False, device)
    labels = labelled_pixels(ade)
    share = (labels == 2).mean()
    assert scores["aAcc"] == pytest.approx(100 * share)
    assert scores["mIoU"] == pytest.approx(100 * share / len(np.unique(labels)))  # its IoU; 0 for the others


def test_training_crops_are_the_crop_size_padded_with_ignore_and_a_function_of_their_seed(ade):
    crops = segment.TrainCrops(segment.list_split(ade, "train"), crop_size=64)
    image, labels = crops[(0, 7)]
    assert image.shape == (3, 64, 64) and labels.shape == (64, 64)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 6, segment.IGNORE}  # ADE 1, 2, 3, 7 -> 0, 1, 2, 6
    again, same_labels = crops[(0, 7)]
    torch.testing.assert_close(again, image)
    assert torch.equal(same_labels, labels)
    other, _ = crops[(0, 8)]
    assert not torch.equal(other, image)


# ---- end to end ----

def train_argv(ade, output, checkpoint, *extra):
    return ["--checkpoint", checkpoint, "--data", ade, "--output", output, "--crop-size", CROP, "--batch-size", 2,
            "--iterations", 4, "--warmup-iterations", 1, "--save-every", 2, "--keep", 3, "--eval-every", 3,
            "--num-workers", 0, "--log-every", 1, "--no-tensorboard", "--lr", "1e-3", *extra]


@pytest.mark.slow
def test_two_cpu_processes_report_the_number_of_the_checkpoint_they_save(tmp_path, ade, tiny_checkpoint):
    """On CPU processes (gloo: no SyncBatchNorm) each rank's BatchNorm statistics drift apart; they are averaged
    before saving and evaluating, so results.json's mIoU is what the saved checkpoint scores in one process."""
    argv = [str(a) for a in train_argv(ade, tmp_path / "run", tiny_checkpoint, "--batch-size", 4, "--eval-every", 4)]
    result = run_python("-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "segment.py", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads((tmp_path / "run" / "results.json").read_text())
    state = torch.load(tmp_path / "run" / "checkpoint-00000004.pth", weights_only=True)
    args = parse(*argv)
    encoder = checkpoints.load_encoder(tiny_checkpoint, image_size=args.crop_size)
    model = segment.build_segmenter(args, encoder)
    model.load_state_dict(state["model"])
    names = segment.class_names(ade)
    scores = segment.evaluate(model.eval(), segment.ValImages(segment.list_split(ade, "val")), names, args.crop_size,
                              round(args.crop_size * 2 / 3), args.test_scales, args.flip, torch.device("cpu"))
    assert scores["mIoU"] == pytest.approx(reported["mIoU"], abs=1e-9)
    assert scores["aAcc"] == pytest.approx(reported["aAcc"], abs=1e-9)


@pytest.mark.slow
def test_trains_end_to_end_and_a_resumed_run_ends_with_the_same_weights(tmp_path, ade, tiny_checkpoint):
    encoder_file = tmp_path / "encoder.pth"  # the run's own copy: the resume below must not need it
    shutil.copy(tiny_checkpoint, encoder_file)
    results = segment.main(parse(*train_argv(ade, tmp_path / "full", encoder_file)))
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["iterations"] == 4 and [e["iteration"] for e in saved["evaluations"]] == [3, 4]
    assert 0 <= saved["mIoU"] <= 100 and saved["mIoU"] == results["mIoU"]
    assert saved["encoder"]["checkpoint"] == str(encoder_file) and saved["data"]["val_images"] == 3
    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    checkpoints = sorted(os.listdir(tmp_path / "full"))
    assert [c for c in checkpoints if c.startswith("checkpoint")] == ["checkpoint-00000002.pth",
                                                                      "checkpoint-00000004.pth"]
    # a run stopped after iteration 2, resumed with no flag but --output: its own settings (--save-every 2, --keep 3,
    # --eval-every 3), the same crops, drop paths and dropouts, so the same weights and the same evaluations; the
    # encoder file it started from is gone (the checkpoint holds every weight)
    encoder_file.unlink()
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-00000002.pth", tmp_path / "resumed")
    args = parse("--output", tmp_path / "resumed", "--resume")
    args.flags_given = ["output", "resume"]
    segment.main(args)
    assert args.eval_every == 3 and args.save_every == 2 and args.keep == 3 and args.num_workers == 0
    full = torch.load(tmp_path / "full" / "checkpoint-00000004.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoint-00000004.pth", weights_only=True)["model"]
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)
    assert os.path.exists(tmp_path / "resumed" / "checkpoint-00000002.pth")  # --keep 3 kept it
    again = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert again["evaluations"] == saved["evaluations"] and again["mIoU"] == saved["mIoU"]
    # killed after its last checkpoint, before results.json: the resume writes it from the checkpoint
    (tmp_path / "resumed" / "results.json").unlink()
    args = parse("--output", tmp_path / "resumed", "--resume")
    args.flags_given = ["output", "resume"]
    segment.main(args)
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["evaluations"] == saved["evaluations"]
    segment.main(args)  # and then there is nothing left to do


def test_damaged_recorded_settings_of_a_segmentation_checkpoint_are_one_line(tmp_path, ade, tiny_checkpoint):
    """Every recorded setting goes through the flag's own type and range, as typed ones do."""
    argv = [str(a) for a in train_argv(ade, tmp_path / "run", tiny_checkpoint)]
    recorded = vars(parse(*argv))
    for key, value, fragment in (("batch_size", 0, "--batch-size 0"), ("iterations", "many", "--iterations 'many'"),
                                 ("crop_size", -16, "--crop-size -16"), ("lr", float("nan"), "--lr nan")):
        (tmp_path / "run").mkdir(exist_ok=True)
        torch.save({"model": {}, "optimizer": {}, "iteration": 2, "args": {**recorded, key: value},
                    "rng": {"torch": torch.get_rng_state()}}, tmp_path / "run" / "checkpoint-00000002.pth")
        args = parse("--output", tmp_path / "run", "--resume")
        args.flags_given = ["output", "resume"]
        with pytest.raises(segment.UserError, match="cannot be resumed") as raised:
            segment.main(args)
        assert fragment in str(raised.value)


def test_a_preemption_signal_saves_at_the_next_iteration_and_stops_with_one_line(tmp_path, ade, tiny_checkpoint,
                                                                                monkeypatch, capsys):
    """SIGUSR1 (SLURM's warning) or SIGTERM during iteration 1: checkpoint 1 although --save-every is 2, exit 130."""
    import signal
    schedule = segment.poly_lr

    def preempted(iteration, *rest):
        if iteration == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return schedule(iteration, *rest)

    monkeypatch.setattr(segment, "poly_lr", preempted)
    with pytest.raises(SystemExit) as stop:
        segment.main(parse(*train_argv(ade, tmp_path / "run", tiny_checkpoint)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 130 and lines[-1].startswith("segment.py: SIGUSR1 at iteration 1: saved "), lines
    assert sorted(os.listdir(tmp_path / "run")).count("checkpoint-00000001.pth") == 1


def test_images_of_extreme_aspect_are_cropped_and_scored(tmp_path):
    """A 1 x 2000 (or 2000 x 1) image rescaled by a factor that rounds a side to 0 pixels: kept at 1."""
    for height, width in ((1, 2000), (2000, 1)):
        folder = tmp_path / f"{height}x{width}"
        folder.mkdir()
        Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(folder / "a.jpg")
        Image.fromarray(np.ones((height, width), dtype=np.uint8)).save(folder / "a.png")
        image, labels = segment.TrainCrops([(str(folder / "a.jpg"), str(folder / "a.png"))], 32)[(0, 0)]
        assert image.shape == (3, 32, 32) and labels.shape == (32, 32)
        scaled, _ = segment.rescale(torch.zeros(3, height, width), None, 0.01)
        assert min(scaled.shape[1:]) == 1


def test_every_checkpoint_kind_loads(tmp_path, tiny_encoder):
    """Ours (pretrain.py's and encoder.pth), the official code's (DDP names, Namespace args) and a timm state dict."""
    state = tiny_encoder.state_dict()
    kinds = {"pretrain": {"model": {f"visual.{k}": v for k, v in state.items()}, "args": {"model": "vit_tiny"}},
             "encoder": {"model": state, "config": {"model": "vit_tiny", "image_size": 32}},
             "official": {"model": {f"module.visual.{k}": v for k, v in state.items()},
                          "args": argparse.Namespace(model="base"), "epoch": 15},
             "timm": state}
    from util import evaluation as ev
    for kind, content in kinds.items():
        path = tmp_path / f"{kind}.pth"
        torch.save(content, path)
        encoder_args = argparse.Namespace(checkpoint=str(path), random_init=False, raw_pixels=False, model=None,
                                          image_size=64, seed=0)
        encoder, identity = ev.build_encoder(encoder_args, torch.device("cpu"))
        assert identity["model"] == "vit_tiny" and encoder.patch_embed.grid_size == 4  # interpolated to 64 px
        torch.testing.assert_close(encoder.blocks[1].mlp.fc1.weight, state["blocks.1.mlp.fc1.weight"])
        model = segment.build_segmenter(parse("--random-init"), encoder).eval()
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 150, 64, 64)


# ---- bad input: one line, exit code 2, nothing written ----

@pytest.mark.parametrize("case", ["no data", "not ade", "no annotation", "no checkpoint", "random init no output",
                                  "taps past the depth", "crop not 16", "batch 1", "existing run",
                                  "unreadable images", "unreadable validation images", "output inside data",
                                  "1 image per cpu process"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, ade, tiny_checkpoint, case, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    broken = shutil.copytree(ade, inputs / "broken")
    os.remove(next((broken / "annotations" / "training").iterdir()))
    damaged = shutil.copytree(ade, inputs / "damaged")
    for image in (damaged / "images" / "training").iterdir():
        image.write_bytes(image.read_bytes()[:20])  # found only when the first batch is read
    damaged_val = shutil.copytree(ade, inputs / "damaged_val")
    next((damaged_val / "images" / "validation").iterdir()).write_bytes(b"not a jpeg")  # scored only at evaluation
    inside = shutil.copytree(ade, inputs / "inside")
    (inputs / "run").mkdir()
    (inputs / "run" / "checkpoint-00000002.pth").write_bytes(b"")
    out = tmp_path / "out"
    base = ["--checkpoint", tiny_checkpoint, "--data", ade, "--output", out, "--crop-size", CROP]
    argv, message = {
        "no data": (["--checkpoint", tiny_checkpoint, "--data", inputs / "nope", "--output", out], "not a folder"),
        "not ade": (["--checkpoint", tiny_checkpoint, "--data", inputs, "--output", out], "no folder"),
        "no annotation": (["--checkpoint", tiny_checkpoint, "--data", broken, "--output", out], "no annotation"),
        "no checkpoint": (["--data", ade, "--output", out], "give --checkpoint"),
        "random init no output": (["--random-init", "--model", "vit_tiny", "--data", ade], "pass --output"),
        "taps past the depth": (base + ["--taps", "0", "1", "1", "2"], "the encoder has 2 blocks"),
        "crop not 16": (base[:-1] + ["40"], "not a multiple of the patch size"),
        "batch 1": (base + ["--batch-size", "1"], "--batch-size: must be >= 2"),
        "existing run": (["--checkpoint", tiny_checkpoint, "--data", ade, "--output", inputs / "run"],
                         "already holds checkpoints"),
        "unreadable images": (["--checkpoint", tiny_checkpoint, "--data", damaged, "--output", out, "--crop-size",
                               CROP, "--num-workers", "0"], "training"),
        "unreadable validation images": (["--checkpoint", tiny_checkpoint, "--data", damaged_val, "--output", out,
                                          "--crop-size", CROP, "--num-workers", "0"], "validation"),
        "output inside data": (["--checkpoint", tiny_checkpoint, "--data", inside, "--output", inside / "run",
                                "--crop-size", CROP], "is inside --data"),
        "1 image per cpu process": (base + ["--batch-size", "2"], "is 1 image each"),
    }[case]
    if case == "1 image per cpu process":  # as under torchrun with 2 gloo processes
        monkeypatch.setattr(segment.distributed, "world_size", lambda: 2)
    with pytest.raises(SystemExit) as info:
        run(segment.main, segment.get_args_parser(), [str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("segment.py: error: ") and message in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["inputs"]
    assert not (inputs / "broken" / "segment_ade20k").exists()
