"""Tar shards in webdataset's layout: generate.py writes them (--output-format webdataset), pretrain.py reads them,
and img2dataset's webdataset output, through this module.

    <root>/settings.json            how the set was made (generate.py), with "output_format": "webdataset"
    <root>/00012.tar                captions 12000 .. 12999 (--captions-per-shard 1000) in caption order:
        __index__                     .npy of int64 [captions, 2 + n]: caption id, data offset of its .txt, data
                                      offsets of its images 0 .. n-1 (0: none); webdataset readers skip `__*__`
        000012000.00.jpg ... .09.jpg  the caption's n images, image k named `<key>.<k:02d>.<format>`
        000012000.txt                 the caption (UTF-8, one line, no newline)
        000012000.json                {"caption_id": 12000, "row": 12000, "seeds": [the n image seeds]}
        000012001.00.jpg ...
    <root>/.tmp-00012.tar           a shard being written: appended caption by caption, renamed when complete

A sample's members share the key before the first dot of the file name (webdataset's rule): the 9-digit caption
id, as in imagetree's files and in img2dataset's output, whose tars hold `<key>.jpg`, `<key>.txt` and
`<key>.json` per caption. The tars are plain uncompressed ustar, so any member can be read at its data offset
(random access: the 512-byte header right before the data gives its size, a checksum and the member's name, which
the reader checks against the caption and image the index names). Tars are opened with POSIX_FADV_RANDOM (no
readahead past the member read), and every size read from a tar is bounded by the file's own, so a damaged one
(a looping pax record, a header or `__index__` claiming a terabyte) raises DamagedTar or OSError, never hangs or
allocates what it claims.
"""
import contextlib
import io
import json
import os
import re

import numpy as np

INDEX_MEMBER = "__index__"
BLOCK = 512
TAR_SUFFIX = ".tar"
TEMPORARY_PREFIX = ".tmp-"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
MAX_IMAGES = 100  # images per caption: generate.py's --num-images is at most 100
_NUMBERED_IMAGE = re.compile(r"^(\d+)\.(\w+)$")  # "07.jpg": image 7 of a sample with several images


def shard_name(shard):
    """The file name of output shard `shard` (captions shard * size .. (shard + 1) * size - 1)."""
    return f"{shard:05d}{TAR_SUFFIX}"


def temporary_path(path):
    folder, name = os.path.split(path)
    return os.path.join(folder, TEMPORARY_PREFIX + name)


def list_shards(folder):
    """The finished `*.tar` files of a folder, sorted by name (in-progress `.tmp-*` files excluded)."""
    return sorted(name for name in os.listdir(folder)
                  if name.endswith(TAR_SUFFIX) and not name.startswith(".") and
                  os.path.isfile(os.path.join(folder, name)))


def padded(size):
    return -(-size // BLOCK) * BLOCK


def split_name(name):
    """(key, suffix) of a member name as webdataset groups them: the key is the path up to the first dot of the
    base name, the suffix the rest ("dir/000000012.07.jpg" -> ("dir/000000012", "07.jpg")); (None, None) if no dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None, None
    return (folder + "/" + stem if folder else stem), suffix


def image_slot(suffix):
    """Which image of its sample a member is: "jpg" -> 0 (img2dataset: one image), "07.jpg" -> 7, None if the
    member is not an image (or claims a number from MAX_IMAGES up, which no writer of ours makes)."""
    suffix = suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return 0
    match = _NUMBERED_IMAGE.match(suffix)
    if match and match.group(2) in IMAGE_SUFFIXES and len(match.group(1)) <= 3 and int(match.group(1)) < MAX_IMAGES:
        return int(match.group(1))
    return None


# ---- headers ----

def member_header(name, size, mtime=0):
    """A 512-byte ustar header for a regular file (names up to 100 bytes, sizes below 8 GiB)."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    block = bytearray(BLOCK)
    block[0:len(encoded)] = encoded
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = f"{mtime:011o}\0".encode()
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[148:156] = f"{sum(block) + 8 * 32:06o}\0 ".encode()  # checksum with its own field as spaces
    return bytes(block)


def _number(field):
    """A numeric header field: octal text, or GNU's base-256 when the top bit is set. ValueError if neither."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(block):
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


class DamagedTar(ValueError):
    """A tar header that cannot be what it claims: a wrong checksum on a block that is not the end of the archive,
    a field that is not a number, an extended header that runs past the file or loops. Readers keep what came
    before it."""


class Member:
    """One regular file of a tar: its name, the offset of its data and its size in bytes."""
    __slots__ = ("name", "offset", "size")

    def __init__(self, name, offset, size):
        self.name, self.offset, self.size = name, offset, size


def _pax_records(data):
    """The key=value records of a pax extended header ("<length> <key>=<value>\n", the length counting the whole
    record); DamagedTar for a record whose length is not a number, is too short to hold itself (a length of 0 would
    never move on) or runs past the header."""
    records, position = {}, 0
    while position < len(data):
        space = data.find(b" ", position)
        digits = data[position:space]
        if space < 0 or not digits.isdigit() or position + int(digits) > len(data) or int(digits) <= len(digits) + 1:
            raise DamagedTar(f"damaged pax record at byte {position} of its header")
        length = int(digits)
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


MAX_EXTENDED_HEADER = 1 << 20  # a pax or GNU long-name header: a few names and numbers (ours are under 1 KiB)


def advise(fd, pattern):
    """Tell the kernel how the file open as `fd` will be read: "random" (members at their offsets: readahead off for
    this descriptor, so a 29 KB image costs about its own pages from the disk, not a readahead window of 128 KiB to
    several MiB; measured cold: 4.5x the image bytes without, 1.1x with, BENCHMARKS.md) or "sequential" (a whole
    pass: readahead doubled). Nothing where the platform has no posix_fadvise (macOS)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if pattern == "random" else os.POSIX_FADV_SEQUENTIAL)


def open_tar(path):
    """A read-only descriptor of a tar whose members will be read at their offsets (advise "random")."""
    fd = os.open(path, os.O_RDONLY)
    advise(fd, "random")
    return fd


def scan_members(fd, start=0, end=None):
    """The regular-file members of the tar open as `fd`, from offset `start`, in order: a generator of Member.

    Stops at the end-of-archive block or where the file ends (a truncated tar: the last member may then be cut
    short, its offset + size past `end`, the file size by default); raises DamagedTar at a header that cannot be
    one (its caller keeps the members before it). Reads the headers only (one pread each), never the data; every
    size it reads is bounded by the file's, so a header claiming a terabyte allocates nothing. Understands pax (`x`)
    and GNU long-name (`L`) headers."""
    end = os.fstat(fd).st_size if end is None else end
    position, long_name, pax = start, None, {}
    while position + BLOCK <= end:
        block = os.pread(fd, BLOCK, position)
        if len(block) < BLOCK or not any(block):
            return
        if not _checksum_ok(block):
            raise DamagedTar(f"no valid tar header at byte {position}")
        kind = block[156:157]
        try:
            size = _number(block[124:136])
        except ValueError:
            raise DamagedTar(f"the tar header at byte {position} has no readable size") from None
        data_offset = position + BLOCK
        position = data_offset + padded(size)
        if kind in (b"x", b"L"):
            if size > min(MAX_EXTENDED_HEADER, end - data_offset):
                raise DamagedTar(f"the extended header at byte {data_offset - BLOCK} claims {size} bytes")
            extra = os.pread(fd, size, data_offset)
            if kind == b"L":
                long_name = extra.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pax = _pax_records(extra)
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers: not files
            long_name, pax = None, {}
            continue
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX ustar: a prefix holds the leading folders
            name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        name = pax.get("path", long_name or name)
        if "size" in pax:
            if not pax["size"].isdigit():
                raise DamagedTar(f"the pax size of the member at byte {data_offset - BLOCK} is not a number")
            size = int(pax["size"])
            position = data_offset + padded(size)
        long_name, pax = None, {}
        yield Member(name, data_offset, size)


def member_is(name, key, slot):
    """Is the member `name` the one an index row names: caption `key`'s image `slot`, or its text (slot None)?
    The key is the number before the first dot of the base name (generate.py's 9 digits, img2dataset's key); a
    member whose key is not a number (scanned tars number such samples in order) is checked by its suffix only."""
    member_key, suffix = split_name(name)
    if member_key is None:
        return False
    base = member_key.rpartition("/")[2]
    if base.isascii() and base.isdigit() and int(base) != key:
        return False
    return suffix.lower() == "txt" if slot is None else image_slot(suffix) == slot


def read_member(fd, offset, key=None, slot=None):
    """The data of the member whose data starts at `offset` in the tar open as `fd`.

    Raises OSError for a header that is not a valid regular-file header (a wrong offset, an overwritten or
    corrupt tar), for a size past the end of the file (a truncated tar, or a header claiming more than the file
    holds: nothing is allocated for it), and, given the `key` and `slot` an index names (see member_is), for a
    member that is another one (an index that disagrees with its tar): the caller treats it as a corrupt image."""
    header = os.pread(fd, BLOCK, offset - BLOCK) if offset >= BLOCK else b""
    if len(header) < BLOCK or not _checksum_ok(header) or header[156:157] not in (b"0", b"\0", b"7"):
        raise OSError(f"no valid tar header before offset {offset}")
    try:
        size = _number(header[124:136])
    except ValueError:
        raise OSError(f"the tar header before offset {offset} has no readable size") from None
    if key is not None:
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if not member_is(name, key, slot):
            raise OSError(f"the member at offset {offset} is {name}, not the index's caption {key} "
                          f"{'text' if slot is None else f'image {slot}'}")
    available = os.fstat(fd).st_size - offset
    if size > available:
        raise OSError(f"tar member at offset {offset} is truncated ({max(0, available)} of {size} bytes)")
    return os.pread(fd, size, offset)


def read_index(fd):
    """The `__index__` table of one of generate.py's shards, int64 [captions, 2 + n]; None when the tar does not
    start with one (img2dataset's tars, or tars repacked by other tools: scan_members reads those).

    DamagedTar when the member is there but is not such a table (a tampered or foreign shard): the numpy header is
    read and checked against the member's own size before anything is allocated, so a header claiming 10^12 rows
    costs nothing. Offsets past the end of a truncated shard are the caller's to drop."""
    header = os.pread(fd, BLOCK, 0)
    if len(header) < BLOCK or not _checksum_ok(header):
        return None
    if header[0:100].split(b"\0", 1)[0] != INDEX_MEMBER.encode():
        return None
    try:
        data = read_member(fd, BLOCK)
    except OSError as err:
        raise DamagedTar(f"its {INDEX_MEMBER} member is unreadable ({err})") from None
    buffer = io.BytesIO(data)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        shape, fortran, dtype = readers[np.lib.format.read_magic(buffer)](buffer)
    except (KeyError, ValueError, SyntaxError, TypeError) as err:
        raise DamagedTar(f"its {INDEX_MEMBER} member is not a numpy array ({err})") from None
    if len(shape) != 2 or shape[1] < 2 or dtype != np.dtype("<i8") or fortran or \
            shape[0] * shape[1] * 8 != len(data) - buffer.tell():
        raise DamagedTar(f"its {INDEX_MEMBER} member is not an int64 table [captions, 2 + n] of its own size")
    table = np.frombuffer(data, dtype="<i8", offset=buffer.tell()).reshape(shape)
    offsets = table[:, 1:]
    if (table[:, 0] < 0).any() or ((offsets != 0) & (offsets < 2 * BLOCK)).any():
        raise DamagedTar(f"its {INDEX_MEMBER} names a negative caption or an offset inside the index itself")
    return table


# ---- writing ----

def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Writes one shard of generate.py: the given captions, in order, each with its n images, text and JSON.

    The shard grows under its temporary name (`.tmp-00012.tar`), one write per caption, and is renamed to its
    final name by `finish()`, so a killed run never leaves a partial tar under the final name. Opening a writer
    on a shard whose temporary file exists resumes it: the captions complete there are kept (a caption is
    complete once its JSON member, written last, is whole), the file is cut after the last of them, and
    `remaining` lists the captions still to add. The `__index__` member comes first, written as zeros of its
    final size when the shard starts and filled in by `finish()`, so no member moves.

    A write that fails (a full disk) cuts the file back to where the caption started, so the temporary tar
    holds whole captions only, and raises an OSError naming it. The temporary file is opened without following
    a link (one planted at the predictable name is refused) and gets the mode `open` gives (0666 less the
    umask)."""

    def __init__(self, path, caption_ids, n):
        self.path, self.tmp, self.n = path, temporary_path(path), n
        self.table = np.zeros((len(caption_ids), 2 + n), dtype=np.int64)  # the __index__ member's content
        self.table[:, 0] = caption_ids
        self.index_size = len(_npy_bytes(self.table))
        self.written = 0
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            self.position = self._recover()
            if self.position is None:  # a new shard, or a temporary file that is not one of ours
                self.position = 0
                os.ftruncate(self.fd, 0)
                self._append(member_header(INDEX_MEMBER, self.index_size) + b"\0" * padded(self.index_size))
        except BaseException:
            self.close()
            raise

    @property
    def complete(self):
        return self.written == len(self.table)

    @property
    def remaining(self):
        """Caption ids still to add, in order."""
        return self.table[self.written:, 0].tolist()

    def _recover(self):
        """Keep the complete captions of an interrupted shard and return where the next one goes; None if the
        temporary file is empty or not such a shard."""
        members, size, keep = scan_members(self.fd), os.fstat(self.fd).st_size, None
        try:
            first = next(members, None)
            if first is None or first.name != INDEX_MEMBER or first.size != self.index_size:
                return None
            keep, row = first.offset + padded(first.size), {}
            for member in members:
                if self.written == len(self.table) or member.offset + member.size > size:
                    break
                key, suffix = split_name(member.name)
                if key != f"{self.table[self.written, 0]:09d}":
                    break
                slot = image_slot(suffix)
                if slot is not None and slot < self.n:
                    row[2 + slot] = member.offset
                elif suffix == "txt":
                    row[1] = member.offset
                elif suffix == "json":  # the caption's last member: it is complete
                    for column, offset in row.items():
                        self.table[self.written, column] = offset
                    self.written, row = self.written + 1, {}
                    keep = member.offset + padded(member.size)
        except ValueError:  # a header scan_members cannot parse: what came before it is kept
            if keep is None:
                return None
        os.ftruncate(self.fd, keep)
        return keep

    def _write_at(self, data, offset):
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as err:
            raise OSError(err.errno, err.strerror, self.tmp) from None

    def _append(self, data):
        """Write `data` at the end of the shard; if that fails, cut the file back to where it was."""
        try:
            self._write_at(data, self.position)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.position)
            raise
        self.position += len(data)

    def add(self, caption_id, images, caption, meta):
        """Append caption `caption_id` (the next in order): images [(k, format, encoded bytes)], its text and a
        JSON-able dict, in one write (a killed process keeps it, or none of it once the next run cuts the file)."""
        if self.written == len(self.table) or caption_id != self.table[self.written, 0]:
            raise ValueError(f"caption {caption_id} is not the next one of shard {self.path}")
        key = f"{caption_id:09d}"
        members = [(f"{key}.{k:02d}.{image_format}", data, 2 + k) for k, image_format, data in images]
        members += [(f"{key}.txt", caption.encode("utf-8"), 1),
                    (f"{key}.json", json.dumps(meta, sort_keys=True).encode(), None)]
        chunks, offsets, offset = [], {}, self.position
        for name, data, column in members:
            chunks += [member_header(name, len(data)), data, b"\0" * (padded(len(data)) - len(data))]
            if column is not None:
                offsets[column] = offset + BLOCK
            offset += BLOCK + padded(len(data))
        self._append(b"".join(chunks))
        for column, value in offsets.items():
            self.table[self.written, column] = value
        self.written += 1

    def finish(self):
        """Write the index and the end-of-archive blocks, then rename the shard to its final name."""
        if self.written != len(self.table):
            raise ValueError(f"shard {self.path} has {self.written} of {len(self.table)} captions")
        self._append(b"\0" * (2 * BLOCK))
        self._write_at(_npy_bytes(self.table), BLOCK)
        os.fsync(self.fd)
        self.close()
        os.replace(self.tmp, self.path)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
