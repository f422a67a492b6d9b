"""shards.py: the writer keeps whole captions only in the temporary tar (a failed write is cut off), writes through no
planted link and gives the mode `open` gives; the reader bounds every size a damaged tar claims by the file's own
and checks that an index offset holds the member it names. Reading whole shard sets is tested through dataindex
(tests/test_dataindex.py) and generate.py's resume tests (tests/test_generate.py)."""
import errno
import os
import stat

import pytest

from conftest import caption_text, write_random_shards
from util import dataindex, shards


def images(caption_id):
    return [(k, "jpg", bytes([caption_id, k]) * 300) for k in range(2)]


def add(writer, caption_id):
    writer.add(caption_id, images(caption_id), f"caption {caption_id}", {"caption_id": caption_id})


def test_a_failed_write_is_cut_off_and_the_shard_resumes(tmp_path, monkeypatch):
    path = str(tmp_path / "00000.tar")
    writer = shards.ShardWriter(path, [0, 1, 2], 2)
    add(writer, 0)
    size = os.path.getsize(shards.temporary_path(path))
    real_pwrite = os.pwrite

    def disk_full(fd, data, offset):  # half of the caption reaches the disk, then it is full
        real_pwrite(fd, bytes(data[:len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(OSError) as error:
        add(writer, 1)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC and error.value.filename == shards.temporary_path(path)
    assert os.path.getsize(shards.temporary_path(path)) == size  # back to whole captions
    writer.close()
    resumed = shards.ShardWriter(path, [0, 1, 2], 2)
    assert resumed.remaining == [1, 2]
    add(resumed, 1)
    add(resumed, 2)
    resumed.finish()
    fd = os.open(path, os.O_RDONLY)
    try:
        table = shards.read_index(fd)
        assert [shards.read_member(fd, offset) for offset in table[1, 2:]] == [data for _, _, data in images(1)]
    finally:
        os.close(fd)


def test_a_link_at_the_temporary_name_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not yours")
    os.symlink(target, tmp_path / ".tmp-00000.tar")
    with pytest.raises(OSError) as error:
        shards.ShardWriter(str(tmp_path / "00000.tar"), [0], 2)
    assert error.value.errno == errno.ELOOP and target.read_bytes() == b"not yours"


def test_the_temporary_tar_gets_the_mode_open_gives(tmp_path):
    previous = os.umask(0o027)
    try:
        writer = shards.ShardWriter(str(tmp_path / "00000.tar"), [0], 2)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / ".tmp-00000.tar").st_mode) == 0o640  # 0666 less the umask
    add(writer, 0)
    writer.finish()
    assert stat.S_IMODE(os.stat(tmp_path / "00000.tar").st_mode) == 0o640


# ---- damaged tars: bounded by the file's own size, never a hang, a traceback or a huge allocation ----

def header(name, size, kind=b"0"):
    """A ustar header of any kind and any size (base-256 above 8 GiB, as GNU tar writes it)."""
    block = bytearray(shards.member_header(name, 0))
    block[124:136] = f"{size:011o}\0".encode() if size < 8 ** 11 else b"\x80" + size.to_bytes(11, "big")
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def write_tar(path, members):
    """members: [(name, data, kind)], each padded to whole blocks, then the end-of-archive blocks."""
    with open(path, "wb") as f:
        for name, data, kind in members:
            f.write(header(name, len(data), kind) + data + b"\0" * (shards.padded(len(data)) - len(data)))
        f.write(b"\0" * 2 * shards.BLOCK)
    return os.open(path, os.O_RDONLY)


def test_a_pax_record_of_length_zero_stops_the_scan_instead_of_looping(tmp_path):
    fd = write_tar(tmp_path / "a.tar", [("000000000.jpg", b"fine", b"0"), ("PaxHeader", b"0 path=x\n", b"x"),
                                        ("000000001.jpg", b"after", b"0")])
    members = shards.scan_members(fd)
    assert next(members).name == "000000000.jpg"  # what came before the damage is read
    with pytest.raises(shards.DamagedTar, match="pax record"):
        next(members)
    for record in (b"5 path=x\n", b"99 path=x\n", b"x path=y\n"):  # too short, past the header, not a number
        with pytest.raises(shards.DamagedTar):
            shards._pax_records(record)
    assert shards._pax_records(b"10 path=x\n12 size=123\n") == {"path": "x", "size": "123"}


def test_sizes_a_header_claims_are_bounded_by_the_file(tmp_path):
    fd = write_tar(tmp_path / "a.tar", [("000000000.00.jpg", b"jpeg", b"0")])
    with open(tmp_path / "a.tar", "r+b") as f:  # the member now claims 1 TiB
        f.write(header("000000000.00.jpg", 2 ** 40))
    member = next(shards.scan_members(fd))
    assert (member.offset, member.size) == (shards.BLOCK, 2 ** 40)  # listed, never read
    with pytest.raises(OSError, match=r"truncated \(1536 of 1099511627776 bytes\)"):
        shards.read_member(fd, shards.BLOCK)
    fd = write_tar(tmp_path / "b.tar", [("PaxHeader", b"10 path=x\n", b"x")])
    with open(tmp_path / "b.tar", "r+b") as f:  # an extended header claiming 1 TiB is damage, not a read
        f.write(header("PaxHeader", 2 ** 40, b"x"))
    with pytest.raises(shards.DamagedTar, match="claims 1099511627776 bytes"):
        list(shards.scan_members(fd))


def test_an_index_claiming_a_trillion_rows_is_damage_not_an_allocation(tmp_path):
    root = write_random_shards(tmp_path / "s", captions=5, images_per_caption=2, size=8, per_shard=5)
    path = os.path.join(root, "00000.tar")
    with open(path, "r+b") as f:
        block = f.read(4096)
        start = block.index(b"{'descr'")
        end = block.index(b"\n", start)
        text = block[start:end].replace(b"(5, 4)", b"(1000000000000, 4)").rstrip()
        f.seek(start)
        f.write(text.ljust(end - start))  # the same header length: only the claim changes
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(shards.DamagedTar, match="of its own size"):
        shards.read_index(fd)
    table, metadata = dataindex.build_tars([path])  # the headers are read instead, with a note
    assert table["key"].tolist() == [0, 1, 2, 3, 4] and "read from its member headers" in metadata["notes"][0]


def test_the_member_at_an_index_offset_must_be_the_one_it_names(tmp_path):
    root = write_random_shards(tmp_path / "s", captions=3, images_per_caption=2, size=8, per_shard=3)
    fd = os.open(os.path.join(root, "00000.tar"), os.O_RDONLY)
    table = shards.read_index(fd)
    assert shards.read_member(fd, int(table[1, 3]), key=1, slot=1)  # caption 1's image 1, as named
    assert shards.read_member(fd, int(table[1, 1]), key=1, slot=None).decode() == caption_text(1)
    for offset, key, slot in ((table[2, 2], 1, 0), (table[1, 2], 1, 1), (table[1, 1], 1, 0)):
        with pytest.raises(OSError, match="not the index's caption 1"):
            shards.read_member(fd, int(offset), key=key, slot=slot)
