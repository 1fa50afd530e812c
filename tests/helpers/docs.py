"""The manual's pages and their fenced code blocks, for tests/unit/test_docs.py and
tests/e2e/test_docs_commands.py.

Every shell block in the manual is titled with what it needs (docs/getting-started.md, "How to read
the commands"): ```` ```bash title="runs here" ```` and so on. Blocks titled ``runs here`` are run
by tests/e2e/test_docs_commands.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import ROOT

DOCS = ROOT / "docs"
RUNS_HERE = "runs here"
TITLES = {  # a shell block's title -> what it means (docs/getting-started.md shows the same table)
    RUNS_HERE: "runs in seconds on a CPU-only machine; tested",
    "runs here, slow": "runs on a CPU-only machine but takes minutes",
    "runs here, until stopped": "a server that runs until Ctrl-C",
    "runs here, on your data": "runs on a CPU-only machine, given a dataset at the path shown",
    "needs a GPU": "needs an NVIDIA GPU",
    "needs Docker": "needs a Docker engine",
    "needs Docker and a GPU": "needs a Docker engine, an NVIDIA GPU and the NVIDIA Container Toolkit",
    "needs a cluster": "needs several nodes and their scheduler",
}
SHELLS = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^`\n]*)$")
TITLE = re.compile(r'\btitle="([^"]*)"')


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: its language, its title (or None) and its text."""

    path: Path
    line: int  # of the opening fence, from 1
    language: str
    title: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """The manual's pages and the front page: docs/**/*.md and the README that is to be the front
    page (README.new.md while it waits to replace README.md, else README.md)."""
    front = ROOT / "README.new.md"
    return sorted(DOCS.rglob("*.md")) + [front if front.exists() else ROOT / "README.md"]


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path`` (```` ``` ```` fences, indented or not)."""
    found, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j].removeprefix(indent))
            j += 1
        title = TITLE.search(info)
        found.append(Block(path, i + 1, info.split()[0] if info else "", title[1] if title else None,
                           "\n".join(body) + "\n"))
        i = j + 1
    return found


def shell_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page) if b.language in SHELLS]


def runnable_blocks() -> list[Block]:
    """Every ``runs here`` shell block, each text once (the front page repeats the manual's first)."""
    seen, unique = set(), []
    for block in shell_blocks():
        if block.title == RUNS_HERE and block.text not in seen:
            seen.add(block.text)
            unique.append(block)
    return unique
