"""The fenced ``bash`` commands of README.md and docs/*.md, parsed (for tests/test_readme_commands.py)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from readme_command_rules import RULES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Command:
    """One command of a fenced block: where it is and its words (comments and continuations removed)."""

    doc: str
    line: int
    block: int
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.argv)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def fenced_blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """(first line number, text) of every ```lang block; fences may be indented (inside list items)."""
    blocks, current, start, indent = [], None, 0, ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if current is None and stripped == f"```{lang}":
            current, start, indent = [], n + 1, line[: len(line) - len(line.lstrip())]
        elif current is not None and stripped == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line[len(indent) :] if line.startswith(indent) else line)
    assert current is None, f"{path}: unclosed ```{lang} block from line {start}"
    return blocks


def split_commands(doc: str, block: int, start: int, text: str) -> list[Command]:
    """The commands of one bash block, split on newlines (after joining ``\\`` continuations) and ``&&``."""
    commands, pending, first = [], "", start
    for n, line in enumerate(text.splitlines(), start):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        part: list[str] = []
        for w in [*words, "&&"]:
            if w == "&&":
                if part:
                    commands.append(Command(doc, first, block, tuple(part)))
                part = []
            else:
                part.append(w)
    return commands


def all_commands() -> list[Command]:
    """Every command of every ```bash block of the README and docs/."""
    out = []
    for path in DOCS:
        doc = str(path.relative_to(ROOT))
        for i, (start, text) in enumerate(fenced_blocks(path, "bash")):
            out += split_commands(doc, i, start, text)
    return out


def classify(cmd: Command) -> tuple[str, str, str]:
    """(kind, reason, pattern) of the first rule that matches the command."""
    for pattern, kind, reason in RULES:
        if re.search(pattern, cmd.text):
            return kind, reason, pattern
    raise AssertionError(f"{cmd}\n  no rule in RULES says whether this command can run here; add one")
