"""data.py and augment.py: deterministic items, the per-rank caption sampler, batch labels; the augmentation's
parameters, ops and statistics against the official pipeline, the batched (--gpu-augment) path, downsampling; the
loader's workers; streamed shards (each caption once an epoch, exact resume from a position, bounded members)."""
import copy
import io
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter, ImageOps

import augment
import data
from augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorParams,
    PILDownAndUp,
    PretrainAugmentation,
    View,
    augment_crops,
    down_and_up,
    official_augmentation,
    sample_color_params,
)
from conftest import write_random_shards, write_random_tree
from data import CaptionImagesDataset, CaptionSampler, LocalCrops, collate
from families import byol, dino, mae
from util.jpeg import decode_crops


def test_an_item_is_a_function_of_epoch_and_index(random_tree):
    dataset = CaptionImagesDataset([random_tree], 3, 2, 32, seed=5)
    first, again, other_epoch = dataset[(1, 4)], dataset[(1, 4)], dataset[(2, 4)]
    assert first.images.shape == (6, 3, 32, 32) and first.label == 4
    assert len(set(first.image_indices.tolist())) == 3  # drawn without replacement
    torch.testing.assert_close(first.images, again.images)
    assert not torch.equal(first.images, other_epoch.images)
    state = torch.get_rng_state()
    dataset[(0, 0)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched


def test_sampler_splits_each_epoch_across_ranks_and_resumes_mid_epoch():
    samplers = [CaptionSampler(23, 5, rank, 2, seed=1) for rank in range(2)]
    assert samplers[0].steps_per_epoch == 2  # ceil(23 / 2 ranks) // 5; the rest of the epoch is dropped
    for sampler in samplers:
        sampler.set_epoch(3)
    batches = [list(sampler) for sampler in samplers]
    keys = [key for rank_batches in batches for batch in rank_batches for key in batch]
    assert len(keys) == 20 and len({index for _, index in keys}) == 20 and {e for e, _ in keys} == {3}
    samplers[0].set_epoch(3, start_step=1)
    assert list(samplers[0]) == batches[0][1:] and len(samplers[0]) == 1
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != batches[0]  # a fresh order every epoch


@pytest.mark.parametrize("captions", [19, 20, 21, 37, 38, 39, 40, 41, 59, 61])
def test_sampler_deals_each_rank_the_official_distributed_samplers_batches(captions):
    """The official loader: DistributedSampler(shuffle, seed) padded to a multiple of the ranks, then batches of
    `captions_per_gpu` with the last partial one dropped. Around multiples of 5 captions x 4 ranks the step count
    differs from captions // 20 (39 captions: 2 steps, the second repeating the permutation's first caption)."""
    from torch.utils.data import BatchSampler, DistributedSampler
    ranks, per_gpu, seed, epoch = 4, 5, 7, 3
    for rank in range(ranks):
        official = DistributedSampler(range(captions), num_replicas=ranks, rank=rank, shuffle=True, seed=seed)
        official.set_epoch(epoch)
        ours = CaptionSampler(captions, per_gpu, rank, ranks, seed)
        ours.set_epoch(epoch)
        expected = list(BatchSampler(official, per_gpu, drop_last=True))
        assert ours.steps_per_epoch == len(expected) == -(-captions // ranks) // per_gpu
        assert [[index for _, index in batch] for batch in ours] == expected
    if captions == 39:
        assert CaptionSampler(captions, per_gpu, 0, ranks, seed).padding == 1


def test_collate_labels_for_both_kinds_of_positives(random_tree):
    dataset = CaptionImagesDataset([random_tree], 2, 2, 32)
    batch = collate([dataset[(0, i)] for i in (3, 7)])
    assert batch["images"].shape == (8, 3, 32, 32)
    assert batch["image_labels"].tolist() == [3, 3, 3, 3, 7, 7, 7, 7]  # StableRep: the caption
    crop = batch["crop_labels"].tolist()  # SimCLR: crops of one image
    assert crop[0] == crop[1] != crop[2] == crop[3] and len(set(crop)) == 4
    assert batch["caption_labels"].tolist() == [3, 7] and batch["tokens"] is None


def test_labels_run_across_several_sources(random_tree, random_shards):
    dataset = CaptionImagesDataset([random_tree, random_shards], 1, 1, 32)
    assert len(dataset) == 24 and dataset[(0, 20)].label == 20


# ---- the augmentation (augment.py) ----

def colour_sources(size=96):
    """Two images of one hue each (orange, blue; saturation 0.7) whose value ramps across the image plus
    per-pixel noise: hue jitter shows as a hue shift, blur as lost noise, the crop as the part of the ramp kept."""
    rng = np.random.default_rng(0)
    images = []
    for hue, axis in ((0.05, 1), (0.6, 0)):
        ramp = np.expand_dims(np.linspace(0.25, 0.75, size), 1 - axis)
        value = np.clip(ramp + 0.15 * rng.uniform(-1, 1, (size, size)), 0, 1)
        hsv = np.stack([np.full((size, size), hue), np.full((size, size), 0.7), value], -1)
        images.append(np.array(Image.fromarray((hsv * 255).round().astype(np.uint8), "HSV").convert("RGB")))
    return images, (0.05, 0.6)


def hue_and_chroma(x):
    """HSV hue (turns) and chroma of RGB images [n, 3, S, S] in [0, 1], written out independently of augment.py."""
    top, chroma = x.amax(1), x.amax(1) - x.amin(1)
    r, g, b, safe = *x.unbind(1), chroma.clamp_min(1e-6)
    hue = torch.where(top == r, (g - b) / safe, torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (hue / 6) % 1, chroma


def augmentation_statistics(outputs, source_hues):
    """Statistics of normalised outputs [n, 3, S, S] (rounded to 8 bits, as the official pipeline's are)."""
    x = outputs * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    x = (x.clamp(0, 1) * 255).round() / 255
    means = x.mean((2, 3))  # [n, 3]
    gray = (x.amax(1) - x.amin(1)).amax((1, 2)) < 1e-3
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)  # [n, S, S]
    laplacian = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2]
                 - luma[:, 1:-1, 2:]).abs().mean((1, 2))
    # solarisation leaves no level at or above 128 (ours computes in float: up to 127.99, rounded to 128 here)
    bright = (x.amax((1, 2, 3)) >= 129 / 255).float().mean()
    hue, chroma = hue_and_chroma(x)
    shift = (hue - source_hues.view(-1, 1, 1) + 0.5) % 1 - 0.5  # [n, S, S] in turns
    shift = torch.where(chroma > 0.05, shift, torch.nan).flatten(1).nanmedian(1).values  # per image
    shift = shift[~gray & ~shift.isnan()]  # images with colour left
    return {"mean R": means[:, 0].mean(), "mean G": means[:, 1].mean(), "mean B": means[:, 2].mean(),
            "spread of image means": means.std(0).mean(), "within-image spread": x.std((2, 3)).mean(),
            "grayscale fraction": gray.float().mean(), "mean |hue shift|": shift.abs().mean(),
            "hue shift spread": shift.std(),
            # blur: the blurred half of the images sits in the lower quantiles of fine detail / contrast
            "detail q25": (laplacian / luma.std((1, 2)).clamp_min(1e-6)).quantile(0.25), "bright fraction": bright}


# differences allowed between our pipeline and the official one: absolute for the means and the grayscale
# fraction, relative for the rest. Dropping or doubling the blur, the hue jitter or the grayscale moves the
# statistic it governs 2-20 times further than this (checked by breaking the pipeline)
TOLERANCES = {"mean R": 0.02, "mean G": 0.02, "mean B": 0.02, "spread of image means": 0.06,
              "within-image spread": 0.06, "grayscale fraction": 0.04, "mean |hue shift|": 0.15,
              "hue shift spread": 0.15, "detail q25": 0.25}
RELATIVE = {"spread of image means", "within-image spread", "mean |hue shift|", "hue shift spread", "detail q25"}


def both_statistics(official, ours, count):
    """augmentation_statistics of `count` crops of the official pipeline (PIL images) and of ours (uint8 tensors),
    from colour_sources' two images in turn; (official's, ours)."""
    images, hues = colour_sources()
    source_hues = torch.tensor([hues[i % 2] for i in range(count)])
    torch.manual_seed(0)
    theirs = torch.stack([official(Image.fromarray(images[i % 2])) for i in range(count)])
    torch.manual_seed(1)
    mine = torch.stack([ours(torch.from_numpy(images[i % 2])) for i in range(count)])
    return augmentation_statistics(theirs, source_hues), augmentation_statistics(mine, source_hues)


@pytest.mark.slow
def test_augmentation_has_the_official_pipelines_statistics():
    """1500 crops of each pipeline (64 px from 96 px images): the same colour, grayscale, hue, blur and crop
    statistics as the official pipeline (PIL, torchvision v1, PIL's blur), within TOLERANCES."""
    expected, measured = both_statistics(official_augmentation(64), PretrainAugmentation(64), 1500)
    for name, tolerance in TOLERANCES.items():
        difference = abs(measured[name] - expected[name]) / (abs(expected[name]) if name in RELATIVE else 1)
        assert difference <= tolerance, f"{name}: ours {measured[name]:.4f}, official {expected[name]:.4f}"


@pytest.mark.slow
def test_parameters_follow_the_recipe():
    torch.manual_seed(0)
    params = ColorParams.cat([sample_color_params() for _ in range(20000)])
    for flag, p in ((params.jitter, 0.8), (params.gray, 0.2), (params.sigma > 0, 0.5), (params.flip, 0.5)):
        assert abs(flag.float().mean().item() - p) < 0.015
    brightness_contrast_saturation, hue = params.factors[:, :3], params.factors[:, 3]
    assert 0.6 <= brightness_contrast_saturation.min() and brightness_contrast_saturation.max() <= 1.4
    assert -0.1 <= hue.min() and hue.max() <= 0.1 and abs(hue.mean()) < 0.005
    torch.testing.assert_close(brightness_contrast_saturation.mean(0), torch.ones(3), atol=0.01, rtol=0)
    sigma = params.sigma[params.sigma > 0]
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02
    orders, counts = params.order.unique(dim=0, return_counts=True)  # every order of the four ops, equally often
    assert len(orders) == 24 and (counts.float() / 20000 - 1 / 24).abs().max() < 0.01
    out = PretrainAugmentation(224)(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_crops_cut_the_box_torchvision_draws():
    """A crop of an image whose red and green encode x and y shows the box RandomResizedCrop.get_params drew."""
    height, width = 90, 120
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = torch.from_numpy(np.stack([xs * 2, ys * 2, np.zeros_like(xs)], -1).astype(np.uint8))
    augment = PretrainAugmentation(48, crop_scale=(0.1, 0.9))
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, box_height, box_width = T.RandomResizedCrop.get_params(pixels.permute(2, 0, 1), (0.1, 0.9),
                                                                         (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        crop = augment.crop(pixels)[0].float()  # [48, 48, 3]: red = 2 x, green = 2 y, resampled
        assert abs(crop[..., 0].min() / 2 - left) <= 1 and abs(crop[..., 0].max() / 2 - (left + box_width - 1)) <= 1
        assert abs(crop[..., 1].min() / 2 - top) <= 1 and abs(crop[..., 1].max() / 2 - (top + box_height - 1)) <= 1


def test_colour_ops_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 10)
    x[0, :, 0, :8] = torch.tensor([[1, 0, 0], [1, 1, 0], [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [0.8, 0.8, 0.2],
                                   [0.2, 0.8, 0.8], [0.9, 0.1, 0.9]]).t()  # primaries, greys, ties in the max
    factors, shifts = torch.tensor([0.6, 0.9, 1.2, 1.4]), torch.tensor([-0.1, -0.03, 0.05, 0.1])
    for i in range(4):
        one = x[i:i + 1]
        torch.testing.assert_close(augment.adjust_brightness(one.clone(), factors[i:i + 1])[0],
                                   TF.adjust_brightness(x[i], factors[i].item()), atol=1e-6, rtol=0)
        torch.testing.assert_close(augment.adjust_contrast(one.clone(), factors[i:i + 1])[0],  # torchvision's
                                   TF.adjust_contrast(x[i], factors[i].item()), atol=1e-4, rtol=0)  # red 0.2989
        torch.testing.assert_close(augment.adjust_saturation(one.clone(), factors[i:i + 1])[0],
                                   TF.adjust_saturation(x[i], factors[i].item()), atol=1e-4, rtol=0)
        torch.testing.assert_close(augment.adjust_hue(one.clone(), shifts[i:i + 1])[0],
                                   TF.adjust_hue(x[i], shifts[i].item()), atol=1e-5, rtol=0)
    torch.testing.assert_close(augment.to_grayscale(x), TF.rgb_to_grayscale(x, 3), atol=2e-4, rtol=0)


def test_blur_is_pils_gaussian_blur():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # [1, 3, 40, 48]
    for sigma in (0.1, 0.3, 0.7, 1.0, 1.5, 2.0):
        kernel = augment.blur_kernels(torch.tensor([sigma]))[0]
        taps = torch.arange(len(kernel)) - len(kernel) // 2
        assert abs(kernel.sum() - 1) < 1e-6 and abs((kernel * taps ** 2).sum() - sigma ** 2) < 1e-4
        ours = augment.gaussian_blur(x.clone(), torch.tensor([sigma]))  # the ops may write over their input
        pil = torch.from_numpy(np.array(image.filter(ImageFilter.GaussianBlur(sigma)))).permute(2, 0, 1)[None]
        interior = (ours - pil)[..., len(kernel):-len(kernel), len(kernel):-len(kernel)]
        # PIL rounds to 8 bits after each of its six passes: at sigma 0.1 that undoes a third of the blur (noise
        # pixels 85 levels apart move by 0.5 instead of 1.4 levels), at sigma >= 0.3 it is rounding noise
        assert interior.abs().max() <= 3 and interior.abs().mean() <= (1.1 if sigma < 0.3 else 0.75)
    # a batch blurs each image with its own kernel
    batch = augment.gaussian_blur(x.repeat(2, 1, 1, 1), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(batch[0], augment.gaussian_blur(x.clone(), torch.tensor([0.5]))[0], atol=1e-5, rtol=0)


def test_batched_augmentation_equals_the_per_crop_path(random_tree):
    """--gpu-augment: items carry uint8 crops and their parameters; augment_crops on the collated batch (any
    device; here the CPU) gives what the loader's per-crop path gives, from the same draws."""
    on_cpu = CaptionImagesDataset([random_tree], 3, 2, 32, seed=3)
    deferred = CaptionImagesDataset([random_tree], 3, 2, 32, seed=3, augment_on_device=True)
    batch = collate([deferred[(1, i)] for i in range(8)])
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (48, 32, 32, 3)
    assert len(batch["color"].sigma) == 48 and 0 < int(batch["color"].gray.sum()) < 48
    expected = collate([on_cpu[(1, i)] for i in range(8)])
    assert expected["color"] is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 whatever autocast says
        images = augment_crops(batch["images"], batch["color"])
    torch.testing.assert_close(images, expected["images"], atol=1e-5, rtol=0)


def test_decoding_on_the_device_makes_the_workers_crops(random_tree, tmp_path):
    """--gpu-decode: a JPEG travels undecoded with its drawn crop box; util.jpeg.decode_crops (torchvision's decoder
    where the crops are: nvJPEG on a GPU, here the CPU) makes the crops the workers would have made from the same
    draws, within two grey levels (float resizing instead of uint8); a PNG is still cropped by the worker."""
    tree = tmp_path / "tree"
    shutil.copytree(random_tree, tree, ignore=shutil.ignore_patterns(".stablerep-index"))
    png = tree / "00000" / "000000002_01.png"
    Image.open(tree / "00000" / "000000002_01.jpg").save(png)
    os.remove(tree / "00000" / "000000002_01.jpg")
    os.remove(tree / "00000" / "_index.json")  # listed again: image 1 of caption 2 is now a PNG
    workers = CaptionImagesDataset([str(tree)], 3, 2, 32, seed=3, augment_on_device=True, downsample_prob=0.5,
                                   downsample_res=(16,))
    deferred = CaptionImagesDataset([str(tree)], 3, 2, 32, seed=3, augment_on_device=True, decode_on_device=True,
                                    downsample_prob=0.5, downsample_res=(16,))
    expected = collate([workers[(2, i)] for i in range(6)])
    batch = collate([deferred[(2, i)] for i in range(6)])
    assert batch["jpegs"] is not None and len(batch["jpegs"].rows) + len(batch["images"]) == 36
    assert 0 < len(batch["images"]) < 36  # the PNG's crops, made by the worker
    assert torch.equal(batch["crop_labels"], expected["crop_labels"])
    for field in ("order", "factors", "sigma"):  # the same colour draws, crop for crop
        assert torch.equal(getattr(batch["color"], field), getattr(expected["color"], field))
    crops, corrupt = decode_crops(batch["images"], batch["jpegs"], 36, 6)
    assert corrupt == 0 and crops.shape == expected["images"].shape
    difference = (crops.int() - expected["images"].int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.3

    # a JPEG the batched decode refuses is tried alone, then by PIL; one nothing decodes takes another crop of its
    # own caption and is counted
    jpegs = batch["jpegs"]
    start, length = int(jpegs.lengths[:4].sum()), int(jpegs.lengths[4])
    data = jpegs.data.clone()
    data[start:start + length] = 0
    crops, corrupt = decode_crops(batch["images"], jpegs._replace(data=data), 36, 6)
    row = int(jpegs.rows[4])
    assert corrupt == 1 and any(torch.equal(crops[row], crops[other]) for other in range(row // 6 * 6, row // 6 * 6
                                                                                          + 6) if other != row)
    others = [r for r in range(36) if r != row]
    assert (crops[others].int() - expected["images"][others].int()).abs().max() <= 2


@pytest.mark.slow
def test_downsampling_resizes_the_whole_image_down_and_back(random_tree, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    low = down_and_up(pixels, 15)  # shorter side 15 (15 x 20), then back to 60 x 80
    assert low.shape == pixels.shape and low.dtype == torch.uint8
    detail = lambda image: (image[1:].float() - image[:-1].float()).abs().mean()  # noqa: E731
    assert detail(low) < detail(pixels) / 4
    official = np.array(PILDownAndUp([15])(Image.fromarray(pixels.numpy())), dtype=np.float32)
    assert np.abs(official - low.numpy()).mean() < 1.5  # torch's resampling computes PIL's

    calls = []
    monkeypatch.setattr(augment, "down_and_up", lambda image, resolution: calls.append(resolution) or image)
    torch.manual_seed(0)
    for _ in range(4000):
        PretrainAugmentation(32, downsample_prob=0.05, downsample_res=(64, 128)).crop(pixels)
    assert abs(len(calls) / 4000 - 0.05) < 0.012 and 0.35 < calls.count(64) / len(calls) < 0.65
    calls.clear()
    PretrainAugmentation(32).crop(pixels)
    assert not calls  # off by default
    monkeypatch.undo()

    items = [CaptionImagesDataset([random_tree], 2, 1, 32, downsample_prob=prob, downsample_res=(4,))[(0, i)]
             for prob in (0.0, 1.0) for i in range(12)]
    sharp, smooth = (torch.stack([detail(item.images.permute(0, 2, 3, 1)[k]) for item in items[j:j + 12]
                                  for k in range(2)]).mean() for j in (0, 12))
    assert smooth < sharp / 2


# ---- the self-supervised families' views (MoCo v3, BYOL, DINO, MAE) ----

@pytest.mark.parametrize("name, view", [("BYOL's first view: blur always", byol.VIEWS[0]),
                                        ("BYOL's second: blur 0.1, solarise 0.2", byol.VIEWS[1]),
                                        ("MAE's: crop and flip alone", mae.VIEWS[0])])
def test_family_views_have_their_official_pipelines_statistics(name, view):
    """1000 crops of each pipeline (48 px from 96 px images), the family's official one rebuilt with torchvision v1
    and PIL: the same statistics as the StableRep test's, and the fraction of crops with a level at or above 128
    (which solarisation removes). MoCo v3's views are BYOL's with bilinear resampling; DINO's are BYOL's and a local
    view of the same ops."""
    expected, measured = both_statistics(official_augmentation(48, view=view), PretrainAugmentation(48, view=view),
                                         1000)
    tolerances = {**TOLERANCES, "bright fraction": 0.04}
    if view.jitter_p == 0:  # no hue jitter: both shifts are resampling noise, near 0
        del tolerances["mean |hue shift|"], tolerances["hue shift spread"]
        assert measured["mean |hue shift|"] < 0.01 and expected["mean |hue shift|"] < 0.01
    for statistic, tolerance in tolerances.items():
        difference = abs(measured[statistic] - expected[statistic]) / (
            abs(expected[statistic]) if statistic in RELATIVE else 1)
        assert difference <= tolerance, f"{name}, {statistic}: ours {measured[statistic]:.4f}, " \
                                        f"official {expected[statistic]:.4f}"


@pytest.mark.slow
def test_view_parameters_follow_their_recipes_and_simclrs_draws_are_unchanged():
    torch.manual_seed(0)
    params = ColorParams.cat([sample_color_params(byol.VIEWS[1]) for _ in range(20000)])
    for flag, p in ((params.jitter, 0.8), (params.gray, 0.2), (params.sigma > 0, 0.1), (params.solarize, 0.2)):
        assert abs(flag.float().mean().item() - p) < 0.015
    assert 0.8 <= params.factors[:, 2].min() and params.factors[:, 2].max() <= 1.2  # saturation 0.2
    assert (sample_color_params(byol.VIEWS[0]).sigma > 0).all()  # blur always
    none = ColorParams.cat([sample_color_params(mae.VIEWS[0]) for _ in range(200)])
    assert not (none.jitter.any() or none.gray.any() or none.sigma.any() or none.solarize.any())
    torch.manual_seed(3)
    default = sample_color_params()
    after_default = torch.get_rng_state()
    torch.manual_seed(3)
    simclr = sample_color_params(View())
    assert all(torch.equal(a, b) for a, b in zip(default, simclr)) and not simclr.solarize.any()
    assert torch.equal(after_default, torch.get_rng_state())  # no solarisation draw: the old stream exactly


def test_solarize_is_pils_and_bicubic_resampling_is_pils():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
    ours = augment.solarize(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    pil = torch.from_numpy(np.array(ImageOps.solarize(Image.fromarray(pixels)))).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(ours * 255, pil, atol=1e-4, rtol=0)
    smooth = np.array(Image.fromarray(pixels).resize((88, 80), Image.BILINEAR).filter(ImageFilter.GaussianBlur(2)))
    ours = augment.resize(torch.from_numpy(smooth), 30, 33, "bicubic").float().numpy()
    pil = np.array(Image.fromarray(smooth).resize((33, 30), Image.BICUBIC), dtype=np.float32)
    assert np.abs(ours - pil).mean() < 1.0 and np.abs(ours - pil).max() <= 3


def test_dino_items_carry_local_crops_and_their_noise(random_tree):
    """Two global crops by DINO's views, two 16 px local crops, and noise rows for every crop; the global crops
    are those drawn without noise (noise is drawn after them), an item is a function of (epoch, index), and the
    local crops finished on the device (--gpu-augment) are those finished in the loader."""
    local = LocalCrops(2, 16, (0.05, 0.4), dino.LOCAL_VIEW)
    views = dict(views=dino.VIEWS, local=local)
    dataset = CaptionImagesDataset([random_tree], 1, 2, 32, seed=2, noise_per_crop=6, **views)
    item = dataset[(1, 5)]
    assert item.images.shape == (2, 3, 32, 32) and item.local_images.shape == (2, 3, 16, 16)
    assert item.noise.shape == (2, 6) and item.local_noise.shape == (2, 6)
    again = dataset[(1, 5)]
    assert torch.equal(item.local_images, again.local_images) and torch.equal(item.noise, again.noise)
    without_noise = CaptionImagesDataset([random_tree], 1, 2, 32, seed=2, **views)[(1, 5)]
    assert torch.equal(without_noise.images, item.images) and without_noise.noise is None
    deferred = CaptionImagesDataset([random_tree], 1, 2, 32, seed=2, noise_per_crop=6, augment_on_device=True,
                                    **views)
    batch, expected = collate([deferred[(1, i)] for i in range(3)]), collate([dataset[(1, i)] for i in range(3)])
    assert batch["local_images"].dtype == torch.uint8 and len(batch["local_color"].sigma) == 6
    torch.testing.assert_close(augment_crops(batch["local_images"], batch["local_color"]), expected["local_images"],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["noise"], expected["noise"])
    plain = collate([CaptionImagesDataset([random_tree], 1, 2, 32)[(0, 0)]])
    assert plain["local_images"] is None and plain["noise"] is None and plain["local_color"] is None


# ---- unreadable images: skipped and counted, never trained on, never a crash ----

@pytest.mark.parametrize("on_device", [False, True], ids=["decoded by the workers", "--gpu-decode"])
@pytest.mark.parametrize("damage", ["truncated jpeg", "74-byte png", "not an image", "decompression bomb"])
def test_unreadable_images_are_skipped_and_counted(tmp_path, damage, on_device, monkeypatch):
    """The 74-byte PNG (a header that claims 64x64, too little data) made torchvision's decoder segfault, which no
    skip could catch and every --resume hit again; PIL raises instead. Under --gpu-decode the workers catch the same
    files from the header and the end-of-image marker alone."""
    tree = write_random_tree(tmp_path / "tree", captions=8, images_per_caption=3)
    broken = os.path.join(tree, "00000", "000000001_00.jpg")
    if damage == "truncated jpeg":
        with open(broken, "r+b") as f:
            f.truncate(100)
    elif damage == "74-byte png":
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
        with open(broken, "wb") as f:
            f.write(buffer.getvalue()[:74])
    elif damage == "not an image":
        with open(broken, "wb") as f:
            f.write(b"\x89PNG but nothing else")
    else:  # more pixels than twice PIL's limit, lowered here (the 40 x 40 images stay under twice it)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        Image.new("RGB", (64, 64)).save(broken, format="JPEG")
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    options = {"augment_on_device": on_device, "decode_on_device": on_device}
    dataset = CaptionImagesDataset([tree], 2, 1, 32, **options)
    assert all(len(collate([dataset[(0, i)]])["image_labels"]) == 2 for i in range(8))
    caption_1 = [dataset[(epoch, 1)] for epoch in range(10)]  # each epoch draws 2 of its 3 images anew
    assert all(item.label == 1 and 0 not in item.image_indices.tolist() for item in caption_1)  # never image 0
    assert any(item.corrupt == 1 for item in caption_1)  # counted when it was drawn
    item = CaptionImagesDataset([tree], 3, 1, 32, **options)[(0, 1)]  # only 2 readable: another caption stands in
    assert item.label != 1 and item.corrupt == 1


# ---- the loader's workers ----

def test_workers_start_by_fork_on_linux_and_in_flight_is_bounded(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert data.loader_options(4, True) == {"num_workers": 4, "pin_memory": True, "multiprocessing_context": "fork",
                                            "prefetch_factor": 2, "worker_init_fn": data.quiet_worker}
    assert data.loader_options(0, False) == {"num_workers": 0, "pin_memory": False}  # no workers, no start method
    monkeypatch.setattr(sys, "platform", "darwin")  # fork is unsafe there: the platform's own default (spawn)
    assert data.loader_options(4, False)["multiprocessing_context"] is None
    # the paper's batch per GPU, 43 captions x 6 images at 224 px: float32 [258, 3, 224, 224], or uint8 crops
    floats = data.batch_bytes(43, 6, 1, 224, False)
    assert floats == 258 * 3 * 224 * 224 * 4 == 4 * data.batch_bytes(43, 6, 1, 224, True)
    assert data.in_flight_bytes(14, 43, 6, 1, 224, False) == 14 * 2 * 258 * 3 * 224 * 224 * 4  # 4.05 GiB


# ---- streamed shards ----

def stream_epoch(stream, epoch, start_step=0, positions=None):
    """One epoch (from start_step) through StreamLoader: (batches, the stream's state_dict after each batch)."""
    stream.set_epoch(epoch, start_step)
    stream.load_state_dict(positions)
    loader = data.StreamLoader(stream, **data.loader_options(stream.streams if stream.streams > 1 else 0, False))
    batches, states = [], []
    for batch in loader:
        batches.append(batch)
        states.append(copy.deepcopy(stream.state_dict()))
    return batches, states


def labels(batches):
    return [label for batch in batches for label in batch["caption_labels"].tolist()]


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory):
    """16 captions of 2 images in 4 tars of 4, streamed through `pipe:cat`."""
    root = write_random_shards(tmp_path_factory.mktemp("even"), captions=16, images_per_caption=2, size=8,
                               per_shard=4)
    return "pipe:cat " + os.path.join(root, "{00000..00003}.tar")


@pytest.mark.slow
@pytest.mark.parametrize("world_size, workers, shards", [(1, 0, 4), (1, 2, 4), (2, 2, 4), (1, 2, 3), (2, 2, 2)])
def test_a_streamed_epoch_sees_each_caption_once(even_shards, world_size, workers, shards):
    """The shards are dealt to the streams (ranks x workers), those left over shared, and each stream reads its own
    once: over every rank, an epoch is every caption exactly once, in an order that mixes shards within a batch."""
    url = even_shards.replace("{00000..00003}", f"{{00000..{shards - 1:05d}}}")
    epochs = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            stream = data.CaptionShardStream([url], 4 * shards, 2, 2, 1, 16, seed=3, rank=rank,
                                             world_size=world_size, workers=workers, shuffle_buffer=3, mix=2)
            batches, _ = stream_epoch(stream, epoch)
            assert len(batches) == 2 * shards // world_size and all(len(b["caption_labels"]) == 2 for b in batches)
            seen += labels(batches)
        assert sorted(seen) == list(range(4 * shards))  # once each
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order every epoch
    if world_size == 1 and workers == 0:  # one stream, 2 of its 4 shards open at once: batches cross shards
        assert any(len({label // 4 for label in pair}) == 2 for pair in zip(epochs[0][::2], epochs[0][1::2]))


@pytest.mark.slow
def test_a_streamed_run_resumes_at_the_shard_and_sample_where_it_stopped(even_shards):
    """The position after each batch (the open shards and how far each was read, the buffer, the draw count) goes
    into the checkpoint; a resumed epoch continues it exactly, reading again only what it had open."""
    for workers, mix, buffer in ((2, 2, 3), (0, 3, 5)):
        def stream():
            return data.CaptionShardStream([even_shards], 16, 2, 2, 1, 16, seed=1, workers=workers,
                                           shuffle_buffer=buffer, mix=mix)
        whole, states = stream_epoch(stream(), 1)
        for start in (3, 5):
            resumed, _ = stream_epoch(stream(), 1, start, states[start - 1])
            assert len(resumed) == 8 - start
            for a, b in zip(whole[start:], resumed):
                assert torch.equal(a["caption_labels"], b["caption_labels"]) and torch.equal(a["images"], b["images"])
    # one shard at a time, no buffer: stopped after 5 steps = 10 captions, i.e. 2 of the third shard; the resumed
    # epoch opens neither of the first two and reads the third again up to where it stood, then on: 2 + 2 + 4
    single = data.CaptionShardStream([even_shards], 16, 2, 2, 1, 16, seed=1, shuffle_buffer=1, mix=1)
    _, states = stream_epoch(single, 0)
    assert states[4]["streams"]["0"]["open"][0][1] == 2 and states[4]["streams"]["0"]["next"] == 3
    resumed = data.CaptionShardStream([even_shards], 16, 2, 2, 1, 16, seed=1, shuffle_buffer=1, mix=1)
    stream_epoch(resumed, 0, 5, states[4])
    assert resumed.samples_read == 8 and single.samples_read == 16


def test_a_stream_whose_shards_are_mostly_missing_stops_with_one_error(even_shards, capsys):
    """`pipe:cat .../{00000..00099}.tar` with 4 real shards: one UnreadableData once the stream has finished
    MISSING_PROBE shards, most of them empty, and no note per missing shard (each one a `cat` error) before it."""
    mostly_missing = even_shards.replace("{00000..00003}", "{00000..00099}")
    stream = data.CaptionShardStream([mostly_missing], 16, 2, 2, 1, 16, seed=0, shuffle_buffer=2, mix=1)
    with pytest.raises(data.UnreadableData, match=r"of the first 16 shards stream 0 opened gave no sample .*"
                                                  "most shards --data names are missing"):
        stream_epoch(stream, 0)
    assert "note:" not in capsys.readouterr().err


def test_a_stream_shorter_than_its_epoch_says_how_many_passes(even_shards, capsys):
    stream = data.CaptionShardStream([even_shards], 40, 4, 2, 1, 16, seed=0, shuffle_buffer=4)
    batches, _ = stream_epoch(stream, 0)
    seen = labels(batches)
    assert len(seen) == 40 and sorted(set(seen)) == list(range(16)) and max(seen.count(x) for x in seen) == 3
    err = capsys.readouterr().err
    assert "pass 2 over them" in err and "pass 3 over them" in err and "--stream-captions" in err
