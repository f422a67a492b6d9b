"""cli.py: one-line errors with exit code 2, atomic writes, stage scripts run as subprocesses."""
import argparse
import os

import pytest

import cli


def test_user_error_is_one_line_and_exit_code_2(capsys):
    def main(args):
        raise cli.UserError(f"bad value {args.x}")

    parser = argparse.ArgumentParser("tool.py")
    parser.add_argument("--x", default="7")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "tool.py: error: bad value 7\n"


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "settings.json"
    cli.atomic_write_json(str(path), {"w": 2})
    with pytest.raises(TypeError):
        cli.atomic_write_json(str(path), {"w": object()})  # fails while serialising: the old file stays
    assert path.read_text() == '{\n  "w": 2\n}\n'
    assert os.listdir(tmp_path) == ["settings.json"]  # no temporary file left behind


def test_check_writable_folder(tmp_path):
    cli.check_writable_folder(str(tmp_path / "new" / "folder"))
    assert os.path.isdir(tmp_path / "new" / "folder")
    (tmp_path / "file").write_text("")
    with pytest.raises(cli.UserError, match="cannot be written"):
        cli.check_writable_folder(str(tmp_path / "file" / "sub"))


# ---- range-checked flags: one line, exit code 2, before main runs ----

@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--epochs", "1.5"], "argument --epochs: expected an integer, got '1.5'"),
    (["--temperature", "0"], "argument --temperature: must be a finite number > 0, got 0"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number > 0, got nan"),
    (["--w", "inf"], "argument --w: must be a finite number >= 0, got inf"),
    (["--p", "1.5"], "argument --p: must be a finite number >= 0 and <= 1, got 1.5"),
    (["--seed", str(2 ** 64)], f"argument --seed: must be >= 0 and <= {2 ** 63 - 1}, got {2 ** 64}"),
    (["--nope"], "unrecognized arguments: --nope"),
])
def test_bad_flags_are_one_line_before_main_runs(argv, message, capsys):
    parser = argparse.ArgumentParser("tool.py")
    parser.add_argument("--epochs", type=cli.integer(1), default=1)
    parser.add_argument("--temperature", type=cli.number(above=0), default=0.1)
    parser.add_argument("--w", type=cli.number(0), default=2.0)
    parser.add_argument("--p", type=cli.number(0, 1), default=0.5)
    parser.add_argument("--seed", type=cli.SEED, default=0)
    called = []
    with pytest.raises(SystemExit) as exit_info:
        cli.run(called.append, parser, argv)
    assert exit_info.value.code == 2 and not called
    assert capsys.readouterr().err == f"tool.py: error: {message}\n"


def test_good_flags_are_parsed_to_numbers():
    parser = argparse.ArgumentParser("tool.py")
    parser.add_argument("--epochs", type=cli.integer(1))
    parser.add_argument("--temperature", type=cli.number(above=0))
    args = parser.parse_args(["--epochs", "3", "--temperature", "1e-3"])
    assert (args.epochs, args.temperature) == (3, 1e-3)


# ---- files a lab can share, never written through a link, a full disk is one line ----

def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cli.UMASK = 0o022
        cli.atomic_write_bytes(str(tmp_path / "shared.json"), b"{}")
        cli.UMASK = 0o077
        cli.atomic_write_bytes(str(tmp_path / "private.json"), b"{}")
    finally:
        os.umask(old)
        cli.UMASK = cli._umask()
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644  # what open() would give
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


def test_atomic_write_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    link = tmp_path / "checkpoint.pth"
    link.symlink_to(target)
    cli.atomic_write_bytes(str(link), b"new")
    assert target.read_text() == "precious" and not link.is_symlink() and link.read_bytes() == b"new"


def test_append_refuses_a_symlinked_log(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "log.jsonl").symlink_to(target)
    with pytest.raises(cli.UserError, match="symbolic link"):
        cli.open_append(str(tmp_path / "log.jsonl"))
    with cli.open_append(str(tmp_path / "real.jsonl")) as f:
        f.write("{}\n")
    assert target.read_text() == "precious\n" and (tmp_path / "real.jsonl").read_text() == "{}\n"


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    with pytest.raises(cli.UserError, match="no space left to write .*big.bin"):
        with cli.atomic_open(str(tmp_path / "big.bin")) as f:
            f.write(b"x" * 10)
            raise OSError(28, os.strerror(28))  # what a write to a full disk raises
    assert os.listdir(tmp_path) == []
