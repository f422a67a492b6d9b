"""The readers of pretrain.py: generate.py's tar shards, img2dataset's webdataset and files output, the official CSV
layout (streamed shards: tests/test_data.py); the cached flat index, rebuilt when damaged; corrupt, truncated and
mislabelled tar members; data counted twice through links; the notes on what was skipped."""
import codecs
import csv
import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from augment import PretrainAugmentation, decode_rgb
from conftest import caption_text, write_random_shards
from data import CaptionImagesDataset, item_seed
from util import dataindex, shards


def items(dataset, epoch=0):
    return [dataset[(epoch, index)] for index in range(len(dataset))]


def assert_same_items(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.label == y.label and x.image_indices.tolist() == y.image_indices.tolist()
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)


def jpeg(value, size=16):
    return Image.new("RGB", (size, size), (value, 255 - value, value // 2))


# ---- generate.py's shards ----

def test_shards_read_exactly_like_the_tree(random_tree, random_shards):
    tree = CaptionImagesDataset([random_tree], 3, 2, 32, seed=3)
    tars = CaptionImagesDataset([random_shards], 3, 2, 32, seed=3)
    assert len(tars) == 12 and tars.fewest_images() == (0, 4)
    assert_same_items(items(tree, epoch=1), items(tars, epoch=1))  # same bytes -> same crops, image ids, labels
    assert tars.describe(7) == f"caption 7 ({random_shards}/00001.tar at byte {tars.sources[0].table['images'][7][0]})"


def test_shard_list_as_a_brace_pattern_or_paths(random_shards):
    folder = CaptionImagesDataset([random_shards], 2, 1, 32)
    pattern = CaptionImagesDataset([os.path.join(random_shards, "{00000..00002}.tar")], 2, 1, 32)
    assert_same_items(items(folder), items(pattern))
    two = CaptionImagesDataset([os.path.join(random_shards, "00001.tar"), os.path.join(random_shards, "00002.tar")],
                               2, 1, 32)
    assert len(two) == 7 and [two.sources[s].key(0) for s in (0, 1)] == [5, 10]


@pytest.mark.slow
def test_text_is_read_from_the_tar_for_the_text_tower(random_shards, tiny_tokenizer):
    dataset = CaptionImagesDataset([random_shards], 1, 1, 32, tokenizer=tiny_tokenizer, context_length=40)
    expected = tiny_tokenizer(caption_text(6), padding="max_length", max_length=40, return_tensors="pt").input_ids[0]
    assert torch.equal(dataset[6].tokens, expected)


# ---- the index: flat, cached, invalidated ----

def test_index_is_flat_memory_mapped_and_pickles_as_a_path(tmp_path):
    sizes = []
    for captions in (12, 120):
        root = write_random_shards(tmp_path / f"s{captions}", captions=captions, images_per_caption=2, size=8,
                                   per_shard=50)
        dataset = CaptionImagesDataset([root], 2, 1, 16)
        table = dataset.sources[0].table
        assert isinstance(table, np.memmap) and table.dtype.names == ("key", "container", "text", "images")
        assert table.dtype.itemsize == 4 + 4 + 4 + 2 * 4  # u4 key, tar, text offset, 2 image offsets
        sizes.append(len(pickle.dumps(dataset)))
        restored = pickle.loads(pickle.dumps(dataset))  # what a spawned worker gets: the same file, mapped again
        assert isinstance(restored.sources[0].table, np.memmap)
        assert_same_items([restored[5]], [dataset[5]])
    assert sizes[1] - sizes[0] < 300  # 10x the captions, 2 more tar names: no per-caption state in the pickle


def test_index_is_cached_beside_the_data_and_rebuilt_when_it_changes(tmp_path):
    root = write_random_shards(tmp_path / "shards", captions=6, images_per_caption=2, size=8, per_shard=3)
    first = dataindex.open_source(root)
    assert os.path.dirname(first.table_path) == os.path.join(root, dataindex.CACHE_FOLDER)
    built = os.stat(first.table_path).st_mtime_ns
    again = dataindex.open_source(root, build=False)  # a cache hit: no rebuild
    assert again.table_path == first.table_path and os.stat(again.table_path).st_mtime_ns == built
    write_random_shards(tmp_path / "more", captions=9, images_per_caption=2, size=8, per_shard=3)
    shutil.copy(tmp_path / "more" / "00002.tar", os.path.join(root, "00002.tar"))  # a shard added
    with pytest.raises(ValueError, match="no index"):
        dataindex.open_source(root, build=False)
    rebuilt = dataindex.open_source(root)
    assert len(rebuilt) == 9 and rebuilt.table_path != first.table_path
    assert not os.path.exists(first.table_path)  # the stale table is gone


def test_index_goes_to_the_fallback_folder_when_the_data_is_read_only(tmp_path, monkeypatch):
    root = write_random_shards(tmp_path / "shards", captions=3, images_per_caption=2, size=8, per_shard=3)
    writable = dataindex._writable
    monkeypatch.setattr(dataindex, "_writable", lambda folder: not folder.startswith(root) and writable(folder))
    source = dataindex.open_source(root, fallback_cache=str(tmp_path / "out" / "index-cache"))
    assert source.table_path.startswith(str(tmp_path / "out" / "index-cache"))
    assert not os.path.exists(os.path.join(root, dataindex.CACHE_FOLDER))


# ---- corrupt and truncated members ----

def test_corrupt_and_truncated_tar_members_are_skipped_and_counted(random_shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(random_shards, root, ignore=shutil.ignore_patterns(dataindex.CACHE_FOLDER))
    index = shards.read_index(os.open(root / "00000.tar", os.O_RDONLY))
    with open(root / "00000.tar", "r+b") as f:  # caption 1, image 0: JPEG bytes overwritten
        f.seek(int(index[1, 2]))
        f.write(b"garbage!" * 8)
        f.seek(int(index[3, 3]) - 512 + 10)  # caption 3, image 1: its tar header damaged (checksum fails)
        f.write(b"XX")
    index = shards.read_index(os.open(root / "00001.tar", os.O_RDONLY))
    with open(root / "00001.tar", "r+b") as f:  # cut inside caption 8's image 2: it and all after are gone
        f.truncate(int(index[3, 4]) + 100)
    dataset = CaptionImagesDataset([str(root)], 3, 1, 32)
    # the index names bytes past the cut: caption 8's image 3 and all of caption 9 are left out, with a note
    assert len(dataset) == 11 and dataset.sources[0].key(9) == 10
    assert dataset.sources[0].notes == [f"1 of 3 tar shard(s) damaged or empty, e.g. {root}/00001.tar: truncated: "
                                        f"5 image(s) past its end ({int(index[3, 4]) + 100} bytes) are left out"]
    seen = items(dataset) + items(dataset, epoch=1)
    assert all(item.images.shape == (3, 3, 32, 32) for item in seen)
    for item in seen:
        if item.label == 1:
            assert 0 not in item.image_indices.tolist()  # never trained on
        if item.label == 3:
            assert 1 not in item.image_indices.tolist()
    assert any(dataset[(epoch, 1)].corrupt == 1 for epoch in range(8))  # when image 0 is tried, it is counted
    cut = dataset[(0, 8)]
    assert cut.label != 8 and cut.corrupt >= 1  # image 2 cut short, image 3 gone: 2 readable < m = 3
    two = CaptionImagesDataset([str(root)], 2, 1, 32)[(0, 8)]
    assert two.label == 8 and sorted(two.image_indices.tolist()) == [0, 1]
    assert sum(item.corrupt for item in seen) > 0


# ---- img2dataset's outputs ----

def write_img2dataset_tar(path, samples):
    """A tar as img2dataset's webdataset writer makes it: per sample `<key>.jpg`, `<key>.json`, `<key>.txt`
    (python's tarfile, pax format, members in sorted suffix order)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, image, caption in samples:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            members = {"jpg": buffer.getvalue(), "json": json.dumps({"key": key, "caption": caption}).encode(),
                       "txt": caption.encode()}
            for suffix in sorted(members):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.uname = len(members[suffix]), 1700000000, "img2dataset"
                tar.addfile(info, io.BytesIO(members[suffix]))


def test_img2dataset_webdataset_output(tmp_path, tiny_tokenizer):
    root = tmp_path / "laion"
    root.mkdir()
    # shard 0: keys 000000000 .. 000000004 with key 2 failed (absent); shard 1: keys 000010000, 000010001
    write_img2dataset_tar(root / "00000.tar", [(f"00000000{i}", jpeg(40 * i), f"caption {i}") for i in (0, 1, 3, 4)])
    write_img2dataset_tar(root / "00001.tar", [(f"00001000{i}", jpeg(200 + i), f"caption 1000{i}") for i in (0, 1)])
    (root / "00000_stats.json").write_text('{"successes": 4}')
    (root / "00000.parquet").write_bytes(b"PAR1")
    dataset = CaptionImagesDataset([str(root)], 1, 1, 32, tokenizer=tiny_tokenizer, context_length=40)
    source = dataset.sources[0]
    assert len(dataset) == 6 and [source.key(j) for j in range(6)] == [0, 1, 3, 4, 10000, 10001]
    assert dataset.fewest_images() == (0, 1)
    with source.open(4) as files:
        assert files.slots == [0] and files.caption() == "caption 10000"
        assert decode_rgb(io.BytesIO(files.image(0))).shape == (16, 16, 3)
    item = dataset[(0, 2)]
    assert item.images.shape == (1, 3, 32, 32) and item.label == 2
    assert torch.equal(item.tokens, tiny_tokenizer("caption 3", padding="max_length", max_length=40,
                                                   return_tensors="pt").input_ids[0])


def test_img2dataset_files_output(tmp_path):
    folder = tmp_path / "cc3m" / "00000"
    folder.mkdir(parents=True)
    for key in ("000000000", "000000001", "000000003"):
        jpeg(int(key) * 50).save(folder / f"{key}.jpg")
        (folder / f"{key}.txt").write_text(f"text of {key}")
        (folder / f"{key}.json").write_text("{}")
    (folder / "000000002.txt").write_text("a caption whose image failed to download")
    dataset = CaptionImagesDataset([str(tmp_path / "cc3m")], 1, 2, 32)
    source = dataset.sources[0]
    assert len(dataset) == 3 and [source.key(j) for j in range(3)] == [0, 1, 3]
    with source.open(2) as files:
        assert files.image(0) == str(folder / "000000003.jpg") and files.caption() == "text of 000000003"
    assert dataset[2].images.shape == (2, 3, 32, 32)


def test_truncated_img2dataset_tar_keeps_its_whole_samples(tmp_path):
    root = tmp_path / "laion"
    root.mkdir()
    write_img2dataset_tar(root / "00000.tar", [(f"00000000{i}", jpeg(20 * i, 64), f"caption {i}") for i in range(4)])
    fd = os.open(root / "00000.tar", os.O_RDONLY)
    cut = [m for m in shards.scan_members(fd) if m.name == "000000003.jpg"][0]
    os.close(fd)
    os.truncate(root / "00000.tar", cut.offset + 50)  # inside the last sample's image
    dataset = CaptionImagesDataset([str(root)], 1, 1, 32)
    assert len(dataset) == 4  # the cut image is indexed, and fails when read
    item = dataset[(0, 3)]
    assert item.label != 3 and item.corrupt == 1


# ---- the official CSV + per-seed roots ----

def test_official_csv_layout(tmp_path, tiny_tokenizer):
    roots = [tmp_path / f"seed{s}" for s in range(3)]
    for s, root in enumerate(roots):
        (root / "img").mkdir(parents=True)
        for r, name in enumerate(("000.png", "001.png", "002.jpg")):
            jpeg(60 * s + 20 * r).save(root / "img" / name)
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('filepath,title\n'
                        'img/000.png,"a cat, sitting"\n'
                        'img/001.png,"a ""quoted"" dog\non two lines"\n'
                        'notes.txt,not an image row\n'
                        'img/002.jpg,a plain caption\n'
                        f'img/000.png,{"x" * 200_000}\n')  # over csv's 128 KiB field limit: skipped, no traceback
    dataset = CaptionImagesDataset([str(csv_path)], 2, 1, 32, seed=4, folder_list=[str(r) for r in roots],
                                   tokenizer=tiny_tokenizer, context_length=40)
    assert len(dataset) == 3 and dataset.fewest_images() == (0, 3)  # the header, .txt and huge rows are skipped
    source = dataset.sources[0]
    assert [source.key(j) for j in range(3)] == [1, 2, 4]
    with source.open(1) as files:
        assert files.caption() == 'a "quoted" dog\non two lines' and files.image(2) == str(roots[2] / "img/001.png")
    item = dataset[(5, 1)]
    torch.manual_seed(item_seed(4, 5, 1))  # replay the item's draws: 2 of the 3 roots, then their crops
    chosen = torch.randperm(3).tolist()[:2]
    augment = PretrainAugmentation(32)
    expected = torch.stack([augment(decode_rgb(str(roots[s] / "img/001.png"))) for s in chosen])
    assert item.image_indices.tolist() == chosen
    torch.testing.assert_close(item.images, expected, rtol=0, atol=0)
    assert torch.equal(item.tokens, tiny_tokenizer('a "quoted" dog\non two lines', padding="max_length",
                                                   max_length=40, truncation=True, return_tensors="pt").input_ids[0])


def test_bad_sources_are_named(tmp_path, random_shards):
    with pytest.raises(ValueError, match="--folder-list"):
        dataindex.open_source(str(tmp_path / "train.csv"))
    with pytest.raises(ValueError, match=r"00003.tar does not exist \(7 of 10 missing\)"):
        dataindex.open_source(os.path.join(random_shards, "{00000..00009}.tar"))
    with pytest.raises(ValueError, match="does not exist"):
        dataindex.open_source(str(tmp_path / "nowhere"))


# ---- data dropped, mislabelled or counted twice (issue 18) ----

def test_csv_is_parsed_as_the_official_reader_parses_it(tmp_path):
    """An unbalanced quote inside a field (`a 5" tall vase`) is a plain character to csv.reader, which the official
    dataset uses: no row is lost, and the note counts what was read and skipped."""
    rows = [(f"img/{i:03d}.png", f"caption {i}") for i in range(40)]
    rows[5] = ("img/005.png", 'a 5" tall vase')
    rows[9] = ("img/009.png", '"a ""quoted"" caption\non two lines"')
    text = "filepath,title\n" + "".join(f"{path},{caption}\n" for path, caption in rows) + "notes.txt,not a row\n"
    path = tmp_path / "train.csv"
    path.write_text(text)
    with open(path, newline="") as f:  # the official reader, literally: every row whose path is an image
        official = [row for row in csv.reader(f) if row[0].endswith((".png", ".jpg", ".jpeg"))]
    table, metadata = dataindex.build_csv(str(path), [str(tmp_path)])
    assert len(table) == len(official) == 40
    assert metadata["notes"] == [f"{path}: 40 rows read, 2 skipped (the first at line 1: 'filepath' is not an image "
                                 "path ending in .png/.jpg/.jpeg)"]
    with open(path, "rb") as f:
        assert [dataindex.read_csv_record(f, int(offset)) for offset in table["offset"]] == official
    assert official[5][1] == 'a 5" tall vase' and official[9][1] == 'a "quoted" caption\non two lines'


def test_rows_swallowed_by_an_unbalanced_quote_are_never_merged_silently(tmp_path):
    """`imgs/4.png,"a photo of object 4` opens a quote that takes the next rows into one caption: that record is
    skipped and a note names its lines; a quoted caption on two lines whose second line is no row stays one row."""
    lines = [f"imgs/{i}.png,a photo of object {i}" for i in range(12)]
    lines[4] = 'imgs/4.png,"a photo of object 4'
    lines[9] = 'imgs/9.png,object 9"'  # where the quote closes
    lines.insert(1, 'imgs/x.png,"a caption\non two lines"')
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    table, metadata = dataindex.build_csv(str(path), [str(tmp_path)])
    with open(path, "rb") as f:
        read = [dataindex.read_csv_record(f, int(offset)) for offset in table["offset"]]
    assert [fields[0] for fields in read] == ["imgs/0.png", "imgs/x.png", "imgs/1.png", "imgs/2.png", "imgs/3.png",
                                              "imgs/10.png", "imgs/11.png"]
    assert metadata["notes"] == [f"{path}: 7 rows read, 1 skipped (the first at line 7: a quote opened on line 7 "
                                 "swallows 5 line(s) that look like rows of their own (lines 8-12): fix the "
                                 "unbalanced quote)"]


def test_brace_patterns_are_counted_before_they_are_expanded():
    """The count agrees with braceexpand's own expansion; a pattern of 10^12 names is refused at once (it used to be
    expanded into a list: a MemoryError after minutes)."""
    from braceexpand import braceexpand
    for pattern in ("s/{00000..00099}.tar", "x{a,b{1..3},c}y{1..2}", "{a..g..2}", "{4..1}", "{2..-1}", "{1..10..3}",
                    "p{1,{2,3}}", "plain", "{}", "{a}", "{1\\{2,3}", "{,x}", "{07..10}", "{x,{}}", "{{a,b}}"):
        assert dataindex.count_expanded(pattern) == len(list(braceexpand(pattern))), pattern
    huge = "pipe:cat /data/{000000000000..999999999999}.tar"
    assert dataindex.count_expanded(huge) == 10 ** 12
    with pytest.raises(ValueError, match=r"expands to 1,000,000,000,000 names, over the bound of 1,000,000"):
        dataindex.expand(huge)
    with pytest.raises(ValueError, match="Unbalanced braces"):
        dataindex.expand("s/{{1..3}.tar")


def test_a_byte_order_mark_before_a_headerless_csv_is_dropped(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(codecs.BOM_UTF8 + b"imgs/0.png,a cat\nimgs/1.png,a dog\n")
    table, metadata = dataindex.build_csv(str(path), [str(tmp_path)])
    with open(path, "rb") as f:
        assert [dataindex.read_csv_record(f, int(o)) for o in table["offset"]] == [["imgs/0.png", "a cat"],
                                                                                  ["imgs/1.png", "a dog"]]
    assert metadata["notes"] == [f"{path}: 2 rows read, 0 skipped"]


def test_an_index_that_disagrees_with_its_members_gives_corrupt_images_not_wrong_labels(tmp_path):
    root = write_random_shards(tmp_path / "s", captions=4, images_per_caption=3, size=8, per_shard=4)
    path = os.path.join(root, "00000.tar")
    fd = os.open(path, os.O_RDONLY)
    table = shards.read_index(fd).copy()
    os.close(fd)
    table[1, 2:] = table[2, 2:]  # caption 1's row names caption 2's images (a tampered index, the same size)
    with open(path, "r+b") as f:
        f.seek(shards.BLOCK)
        f.write(shards._npy_bytes(table))
    dataset = CaptionImagesDataset([root], 2, 1, 16)
    item = dataset[(0, 1)]
    assert item.label != 1 and item.corrupt == 3  # all three refused as someone else's, never trained as caption 1
    assert dataset[(0, 2)].label == 2 and dataset[(0, 2)].corrupt == 0


def test_the_same_data_through_a_link_is_refused(tmp_path, random_shards, random_tree):
    link = tmp_path / "link"
    os.symlink(random_shards, link)
    for specs in ([random_shards, str(link)], [random_tree, random_tree],
                  [os.path.join(random_shards, "00000.tar"), os.path.join(str(link), "{00000..00001}.tar")]):
        with pytest.raises(ValueError, match="counted twice"):
            dataindex.check_distinct(specs)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(os.path.join(random_shards, "00000.tar"), folder / "00000.tar")
    os.link(folder / "00000.tar", folder / "00001.tar")  # one file under two names in one folder
    with pytest.raises(ValueError, match=r"folder holds the same file twice \(.*00000.tar and .*00001.tar\)"):
        dataindex.check_distinct([str(folder)])
    dataindex.check_distinct([random_shards, random_tree])  # different files: fine


def test_empty_shards_and_mixed_generation_settings_get_a_note(tmp_path):
    a = write_random_shards(tmp_path / "w2", captions=4, images_per_caption=2, size=8, per_shard=2)
    b = write_random_shards(tmp_path / "w8", captions=2, images_per_caption=2, size=8, per_shard=2, seed=1)
    for folder, w in ((a, 2), (b, 8)):
        (tmp_path / folder / "settings.json").write_text(json.dumps({"model": "sd", "w": w, "steps": 50}))
    (tmp_path / "w2" / "00002.tar").write_bytes(b"")  # a zero-byte shard among good ones
    dataset = CaptionImagesDataset([a, b], 1, 1, 16)
    assert len(dataset) == 6
    assert dataset.notes == [f"1 of 3 tar shard(s) damaged or empty, e.g. {a}/00002.tar: zero bytes",
                             f"--data mixes images of 2 generation settings ({a} vs {b}: w 2 vs 8); training goes "
                             "on with all of them"]


# ---- the index cache: damaged, foreign or planted ----

def test_a_damaged_or_foreign_cache_is_rebuilt_with_a_note(tmp_path):
    root = write_random_shards(tmp_path / "s", captions=3, images_per_caption=2, size=8, per_shard=3)
    first = dataindex.open_source(root)
    meta_path = first.table_path.rsplit("-", 1)[0] + ".json"
    good = open(meta_path).read()
    for damage, problem in ((lambda: open(meta_path, "w").write("[]"), "a JSON list"),
                            (lambda: open(meta_path, "w").write("{not json"), "unreadable: Expecting property"),
                            (lambda: np.save(first.table_path, np.arange(3)), "its table is not this source's"),
                            (lambda: json.dump({**json.loads(good), "table": "../x.npy"}, open(meta_path, "w")),
                             "not the index this version writes")):
        damage()
        rebuilt = dataindex.open_source(root)
        assert len(rebuilt) == 3 and len(rebuilt.notes) == 1
        assert rebuilt.notes[0].startswith(f"{meta_path} is a damaged or foreign index cache ({problem}")
        assert rebuilt.notes[0].endswith("): rebuilt")
        assert dataindex.open_source(root).notes == []  # whole again


def test_a_planted_link_at_the_cache_redirects_nothing(tmp_path):
    root = write_random_shards(tmp_path / "s", captions=3, images_per_caption=2, size=8, per_shard=3)
    meta_path = dataindex.open_source(root).table_path.rsplit("-", 1)[0] + ".json"
    victim = tmp_path / "victim.json"
    victim.write_text(open(meta_path).read())  # a valid cache file elsewhere, linked in
    os.remove(meta_path)
    os.symlink(victim, meta_path)
    assert "index cache (unreadable: Too many levels of symbolic links)" in dataindex.open_source(root).notes[0]
    assert not os.path.islink(meta_path) and victim.read_text() == open(meta_path).read()
    victim.write_text("mine")
    cache = os.path.join(root, dataindex.CACHE_FOLDER)
    shutil.rmtree(cache)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", cache)  # the cache folder itself a link: not read, not written
    source = dataindex.open_source(root, fallback_cache=str(tmp_path / "out"))
    assert source.notes == [f"index cache folder {cache} is a symbolic link: not used"]
    assert source.table_path.startswith(str(tmp_path / "out")) and os.listdir(tmp_path / "elsewhere") == []
    assert victim.read_text() == "mine"
