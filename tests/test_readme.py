"""Every command a reader copies parses as written: those of README.md and docs/RUNNING.md, of the stage scripts'
docstrings, of the recipe files (recipes/*.args, through the `# run:` line each holds) and of the SLURM job files
(slurm/*.sbatch), each with the script's own parser, and torchrun's flags with torchrun's (`--nproc` alone is
ambiguous there). Every shell variable they use is set where they use it. The demo's command runs in test_demo.py.
The documents hold together: the README within its word budget and its CI test command where .ci/run reads it, every
link and anchor of README.md, docs/RUNNING.md and BENCHMARKS.md's headline table leading somewhere, every repository
path they name existing, and no plumbing module named at the top level it left for util/."""
import glob
import importlib
import os
import re
import shlex
import subprocess

import pytest

from conftest import REPO

SCRIPTS = ("generate.py", "pretrain.py", "linear_probe.py", "fewshot.py", "segment.py", "compositionality.py",
           "plots.py", "demo/__main__.py", "demo/tiny_sd.py")


DOCS = ("README.md", "docs/RUNNING.md")  # the paper reader's page and the operator's guide


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def bash_blocks(name):
    return re.findall(r"```bash\n(.*?)```", read(name), re.S)


def readme_commands():
    """(where, words) of every `python X.py ...` and `torchrun ... X.py ...` line in the bash blocks of README.md and
    docs/RUNNING.md."""
    for name in DOCS:
        for block in bash_blocks(name):
            yield from _commands(block, name)


def docstring_commands():
    for script in SCRIPTS:
        with open(os.path.join(REPO, script), encoding="utf-8") as f:
            docstring = re.match(r'\s*"""(.*?)"""', f.read(), re.S)
        if docstring:
            yield from _commands(docstring.group(1), script)


def _commands(text, where):
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"^(\s*)exec\s+", r"\1", line)  # `exec python ...` (an sbatch file's python takes signals)
        line = re.sub(r"\s&\s*$", "", line)  # started in the background (an sbatch file that forwards a signal)
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


SLURM = os.path.join(REPO, "slurm")


def slurm_commands():
    """The python and torchrun command of every slurm/*.sbatch file, without the `srun` (and its options) that
    starts it on each node, nor the `&` that leaves the job's shell free for its signal."""
    for name in sorted(os.listdir(SLURM)):
        with open(os.path.join(SLURM, name), encoding="utf-8") as f:
            script = re.sub(r"^(\s*)srun(\s+--[\w-]+(=\S+)?)*\s+", r"\1", f.read(), flags=re.M)
            yield from _commands(re.sub(r"\s+&$", "", script, flags=re.M), f"slurm/{name}")


COMMANDS = list(readme_commands()) + list(docstring_commands()) + list(recipe_commands()) + list(slurm_commands())


def test_there_are_commands_to_check():
    assert len(COMMANDS) > 20 and any(words[0] == "torchrun" for _, words in COMMANDS)
    for name in DOCS:  # each document's own commands, torchrun launches among them
        assert any(where == name and words[0] == "torchrun" for where, words in COMMANDS), name
    assert sum(where == "docs/RUNNING.md" for where, _ in COMMANDS) > 20
    assert sum(where.startswith("recipes/") for where, _ in COMMANDS) == len(os.listdir(os.path.join(REPO, "recipes")))
    assert sorted(where for where, _ in COMMANDS if where.startswith("slurm/")) == [
        "slurm/generate_array.sbatch", "slurm/pretrain_multinode.sbatch"]  # one command each


def unset_variables(script):
    """The shell variables a script reads but neither sets itself nor gets from SLURM."""
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assigned = set(re.findall(r"^\s*(\w+)=", code, re.M))
    return {name for name in re.findall(r"\$\{?(\w+)", code) if name not in assigned and not name.startswith("SLURM_")}


def test_slurm_files_are_valid_bash_and_set_what_they_use():
    for name in os.listdir(SLURM):
        path = os.path.join(SLURM, name)
        assert subprocess.run(["bash", "-n", path]).returncode == 0, name
        with open(path, encoding="utf-8") as f:
            script = f.read()
        assert not unset_variables(script), (name, unset_variables(script))
        array = re.search(r"^#SBATCH --array=0-(\d+)$", script, re.M)  # an array job: one part per task
        if array:
            assert f"--shard \"$SLURM_ARRAY_TASK_ID\" --num-shards {int(array.group(1)) + 1}" in script, name
    pretrain = open(os.path.join(SLURM, "pretrain_multinode.sbatch"), encoding="utf-8").read()
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in pretrain
    assert "--nnodes \"$SLURM_NNODES\"" in pretrain and "#SBATCH --ntasks-per-node=1" in pretrain


def test_slurm_jobs_survive_their_cluster():
    """What a cluster needs (issue 29): the environment activated; srun given the CPUs (SLURM 22.05 and later no
    longer pass --cpus-per-task to the step); every node ended when one fails; a signal before the time limit that
    the script passes on to the run (which saves and stops) before it requeues the job, the command in the background
    so that the shell can take the signal; the log appended to, not truncated, by the requeued job."""
    for name in os.listdir(SLURM):
        with open(os.path.join(SLURM, name), encoding="utf-8") as f:
            script = f.read()
        directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.M))
        assert directives.get("open-mode") == "append" and "requeue" in directives, name
        assert re.fullmatch(r"B:USR1@\d+", directives.get("signal", "")), name
        # the warning passed on to the run as SIGTERM (it saves and exits with one line), then the job requeued
        assert re.search(r"""^trap '.*kill -TERM "\$RUN"' USR1$""", script, re.M), name
        assert re.search(r"^\s+scontrol requeue ", script, re.M), name
        assert re.search(r"^srun --kill-on-bad-exit=1 ", script, re.M), name
        assert re.search(r"&\nRUN=\$!", script) and 'wait "$RUN"' in script, name  # a trap runs between commands
        assert 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"' in script, name
        assert 'source "$VENV/bin/activate"' in script, name
        code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"--nproc(?![-_])", code), name  # ambiguous to torchrun


def test_readme_blocks_set_the_variables_they_use():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    assert [unset_variables(block) for block in blocks if unset_variables(block)] == []
    blocks = bash_blocks("docs/RUNNING.md")
    assert [unset_variables(block) for block in blocks if unset_variables(block)] == []


README_WORDS = 1800  # the paper reader's page (issue 26); the operator's material goes to docs/RUNNING.md


def test_readme_stays_within_its_word_budget():
    assert len(read("README.md").split()) <= README_WORDS  # words as `wc -w README.md` counts them


def test_ci_reads_the_test_command_after_its_marker():
    """.ci/run runs the second line after `<!-- ci-test-command -->`: the command inside the bash block there."""
    lines = read("README.md").splitlines()
    marker = lines.index("<!-- ci-test-command -->")
    assert lines[marker + 1] == "```bash" and lines[marker + 3] == "```"
    assert lines[marker + 2].startswith("pip install -r requirements-test.txt") and "pytest" in lines[marker + 2]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(name):
    """The anchors of a markdown file's headings, the second of two equal ones suffixed -1 as GitHub does."""
    seen, found = {}, set()
    text = re.sub(r"```.*?```", "", read(name), flags=re.S)
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


LINKED = DOCS + ("BENCHMARKS.md",)


@pytest.mark.parametrize("name", LINKED)
def test_links_and_anchors_lead_somewhere(name):
    text = re.sub(r"```.*?```", "", read(name), flags=re.S)
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", link)]
    assert links, name
    for link in links:
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(name), path)) if path else name
        assert os.path.exists(os.path.join(REPO, target)), (name, link)
        if anchor:
            assert anchor in anchors(target), (name, link)


def test_readme_links_the_other_documents():
    links = re.findall(r"\]\(([^)#\s]+)", read("README.md"))
    assert {"docs/RUNNING.md", "FIDELITY.md", "BENCHMARKS.md"} <= set(links)


def test_benchmarks_open_with_the_headline_table():
    text = read("BENCHMARKS.md")
    first = re.findall(r"^## (.*)$", text, re.M)[0]
    assert first == "Headline figures"
    table = text.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    assert 10 <= len(rows) <= 30  # one screen
    for row in rows:
        assert len(row.split(" | ")) == 5 and "](#" in row, row  # what, figure, machine, section link, command


REPO_FOLDERS = ("util/", "families/", "recipes/", "slurm/", "bench/", "experiments/", "demo/", "tests/", "docs/")


@pytest.mark.parametrize("name", DOCS)
def test_the_paths_the_documents_name_exist(name):
    """Every repository path named in backquotes (a script, a module, a recipe pattern, a folder) exists: a moved file
    must be renamed in the documents too."""
    text = re.sub(r"```.*?```", "", read(name), flags=re.S)
    named = {span.split()[0] for span in re.findall(r"`([^`\n]+)`", text) if span.split()}
    paths = {word for word in named if re.fullmatch(r"[\w*./-]+", word)
             and (word.startswith(REPO_FOLDERS) or word.endswith((".py", ".args", ".sbatch", ".md")))}
    assert len(paths) > 10, paths
    assert [path for path in sorted(paths) if not glob.glob(os.path.join(REPO, path))] == []


PLUMBING = ("cli", "files", "runlog", "distributed", "dataindex", "shards", "imagetree", "catalog", "tokenizer",
            "evaluation")  # modules that left the top level for util/


@pytest.mark.parametrize("name", DOCS)
def test_plumbing_is_named_under_util(name):
    text = read(name)
    assert [m for m in PLUMBING if re.search(rf"(?<![\w/.]){m}\.py", text)] == []


@pytest.mark.parametrize("where, words", COMMANDS, ids=[f"{w}: {' '.join(c)[:60]}" for w, c in COMMANDS])
def test_command_parses_as_written(where, words, monkeypatch):
    monkeypatch.chdir(REPO)  # recipe files are named relative to the repository
    parse(words)
