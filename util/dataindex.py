"""The index of pretraining data: per caption a few bytes in one flat numpy table per data source, built once,
cached on disk and memory-mapped, so the DataLoader workers share its pages instead of copying them (no Python
object per caption or per image: the files are found by arithmetic on the table's numbers).

A source is one `--data` entry of pretrain.py:
    tree   imagetree's folder tree (generate.py --output-format files) or img2dataset's `files` output
    tars   local tar shards: generate.py's (read through each tar's `__index__` member, shards.py) or
           img2dataset's `webdataset` output (headers scanned once); a folder of tars, or a brace pattern
    csv    the official StableRep layout: a CSV of (relative image path, caption) rows, the same relative path
           opened under each of --folder-list's roots (one root per seed); parsed by csv.reader and rows whose
           path does not end in .png/.jpg/.jpeg skipped, as the official reader does (a note counts them)

Tables, one row per caption in key order (the bytes per caption at n = 10 images in parentheses):
    tree   key u4, folder u4 (into the source's folder names), images u1 [K]: 0 = absent, else 1 + the code of
           the file's extension, + 128 for img2dataset's `<key>.jpg` names (18 B)
    tars   key u4, tar u4 (into the tar paths), text u4 or u8 (data offset of the .txt member), images u4 or u8
           [K]: data offsets of image members, 0 = absent (52 B; u8 only for tars over 4 GiB)
    csv    row u4 (the CSV record number), offset u8 (its byte offset in the file) (12 B)
K is the most images any caption of the source has. Keys wider than 32 bits switch the key column to u8.

Cache: `<folder>/.stablerep-index/<source id>.json` (kind, folder or tar names, the fingerprint, the table's
file) and `<source id>-<fingerprint>.npy`, beside the data when that folder is writable, else in the fallback
folder pretrain.py gives (its --output). The fingerprint hashes the index version and every container's name,
size and modification time (a tree's numbered folders, which change whenever a file is added or removed; the
tars; the CSV), so changed data is indexed again; a file rewritten in place inside a tree folder is not noticed.
A damaged or foreign cache is rebuilt (with a note), a cache folder that is a symbolic link is not used.

Damage is skipped, counted and said (each SourceIndex's `notes`), never trained on and never a hang or a huge
allocation: every size read from a file is bounded by the file's own (shards.py), a tar's damaged part or
truncated tail is left out, a member whose header is not the one the index names is a corrupt image, and the same
file given twice (through a link too) is refused.
"""
import codecs
import collections
import csv
import hashlib
import itertools
import json
import os
import re

import numpy as np

from util import imagetree, shards
from util.cli import first_line
from util.files import atomic_open, atomic_write_json

INDEX_VERSION = 2  # 2: CSV records that swallowed rows are skipped, a BOM is dropped (older caches rebuilt)
CACHE_FOLDER = ".stablerep-index"
CSV_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # the official reader's test, case-sensitive as there
STREAM_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://", "sftp://", "scp://")
_TREE_IMAGE = re.compile(r"^(\d+)(?:_(\d+))?(\.[A-Za-z]+)$", re.ASCII)  # 000012345_07.jpg (generate.py), 000012345.jpg


def is_streamed(spec):
    """Is this --data entry a URL only webdataset can open as a stream (no random access)?"""
    return spec.startswith(STREAM_SCHEMES)


MAX_EXPANDED = 1_000_000  # names a brace pattern may give (CC12M at 1000 captions a shard: 12,423)


def expand(spec, limit=MAX_EXPANDED):
    """The paths of a brace pattern ("shards/{00000..00099}.tar"), by the braceexpand package webdataset itself
    uses. Only the braces: webdataset's own expand_urls also splits at "::" and substitutes `${NAME}` from the
    environment (a traceback when the variable is unset), which a path or command must not undergo. The names are
    counted first (count_expanded): a pattern of more than `limit` is a ValueError, never a list of 10^12."""
    from braceexpand import braceexpand
    count = count_expanded(spec)
    if count > limit:
        raise ValueError(f"{spec} expands to {count:,} names, over the bound of {limit:,}: narrow the brace pattern")
    return list(braceexpand(spec))


def count_expanded(pattern):
    """How many names braceexpand(pattern) gives, computed from the ranges' lengths without expanding them (the
    same grammar: products of literals, ranges and comma sequences, backslash escapes, nesting)."""
    import braceexpand as be
    count, start, pos, depth = 1, 0, 0, 0
    while pos < len(pattern):
        if pattern[pos] == "\\":
            pos += 2
            continue
        if pattern[pos] == "{":
            depth += 1
            if depth == 1:
                start = pos
        elif pattern[pos] == "}":
            depth -= 1
            if depth == 0:
                count *= _count_expression(pattern[start + 1:pos], be)
        pos += 1
    if depth != 0:
        raise be.UnbalancedBracesError(f"Unbalanced braces: '{pattern}'")
    return count


def _count_expression(expr, be):
    numbers = be.int_range_re.match(expr)
    if numbers:
        first, last, step = int(numbers.group(1)), int(numbers.group(2)), int(numbers.group(3) or 1) or 1
        return abs(last - first) // step + 1
    if be.char_range_re.match(expr):
        return sum(1 for _ in be.make_char_range(*be.char_range_re.match(expr).groups()))
    items, start, pos, depth = [], 0, 0, 0  # a comma sequence at this level, else a literal brace pair
    while pos < len(expr):
        if expr[pos] == "\\":
            pos += 2
            continue
        depth += {"{": 1, "}": -1}.get(expr[pos], 0)
        if expr[pos] == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth != 0 or not items:
        return count_expanded(expr)
    return sum(count_expanded(item) for item in [*items, expr[start:]])


def _uint(maximum):
    return np.uint32 if maximum < 2 ** 32 else np.uint64


def _source_id(spec, roots):
    return hashlib.sha1(json.dumps([spec, roots]).encode()).hexdigest()[:16]


def _fingerprint(kind, containers, extra=()):
    """A hash of the index version and (name, size, mtime) of each container (folder, tar or CSV file)."""
    digest = hashlib.sha1(f"{INDEX_VERSION}/{kind}/{json.dumps(list(extra))}".encode())
    for path in containers:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ---- building ----

def _assemble(parts, offsets=None):
    """One structured table from per-container parts [(keys, container number, text offsets or None, images
    [rows, k])], each already reduced to its captions with images and to compact dtypes: the table is allocated
    once and filled part by part, each part dropped once copied, so a build peaks near twice the table's size.
    `offsets`: the dtype of the text column (tars), absent for trees."""
    rows = sum(len(part[0]) for part in parts)
    key_max = max((int(part[0].max()) for part in parts if len(part[0])), default=0)
    width = max(part[3].shape[1] for part in parts)
    fields = [("key", _uint(key_max)), ("container", np.uint32)] + ([("text", offsets)] if offsets else [])
    table = np.zeros(rows, dtype=fields + [("images", parts[0][3].dtype, (width,))])
    row = 0
    parts.reverse()
    while parts:
        keys, container, texts, images = parts.pop()
        end = row + len(keys)
        table["key"][row:end] = keys
        table["container"][row:end] = container
        if offsets:
            table["text"][row:end] = texts
        table["images"][row:end, :images.shape[1]] = images
        row = end
    return table


def _table(columns):
    """A structured array from named 1-D columns of equal length."""
    table = np.zeros(len(next(iter(columns.values()))), dtype=[(name, array.dtype) for name, array in columns.items()])
    for name, array in columns.items():
        table[name] = array
    return table


def _tree_folder_captions(folder):
    """[(key text, [image file names])] of a tree folder: from its _index.json when generate.py wrote one, else
    from a listing (img2dataset's `files` output: `<key>.jpg` + `<key>.txt`); captions without a .txt are left
    out, as imagetree.read_tree leaves them out."""
    entries = imagetree.folder_index(folder)
    if entries is not None:
        return [(entry["key"], entry["images"]) for entry in entries]
    return [(key, image_names) for key, _, image_names in imagetree.list_folder(folder)]


def build_tree(root):
    """(table, metadata) of a folder tree; ValueError with a one-line message when it is not one."""
    folders = imagetree.caption_folders(root)
    extensions, key_width, parts = [], None, []
    for folder_id, name in enumerate(folders):
        entries = _tree_folder_captions(os.path.join(root, name))
        folder_keys = np.zeros(len(entries), dtype=np.int64)
        rows = []
        for row, (key, image_names) in enumerate(entries):
            key_width = key_width or len(key)
            if len(key) != key_width or numeric_key(key) is None:
                raise ValueError(f"{root}/{name}: caption key {key!r} is not a {key_width}-digit number like the "
                                 "others")
            folder_keys[row] = numeric_key(key)
            codes = {}
            for image_name in image_names:
                match = _TREE_IMAGE.match(image_name)
                if not match or match.group(1) != key:
                    continue
                slot = int(match.group(2)) if match.group(2) is not None else 0
                if match.group(2) is not None and f"{slot:02d}" != match.group(2) or slot >= shards.MAX_IMAGES:
                    continue  # a name we could not rebuild from the number, or more images than any writer makes
                if match.group(3) not in extensions:
                    extensions.append(match.group(3))
                codes[slot] = 1 + extensions.index(match.group(3)) + (128 if match.group(2) is None else 0)
            rows.append(codes)
        width = max((max(codes) + 1 for codes in rows if codes), default=0)
        images = np.zeros((len(entries), width), dtype=np.uint8)
        for row, codes in enumerate(rows):
            for slot, code in codes.items():
                images[row, slot] = code
        present = images.any(axis=1)
        parts.append((folder_keys[present], folder_id, None, images[present]))
    if len(extensions) > 127:
        raise ValueError(f"{root} uses more than 127 image file extensions")
    table = _assemble(parts)
    if not len(table):
        raise ValueError(f"{root} holds no captioned images")
    return table, {"containers": folders, "extensions": extensions, "key_width": key_width}


def numeric_key(base):
    """The caption number of a sample key's base name ("000012345" -> 12345), or None when it is not a plain
    ASCII number below 2^63 (unicode digits, a 30-digit key)."""
    return int(base) if base.isascii() and base.isdigit() and len(base) <= 18 else None


def _scan_samples(fd):
    """(keys, text offsets, [rows, K] image offsets, what stopped the scan or None) of a tar without an __index__,
    grouping members by key; a damaged header ends the scan, keeping the samples before it."""
    keys, texts, rows, ordinal = [], [], [], 0
    current, row, damage = None, None, None
    try:
        for member in shards.scan_members(fd):
            key, suffix = shards.split_name(member.name)
            if key is None or key.startswith("__"):
                continue
            if key != current:
                if row is not None and row[1]:
                    keys.append(row[0])
                    texts.append(row[2])
                    rows.append(row[1])
                number = numeric_key(key.rpartition("/")[2])
                current, row, ordinal = key, [ordinal if number is None else number, {}, 0], ordinal + 1
            slot = shards.image_slot(suffix)
            if slot is not None:
                row[1].setdefault(slot, member.offset)
            elif suffix.lower() == "txt":
                row[2] = member.offset
    except shards.DamagedTar as err:
        damage = str(err)
    if row is not None and row[1]:
        keys.append(row[0])
        texts.append(row[2])
        rows.append(row[1])
    width = max((max(slots) + 1 for slots in rows), default=0)
    images = np.zeros((len(rows), width), dtype=np.int64)
    for i, slots in enumerate(rows):
        for slot, offset in slots.items():
            images[i, slot] = offset
    return np.array(keys, dtype=np.int64), np.array(texts, dtype=np.int64), images, damage


def _read_tar(path):
    """(keys, text offsets, image offsets, problem or None) of one local tar: from its `__index__` (generate.py's
    shards), else from its headers; a damaged index falls back to the headers, and offsets past the end of a
    truncated tar are dropped (those images cannot be read). `problem` says what was wrong, for a note."""
    fd = shards.open_tar(path)  # the index member or the headers only: no readahead past them
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.int64), "zero bytes"
        problem = None
        try:
            index = shards.read_index(fd)
        except shards.DamagedTar as err:
            index, problem = None, f"{err}; its captions were read from its member headers instead"
        if index is not None:  # generate.py's shard: its first member says everything
            keys, texts, images = index[:, 0], index[:, 1].copy(), index[:, 2:].copy()
        else:
            keys, texts, images, damage = _scan_samples(fd)
            if damage:
                problem = f"{damage}: the {len(keys)} caption(s) before it are kept"
    finally:
        os.close(fd)
    past = images >= size
    if past.any() or (texts >= size).any():
        problem = f"truncated: {int(past.sum())} image(s) past its end ({size} bytes) are left out"
        images[past], texts[texts >= size] = 0, 0
    return keys, texts, images, problem


def build_tars(paths):
    """(table, metadata) of local tar shards; captions without an image are left out, and so are tars that hold
    none (a zero-byte shard) or the part of a tar after damage, each said in the metadata's notes."""
    offsets = _uint(max(os.path.getsize(path) for path in paths))  # u4 unless a tar is over 4 GiB
    parts, problems = [], []
    for tar_id, path in enumerate(paths):
        keys, texts, images, problem = _read_tar(path)
        present = images.any(axis=1)
        if problem or not present.any():
            problems.append((path, problem or "no captioned image"))
        parts.append((keys[present], tar_id, texts[present].astype(offsets), images[present].astype(offsets)))
    table = _assemble(parts, offsets)
    if not len(table):
        raise ValueError(f"the tar shards {paths[0]} ... hold no captioned images")
    notes = [f"{len(problems)} of {len(paths)} tar shard(s) damaged or empty, e.g. {path}: {problem}"
             for path, problem in problems[:1]]
    return table, {"containers": [os.path.abspath(path) for path in paths], "notes": notes}


def _csv_rows(f):
    """(record number, its first line's number, its byte offset, fields or None) of each record of the binary CSV
    file `f` from where it stands, parsed by Python's csv.reader as the official reader parses the file: a quote
    opens a quoted field only at the start of a field (`a 5" tall vase` is one plain field) and a quoted field may
    hold newlines. Fields are None for a record csv refuses (a field over its 128 KiB limit: a quote that never
    closes), after which it reads on from the next line. A UTF-8 byte order mark at the start of the file is dropped
    (else the first path would begin with it). The fifth value lists the record's later lines (numbers) that look
    like rows of their own (`path.png,...`): a quote that opened by mistake swallowed them (_csv_skip_reason)."""
    starts = collections.deque()  # (byte offset, text) of the lines csv has taken and not yet placed in a record

    def lines():
        offset = f.tell()
        for line in f:
            text = line[len(codecs.BOM_UTF8):] if offset == 0 and line.startswith(codecs.BOM_UTF8) else line
            starts.append((offset, text))
            offset += len(line)
            yield text.decode("utf-8", errors="replace")

    reader, consumed = csv.reader(lines()), 0
    for number in itertools.count():
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:
            fields = None
        offset = starts[0][0]
        taken = [starts.popleft()[1] for _ in range(reader.line_num - consumed)]
        swallowed = [consumed + 1 + i for i, text in enumerate(taken) if i and _looks_like_a_row(text)]
        yield number, consumed + 1, offset, fields, swallowed
        consumed = reader.line_num


def _looks_like_a_row(line):
    """Does a line start as a row of the official CSV does (`path.png,`)?"""
    path, comma, _ = line.partition(b",")
    return bool(comma) and path.decode("utf-8", errors="replace").endswith(CSV_IMAGE_SUFFIXES)


def read_csv_record(f, offset):
    """The fields of the CSV record at byte `offset` of the binary file `f`."""
    f.seek(offset)
    return next(_csv_rows(f))[3] or []


def _csv_skip_reason(fields, line=None, swallowed=()):
    """Why the official reader would not train on a record (None: it would), or why we do not: a record whose
    quoted field swallowed lines that look like rows of their own (an unbalanced quote) is never trained on as one
    caption."""
    if fields is None:
        return "a field over csv's 128 KiB limit (a quote that never closes)"
    if swallowed:
        return (f"a quote opened on line {line} swallows {len(swallowed)} line(s) that look like rows of their own "
                f"(lines {swallowed[0]}-{swallowed[-1]}): fix the unbalanced quote")
    if len(fields) < 2:
        return "fewer than two fields"
    if not fields[0].endswith(CSV_IMAGE_SUFFIXES):
        return f"{fields[0][:40]!r} is not an image path ending in .png/.jpg/.jpeg"
    return None


def build_csv(path, roots):
    """(table, metadata) of the official layout: one row per CSV record with an image path and a caption; the
    metadata's note counts the records read and skipped and names the first skipped line."""
    if not os.path.isfile(path):
        raise ValueError(f"CSV file {path} does not exist")
    rows, offsets, skipped, first, merged = [], [], 0, None, []  # merged: records of swallowed rows, each said
    with open(path, "rb") as f:
        shards.advise(f.fileno(), "sequential")
        for number, line, offset, fields, swallowed in _csv_rows(f):
            reason = _csv_skip_reason(fields, line, swallowed)
            if reason is None:
                rows.append(number)
                offsets.append(offset)
            else:
                skipped += 1
                first = first or f"line {line}: {reason}"
                if swallowed:
                    merged.append(f"line {line}: {reason}")
    if not rows:
        raise ValueError(f"{path} has no row of (image path ending in .png/.jpg/.jpeg, caption)")
    table = _table({"key": np.array(rows, dtype=_uint(rows[-1])), "offset": np.array(offsets, dtype=np.uint64)})
    notes = [f"{path}: {len(rows)} rows read, {skipped} skipped" + (f" (the first at {first})" if skipped else "")]
    notes += [f"{path}: skipped the record at {where}" for where in merged if where != first]
    return table, {"containers": [os.path.abspath(path)], "roots": [os.path.abspath(root) for root in roots],
                   "notes": notes}


# ---- the cached, memory-mapped index ----

def _writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        return os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        return False


def resolve(spec, folder_list=None):
    """(kind, container paths, the folder the data lives in) of a --data entry, or ValueError naming what is
    wrong. `folder_list` is the list of image roots of a CSV source."""
    if spec.lower().endswith(".csv"):
        if not folder_list:
            raise ValueError(f"{spec} is a CSV of (image path, caption): give its image roots with --folder-list "
                             "(one per seed, as the official --folder_list)")
        missing = [root for root in folder_list if not os.path.isdir(root)]
        if missing:
            raise ValueError(f"--folder-list root {missing[0]} does not exist")
        return "csv", [spec], os.path.dirname(os.path.abspath(spec))
    if os.path.isdir(spec):
        tars = shards.list_shards(spec)
        if tars:
            return "tars", [os.path.join(spec, name) for name in tars], spec
        if any(name.startswith(shards.TEMPORARY_PREFIX) for name in os.listdir(spec)):
            raise ValueError(f"{spec} holds no finished tar shard yet (only shards generate.py is still writing)")
        return "tree", [spec], spec
    paths = expand(spec) if "{" in spec else [spec]
    if all(path.endswith(shards.TAR_SUFFIX) for path in paths):
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"tar shard {missing[0]} does not exist" +
                             (f" ({len(missing)} of {len(paths)} missing)" if len(missing) > 1 else ""))
        return "tars", paths, os.path.dirname(os.path.abspath(paths[0]))
    raise ValueError(f"data folder {spec} does not exist")


class SourceIndex:
    """One --data source's table (memory-mapped from the cache) and the few names needed to open its files.

    Pickles as the path of its cache files (workers started by spawn or forkserver map the same file), never as
    the table itself."""

    def __init__(self, kind, table_path, metadata):
        self.kind, self.table_path, self.metadata = kind, table_path, metadata
        self.table = np.load(table_path, mmap_mode="r")
        # names as one numpy bytes array: no per-folder Python string whose refcount a worker would write
        self.containers = np.array([name.encode("utf-8", "surrogateescape") for name in metadata["containers"]])
        self.root = metadata.get("root")
        self.roots = metadata.get("roots", [])
        self.extensions = metadata.get("extensions", [])
        self.key_width = metadata.get("key_width", 9)
        self.notes = list(metadata.get("notes", []))  # what the build found, for the user (open_source adds more)

    def __getstate__(self):
        return {"kind": self.kind, "table_path": self.table_path, "metadata": self.metadata}

    def __setstate__(self, state):
        self.__init__(state["kind"], state["table_path"], state["metadata"])

    def __len__(self):
        return len(self.table)

    def image_counts(self, start, stop):
        """Images of captions start .. stop-1 (int array)."""
        if self.kind == "csv":
            return np.full(stop - start, len(self.roots))
        return (self.table["images"][start:stop] != 0).sum(axis=1)

    def key(self, j):
        return int(self.table["key"][j])

    def container(self, j):
        return self.containers[self.table["container"][j]].decode("utf-8", "surrogateescape") \
            if self.kind != "csv" else self.metadata["containers"][0]

    def open(self, j):
        """The files of caption j: CaptionFiles(slots, image(slot) -> path or bytes, caption() -> str)."""
        if self.kind == "tree":
            return TreeCaption(self, j)
        if self.kind == "tars":
            return TarCaption(self, j)
        return CsvCaption(self, j)

    def describe(self, j):
        """A caption and where its first image is, for messages."""
        with self.open(j) as files:
            where = files.where(files.slots[0]) if files.slots else self.container(j)
        return f"caption {self.key(j)} ({where})"


class TreeCaption:
    """A caption of a folder tree: image files found by their names, the caption in `<key>.txt`."""

    def __init__(self, source, j):
        row = source.table[j]
        self.source = source
        self.folder = os.path.join(source.root, source.container(j))
        self.stem = f"{int(row['key']):0{source.key_width}d}"
        self.codes = row["images"]
        self.slots = [int(slot) for slot in np.flatnonzero(self.codes)]

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def where(self, slot):
        code = int(self.codes[slot])
        extension = self.source.extensions[(code & 127) - 1]
        name = self.stem + extension if code & 128 else f"{self.stem}_{slot:02d}{extension}"
        return os.path.join(self.folder, name)

    def image(self, slot):
        return self.where(slot)

    def caption(self):
        with open(os.path.join(self.folder, self.stem + ".txt"), encoding="utf-8", errors="replace") as f:
            return f.read().strip()


class TarCaption:
    """A caption of a local tar: members read at their data offsets through one file descriptor per item, each
    checked to be the member the index names (the name in its header: an index that disagrees with its tar gives
    corrupt images, never another caption's)."""

    def __init__(self, source, j):
        row = source.table[j]
        self.path = source.container(j)
        self.key = int(row["key"])
        self.offsets = row["images"]
        self.text = int(row["text"])
        self.slots = [int(slot) for slot in np.flatnonzero(self.offsets)]
        self.fd = None

    def __enter__(self):
        self.fd = shards.open_tar(self.path)
        return self

    def __exit__(self, *_):
        os.close(self.fd)
        return False

    def where(self, slot):
        return f"{self.path} at byte {int(self.offsets[slot])}"

    def image(self, slot):
        return shards.read_member(self.fd, int(self.offsets[slot]), self.key, slot)

    def caption(self):
        if not self.text:
            raise OSError(f"{self.path}: caption without a .txt member")
        return shards.read_member(self.fd, self.text, self.key, None).decode("utf-8", errors="replace").strip()


class CsvCaption:
    """A row of the official CSV: the same relative path under each image root; the caption from the row."""

    def __init__(self, source, j):
        self.source, self.offset = source, int(source.table["offset"][j])
        self.slots = list(range(len(source.roots)))
        self.fields = None

    def __enter__(self):
        with open(self.source.metadata["containers"][0], "rb") as f:
            shards.advise(f.fileno(), "random")  # one record of a file of millions
            self.fields = read_csv_record(f, self.offset)
        return self

    def __exit__(self, *_):
        return False

    def where(self, slot):
        return os.path.join(self.source.roots[slot], self.fields[0])

    def image(self, slot):
        return self.where(slot)

    def caption(self):
        return self.fields[1]


def _identity(path):
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def check_distinct(specs, folder_list=None):
    """ValueError when two --data entries, or two tars of one, are the same file or folder (by device and inode:
    through a symbolic link, a hard link or another spelling), whose captions would be counted twice."""
    owners = {}
    for spec in specs:
        kind, containers, _ = resolve(os.path.abspath(spec), folder_list)
        for path in [spec] if kind == "tree" else containers:
            identity = _identity(path)
            if identity in owners:
                other_spec, other = owners[identity]
                where = f"{spec} holds" if other_spec == spec else f"--data {other_spec} and {spec} hold"
                raise ValueError(f"{where} the same {'folder' if kind == 'tree' else 'file'} twice ({other} and "
                                 f"{path}): its captions would be counted twice; give it once")
            owners[identity] = (spec, path)


# what changes how generate.py's images look (its settings.json); a --data mixing several gets a note
GENERATION_KEYS = ("model", "scheduler", "steps", "eta", "w", "size", "stored_size", "format", "quality")


def settings_note(sources):
    """A note when the sources' folders hold settings.json files of different generation settings (e.g. w 2 and
    w 8 shards in one --data), else None. Folders without a readable settings.json are not compared."""
    recipes = {}
    for source in sources:
        if source.kind == "csv":
            continue
        folders = [source.root] if source.kind == "tree" else sorted({os.path.dirname(path.decode(
            "utf-8", "surrogateescape")) for path in source.containers})
        for folder in folders:
            try:
                settings = imagetree.read_settings(folder)
            except ValueError:
                continue
            if settings is not None:
                recipes.setdefault(tuple(str(settings.get(key)) for key in GENERATION_KEYS), folder)
    if len(recipes) < 2:
        return None
    (first, a), (second, b) = list(recipes.items())[:2]
    differ = "; ".join(f"{key} {x} vs {y}" for key, x, y in zip(GENERATION_KEYS, first, second) if x != y)
    return (f"--data mixes images of {len(recipes)} generation settings ({a} vs {b}: {differ}); training goes on "
            "with all of them")


def open_sources(specs, folder_list=None, fallback_cache=None, build=True):
    """(SourceIndex of each --data entry, notes for the user): open_source for each, after check_distinct, and
    the sources' notes with settings_note's."""
    check_distinct(specs, folder_list)
    sources = [open_source(spec, folder_list, fallback_cache, build) for spec in specs]
    notes = [note for source in sources for note in source.notes]
    mixed = settings_note(sources)
    return sources, notes + ([mixed] if mixed else [])


TABLE_FIELDS = {"tree": ("key", "container", "images"), "tars": ("key", "container", "text", "images"),
                "csv": ("key", "offset")}


def _cached(folder, source_id, kind, fingerprint):
    """(SourceIndex or None, note or None) of the cache files of a source in `folder`: None without a note when
    there are none or they index older data; None with a note when they are damaged or not ours (unreadable JSON,
    another table, a link planted in place of a file), so that the caller rebuilds them."""
    meta_path = os.path.join(folder, source_id + ".json")
    if not os.path.lexists(meta_path):
        return None, None
    try:
        fd = os.open(meta_path, os.O_RDONLY | os.O_NOFOLLOW)  # a link planted here is not our file
        with os.fdopen(fd, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as err:
        return None, _damaged_cache(meta_path, f"unreadable: {getattr(err, 'strerror', None) or first_line(err)}")
    table_path = os.path.join(folder, f"{source_id}-{fingerprint}.npy")
    if not isinstance(metadata, dict):
        problem = f"a JSON {type(metadata).__name__}"
    elif metadata.get("fingerprint") != fingerprint:
        return None, None  # the index of older data: rebuilt without a word, as any change to the data is
    elif metadata.get("table") != os.path.basename(table_path) or metadata.get("kind") != kind or \
            not isinstance(metadata.get("containers"), list) or not isinstance(metadata.get("notes", []), list):
        problem = "not the index this version writes"
    elif os.path.islink(table_path) or not os.path.isfile(table_path):
        problem = f"its table {table_path} is missing or a link"
    else:
        try:
            index = SourceIndex(kind, table_path, metadata)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            problem = f"its table does not load: {first_line(err)}"
        else:
            if index.table.dtype.names != TABLE_FIELDS[kind] or len(index) != metadata.get("captions"):
                problem = "its table is not this source's"
            else:
                return index, None
    return None, _damaged_cache(meta_path, problem)


def _damaged_cache(path, problem):
    return f"{path} is a damaged or foreign index cache ({problem})"


def open_source(spec, folder_list=None, fallback_cache=None, build=True):
    """The SourceIndex of a --data entry, from the cache when its fingerprint still matches, else built and
    cached (beside the data when that folder is writable, else in `fallback_cache`). With build=False a missing
    or stale cache is an error instead (for ranks that wait for another to build it). ValueError with a
    one-line message for bad input.

    A damaged or foreign cache is rebuilt, with a note; a cache folder that is a symbolic link is neither read nor
    written (a link planted there would redirect the write), and the files are written through atomic_open, which
    replaces a link at their names. The SourceIndex's `notes` say what the user should know: these, and what the
    build found (damaged or empty shards, CSV rows skipped)."""
    spec = os.path.abspath(spec)
    kind, containers, home = resolve(spec, folder_list)
    roots = [os.path.abspath(root) for root in folder_list or []] if kind == "csv" else []
    if kind == "tree":
        folder_paths = [os.path.join(spec, name) for name in sorted(os.listdir(spec))
                        if name.isdigit() and os.path.isdir(os.path.join(spec, name))]
        fingerprint = _fingerprint(kind, folder_paths)
    else:
        fingerprint = _fingerprint(kind, containers, roots)
    source_id = _source_id(spec, roots)
    candidates, notes = [], []
    for folder in [os.path.join(home, CACHE_FOLDER)] + ([fallback_cache] if fallback_cache else []):
        if os.path.islink(folder):
            notes.append(f"index cache folder {folder} is a symbolic link: not used")
        else:
            candidates.append(folder)
    for folder in candidates:
        index, note = _cached(folder, source_id, kind, fingerprint)
        if index is not None:
            index.notes = notes + index.notes
            return index
        if note:
            notes.append(note + ": rebuilt")
    if not build:
        raise ValueError(f"no index of {spec} in {' or '.join(candidates) or 'a usable cache folder'}")
    if kind == "tree":
        table, metadata = build_tree(spec)
    elif kind == "tars":
        table, metadata = build_tars(containers)
    else:
        table, metadata = build_csv(containers[0], folder_list)
    folder = next((folder for folder in candidates if _writable(folder)), None)
    if folder is None:
        raise ValueError(f"cannot write the index of {spec} to {' or '.join(candidates) or 'a cache folder'}")
    table_name = f"{source_id}-{fingerprint}.npy"
    with atomic_open(os.path.join(folder, table_name)) as f:  # nodes building at once write under their own names
        np.save(f, table, allow_pickle=False)
    metadata = {"notes": [], **metadata, "kind": kind, "spec": spec, "fingerprint": fingerprint, "table": table_name,
                "captions": len(table), "version": INDEX_VERSION,
                "root": os.path.abspath(spec) if kind == "tree" else None}
    atomic_write_json(os.path.join(folder, source_id + ".json"), metadata)
    for name in os.listdir(folder):  # earlier tables of this source: stale now (a reader's mapping stays valid)
        if name.startswith(source_id + "-") and name != table_name and name.endswith(".npy"):
            os.remove(os.path.join(folder, name))
    index = SourceIndex(kind, os.path.join(folder, table_name), metadata)
    index.notes = notes + index.notes
    return index
