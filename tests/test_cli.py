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


def test_run_stage_echoes_and_turns_failure_into_a_user_error(tmp_path, capsys):
    cli.run_stage("help", "demo.py", "--help")
    assert "$ python demo.py --help" in capsys.readouterr().out
    with pytest.raises(cli.UserError, match="stage 'broken' failed"):
        cli.run_stage("broken", "demo.py", "--epochs", "0", "--output", str(tmp_path / "x"))
