"""Running stage scripts as a user would, for the scripts that chain them (the demo, experiments/findings.py)."""
import json
import os
import shlex
import subprocess
import sys

from cli import REPOSITORY, UserError


def run_stage(title, *command):
    """`python <command>` from the repository root, offline, echoing the command as a user would type it; a
    failure becomes a UserError naming the command (the stage has already printed its own message)."""
    line = " ".join(shlex.quote(part) for part in command)
    print(f"\n==> {title}\n$ python {line}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if subprocess.run([sys.executable, *command], cwd=REPOSITORY, env=env).returncode != 0:
        raise UserError(f"stage '{title}' failed (command: python {line})")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
