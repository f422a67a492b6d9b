"""Every command a reader copies parses as written: those of README.md, of the stage scripts' docstrings, and the
recipe files (recipes/*.args, through the `# run:` line each holds), each with the script's own parser, and
torchrun's flags with torchrun's (`--nproc` alone is ambiguous there). The demo's command runs in test_demo.py."""
import importlib
import os
import re
import shlex

import pytest

from conftest import REPO

SCRIPTS = ("generate.py", "pretrain.py", "linear_probe.py", "fewshot.py", "segment.py", "compositionality.py",
           "plots.py", "demo/__main__.py", "demo/tiny_sd.py")


def readme_commands():
    """(where, words) of every `python X.py ...` and `torchrun ... X.py ...` line in README.md's bash blocks."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        yield from _commands(block, "README.md")


def docstring_commands():
    for script in SCRIPTS:
        with open(os.path.join(REPO, script), encoding="utf-8") as f:
            docstring = re.match(r'\s*"""(.*?)"""', f.read(), re.S)
        if docstring:
            yield from _commands(docstring.group(1), script)


def _commands(text, where):
    for line in text.replace("\\\n", " ").splitlines():
        if not re.match(r"\s*(python \S+\.py|python -m demo|torchrun )", line):
            continue
        line = re.sub(r"\$\{?(\w+)\}?", "1", line)  # shell variables ($I, $HEAD) -> a value
        words = shlex.split(line, comments=True)
        is_script = len(words) > 1 and words[0] == "python" and (words[1].endswith(".py") or words[1] == "-m")
        if is_script or (words and words[0] == "torchrun"):
            yield where, words


def parse(words):
    """Parse a command as its programs would, or fail the test with argparse's message."""
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser as torchrun_parser
        parser = torchrun_parser()
        parser.exit = parser.error = lambda *a, **k: pytest.fail(f"torchrun rejects {' '.join(words)}: {a}")
        torchrun_args = parser.parse_args(words[1:])
        script, argv = torchrun_args.training_script, torchrun_args.training_script_args
    elif words[1] == "-m":  # python -m demo, python -m demo.tiny_sd
        script, argv = words[2], words[3:]
    else:
        script, argv = words[1], words[2:]
    if script.endswith(".py"):
        name = os.path.splitext(script)[0].replace("/", ".")  # demo/tiny_sd.py -> demo.tiny_sd
    else:
        name = script + ".__main__" if script == "demo" else script
    module = importlib.import_module(name)
    parser = module.get_args_parser()
    parser.exit = parser.error = lambda *a, **k: pytest.fail(f"{script} rejects {' '.join(words)}: {a}")
    return parser.parse_args(argv)


def recipe_commands():
    """The `# run:` line of every recipe file (which says the paper result it reproduces on a `# reproduces:`
    line): the command that reads it, so the file is parsed by the script it belongs to."""
    folder = os.path.join(REPO, "recipes")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert lines[0].startswith("# reproduces: "), f"recipes/{name} does not say what it reproduces"
        run_line = next(line for line in lines if line.startswith("# run: "))
        commands = list(_commands(run_line[len("# run: "):].split(" (")[0], f"recipes/{name}"))
        assert len(commands) == 1 and f"@recipes/{name}" in commands[0][1], run_line
        yield commands[0]


COMMANDS = list(readme_commands()) + list(docstring_commands()) + list(recipe_commands())


def test_there_are_commands_to_check():
    assert len(COMMANDS) > 20 and any(words[0] == "torchrun" for _, words in COMMANDS)
    assert sum(where.startswith("recipes/") for where, _ in COMMANDS) == len(os.listdir(os.path.join(REPO, "recipes")))


@pytest.mark.parametrize("where, words", COMMANDS, ids=[f"{w}: {' '.join(c)[:60]}" for w, c in COMMANDS])
def test_command_parses_as_written(where, words, monkeypatch):
    monkeypatch.chdir(REPO)  # recipe files are named relative to the repository
    parse(words)
