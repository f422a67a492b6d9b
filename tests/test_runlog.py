"""runlog.py: the progress lines of a training run, through a pipe (a batch job's log) and in a terminal (a pty),
and log.jsonl beside them (resumed without repeated steps, damaged lines dropped and counted). pretrain.py's own
progress is pinned in test_pretrain.py."""
import io
import json
import os
import pty

from conftest import read_terminal
from util import runlog


def test_progress_line_holds_step_epoch_loss_lr_speed_and_time_left():
    assert runlog.progress_line(120, 3000, 300, 5.12345, 3.2e-4, 412.4, 3725) == \
        "step 120/3000 (4%)  epoch 0.40/10  loss 5.1235  lr 3.20e-04  412 images/s  1h02m left"
    # the corrupt-image count appears once it moves; fields not measured yet are left out
    assert runlog.progress_line(3000, 3000, 300, None, None, None, 0, corrupt=3) == \
        "step 3000/3000 (100%)  epoch 10.00/10  0s left  corrupt images 3"
    # below 10 images/s, two significant digits: a slow CPU run is not "0 images/s"
    assert "  0.42 images/s  " in runlog.progress_line(1, 10, 10, 1.0, 1e-3, 0.4213, 60)
    assert [runlog.duration(s) for s in (0.4, 45, 725, 3 * 3600 + 4 * 60 + 59, 2 * 86400 + 5 * 3600, -3)] == \
        ["0s", "45s", "12m05s", "3h04m", "2d05h", "0s"]


def write_three_records(folder, stream):
    progress = runlog.Progress(total_steps=30, steps_per_epoch=10, stream=stream)
    log = runlog.RunLog(str(folder), tensorboard=False, progress=progress)
    for step, loss in ((10, 4.0), (20, 3.5), (30, 3.25)):
        log.write(step, epoch=step // 10, loss=loss, lr=1e-3, images=step * 8, corrupt_images=0)
    log.close()


def test_through_a_pipe_each_record_is_a_line_of_its_own(tmp_path):
    stream = io.StringIO()  # not a terminal, as a batch job's log file or a pipe
    write_three_records(tmp_path, stream)
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue() and lines[-1] == "" and len(lines) == 4
    assert [line.split("  ")[:3] for line in lines[:3]] == [
        ["step 10/30 (33%)", "epoch 1.00/3", "loss 4.0000"], ["step 20/30 (66%)", "epoch 2.00/3", "loss 3.5000"],
        ["step 30/30 (100%)", "epoch 3.00/3", "loss 3.2500"]]
    assert all(" images/s  " in line and line.endswith(" left") for line in lines[:3])
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [10, 20, 30]


def test_in_a_terminal_one_line_is_redrawn_in_place(tmp_path):
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert terminal.isatty()
        write_three_records(tmp_path, terminal)
    shown = read_terminal(master).replace("\r\n", "\n")  # the terminal turns the final newline into CR LF
    os.close(master)
    assert shown.count("\r") == 3 and shown.count("\n") == 1 and shown.endswith("\n")
    redraws = shown.rstrip("\n").split("\r")[1:]
    assert [r.split("  ")[0] for r in redraws] == ["step 10/30 (33%)", "step 20/30 (66%)", "step 30/30 (100%)"]
    # a redraw is padded to the length of the line it covers, so nothing of a longer line is left on screen
    assert all(len(after) >= len(before.rstrip()) for before, after in zip(redraws, redraws[1:]))


def test_a_resumed_log_loses_its_later_records_and_its_damaged_lines(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0}).encode() for s in (1, 2, 3, 4)]
    log.write_bytes(b"\n".join([good[0], b'{"step": "2"}', good[1], b"\xff\xfe not utf-8", b'{"step": true}',
                                b'{"step": -1}', good[2], good[3], b'{"step": 5, "lo']))
    assert runlog.drop_records_after(str(log), 3) == 5
    assert log.read_bytes() == b"\n".join(good[:3]) + b"\n"
    records, damaged = runlog.read_records(str(log))
    assert [r["step"] for r in records] == [1, 2, 3] and damaged == 0

    log.write_bytes(good[0] + b"\n\xff\n")
    writer = runlog.RunLog(str(tmp_path), start_step=1, tensorboard=False)
    writer.write(2, loss=0.5)
    writer.close()
    assert "1 damaged line(s) dropped" in capsys.readouterr().err
    assert [r["step"] for r in runlog.read_records(str(log))[0]] == [1, 2]
