"""demo/shapes.py: captions from a grammar, renderings that are a function of (seed, caption, image) and w, a knob
that trades caption fidelity for diversity, and generate.py's layouts that pretrain.py's index reads."""
import os

import numpy as np
import pytest
from torchvision import datasets

from demo import shapes
from util import dataindex


def pixels(image):
    return np.asarray(image, dtype=np.float32)


def test_scenes_are_distinct_captions_of_the_grammar():
    scenes = shapes.sample_scenes(300, seed=0)
    assert len({scene.caption for scene in scenes}) == 300
    assert scenes == shapes.sample_scenes(300, seed=0) and scenes != shapes.sample_scenes(300, seed=1)
    others = shapes.sample_scenes(100, seed=1, exclude=scenes)
    assert not set(others) & set(scenes)
    scene = shapes.Scene("arrow", "below", "ring", "left of", "star")
    assert scene.caption == "an arrow below a small ring and left of a small star"
    assert scene.label == shapes.SHAPES.index("arrow")


def test_the_layout_puts_the_small_objects_where_the_caption_says_inside_the_canvas_and_apart():
    rng = np.random.default_rng(0)
    for scene in shapes.sample_scenes(200, seed=5):
        u = shapes.named(shapes.draw_nuisances(rng))
        (large, big_r), (vertical, vertical_r), (horizontal, horizontal_r) = shapes.layout(scene, u, 128)
        below, right = scene.vertical == "below", scene.horizontal == "right of"
        assert (large[1] > vertical[1]) == below and (large[0] > horizontal[0]) == right  # image y grows downwards
        for (x, y), r in ((large, big_r), (vertical, vertical_r), (horizontal, horizontal_r)):
            assert r <= x <= 128 - r and r <= y <= 128 - r
        circles = [(large, big_r), (vertical, vertical_r), (horizontal, horizontal_r)]
        for i, (a, ra) in enumerate(circles):
            for b, rb in circles[i + 1:]:
                assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= ra + rb  # apart along one axis at least


def test_a_rendering_is_a_function_of_seed_caption_image_and_w():
    scene = shapes.sample_scenes(1, seed=3)[0]
    mode = shapes.mode_of(scene, 0)

    def draw(seed, caption_id, k, w):
        return pixels(shapes.render(scene, shapes.image_rng(seed, caption_id, k), w, 32, mode))

    first = draw(0, 5, 2, 2.0)
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, draw(0, 5, 2, 2.0))
    for other in (draw(1, 5, 2, 2.0), draw(0, 6, 2, 2.0), draw(0, 5, 3, 2.0), draw(0, 5, 2, 8.0)):
        assert not np.array_equal(first, other)


def test_higher_w_follows_the_caption_more_and_varies_less():
    assert shapes.fidelity(0) < shapes.fidelity(2) < shapes.fidelity(8) < 1.0
    assert shapes.diversity(0) == 1.0 and shapes.diversity(0) > shapes.diversity(2) > shapes.diversity(8) > 0

    def spread(w):  # mean pixel distance between renderings of one caption, over 20 captions
        distances = []
        for i, scene in enumerate(shapes.sample_scenes(20, seed=4)):
            mode = shapes.mode_of(scene, 0)
            images = [pixels(shapes.render(scene, shapes.image_rng(0, i, k), w, 32, mode)) for k in range(4)]
            distances += [np.abs(a - b).mean() for j, a in enumerate(images) for b in images[j + 1:]]
        return np.mean(distances)

    assert spread(0.0) > spread(2.0) > spread(8.0)


def test_trees_and_shards_are_generate_py_layouts_that_pretrain_indexes(tmp_path):
    scenes = shapes.sample_scenes(6, seed=0)
    tree = shapes.write_synthetic(scenes, str(tmp_path / "tree"), n=3, w=2.0)
    table, _ = dataindex.build_tree(tree)
    assert len(table) == 6
    with open(os.path.join(tree, "00000", "000000003.txt")) as f:
        assert f.read().strip() == scenes[3].caption
    tars = shapes.write_synthetic(scenes, str(tmp_path / "tars"), n=3, w=2.0, output_format="webdataset",
                                  captions_per_shard=4)
    paths = sorted(os.path.join(tars, name) for name in os.listdir(tars) if name.endswith(".tar"))
    assert len(paths) == 2
    table, _ = dataindex.build_tars(paths)
    assert table["key"].tolist() == list(range(6))
    for name in os.listdir(os.path.join(tree, "00000")):  # the tree's images are the shards' (same draws)
        if name.endswith(".png"):
            assert os.path.getsize(os.path.join(tree, "00000", name)) > 0


def test_scrambled_files_the_same_images_under_random_captions(tmp_path):
    scenes = shapes.sample_scenes(8, seed=0)
    kept = shapes.write_synthetic(scenes, str(tmp_path / "kept"), n=4, w=2.0)
    scrambled = shapes.write_synthetic(scenes, str(tmp_path / "scrambled"), n=4, w=2.0, scrambled=True)

    def images(root):
        folder = os.path.join(root, "00000")
        return {name: pixels(datasets.folder.default_loader(os.path.join(folder, name))).tobytes()
                for name in sorted(os.listdir(folder)) if name.endswith(".png")}

    a, b = images(kept), images(scrambled)
    assert sorted(a.values()) == sorted(b.values())  # the same renderings ...
    assert sum(a[name] == b[name] for name in a) < len(a) // 2  # ... mostly under other captions


def test_labelled_folders_are_image_folders_by_the_large_shape(tmp_path):
    scenes = shapes.sample_scenes(40, seed=2)
    root = shapes.write_labelled(scenes, str(tmp_path / "probe"))
    folder = datasets.ImageFolder(root)
    assert len(folder) == 40 and set(folder.classes) == {scene.shape for scene in scenes}
    path, label = folder.samples[0]
    index = int(os.path.basename(path).split(".")[0])
    assert folder.classes[label] == scenes[index].shape


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_every_shape_draws_a_mask_of_its_own(shape):
    mask = pixels(shapes.shape_mask(shape, 64, 32, 32, 20, 0.0))
    assert 0 < (mask > 0).mean() < 1
    others = [pixels(shapes.shape_mask(other, 64, 32, 32, 20, 0.0)) for other in shapes.SHAPES if other != shape]
    assert all(not np.array_equal(mask, other) for other in others)
