"""demo/digits.py: real RGB images of the right size, a deterministic per-class split, an ImageFolder tree."""
import numpy as np
import pytest
from torchvision import datasets

from demo.digits import CLASS_NAMES, load_digit_images, split_digits, write_image_folder


@pytest.fixture(scope="module")
def samples():
    return load_digit_images(size=32)


def test_images_are_rgb_upscaled_real_digits(samples):
    assert len(samples) == 1797
    assert sorted({label for _, label in samples}) == list(range(10))
    image, _ = samples[0]
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert pixels.shape == (32, 32, 3) and pixels.max() > 200 and pixels.min() == 0  # ink on a black page
    assert (pixels[..., 0] == pixels[..., 1]).all()  # grey, as scanned
    assert not np.array_equal(np.asarray(samples[0][0]), np.asarray(samples[1][0]))
    assert load_digit_images(size=16)[0][0].size == (16, 16)


def test_split_is_per_class_disjoint_and_deterministic(samples):
    train, held_out = split_digits(samples, held_out_fraction=0.25, seed=0)
    assert len(train) + len(held_out) == 1797
    train_ids = {id(image) for image, _ in train}
    assert not train_ids & {id(image) for image, _ in held_out}
    for label in range(10):
        n_class = sum(1 for _, y in samples if y == label)
        assert abs(sum(1 for _, y in held_out if y == label) - 0.25 * n_class) <= 1
    again, _ = split_digits(samples, held_out_fraction=0.25, seed=0)
    assert [id(image) for image, _ in again] == [id(image) for image, _ in train]
    other, _ = split_digits(samples, held_out_fraction=0.25, seed=1)
    assert [id(image) for image, _ in other] != [id(image) for image, _ in train]
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_digits(samples, held_out_fraction=1.0)


def test_image_folder_round_trip(tmp_path, samples):
    subset = samples[:40]
    root = write_image_folder(subset, str(tmp_path / "digits"))
    folder = datasets.ImageFolder(root)
    assert len(folder) == 40
    assert set(folder.classes) <= set(CLASS_NAMES)
    for path, index in folder.samples:  # every file is in the folder of its own label and reads back exactly
        position = int(path.rsplit("/", 1)[1].split(".")[0])
        image, label = subset[position]
        assert folder.classes[index] == CLASS_NAMES[label]
        assert np.array_equal(np.asarray(folder.loader(path)), np.asarray(image))
