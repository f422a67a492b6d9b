"""demo/ (`python -m demo`, and demo/stages.py): every stage runs end to end, and pretraining on the digit captions
beats a random-init encoder.

One run of the demo's own command serves both checks (it is the slowest test, about a minute on 2 cores): 200
pretraining steps, then the linear probe and few-shot episodes on the held-out digits for both encoders. The
margins asserted are well inside what was measured (see MEASURED), so the test fails when learning breaks, not
when a seed is unlucky.
"""
import json

import pytest

import plots
from conftest import assert_one_line_error, run_python
from demo.stages import run_stage
from util import imagetree
from util.cli import UserError

# measured with `python -m demo --seed S --episodes E` on 2 CPU cores: (linear probe, few-shot) of pretrained minus
# random init, in points
MEASURED = {"seed 0, 600 episodes, 2 threads": (1.77, 15.97), "seed 0, 200 episodes, 1 thread": (1.55, 16.2)}
MIN_LINEAR_PROBE_GAIN, MIN_FEWSHOT_GAIN = 0.75, 8.0  # the digits probe linearly at 93.6% even at random init


@pytest.mark.slow
def test_demo_runs_every_stage_and_learns(tmp_path):
    output = tmp_path / "demo"
    result = run_python("-m", "demo", "--output", output, "--episodes", "200")
    assert result.returncode == 0, result.stderr[-3000:]

    # stage 1: the synthetic tree (8 captions x 4 images) and its preview grid
    records = imagetree.read_tree(str(output / "synthetic"))
    assert len(records) == 8 and all(len(r.image_paths) == 4 for r in records)
    assert list((output / "preview").glob("*.png"))
    # stages 2-4, and the summary table
    summary = json.loads((output / "results.json").read_text())
    assert summary["pretrain"]["steps"] == 200
    trained, random_init = summary["encoders"]["pretrained"], summary["encoders"]["random init"]
    assert "linear probe top-1" in result.stdout and "random init" in result.stdout
    assert trained["linear_probe_top1"] >= random_init["linear_probe_top1"] + MIN_LINEAR_PROBE_GAIN, summary
    assert trained["fewshot_5way_5shot"] >= random_init["fewshot_5way_5shot"] + MIN_FEWSHOT_GAIN, summary
    # the figure the README promises (matplotlib comes with requirements.txt): a PNG of a plausible size
    figure = (output / "results.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(figure) < 2_000_000
    assert "the figure in" in result.stdout and "no figure" not in result.stdout
    # `python plots.py demo_output` finds the run inside it
    assert plots.main(plots.get_args_parser().parse_args([str(output)])) == str(output / "pretrain" / "curves.png")
    assert (output / "pretrain" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pretraining showed its progress through the pipe: a line every --log-every 5 steps
    assert sum(line.startswith("step ") and "/200 (" in line for line in result.stdout.splitlines()) == 40
    # checkpoints: one at the end, not one per one-step epoch
    assert [p.name for p in (output / "pretrain").glob("checkpoint-*.pth")] == ["checkpoint-00000200.pth"]


@pytest.mark.slow
def test_demo_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("")
    assert_one_line_error(run_python("-m", "demo", "--output", tmp_path), "not empty")


@pytest.mark.slow
def test_run_stage_echoes_the_command_and_turns_failure_into_a_user_error(tmp_path, capsys):
    run_stage("help", "pretrain.py", "--help")
    assert "$ python pretrain.py --help" in capsys.readouterr().out
    with pytest.raises(UserError, match="stage 'broken' failed"):
        run_stage("broken", "pretrain.py", "--epochs", "0", "--output", str(tmp_path / "x"))
