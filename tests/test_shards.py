"""shards.py's writer: whole captions only in the temporary tar (a failed write is cut off), no write through a
planted link, the mode `open` gives. Reading tars is tested through dataindex (tests/test_dataindex.py) and
generate.py's resume tests (tests/test_generate.py)."""
import errno
import os
import stat

import pytest

import shards


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
