"""Every ``dicomnode …`` command the README and docs/*.md show parses with the real argument parser.

Documentation drifts from the parser silently (``train train.toml`` when the CLI takes ``--config``, a
``dicomnode run`` that never existed); this reads every fenced code block and inline code span, takes
each ``dicomnode`` invocation up to the first shell operator or comment, fills placeholders (``FILE...``,
``<dir>``, ``[--json]``) sensibly and hands it to ``build_parser().parse_args``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomnode.cli import build_parser

REPOSITORY = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# `dicomnode` in command position: at the start, after a shell operator or `$(`, after VAR=value
# assignments or `sudo -u USER`; not `journalctl -u dicomnode` or `/opt/dicomnode/scripts/setup.sh`
INVOCATION = re.compile(
    r"(?:^|&&|\|\||;|\||\$\()\s*(?:\w+=\S+\s+)*(?:sudo\s+(?:-u\s+\S+\s+)?)?"
    r"(?:\S*/)?(?:python -m )?dicomnode(?=\s)(.*)$"
)
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "2>", "<"}
# placeholders whose value must be one of a choice or a number
PLACEHOLDER_VALUES = {
    "COMMAND": "status",
    "LEVEL": "INFO",
    "S": "0.95",
    "N": "100",
    "P": "11112",
    "PORT": "11112",
}
BOX_DRAWING = re.compile(r"[\u2500-\u257f]")  # an architecture diagram, not a command line


@dataclass(frozen=True)
class Shown:
    """One command as a document shows it."""

    document: str
    line: int
    text: str
    inline: bool = False

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: dicomnode {self.text}"


def _invocations(line: str) -> list[str]:
    """The arguments of each ``dicomnode`` command on a shell line (`a && dicomnode b`: both)."""
    found = []
    for segment in re.split(r"&&|\|\||;|(?<!\|)\|(?!\|)", line.split(" #")[0]):
        match = INVOCATION.search(segment.strip())
        if match:
            found.append(match.group(1))
    return found


def _commands_in(path: Path) -> list[Shown]:
    text = path.read_text(encoding="utf-8")
    found: list[Shown] = []
    fenced: list[tuple[int, int]] = []
    for block in FENCE.finditer(text):
        fenced.append(block.span())
        first = text.count("\n", 0, block.start(1)) + 1
        for offset, line in enumerate(block.group(1).splitlines()):
            if BOX_DRAWING.search(line):
                continue
            for command in _invocations(line):
                found.append(Shown(path.name, first + offset, command))
    for span in INLINE.finditer(text):
        if any(start <= span.start() < end for start, end in fenced):
            continue
        line = text.count("\n", 0, span.start()) + 1
        for command in _invocations(span.group(1)):
            found.append(Shown(path.name, line, command, inline=True))
    return found


def _argv(text: str) -> list[str]:
    """The arguments as the parser would get them, placeholders filled in."""
    text = text.replace("…", "...")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        tokens = text.split()
    argv: list[str] = []
    for token in tokens:
        if token in SHELL_OPERATORS or token.startswith((">", "2>")):
            break
        token = token.strip("[]")  # an optional part is shown: check it too
        token = token.removesuffix("...").split("|")[0]  # `worker|sender`: either parses
        if not token:
            continue
        if re.fullmatch(r"<[^>]+>", token):
            token = "x"
        argv.append(PLACEHOLDER_VALUES.get(token, token))
    return argv


def _parses(argv: list[str]) -> str | None:
    """None when the parser accepts ``argv`` (``--help`` included), else its error message."""
    parser = build_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else errors.getvalue().strip().splitlines()[-1]
    return None


SHOWN = [shown for document in DOCUMENTS for shown in _commands_in(document)]


def test_the_documents_show_commands() -> None:
    """The extraction finds the quick start's and the reference's commands (it is not vacuous)."""
    assert len(SHOWN) > 30
    assert any(s.document == "README.md" and s.text.strip().startswith("serve") for s in SHOWN)


def _lacks_only_positionals(error: str) -> bool:
    """Prose may name a command without its files (`dicomnode retry`, `dicomnode infer --json`); a
    missing option (`train train.toml` without ``--config``) is a wrong command."""
    required = error.partition("the following arguments are required: ")[2]
    return bool(required) and "--" not in required


def _names_a_command(argv: list[str]) -> bool:
    """Prose that names a command (`dicomnode listen`, `dicomnode train`) without any argument."""
    named = " ".join(argv)
    return any(name == named or name.startswith(named + " ") for name in _subcommands(build_parser()))


@pytest.mark.parametrize("shown", SHOWN, ids=str)
def test_documented_command_parses(shown: Shown) -> None:
    """The command parses with the real parser (prose may name a command without its arguments)."""
    argv = _argv(shown.text)
    error = _parses(argv)
    if error and shown.inline and (_lacks_only_positionals(error) or _names_a_command(argv)):
        return
    assert error is None, f"{shown}\n  argv {argv}\n  {error}"


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    names: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                below = _subcommands(child, f"{prefix}{name} ")
                names.extend(below or [f"{prefix}{name}"])
    return names


def test_every_command_is_in_the_cli_reference() -> None:
    """docs/cli.md's table names every (sub)command the parser has, e.g. `dataset demo`."""
    reference = (REPOSITORY / "docs" / "cli.md").read_text(encoding="utf-8")
    cells = re.findall(r"^\|\s*(.+?)\s*\|", reference, flags=re.MULTILINE)
    documented = " ".join(cells)
    missing = [
        name for name in _subcommands(build_parser()) if f"`{name}" not in documented.replace("/ `", "`")
    ]
    assert missing == []
