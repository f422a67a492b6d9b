"""demo/ (`python -m demo`, and demo/stages.py): every stage runs end to end, and pretraining on the digit captions
beats a random-init encoder.

One run of the demo's own command, `python -m demo` as the README gives it, serves every check (it is the slowest
test, about three minutes on 2 cores): 200 pretraining steps, then the linear probe and 600 few-shot episodes on
the held-out digits for both encoders. The margins asserted are well inside what was measured (see MEASURED), so the
test fails when learning breaks, not when a seed is unlucky; and the README's table is what the demo prints.
"""
import json
import os
import re

import pytest

import plots
from conftest import REPO, assert_one_line_error, run_python
from demo.stages import run_stage
from util import imagetree
from util.cli import UserError

# measured with `python -m demo --seed S --episodes E` on 2 CPU cores: (linear probe, few-shot) of pretrained minus
# random init, in points
MEASURED = {"seed 0, 600 episodes, 2 threads": (1.77, 15.97), "seed 0, 200 episodes, 1 thread": (1.55, 16.2)}
MIN_LINEAR_PROBE_GAIN, MIN_FEWSHOT_GAIN = 0.75, 8.0  # the digits probe linearly at 93.6% even at random init
# the README's table, measured on 2 cores of an AMD EPYC server (pretrained 96.00 / 86.38 +- 0.51), is reproduced
# exactly there; another machine of the same kind printed 95.33 / 85.73 +- 0.51 (issue 29): the CPU's float kernels
# move a number by up to 0.67 points. A table within 1 point is the demo's on any such machine; a stale one (2.2
# points off, issue 29) is not. The confidence interval's half-width moves by a hundredth or two.
README_TOLERANCE, README_CI_TOLERANCE = 1.0, 0.05


def readme_table():
    """{encoder row: (linear probe top-1, few-shot mean, its 95% interval)} from the README's demo table."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read().split("<!-- demo-table -->", 1)[1]
    rows = re.findall(r"^\| (pretrained|random init)[^|]* \| ([\d.]+) \| ([\d.]+) \+- ([\d.]+) \|$", text, re.M)
    return {name: tuple(float(x) for x in numbers) for name, *numbers in rows}


@pytest.mark.slow
def test_demo_runs_every_stage_and_learns(tmp_path):
    output = tmp_path / "demo"
    result = run_python("-m", "demo", "--output", output)
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
    # the README's table is this run's (see README_TOLERANCE)
    table = readme_table()
    assert table.keys() == {"pretrained", "random init"}
    for name, encoder in (("pretrained", trained), ("random init", random_init)):
        linear, fewshot, interval = table[name]
        assert abs(linear - encoder["linear_probe_top1"]) <= README_TOLERANCE, (name, encoder)
        assert abs(fewshot - encoder["fewshot_5way_5shot"]) <= README_TOLERANCE, (name, encoder)
        assert abs(interval - encoder["fewshot_ci95"]) <= README_CI_TOLERANCE, (name, encoder)
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


def test_an_interrupted_demo_is_resumed_with_its_own_settings(tmp_path):
    """demo.json records the demo's settings: a non-empty --output with one is resumed with --resume (each stage
    resumes), refused without it (the message says --resume) or with other settings."""
    from demo.__main__ import check_output, get_args_parser
    parse = get_args_parser().parse_args
    output = tmp_path / "demo"
    output.mkdir()
    (output / "synthetic").mkdir()  # what an interrupted demo leaves
    args = parse(["--output", str(output), "--resume"])
    with pytest.raises(UserError, match="holds no demo to resume"):
        check_output(args)
    (output / "demo.json").write_text(json.dumps({"captions": args.captions, "epochs": 200, "images_per_caption": 8,
                                                  "episodes": 600, "seed": 0}))
    check_output(args)  # the same settings: resumed
    with pytest.raises(UserError, match=r"is not empty.*pass --resume"):
        check_output(parse(["--output", str(output)]))
    with pytest.raises(UserError, match="other settings .*--epochs 200"):
        check_output(parse(["--output", str(output), "--resume", "--epochs", "50"]))
