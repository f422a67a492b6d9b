"""bench/gpu_report.py at toy sizes on the CPU, as a subprocess: every section prints its rows and the JSON holds
finite numbers, so the GPU report cannot rot between the rare runs on a GPU."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_one_line_error, run_python
from loss import multi_positive_loss

sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_report  # noqa: E402

# rows each table must have in a --tiny run on the CPU (SupConLoss's rows only where the package is installed)
try:
    import pytorch_metric_learning  # noqa: F401
    LOSS_ROWS = 4
except ImportError:
    LOSS_ROWS = 2
ROWS = {"generation": [6], "train": [3], "loss": [LOSS_ROWS], "loader": [3, 2, 3], "evaluations": [3], "parity": [3],
        "families": [4]}


def numbers(value):
    """Every int and float in a JSON value (booleans and None left out)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_tiny_cpu_run_prints_every_section_and_finite_numbers(tmp_path):
    output = tmp_path / "report.json"
    # about 12 s on 2 idle cores; the timeout only stops full sizes creeping into --tiny (hours on a CPU)
    result = run_python("bench/gpu_report.py", "--device", "cpu", "--tiny", "--output", output, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["complete"] and not report["failed"] and report["tiny"]
    assert sorted(report["sections"]) == sorted(gpu_report.SECTIONS)
    for section, expected in ROWS.items():
        tables = report["sections"][section]["tables"]
        assert [len(table["rows"]) for table in tables] == expected, section
        for table in tables:
            assert table["title"] in result.stdout
            for row in table["rows"]:
                assert "| " + " | ".join(row["cells"]) + " |" in result.stdout  # printed as markdown
                assert len(row["cells"]) == len(table["columns"])
                assert list(numbers({k: v for k, v in row.items() if k != "cells"})), row  # each row has numbers
    values = list(numbers(report["sections"]))
    assert values and all(math.isfinite(v) for v in values)
    # the headline numbers are there
    rows = {section: [row for table in report["sections"][section]["tables"] for row in table["rows"]]
            for section in ROWS}
    assert all(row["images_per_s"] > 0 for row in rows["generation"] if "side" in row)
    assert {row["scheduler"] for row in rows["generation"]} == {"ddim", "dpm-solver++"}
    assert rows["train"][0]["side"] == "ours" and rows["train"][0]["flops_per_step"] > 0
    assert abs(rows["train"][2]["loss_difference"]) < 1e-4  # ours and timm compute the same step
    assert rows["loss"][0]["rows"] * 4 == rows["loss"][0]["columns"]  # one rank of 4 simulated
    assert all(row["cores"] > 0 for row in rows["loader"][-3:])
    decode = [row for row in rows["loader"] if row.get("what") == "decode_crops"]  # --gpu-decode, the CPU fallback
    assert len(decode) == 1 and decode[0]["images_per_s"] > 0
    assert [row["family"] for row in rows["families"]] == ["mocov3", "byol", "dino", "mae"]
    assert all(row["gpu_hours"] > 0 and row["recipe_steps"] > 0 for row in rows["families"])
    # what a CPU run cannot measure is said, on stdout and in the JSON
    skipped = {entry["what"] for entry in report["skipped"]}
    assert {"generation in float16", "bf16 autocast in the training step", "host-to-device copies",
            "bf16 autocast in the evaluations"} <= skipped
    assert all(row["items_per_s"] > 0 and row["flops"] > 0 for row in rows["evaluations"])
    for what in skipped:
        assert f"skipped: {what}: " in result.stdout
    assert report["machine"]["device"] == "cpu" and report["sizes"]["world_size"] == 4


def test_one_simulated_rank_is_its_share_of_the_one_process_loss():
    """Averaged over the ranks of a simulated run, one_rank_loss gives the one-process loss over the whole batch."""
    generator = torch.Generator().manual_seed(0)
    columns = F.normalize(torch.randn(48, 16, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.arange(48) // 6
    per_rank = [gpu_report.one_rank_loss(columns, labels, rank, 12, 0.1) for rank in range(4)]
    assert torch.allclose(torch.stack(per_rank).mean(), multi_positive_loss(columns, labels, 0.1), atol=1e-12)


@pytest.mark.slow
def test_help_names_every_size_with_both_defaults():
    result = run_python("bench/gpu_report.py", "--help")
    assert result.returncode == 0
    for key, value in gpu_report.SIZES["full"].items():
        if value is not None:
            flag = "--" + key.replace("_", "-")
            assert flag in result.stdout, flag
    for flag in ("--device", "--tiny", "--sections", "--output", "--train-depth"):
        assert flag in result.stdout


@pytest.mark.slow
def test_bad_flag_is_one_line_and_exit_code_2():
    assert_one_line_error(run_python("bench/gpu_report.py", "--tiny", "--gen-repeats", "0"), "--gen-repeats")


def test_quick_is_the_full_shapes_and_a_time_limit_skips_the_sections_left(tmp_path):
    """--quick measures what the full run measures (the same shapes but the generation batch) with fewer repeats,
    inside 480 s; a section that would start after --time-limit is skipped and said, and the JSON is complete."""
    quick, full = gpu_report.SIZES["quick"], gpu_report.SIZES["full"]
    shapes = {key for key in full if not key.endswith("repeats") and not key.startswith("gen_")}
    assert {key: quick[key] for key in shapes} == {key: full[key] for key in shapes}
    assert all(quick[key] <= full[key] for key in full if key.endswith("repeats"))
    args = gpu_report.get_args_parser().parse_args(["--quick"])
    gpu_report.resolve_sizes(args)
    assert args.time_limit == gpu_report.QUICK_TIME_LIMIT == 480 and args.gen_captions * args.gen_images == 8
    output = tmp_path / "report.json"
    args = gpu_report.get_args_parser().parse_args(["--device", "cpu", "--tiny", "--time-limit", "0", "--output",
                                                    str(output)])
    gpu_report.main(args)
    report = json.loads(output.read_text())
    assert report["complete"] and report["sections"] == {} and report["time_limit"] == 0
    assert [entry["what"] for entry in report["skipped"]] == [f"section {name}" for name in gpu_report.SECTIONS]


@pytest.mark.slow
def test_sigterm_keeps_the_rows_measured_and_says_it_stopped(tmp_path):
    """`timeout` or a lease ending sends SIGTERM: the rows measured so far stay in the JSON, marked stopped."""
    import signal
    import subprocess
    import time
    output = tmp_path / "report.json"
    process = subprocess.Popen([sys.executable, "bench/gpu_report.py", "--device", "cpu", "--tiny", "--output",
                                str(output)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # until the first row is in the JSON
        try:
            if json.loads(output.read_text())["sections"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["stopped"].startswith("interrupted during section") and not report["complete"]
    assert report["sections"] and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("gpu_report.py: stopped after")
