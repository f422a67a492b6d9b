"""util/results.py and its users: a result never replaces an input, another file, or a result of other settings; a
rerun of the same settings replaces its own; default names say which checkpoint made the number."""
import json
import os

import pytest

import compositionality
import fewshot
import linear_probe
import plots
from util import evaluation as ev
from util.cli import UserError, run
from util.results import MADE_BY, check_output, default_name


def one_line(stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_check_output_refuses_inputs_other_files_and_other_settings_and_lets_a_rerun_replace_its_own(tmp_path):
    recipe = {"script": "x.py", "settings": {"seed": 0, "scales": (1.0, 2.0)}}
    target = tmp_path / "results.json"
    check_output(str(target), recipe, [])  # nothing there yet
    target.write_text(json.dumps({MADE_BY: {"script": "x.py", "settings": {"seed": 0, "scales": [1.0, 2.0]}}}))
    check_output(str(target), recipe, [])  # its own, read back from JSON: may be replaced
    with pytest.raises(UserError, match=r"results of other settings \(settings.seed 0 there, 1 here\)"):
        check_output(str(target), {**recipe, "settings": {"seed": 1, "scales": (1.0, 2.0)}}, [])
    with pytest.raises(UserError, match="is an input of this run"):
        check_output(str(target), recipe, [str(target)])
    for content, reason in ((b"PK\x03\x04 a checkpoint", "is not a results file"),
                            (b'{"loss": 1}', "records no settings"), (b"[1, 2]", "records no settings"),
                            (b'{"made_by": 5}', "its settings are unreadable")):
        target.write_bytes(content)
        with pytest.raises(UserError, match=reason):
            check_output(str(target), recipe, [])
    with pytest.raises(UserError, match="not a plain file"):
        check_output(str(tmp_path), recipe, [])


def test_default_names_carry_the_checkpoint_unless_it_is_the_encoder(tmp_path):
    assert default_name("linear_probe", ["flowers", "lbfgs"], str(tmp_path / "run" / "encoder.pth")) == \
        str(tmp_path / "run" / "linear_probe_flowers_lbfgs.json")
    assert default_name("linear_probe", ["flowers", "lbfgs"], str(tmp_path / "run" / "checkpoint-00000003.pth")) == \
        str(tmp_path / "run" / "linear_probe_flowers_lbfgs_checkpoint-00000003.json")


@pytest.mark.parametrize("script", ["linear_probe", "fewshot", "compositionality"])
def test_an_evaluation_never_writes_over_the_checkpoint_it_scores(script, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-00000003.pth"
    checkpoint.write_bytes(b"PK\x03\x04 weights")
    (tmp_path / "aro").mkdir()
    argv = {"linear_probe": ["--protocol", "lbfgs", "--train-dir", tmp_path, "--val-dir", tmp_path],
            "fewshot": ["--data-dir", tmp_path], "compositionality": ["--aro-root", tmp_path / "aro"]}[script]
    module = {"linear_probe": linear_probe, "fewshot": fewshot, "compositionality": compositionality}[script]
    with pytest.raises(SystemExit) as exit_info:
        run(module.main, module.get_args_parser(),
            [str(a) for a in ["--checkpoint", checkpoint, *argv, "--output", checkpoint]])
    assert exit_info.value.code == 2
    one_line(capsys.readouterr().err, "is an input of this run")
    assert checkpoint.read_bytes() == b"PK\x03\x04 weights"


def test_a_probe_of_other_settings_does_not_replace_a_result(tmp_path, capsys):
    """The same --output for another seed: refused before any work, the first result kept."""
    encoder = tmp_path / "encoder.pth"
    encoder.write_bytes(b"weights")
    base = ["--checkpoint", encoder, "--data-dir", tmp_path, "--output", tmp_path / "fewshot.json"]
    parser = fewshot.get_args_parser()
    args = parser.parse_args([str(a) for a in base])
    recipe = ev.made_by(args, "fewshot.py", [str(tmp_path)], ("split", "ways", "shots", "queries", "episodes",
                                                              "classifier", "C", "seed"))
    (tmp_path / "fewshot.json").write_text(json.dumps({"accuracy": 80.0, MADE_BY: recipe}))
    ev.results_path(args, "fewshot", "x", [], recipe, [str(tmp_path)])  # a rerun of the same settings: allowed
    with pytest.raises(SystemExit):
        run(fewshot.main, parser, [str(a) for a in [*base, "--seed", "1"]])
    one_line(capsys.readouterr().err, "holds the results of other settings", "seed")
    assert json.loads((tmp_path / "fewshot.json").read_text())["accuracy"] == 80.0


def test_plots_never_replace_a_log_a_checkpoint_or_a_folder(tmp_path, capsys):
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    log = run_folder / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n")
    checkpoint = run_folder / "checkpoint-00000002.pth"
    checkpoint.write_bytes(b"PK\x03\x04")
    for target, reason in ((log, "is not a figure"), (checkpoint, "is not a figure"), (run_folder, "is a folder")):
        before = {path: path.read_bytes() for path in (log, checkpoint)}
        with pytest.raises(SystemExit):
            run(plots.main, plots.get_args_parser(), [str(run_folder), "--output", str(target)])
        one_line(capsys.readouterr().err, reason)
        assert {path: path.read_bytes() for path in (log, checkpoint)} == before
    figure = run(plots.main, plots.get_args_parser(), [str(run_folder)])
    assert run(plots.main, plots.get_args_parser(), [str(run_folder), "--output", figure]) == figure  # its own
    assert os.path.getsize(figure) > 0
