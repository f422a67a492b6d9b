"""runlog.py: log.jsonl records, resumed without repeated steps, damaged lines dropped and counted."""
import json

import runlog


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
