"""Tar shards read as streams (webdataset's URLs: `pipe:` commands, http(s), gs, local paths; .tar.gz too), one
caption's members at a time, with every size bounded: what data.CaptionShardStream reads for pretrain.py's streamed
--data."""
import sys
from typing import NamedTuple

from util import shards
from util.cli import first_line

MAX_STREAM_MEMBER = 64 << 20  # bytes: a streamed member claiming more (a damaged header, a decompression bomb in a


#                                .tar.gz) ends its shard unread (generate.py's images are tens of KB)
MAX_STREAM_SAMPLE = 256 << 20  # bytes of one sample's kept members; the rest of a larger sample is skipped


class StreamedSample(NamedTuple):
    """One caption of a streamed tar: where it is (shard number, its order in the shard) and what is kept of it."""
    shard: int
    ordinal: int
    key: str  # webdataset's key: the member names up to the first dot of the base name
    images: dict  # {image slot: encoded bytes}
    text: bytes  # the .txt member, b"" when absent


def read_stream(url, shard, max_member=MAX_STREAM_MEMBER, max_sample=MAX_STREAM_SAMPLE, failures=None):
    """The samples of the tar at `url` (any URL webdataset's gopen opens: `pipe:`, http(s), gs, a local path; a
    .tar.gz too), in order: a generator of StreamedSample, members grouped by key as webdataset groups them.
    Only image and .txt members are read, and no more than `max_sample` bytes of them per sample. A member whose
    header claims more than `max_member` bytes ends the shard, its sample dropped, with a note (a stream can only
    be skipped by reading it, and the claim may be a damaged header's 1 TiB or a gzip member inflating 1000x); a
    truncated or unreadable stream ends early with a note too. Closing the generator stops the command behind a
    `pipe:` URL. With a list `failures`, a stream that fails before its first sample (a missing shard) is appended
    to it as (url, reason) instead of a note: the caller says it (CaptionShardStream counts them)."""
    import tarfile

    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    current, images, text, size, ordinal, complete = None, {}, b"", 0, 0, False
    try:
        with tarfile.open(fileobj=_decompressed(stream), mode="r|") as tar:
            for info in tar:
                key, suffix = shards.split_name(info.name)
                if not info.isreg() or key is None or key.startswith("__"):
                    continue
                if key != current:
                    if images:
                        yield StreamedSample(shard, ordinal, current, images, text)
                        ordinal += 1
                    current, images, text, size = key, {}, b"", 0
                if info.size > max_member:
                    print(f"note: {url}: {info.name} claims {info.size} bytes, over the bound of {max_member}: the "
                          "rest of this shard is skipped", file=sys.stderr)
                    images = {}
                    break
                slot = shards.image_slot(suffix)
                if (slot is None and suffix.lower() != "txt") or size + info.size > max_sample:
                    continue  # not read: tarfile skips its bytes
                value = tar.extractfile(info).read()
                size += len(value)
                if slot is None:
                    text = value
                else:
                    images.setdefault(slot, value)
            if images:
                yield StreamedSample(shard, ordinal, current, images, text)
        complete = True
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        if failures is not None and not ordinal and not images:
            failures.append((url, first_line(err)))
        else:
            print(f"note: {url}: {first_line(err)}; the samples before it are used", file=sys.stderr)
    finally:
        _close_quietly(stream, complete)


class _Prefixed:
    """A stream's first bytes, already read, put back in front of the rest."""

    def __init__(self, head, stream):
        self.head, self.stream = head, stream

    def read(self, size=-1):
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.stream.read(size - len(data))


def _decompressed(stream):
    """The stream, decompressed if it is gzip, bzip2 or xz (told by its first bytes) by a reader that inflates no
    more than each read asks for: tarfile's own stream mode ("r|*") inflates each compressed chunk whole, about
    10 MB for 10 KB of a 1000x member."""
    import bz2
    import gzip
    import lzma

    head = stream.read(6)
    prefixed = _Prefixed(head, stream)
    for magic, reader in ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile)):
        if head.startswith(magic):
            return reader(fileobj=prefixed, mode="rb")
    return prefixed


BROKEN_PIPE = (-13, 141)  # a command stopped by SIGPIPE (directly, or through the shell) once we stopped reading


def _close_quietly(stream, complete):
    """Close a stream; a `pipe:` command stopped because we closed its pipe (we stopped reading: an epoch's end,
    the padding after a tar's end) is not an error, one that failed is a note."""
    try:
        stream.close()
    except OSError as err:
        if complete and getattr(stream, "status", None) not in BROKEN_PIPE:
            print(f"note: {first_line(err)}", file=sys.stderr)
