"""experiments/guidance_sweep.py: the commands it runs parse with each stage's own parser, steps whose result is
there are skipped, and the table and figure come from the probes' results."""
import importlib
import json
import os
import shlex

import pytest

from conftest import REPO

sweep = importlib.import_module("experiments.guidance_sweep")


def run_sweep(tmp_path, capsys, *flags):
    """The sweep in this process (dry or not); returns the commands it printed (dry) and its table."""
    captions = tmp_path / "cc3m.tsv"
    captions.write_text("a photo of a cat\thttp://x/1.jpg\n")
    argv = ["--captions", str(captions), "--imagenet", str(tmp_path / "imagenet"), "--output",
            str(tmp_path / "sweep"), "--ws", "2", "8", "--families", "dino", "mae", *flags]
    table = sweep.main(sweep.get_args_parser().parse_args(argv))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    return [shlex.split(line) for line in lines], table


def parse_stage(words, monkeypatch):
    """A printed command parsed as its script would: torchrun's launcher stripped, recipes read from the root."""
    monkeypatch.chdir(REPO)
    if words[1] == "-m":
        words = words[words.index("--standalone"):]
    script, argv = words[1], words[2:]
    module = importlib.import_module(os.path.splitext(script)[0])
    parser = module.get_args_parser()
    parser.exit = parser.error = lambda *a, **k: pytest.fail(f"{script} rejects {' '.join(words)}: {a}")
    return script, parser.parse_args(argv)


def plant(folder, name, content):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(content, f)


def probe_result(top1):
    return {"metric": "top1", "best": {"top1": top1}, "last": {"top1": top1 - 0.5}}


def test_dry_run_lists_every_stage_and_each_parses(tmp_path, capsys, monkeypatch):
    commands, _ = run_sweep(tmp_path, capsys, "--dry-run", "--nproc-per-node", "8", "--real", str(tmp_path / "real"),
                            "--pretrain-args", "--epochs 30")
    parsed = [parse_stage(words, monkeypatch) for words in commands]
    assert [script for script, _ in parsed] == (
        ["generate.py"] + ["pretrain.py", "linear_probe.py"] * 2) * 2 + ["pretrain.py", "linear_probe.py"] * 2
    assert all(words[:4] == ["python", "-m", "torch.distributed.run", "--nproc-per-node"] for words in commands)
    generate_w8 = parsed[5][1]
    assert (generate_w8.w, generate_w8.n, generate_w8.output) == (8.0, 1, str(tmp_path / "sweep" / "syn" / "w8"))
    pretrain_dino = parsed[1][1]
    assert (pretrain_dino.loss, pretrain_dino.data, pretrain_dino.epochs, pretrain_dino.resume) == (
        "dino", [str(tmp_path / "sweep" / "syn" / "w2")], 30, "latest")
    probe = parsed[2][1]
    assert probe.protocol == "sgd" and probe.checkpoint.endswith(os.path.join("dino_w2", "encoder.pth"))
    assert parsed[-2][1].data == [str(tmp_path / "real")] and parsed[-2][1].loss == "mae"
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing


def test_done_steps_are_skipped_and_generation_only_runs_for_runs_still_to_train(tmp_path, capsys):
    runs = tmp_path / "sweep" / "runs"
    plant(runs / "dino_w2", "linear_probe.json", probe_result(40.0))  # probed: nothing to do
    plant(runs / "mae_w2", "summary.json", {"steps": 10})  # trained: only its probe is left
    commands, _ = run_sweep(tmp_path, capsys, "--dry-run")
    scripts = [(words[1], words[words.index("--output") + 1]) for words in commands]
    assert scripts[0] == ("linear_probe.py", str(runs / "mae_w2" / "linear_probe.json"))  # no generation at w = 2
    assert [script for script, _ in scripts[1:]] == ["generate.py", "pretrain.py", "linear_probe.py",
                                                     "pretrain.py", "linear_probe.py"]


def test_table_and_figure_from_the_probes_without_running_anything(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "sweep" / "runs"
    for family, base in (("dino", 50.0), ("mae", 30.0)):
        for w in (2, 8):
            plant(runs / f"{family}_w{w}", "linear_probe.json", probe_result(base + w))
        plant(runs / f"{family}_real", "linear_probe.json", probe_result(base + 5))
    _, table = run_sweep(tmp_path, capsys, "--real", str(tmp_path / "real"))  # every step done: nothing runs
    assert table["dino"]["synthetic"] == {"2": {"best": 52.0, "last": 51.5}, "8": {"best": 58.0, "last": 57.5}}
    assert table["mae"]["real"] == {"best": 35.0, "last": 34.5}
    written = json.loads((tmp_path / "sweep" / "guidance_sweep.json").read_text())
    assert written["imagenet_top1"] == table
    assert (tmp_path / "sweep" / "guidance_sweep.png").stat().st_size > 10_000


def test_a_sweep_over_fewer_families_or_ws_keeps_the_others_rows(tmp_path, capsys):
    """The table is every probe done in --output: a later launch for one family and one w rewrites it with the
    others' rows kept."""
    pytest.importorskip("matplotlib")
    runs = tmp_path / "sweep" / "runs"
    for family, base in (("dino", 50.0), ("mae", 30.0)):
        for w in (2, 8):
            plant(runs / f"{family}_w{w}", "linear_probe.json", probe_result(base + w))
    _, table = run_sweep(tmp_path, capsys)
    _, fewer = run_sweep(tmp_path, capsys, "--families", "dino", "--ws", "2")
    assert fewer == table and set(fewer) == {"dino", "mae"} and set(fewer["mae"]["synthetic"]) == {"2", "8"}
    written = json.loads((tmp_path / "sweep" / "guidance_sweep.json").read_text())
    assert written["imagenet_top1"] == table


def test_extra_flags_with_an_unclosed_quote_stop_at_parse_time(tmp_path, capsys):
    """--pretrain-args '--epochs "30' was a traceback from shlex after the output folder was made."""
    from util.cli import run
    argv = ["--captions", str(tmp_path / "c.tsv"), "--imagenet", str(tmp_path / "i"), "--output",
            str(tmp_path / "sweep"), "--pretrain-args", '--epochs "30']
    with pytest.raises(SystemExit) as stop:
        run(sweep.main, sweep.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--pretrain-args" in err[0] and "closing quotation" in err[0]
    assert not (tmp_path / "sweep").exists()
