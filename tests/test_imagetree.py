"""imagetree.py: the layout generate.py writes and pretrain.py reads."""
import os

import pytest
from PIL import Image

from util import imagetree


def _image(value):
    return Image.new("RGB", (8, 8), (value, value, value))


def test_layout_round_trip_through_the_index(tmp_path):
    root = str(tmp_path)
    for caption_id in (3, 1999, 2000):
        imagetree.write_caption(root, caption_id, f"caption {caption_id}")
        for k in range(3):
            imagetree.write_image(root, caption_id, k, _image(k), "png")
    assert os.path.isfile(os.path.join(root, "00001", "000001999_02.png"))
    for folder in ("00000", "00001", "00002"):
        imagetree.index_folder(os.path.join(root, folder))
    os.remove(os.path.join(root, "00000", "000000003_00.png"))  # the index, not a listing, is what is read
    records = imagetree.read_tree(root)
    assert [r.caption_id for r in records] == [3, 1999, 2000]
    assert records[1].caption == "caption 1999"
    assert [os.path.basename(p) for p in records[2].image_paths] == [f"000002000_0{k}.png" for k in range(3)]
    assert len(records[0].image_paths) == 3


def test_reads_img2dataset_files_output_and_ignores_partial_writes(tmp_path):
    folder = tmp_path / "00000"
    folder.mkdir()
    for key in ("000000000", "000000001"):
        (folder / f"{key}.txt").write_text(f"text of {key}\n")
        _image(1).save(folder / f"{key}.jpg")
        (folder / f"{key}.json").write_text("{}")
    (folder / ".tmpabc123").write_bytes(b"half an image")
    (folder / "000000002.txt").write_text("a caption whose image failed to download")
    records = imagetree.read_tree(str(tmp_path))
    assert [(r.caption_id, r.caption, len(r.image_paths)) for r in records] == [
        (0, "text of 000000000", 1), (1, "text of 000000001", 1)]


def test_settings_round_trip(tmp_path):
    assert imagetree.read_settings(str(tmp_path)) is None
    imagetree.write_settings(str(tmp_path), {"w": 2.0, "n": 10})
    assert imagetree.read_settings(str(tmp_path)) == {"w": 2.0, "n": 10}


@pytest.mark.parametrize("content", [b'{"w": 2.0, "n"', b"\xff\xfe", b"[1, 2]", None])
def test_an_unreadable_settings_file_is_a_one_line_value_error(tmp_path, content):
    path = tmp_path / imagetree.SETTINGS_FILE
    if content is None:
        path.mkdir()  # a folder where the file belongs
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="settings.json is not a readable settings file") as error:
        imagetree.read_settings(str(tmp_path))
    assert "\n" not in str(error.value)


def test_bad_trees_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        imagetree.read_tree(str(tmp_path / "missing"))
    (tmp_path / "photos").mkdir()
    with pytest.raises(ValueError, match="not an image tree"):
        imagetree.read_tree(str(tmp_path))
    (tmp_path / "00000").mkdir()
    with pytest.raises(ValueError, match="no captioned images"):
        imagetree.read_tree(str(tmp_path))


def test_images_on_disk_lists_each_captions_image_indices(tmp_path):
    root = str(tmp_path)
    for caption_id, k in ((5, 0), (5, 2), (7, 1)):
        imagetree.write_image(root, caption_id, k, _image(k), "png")
    imagetree.write_image(root, 9, 0, _image(0), "jpg")  # another format: not this run's images
    folder = imagetree.folder_of(root, 5)
    (tmp_path / "00000" / ".tmpxyz").write_bytes(b"partial")
    assert imagetree.images_on_disk(folder, "png") == {5: {0, 2}, 7: {1}}
    assert imagetree.images_on_disk(str(tmp_path / "99999"), "png") == {}
