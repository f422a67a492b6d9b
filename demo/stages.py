"""Running stage scripts as a user would, for the scripts that chain them (the demo, experiments/findings.py)."""
import json
import os
import shlex
import subprocess
import sys

from util.cli import REPOSITORY, UserError

# the encoder the demo and findings.py train on the 32 px digits, and the pretraining flags they share
DIGIT_ENCODER_FLAGS = ["--model", "vit_tiny", "--image-size", "32"]
DIGIT_PRETRAIN_FLAGS = [*DIGIT_ENCODER_FLAGS, "--crop-scale", "0.6", "1", "--head-hidden-dim", "512",
                        "--embed-dim", "128",
                        "--head-batchnorm", "joint"]  # 10-40 captions a step: per-view BatchNorm batches that small


def run_stage(title, *command, launcher=(), offline=True):
    """`python [launcher] <command>` from the repository root, offline unless told, echoing the command as a user
    would type it (launcher: e.g. `-m torch.distributed.run --nproc-per-node 8 --standalone`); a failure becomes
    a UserError naming the command (the stage has already printed its own message)."""
    line = " ".join(shlex.quote(str(part)) for part in (*launcher, *command))
    print(f"\n==> {title}\n$ python {line}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} if offline else None
    if subprocess.run([sys.executable, *map(str, launcher), *map(str, command)], cwd=REPOSITORY,
                      env=env).returncode != 0:
        raise UserError(f"stage '{title}' failed (command: python {line})")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def probe_and_fewshot(title, encoder_flags, train_folder, test_folder, folder, probe_flags=(), fewshot_flags=()):
    """One encoder scored as the demo and experiments/findings.py score it: linear_probe.py (L-BFGS, trained on
    `train_folder`, tested on `test_folder`) and fewshot.py (5-way 5-shot episodes from `test_folder`), results in
    `folder` (a result already there is reused). Returns the three numbers the tables print."""
    probe_json, fewshot_json = os.path.join(folder, "linear_probe.json"), os.path.join(folder, "fewshot.json")
    if not os.path.isfile(probe_json):
        run_stage(f"linear_probe.py ({title})", "linear_probe.py", "--protocol", "lbfgs", *encoder_flags,
                  "--train-dir", train_folder, "--val-dir", test_folder, *probe_flags, "--output", probe_json)
    if not os.path.isfile(fewshot_json):
        run_stage(f"fewshot.py ({title})", "fewshot.py", *encoder_flags, "--data-dir", test_folder, *fewshot_flags,
                  "--output", fewshot_json)
    probe, fewshot = read_json(probe_json), read_json(fewshot_json)
    return {"linear_probe_top1": probe["test"], "fewshot_5way_5shot": fewshot["accuracy"],
            "fewshot_ci95": fewshot["ci95"]}
