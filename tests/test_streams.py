"""util/streams.py: a streamed tar's members bounded by size, read one sample at a time."""
import io
import os
import tarfile
import tracemalloc

from util import shards
from util.streams import read_stream


def test_a_streamed_member_is_bounded_by_its_header_not_held(tmp_path, capsys):
    """A gzipped tar whose member inflates 1000x (a 16 MiB run of zeros) ends its shard unread, and so does a header
    claiming 1 TiB (skipping it would mean reading it): the samples before it are kept."""
    path = tmp_path / "bomb.tar.gz"
    members = (("000000007.00.jpg", b"\xff\xd8 a small image"), ("000000007.txt", b"a caption"),
               ("000000008.00.jpg", b"\xff\xd8 another"), ("000000008.01.jpg", bytes(16 << 20)),
               ("000000009.00.jpg", b"\xff\xd8 after"))
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert os.path.getsize(path) < 50_000
    tracemalloc.start()
    samples = list(read_stream(str(path), 0, max_member=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(s.key, sorted(s.images), s.text) for s in samples] == [("000000007", [0], b"a caption")]
    assert peak < 4 << 20  # never the 16 MiB member
    assert "000000008.01.jpg claims 16777216 bytes" in capsys.readouterr().err
    claim = tmp_path / "claim.tar"
    with open(claim, "wb") as f:  # a first member, then a header claiming 1 TiB in a file of a few KB
        f.write(shards.member_header("000000001.00.jpg", 4) + b"\xff\xd8ok" + bytes(508))
        f.write(shards.member_header("000000002.00.jpg", 0)[:124] + b"\x80" + (2 ** 40).to_bytes(11, "big") +
                shards.member_header("000000002.00.jpg", 0)[136:])
        f.write(bytes(2048))
    with open(claim, "r+b") as f:  # fix the second header's checksum
        f.seek(1024)
        block = bytearray(f.read(512))
        block[148:156] = b" " * 8
        block[148:156] = f"{sum(block):06o}\0 ".encode()
        f.seek(1024)
        f.write(block)
    assert [s.key for s in read_stream(str(claim), 0)] == ["000000001"]  # at once, not a 1 TiB skip
