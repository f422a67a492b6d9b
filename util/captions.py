"""Caption files read as generate.py reads them: CC3M's (caption, url) and CC12M's (url, caption) TSVs, a CSV or TSV
with a `caption` header, or plain text, one caption a line; streamed (CC12M's file is 2 GB), every skipped row
counted with its reason. A caption's id is its data row's number."""
import csv
import os
from typing import List, NamedTuple

from util.cli import UserError

SKIPPED_LISTED = 1000  # skipped rows listed by number in settings.json; the rest are counted


class Captions(NamedTuple):
    captions: dict  # caption id (row number) -> caption text
    valid_ids: List[int]  # the usable caption ids read, in order
    rows: int  # data rows read, skipped ones included
    skipped: List[dict]  # [{"row": id, "reason": "blank" | "undecodable" | "no caption field" | "too long" |
    #                        "a tab inside a field"}]
    layout: str  # how the file was read, for the run's record


class CaptionsSurvey(NamedTuple):
    rows: int  # data rows, skipped ones included
    used: int  # usable captions
    skipped: List[dict]  # the first SKIPPED_LISTED skipped rows, as in Captions
    skipped_count: int
    layout: str


def _looks_like_url(field):
    return field.strip().lower().startswith(("http://", "https://", "ftp://"))


def _records(path, delimiter):
    """The file's rows as lists of fields, streamed (CC12M is 2 GB); bytes that are not UTF-8 become surrogates.
    A CSV row that the csv module refuses (a field over its size limit, 128 KiB: a runaway quote or not a caption)
    is None; the csv reader goes on at the next line."""
    if delimiter == ",":
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            while True:
                try:
                    yield next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    yield None
    with open(path, "rb") as f:  # rows end at b"\n" only: a stray \r inside a caption does not split it
        for number, line in enumerate(f):
            if number == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            text = line.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
            yield text.split("\t") if delimiter == "\t" else [text]


def _layout(path, first):
    """(delimiter, caption column, fields of a TSV row, has a header, description) from the first non-blank row's
    text. CC3M's and CC12M's TSVs have no quoting, so a tab inside a caption splits it: a row of one caption and one
    url (tab-free: URLs percent-encode whitespace) reads whole as everything but the url; a TSV with more columns
    cannot tell, and skips such a row (_rows)."""
    delimiter = "," if path.lower().endswith(".csv") else "\t" if "\t" in first else None
    try:
        fields = next(csv.reader([first])) if delimiter == "," else first.split("\t")
    except csv.Error as err:
        raise UserError(f"captions file {path} has no `caption` column (its first row: {err})") from None
    header = [name.strip().lower() for name in fields]
    if "caption" in header:
        kind = {",": "CSV", "\t": "TSV", None: "text"}[delimiter]
        return (delimiter, header.index("caption"), len(header), True,
                f"{kind} with a header, column {header.index('caption')}")
    if delimiter is None:
        return None, 0, 1, False, "text, one caption per line"
    if delimiter == "\t" and len(header) >= 2 and _looks_like_url(header[0]):
        return delimiter, 1, 2, False, "CC12M TSV (url, caption)"
    if delimiter == "\t" and len(header) >= 2 and _looks_like_url(header[-1]):
        return delimiter, 0, 2, False, "CC3M TSV (caption, url)"
    raise UserError(f"captions file {path} has no `caption` column (a header naming it, or CC3M/CC12M's "
                    "two-column caption/url TSV)")


def _rows(path, delimiter, column, width, has_header):
    """(row, caption, None) for a usable row, (row, None, reason) for a skipped one; streamed."""
    records = _records(path, delimiter)
    if has_header:
        next(record for record in records if record is None or "".join(record).strip())
    for row, record in enumerate(records):
        if record is None:
            yield row, None, "too long"
            continue
        if delimiter == "\t" and len(record) > width:  # a tab inside a field (see _layout)
            if width != 2:
                yield row, None, "a tab inside a field"
                continue
            record = ["\t".join(record[:-1]), record[-1]] if column == 0 else [record[0], "\t".join(record[1:])]
        caption = " ".join(record[column].split()) if column < len(record) else ""  # one line of text
        if not caption:
            yield row, None, "no caption field" if column >= len(record) and "".join(record).strip() else "blank"
        elif any("\udc80" <= ch <= "\udcff" for ch in caption):
            yield row, None, "undecodable"
        else:
            yield row, caption, None


def open_captions(path):
    """(layout description, the rows as _rows yields them) of a captions file (see --captions for the formats).
    UserError for a missing, empty or column-less file."""
    if not os.path.isfile(path):
        raise UserError(f"captions file {path} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise UserError(f"captions file {path} is empty")
    first = first.decode("utf-8", errors="surrogateescape").lstrip("\ufeff").rstrip("\r\n")
    delimiter, column, width, has_header, layout = _layout(path, first)
    return layout, _rows(path, delimiter, column, width, has_header)


def read_captions(path, max_captions=None):
    """Every usable caption of a small file, or its first `max_captions` (--preview), held in memory."""
    layout, rows = open_captions(path)
    captions, skipped, count = {}, [], 0
    for count, (row, caption, reason) in enumerate(rows, 1):
        if caption is None:
            skipped.append({"row": row, "reason": reason})
            continue
        captions[row] = caption
        if max_captions is not None and len(captions) >= max_captions:
            break
    if not captions:
        raise UserError(f"captions file {path} holds no usable caption ({len(skipped)} rows skipped)")
    return Captions(captions, list(captions), count, skipped, layout)


def survey_captions(path):
    """One streaming pass over the file: rows, usable captions, skipped rows; no caption is kept."""
    layout, rows = open_captions(path)
    count, used, skipped, skipped_count = 0, 0, [], 0
    for count, (row, caption, reason) in enumerate(rows, 1):
        if caption is not None:
            used += 1
            continue
        skipped_count += 1
        if len(skipped) < SKIPPED_LISTED:
            skipped.append({"row": row, "reason": reason})
    if not used:
        raise UserError(f"captions file {path} holds no usable caption ({skipped_count} rows skipped)")
    return CaptionsSurvey(count, used, skipped, skipped_count, layout)


def shard_captions(path, wanted, per_shard):
    """(shard, [(caption id, text)]) for each shard number of `wanted` (ascending): the usable captions of rows
    shard * per_shard .. (shard + 1) * per_shard - 1, streamed from the file, one shard's captions held at a time."""
    _, rows = open_captions(path)
    wanted = iter(wanted)
    current, captions = next(wanted, None), []
    for row, caption, _ in rows:
        while current is not None and row >= (current + 1) * per_shard:
            yield current, captions
            current, captions = next(wanted, None), []
        if current is None:
            return
        if caption is not None and row >= current * per_shard:
            captions.append((row, caption))
    while current is not None:  # the file ended inside (or before) the last wanted shards
        yield current, captions
        current, captions = next(wanted, None), []
