"""The docs cannot rot: every command in a shell block of README.md and docs/*.md is checked as it is written,
and every link between them leads somewhere.

- `python <stage>.py ...` and `accelerate launch [options] <stage>.py ...`: the stage's own parser takes the
  flags and values (run in-process up to the parse, nothing else runs; accelerate's parser takes the launch
  options). A flag that is renamed or a value that is no longer accepted fails here.
- `make <target>`: the Makefile has the target.
- `python -m bench.<name>` / `python bench/<name>.py`: the benchmark exists (tests/test_bench.py runs them).
- anything else must be a command of another tool the docs legitimately show (EXTERNAL), so a new kind of
  command is noticed.
The commands that need more than a parse are run by the tests that own them (tests/test_machines.py runs the
two-machine commands of docs/MULTI_NODE.md; tests/test_prepare_data_datatrove.py the cluster corpus runs)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import REPO

from utils.errors import UserError

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STAGES = {p.name for p in REPO.glob("*.py")}
# Programs of other tools that the docs show as they are (their flags are theirs to check).
EXTERNAL = {"source", "mkdir", "ls", "squeue", "ray", "ollama", "llama-cli", "pip", "git", "cp", "export"}


class Parsed(Exception):
    """Raised in place of running a stage, once its parser took the command line."""


def commands() -> list[tuple[str, str]]:
    """(file name, command) for every command line of every shell block (continuations joined, comments cut,
    `a && b` split, leading VAR=value assignments dropped)."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).split("\n"):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                words = shlex.split(line, comments=True)
                for part in " ".join(shlex.quote(w) for w in words).split(" && "):
                    part = re.sub(r"^(\w+=\S+\s+)+", "", part.strip())
                    if part:
                        found.append((path.name, part))
    return found


def stage_and_args(words: list[str]) -> tuple[str, list[str]] | None:
    """The stage script and its arguments of a `python <stage>.py ...` command, else None."""
    if words[0] in ("python", "python3", ".venv/bin/python") and len(words) > 1 and words[1] in STAGES:
        return words[1], words[2:]
    return None


def parse_only(script: str, args: list[str], monkeypatch) -> None:
    """Run `script`'s main on `args` up to its parse: its parse_config is replaced by the real one followed by
    `Parsed`, so nothing the parse accepted runs."""
    module = importlib.import_module(script.removesuffix(".py"))
    real = module.parse_config

    def parse_and_stop(*a, **k):
        real(*a, **k)
        raise Parsed

    monkeypatch.setattr(module, "parse_config", parse_and_stop)
    with pytest.raises(Parsed):
        module.main(args)


COMMANDS = commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 50
    assert any(name == "MULTI_NODE.md" and command.startswith("accelerate launch") for name, command in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{n}:{i}" for i, (n, _) in enumerate(COMMANDS)])
def test_every_documented_command_is_accepted_as_written(where, command, monkeypatch):
    words = [w for w in shlex.split(command) if w not in ("...", "…")]
    if words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
        assert set(words[1:]) <= targets, f"{where}: {command}: no such make target"
        return
    if words[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        parsed = launch_command_parser().parse_args(words[2:])
        assert parsed.training_script in STAGES, f"{where}: {command}"
        if parsed.config_file:
            assert (REPO / parsed.config_file).is_file()
        words = ["python", parsed.training_script, *parsed.training_script_args]
    if found := stage_and_args(words):
        script, args = found
        try:
            parse_only(script, args, monkeypatch)
        except (ValueError, UserError) as err:  # a GPU-only setting, refused on a machine without CUDA
            if torch.cuda.is_available() or "CUDA" not in str(err):
                raise
        return
    bench = next((w for w in words[1:3] if w.startswith("bench")), None)
    if words[0] in ("python", "python3", ".venv/bin/python") and bench:
        module = words[words.index("-m") + 1] if "-m" in words else None
        path = REPO / (module.replace(".", "/") + ".py" if module else bench)
        assert path.is_file(), f"{where}: {command}: no {path}"
        return
    if words[:3] in (["python3", "-m", "pip"], ["python", "-m", "pip"]):
        return
    assert words[0] in EXTERNAL, f"{where}: {command}: not a command this check knows (add it to EXTERNAL?)"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a markdown file."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_every_link_between_the_docs_leads_somewhere():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_what_a_newcomer_reads_first():
    """Short, with every page of docs/ reachable from it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([\w.]+\.md)", readme))
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert pages - linked == set()
