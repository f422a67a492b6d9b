"""util/captions.py: the caption file layouts generate.py reads, ids as row numbers, skipped rows counted."""
import pytest

from conftest import VALID_IDS
from util.captions import read_captions, shard_captions, survey_captions
from util.cli import UserError


@pytest.mark.parametrize("content, name, layout", [
    ("a cat on a mat\thttp://x/1.jpg\n\nsecond caption\thttp://x/2.jpg\n", "cc3m.tsv", "CC3M"),
    ("http://x/1.jpg\ta cat on a mat\nhttp://x/2.jpg\t\nhttp://x/3.jpg\tsecond caption\n", "cc12m.tsv", "CC12M"),
    ("url,caption\nhttp://x/1.jpg,a cat on a mat\nhttp://x/2.jpg,\nhttp://x/3.jpg,\"second caption\"\n",
     "data.csv", "CSV"),
    ("key\tcaption\n7\ta cat on a mat\n8\t  \n9\tsecond caption\n", "data.tsv", "TSV"),
    ("a cat on a mat\n   \nsecond caption\n", "captions.txt", "text"),
    ("\ufeffCaption\na cat on a mat\n\nsecond caption\n", "captions.txt", "text with a header"),
])
def test_caption_formats_ids_are_row_numbers(tmp_path, content, name, layout):
    path = tmp_path / name
    path.write_text(content)
    captions = read_captions(str(path))
    assert captions.captions == {0: "a cat on a mat", 2: "second caption"}
    assert captions.rows == 3 and captions.skipped == [{"row": 1, "reason": "blank"}]
    assert captions.layout.startswith(layout)


def test_a_tab_inside_a_caption_reads_whole_beside_a_url_and_is_skipped_where_ambiguous(tmp_path):
    """CC3M's and CC12M's TSVs have no quoting: a tab inside a caption splits the row. Beside a url (one field,
    tab-free) the caption is everything else; with more columns the split is ambiguous and the row is skipped."""
    files = {"cc3m.tsv": "a cat\ton a mat\thttp://x.org/1.jpg\nplain\thttp://x.org/2.jpg\n",
             "cc12m.tsv": "http://x.org/1.jpg\ta cat\ton a mat\nhttp://x.org/2.jpg\tplain\n",
             "img2dataset.tsv": "caption\turl\na cat\ton a mat\thttp://x.org/1.jpg\nplain\thttp://x.org/2.jpg\n"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        captions = read_captions(str(tmp_path / name))
        assert captions.captions == {0: "a cat on a mat", 1: "plain"} and captions.skipped == [], name
    (tmp_path / "more.tsv").write_text("key\tcaption\tscore\n1\ta cat\ton a mat\t3\n2\tplain\t4\n")
    captions = read_captions(str(tmp_path / "more.tsv"))
    assert captions.captions == {1: "plain"} and captions.skipped == [{"row": 0, "reason": "a tab inside a field"}]


def test_a_field_over_the_csv_limit_is_a_skipped_row(tmp_path):
    huge = "x" * 200_000  # csv's field size limit is 131072 characters
    path = tmp_path / "data.csv"
    path.write_text(f"url,caption\nu0,a cat\nu1,{huge}\nu2,a dog\nu3,\"a runaway quote {'y ' * 70_000}\nu4,a bird\n")
    captions = read_captions(str(path))
    assert captions.captions == {0: "a cat", 2: "a dog", 4: "a bird"}
    assert captions.skipped == [{"row": 1, "reason": "too long"}, {"row": 3, "reason": "too long"}]
    assert [(s, [i for i, _ in c]) for s, c in shard_captions(str(path), [0, 1], 3)] == [(0, [0, 2]),
                                                                                                  (1, [4])]
    (tmp_path / "header.csv").write_text(f"{huge},caption\nu0,a cat\n")
    with pytest.raises(UserError, match="no `caption` column"):
        read_captions(str(tmp_path / "header.csv"))
    (tmp_path / "data.tsv").write_text(f"key\tcaption\n0\t{huge}\n")  # TSV rows are split by us: no limit
    assert read_captions(str(tmp_path / "data.tsv")).captions == {0: huge}


def test_captions_streamed_shard_by_shard_and_the_first_few(captions_file):
    streamed = list(shard_captions(captions_file, [1, 2], 3))  # rows 3-5 and 6-8 (the file has 8)
    assert [(shard, [i for i, _ in captions]) for shard, captions in streamed] == [(1, [3, 5]), (2, [6, 7])]
    assert streamed[0][1][0] == (3, "a dog on the beach")
    first = read_captions(captions_file, max_captions=2)
    assert first.captions == {0: "a photo of a cat", 2: "the red and blue car"}
    survey = survey_captions(captions_file)
    assert (survey.rows, survey.used, survey.skipped_count) == (8, 6, 2)


def test_undecodable_rows_are_skipped_and_counted(captions_file):
    captions = read_captions(captions_file)
    assert sorted(captions.captions) == VALID_IDS == captions.valid_ids
    assert captions.skipped == [{"row": 1, "reason": "blank"}, {"row": 4, "reason": "undecodable"}]
