"""plots.py: the curves of a run's log.jsonl, the demo's figure, and one-line errors."""
import json

import pytest

import plots
from util.cli import UserError, run

pytest.importorskip("matplotlib")  # requirements.txt installs it; the stages themselves never import it


def write_log(path, steps=30):
    lines = [json.dumps({"step": s, "loss": 4.0 / (1 + 0.1 * s), "lr": 1e-3 * min(1, s / 5)}) for s in range(1, steps)]
    path.write_text("\n".join(lines) + "\n{\"step\": 99, \"lo")  # a line torn by a killed run is skipped
    return path


def is_png(path, at_least):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= at_least


def test_curves_of_a_run_folder(tmp_path):
    write_log(tmp_path / "log.jsonl")
    output = plots.main(plots.get_args_parser().parse_args([str(tmp_path)]))
    assert output == str(tmp_path / "curves.png") and is_png(tmp_path / "curves.png", 10_000)
    assert [r["step"] for r in plots.read_log(str(tmp_path / "log.jsonl"))] == list(range(1, 30))


def test_the_run_inside_a_folder_is_found_and_several_are_refused(tmp_path):
    (tmp_path / "pretrain").mkdir()  # the demo's layout: its run in <output>/pretrain
    write_log(tmp_path / "pretrain" / "log.jsonl")
    (tmp_path / "synthetic").mkdir()
    assert plots.find_log(str(tmp_path)) == str(tmp_path / "pretrain" / "log.jsonl")
    (tmp_path / "other").mkdir()
    write_log(tmp_path / "other" / "log.jsonl")
    with pytest.raises(UserError, match="holds 2 runs"):
        plots.find_log(str(tmp_path))
    with pytest.raises(UserError, match="holds no log.jsonl, nor does any folder in it"):
        plots.find_log(str(tmp_path / "synthetic"))


def test_demo_figure(tmp_path):
    records = plots.read_log(str(write_log(tmp_path / "log.jsonl")))
    encoders = {"pretrained": {"linear_probe_top1": 95.3, "fewshot_5way_5shot": 87.1, "fewshot_ci95": 0.5},
                "random init": {"linear_probe_top1": 93.6, "fewshot_5way_5shot": 71.1, "fewshot_ci95": 0.6}}
    plots.plot_demo(records, encoders, str(tmp_path / "results.png"))
    assert is_png(tmp_path / "results.png", 20_000)


def test_missing_or_empty_logs_are_one_line(tmp_path, capsys):
    for argv in ([str(tmp_path / "nope")], [str(tmp_path)]):
        with pytest.raises(SystemExit) as info:
            run(plots.main, plots.get_args_parser(), argv)
        assert info.value.code == 2
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(UserError, match="no training records"):
        plots.read_log(str(tmp_path / "log.jsonl"))
    assert capsys.readouterr().err.count("\n") == 2


def test_a_damaged_log_is_plotted_from_its_good_records_or_is_one_line(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 1, "loss": 2.0, "lr": 0.1}\n\xff\xfe{"step": 2}\n{"step": "3", "loss": 1.0}\n'
                    b'{"step": 4, "loss": "low", "lr": 0.1}\n[1, 2]\n{"step": 5, "loss": 1.5, "lr": "high"}\n')
    records = plots.read_log(str(log))
    assert [r["step"] for r in records] == [1, 5]
    assert "3 damaged line(s) skipped" in capsys.readouterr().err
    plots.plot_curves(records, str(tmp_path / "curves.png"))  # the learning rate "high" is left out, no traceback
    assert is_png(tmp_path / "curves.png", 5_000)
    folder = tmp_path / "run"
    (folder / "log.jsonl").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        run(plots.main, plots.get_args_parser(), [str(folder)])
    assert info.value.code == 2 and "is not a file" in capsys.readouterr().err


def test_collapse_signals_get_a_panel_each(tmp_path, monkeypatch):
    """A DINO run's log.jsonl (pretrain.py writes its families' monitor): a panel per signal under the loss."""
    lines = [json.dumps({"step": s, "loss": 9.0, "lr": 1e-3, "teacher_entropy": 11.0 - 0.1 * s,
                         "teacher_student_kl": 0.5, "teacher_temperature": 0.04, "momentum": 0.996})
             for s in range(1, 20)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    drawn = []
    original = plots.plot_curves

    def spy(records, path, title=None):
        plt = plots._pyplot()
        before = set(plt.get_fignums())
        real_subplots = plt.subplots
        monkeypatch.setattr(plt, "subplots", lambda *a, **k: drawn.append(a) or real_subplots(*a, **k))
        original(records, path, title)
        assert set(plt.get_fignums()) == before
    monkeypatch.setattr(plots, "plot_curves", spy)
    plots.main(plots.get_args_parser().parse_args([str(tmp_path)]))
    assert drawn == [(5, 1)]  # loss and lr, then 4 signals
    assert is_png(tmp_path / "curves.png", 10_000)


def test_a_step_past_a_floats_range_is_a_damaged_line_and_a_folder_is_no_output(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    huge = "1" + "0" * 400  # 10^400: JSON reads it as an integer no float holds
    log.write_text(f'{{"step": 1, "loss": 2.0, "lr": 0.1}}\n{{"step": {huge}, "loss": 1.0}}\n'
                   f'{{"step": 2, "loss": {huge}}}\n{{"step": 3, "loss": 1.0, "lr": {huge}}}\n'
                   '{"step": 4, "loss": 0.5, "lr": 0.1}\n')
    records = plots.read_log(str(log))
    assert [r["step"] for r in records] == [1, 4] and "3 damaged line(s) skipped" in capsys.readouterr().err
    plots.plot_curves(records, str(tmp_path / "curves.png"))
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as info:
        run(plots.main, plots.get_args_parser(), [str(log), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "is a folder: name the PNG" in err
