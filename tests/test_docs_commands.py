"""Every `subspace-optim ...` command that the README and docs/ show, tried as a new user would, at toy size: a
change that breaks a documented command (a renamed flag, a removed choice, a file layout it relies on) fails here.

Commands are read from the markdown itself: lines of code blocks, and inline code spans, that start with
`subspace-optim SUBCOMMAND`. ``a|b`` stands for each alternative, and PLACEHOLDERS for a value of the user's choice.
Each runs in-process through the real CLI, in one scratch folder holding the files the docs name (USER_FILES):

- train / finetune: run for one step with TOY flags appended (argparse keeps the last value), on tiny data unless
  the command names its own --data, and with llama-tiny in place of any other named LLaMA size (an unknown name
  is kept, and fails); --resume and compare get copies of one toy run at the folders they name;
- reproduce: with --dry-run (the experiments themselves are tested, at --quick size, in test_experiments.py);
- memory, --help: as written.

Not run, only parsed and resolved (flags, choices, the resolved config), see NOT_RUN: --data allenai/c4 (streams
from the Hugging Face hub: needs a network and the optional `hub` extra).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from subspace_optim.cli import main

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/harness.md", "docs/rso.md", "docs/results/README.md")
#: Placeholders the docs write for a value of the user's choice, and the value tried.
PLACEHOLDERS = {"S": "0", "η": "0.5", "NAME": "counterexample"}
TOY = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--eval-batches", "1", "--quiet"]
#: Commands that cannot run here (a substring of the command -> why); they are parsed and their config resolved.
NOT_RUN = {"--data allenai/c4": "streams C4 from the Hugging Face hub: needs a network and the hub extra"}
_COMMAND = re.compile(r"subspace-optim [a-z][a-z-]*(\s|$)")  # not "subspace-optim train: error: ..." (output)


def commands_in(text: str, doc: str) -> list[tuple[str, str]]:
    """[(doc:line, command)] for each `subspace-optim SUBCOMMAND ...` in ``text``: lines of fenced or indented
    code blocks (joining lines continued by a backslash), and inline code spans (which may wrap)."""
    found, fenced, prose = [], False, []  # prose: the text outside fenced blocks, line for line
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
            prose.append("")
            continue
        prose.append("" if fenced else line)
        if (fenced or line.startswith("    ")) and _COMMAND.match(line.strip()):
            command, more = line.strip(), number
            while command.endswith("\\"):
                command, more = command[:-1] + lines[more].strip(), more + 1
            found.append((number, command))
    joined = "\n".join(prose)
    for span in re.finditer(r"`(subspace-optim [^`]+)`", joined):
        command = " ".join(span.group(1).split())
        if _COMMAND.match(command):
            found.append((joined.count("\n", 0, span.start()) + 1, command))
    return [(f"{doc}:{number}", command) for number, command in sorted(found)]


def expand(command: str) -> list[list[str]]:
    """The argvs (after `subspace-optim`) a documented command stands for: one per combination of ``a|b``
    alternatives (written with or without spaces), placeholders replaced, ``# comments`` dropped."""
    command = re.sub(r"\s*\|\s*", "|", command)
    tokens = [PLACEHOLDERS.get(t, t) for t in shlex.split(command, comments=True)[1:]]
    return [list(argv) for argv in itertools.product(*(t.split("|") for t in tokens))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """[(doc:line, argv)] over DOCS in order, each distinct argv once (where it first appears)."""
    commands = []
    for doc in DOCS:
        for where, command in commands_in((ROOT / doc).read_text(), doc):
            commands += [(where, argv) for argv in expand(command) if argv not in [a for _, a in commands]]
    return commands


COMMANDS = documented_commands()

USER_FILES = {  # the files and folders the docs' commands name, as a user would have them
    "my.txt": "\n\n".join(f"Paragraph {i} of my own text, with enough words in it to pack a sequence. " * 3
                          for i in range(30)),
    "toy.txt": "\n\n".join(f"Story {i}: the council approved the new budget for the town today. " * 3
                           for i in range(30)),
    "corpus.jsonl": "".join(json.dumps({"body": f"Record {i} holds a document in the body field. " * 3}) + "\n"
                            for i in range(30)),
    "reviews.jsonl": "".join(json.dumps({"text": f"{'great fine good' if i % 2 else 'awful poor bad'} review {i}",
                                         "stars": 1 + 4 * (i % 2)}) + "\n" for i in range(40)),
}
USER_FILES["toy.jsonl"] = USER_FILES["reviews.jsonl"].replace('"stars"', '"label"')
USER_FILES["toy-sft.jsonl"] = "".join(json.dumps({"prompt": f"Story {i}", "response": "Yes" if i % 2 else "No"}) + "\n"
                                      for i in range(30))  # short: the toy --seq-len 16 holds the template too
#: Data for a command that names none: tiny, so that a run takes about a second.
TOY_DATA = {"train": "toy.txt", "finetune": "toy.jsonl", "sft": "toy-sft.jsonl"}
#: Flags that name a run folder to start from (`export` names one as its first argument).
RUN_FOLDER_FLAGS = ("--init-from", "--model")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One scratch folder as the current folder for every command: the user's files, the packaged MiniLM as
    `path/to/hf-checkpoint`, and one finished toy run that the commands naming a run folder get copies of."""
    from subspace_optim.train.models import classifier_dir

    root = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name, content in USER_FILES.items():
            Path(name).write_text(content)
        Path("path/to").mkdir(parents=True)
        Path("path/to/hf-checkpoint").symlink_to(classifier_dir("minilm"))
        assert main(["train", "--data", "toy.txt", *TOY, "--out", str(root / "toy-run")]) == 0
        yield root


def _toy_run_at(folder: str, workspace: Path) -> None:
    if not Path(folder).exists():
        shutil.copytree(workspace / "toy-run", folder)


def toy_argv(argv: list[str], workspace: Path, index: int) -> list[str]:
    """The command as it runs here (see the module docstring); prepares the run folders it names."""
    from subspace_optim.train.models import LLAMA_SIZES

    command = argv[0]
    if command == "compare":
        for folder in argv[1:]:
            _toy_run_at(folder, workspace)
        return argv
    if command == "reproduce":
        return [*argv, "--dry-run"]
    if command == "export":  # a copy of the toy run, exported into a fresh folder
        _toy_run_at(argv[1], workspace)
        return [*argv[:2], str(workspace / "exports-of-docs" / str(index)), *argv[3:]]
    if command not in TOY_DATA or "--help" in argv:
        return argv
    for flag in RUN_FOLDER_FLAGS:  # a run folder the command starts from (`runs/...`): the toy run
        if flag in argv and argv[argv.index(flag) + 1].startswith("runs/"):
            _toy_run_at(argv[argv.index(flag) + 1], workspace)
    if "--resume" in argv:  # the toy run is at step 1: extending it is the toy version of extending a run
        _toy_run_at(argv[argv.index("--resume") + 1], workspace)
        return [*argv, "--steps", "2", "--quiet"]
    argv = list(argv)
    if "--model" in argv and argv[argv.index("--model") + 1] in LLAMA_SIZES:  # an unknown name fails the run
        argv[argv.index("--model") + 1] = "llama-tiny"
    task = "sft" if "--task" in argv and argv[argv.index("--task") + 1] == "sft" else command
    data = [] if "--data" in argv else ["--data", TOY_DATA[task]]
    return [*argv, *data, *TOY, "--out", str(workspace / "runs-of-docs" / str(index))]


def test_commands_are_read_from_markdown():
    text = """Intro `subspace-optim train --optimizer a|b
--seed S` and `subspace-optim` alone, `other --x`.

```bash
subspace-optim memory --model llama-7b \\
    --dtype bf16   # a comment
subspace-optim train: error: this line is output
$ not a command
```

    subspace-optim reproduce counterexample | all
"""
    found = commands_in(text, "x.md")
    assert found == [("x.md:1", "subspace-optim train --optimizer a|b --seed S"),
                     ("x.md:5", "subspace-optim memory --model llama-7b --dtype bf16   # a comment"),
                     ("x.md:11", "subspace-optim reproduce counterexample | all")]
    assert [argv for _, c in found for argv in expand(c)] == [
        ["train", "--optimizer", "a", "--seed", "0"], ["train", "--optimizer", "b", "--seed", "0"],
        ["memory", "--model", "llama-7b", "--dtype", "bf16"], ["reproduce", "counterexample"], ["reproduce", "all"]]


def test_every_doc_has_commands():
    assert {where.split(":")[0] for where, _ in COMMANDS} == set(DOCS)


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w} {' '.join(a)}" for w, a in COMMANDS])
def test_documented_command_runs(where, argv, workspace, monkeypatch, capsys):
    if any(key in " ".join(argv) for key in NOT_RUN):  # the real parser and config, but no training
        from subspace_optim.train import loop
        from subspace_optim.train.config import resolve

        monkeypatch.setattr(loop, "run", lambda cfg, given: resolve(cfg))
        run = argv
    else:
        run = toy_argv(argv, workspace, COMMANDS.index((where, argv)))
    try:
        code = main(run)
    except SystemExit as exit_:  # --help, or argparse rejecting the command
        code = exit_.code
    assert code == 0, f"{where}: `subspace-optim {shlex.join(argv)}` failed as `subspace-optim {shlex.join(run)}`:\n" \
                      f"{capsys.readouterr().err}"
