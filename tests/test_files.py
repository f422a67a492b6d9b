"""files.py: writes that leave the old file or the new one, with the mode open() gives, never through a link, and a
full disk as one line."""
import os

import pytest

from util import files
from util.cli import UserError


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "settings.json"
    files.atomic_write_json(str(path), {"w": 2})
    with pytest.raises(TypeError):
        files.atomic_write_json(str(path), {"w": object()})  # fails while serialising: the old file stays
    assert path.read_text() == '{\n  "w": 2\n}\n'
    assert os.listdir(tmp_path) == ["settings.json"]  # no temporary file left behind


def test_check_writable_folder(tmp_path):
    files.check_writable_folder(str(tmp_path / "new" / "folder"))
    assert os.path.isdir(tmp_path / "new" / "folder")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot be written"):
        files.check_writable_folder(str(tmp_path / "file" / "sub"))


# ---- files a lab can share, never written through a link, a full disk is one line ----

def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        files.UMASK = 0o022
        files.atomic_write_bytes(str(tmp_path / "shared.json"), b"{}")
        files.UMASK = 0o077
        files.atomic_write_bytes(str(tmp_path / "private.json"), b"{}")
    finally:
        os.umask(old)
        files.UMASK = files._umask()
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644  # what open() would give
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


def test_atomic_write_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    link = tmp_path / "checkpoint.pth"
    link.symlink_to(target)
    files.atomic_write_bytes(str(link), b"new")
    assert target.read_text() == "precious" and not link.is_symlink() and link.read_bytes() == b"new"


def test_append_refuses_a_symlinked_log(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "log.jsonl").symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        files.open_append(str(tmp_path / "log.jsonl"))
    with files.open_append(str(tmp_path / "real.jsonl")) as f:
        f.write("{}\n")
    assert target.read_text() == "precious\n" and (tmp_path / "real.jsonl").read_text() == "{}\n"


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    with pytest.raises(UserError, match="no space left to write .*big.bin"):
        with files.atomic_open(str(tmp_path / "big.bin")) as f:
            f.write(b"x" * 10)
            raise OSError(28, os.strerror(28))  # what a write to a full disk raises
    assert os.listdir(tmp_path) == []
