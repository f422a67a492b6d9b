"""data.py: deterministic items, the per-rank caption sampler, batch labels, the augmentation's settings."""
import torch
import torchvision.transforms.v2 as T

from data import CaptionImagesDataset, CaptionSampler, collate, pretrain_augmentation


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
    assert samplers[0].steps_per_epoch == 2  # 23 captions // (5 x 2 ranks); the remainder is dropped
    for sampler in samplers:
        sampler.set_epoch(3)
    batches = [list(sampler) for sampler in samplers]
    keys = [key for rank_batches in batches for batch in rank_batches for key in batch]
    assert len(keys) == 20 and len({index for _, index in keys}) == 20 and {e for e, _ in keys} == {3}
    samplers[0].set_epoch(3, start_step=1)
    assert list(samplers[0]) == batches[0][1:] and len(samplers[0]) == 1
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != batches[0]  # a fresh order every epoch


def test_collate_labels_for_both_kinds_of_positives(random_tree):
    dataset = CaptionImagesDataset([random_tree], 2, 2, 32)
    batch = collate([dataset[(0, i)] for i in (3, 7)])
    assert batch["images"].shape == (8, 3, 32, 32)
    assert batch["image_labels"].tolist() == [3, 3, 3, 3, 7, 7, 7, 7]  # StableRep: the caption
    crop = batch["crop_labels"].tolist()  # SimCLR: crops of one image
    assert crop[0] == crop[1] != crop[2] == crop[3] and len(set(crop)) == 4
    assert batch["caption_labels"].tolist() == [3, 7] and batch["tokens"] is None


def test_labels_run_across_several_trees(random_tree):
    dataset = CaptionImagesDataset([random_tree, random_tree], 1, 1, 32)
    assert len(dataset) == 24 and dataset[(0, 20)].label == 20


def test_augmentation_is_the_papers():
    augment = pretrain_augmentation(224)
    crop, jitter, gray, blur, flip = augment.transforms[:5]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.08, 1.0) and crop.size == (224, 224)
    assert jitter.p == 0.8 and gray.p == 0.2 and blur.p == 0.5 and flip.p == 0.5
    assert blur.transforms[0].sigma == [0.1, 2.0]
    assert pretrain_augmentation(32, (0.6, 1.0)).transforms[0].scale == (0.6, 1.0)
    out = augment(torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
