"""MkDocs hooks of the manual (mkdocs.yml ``hooks:``); run by ``mkdocs build`` and ``mkdocs serve``.

- ``<!-- cli-help: serve -->`` on a line of its own becomes a code block with the output of
  ``python -m dalishare serve --help`` (``<!-- cli-help: dalishare -->``: the top-level help;
  ``<!-- cli-help: cache list -->``: a sub-sub-command), so the CLI reference cannot drift from
  the code. A command that fails fails the build.
- A page may link a file of the repository outside docs/ the way GitHub resolves it
  (``../bench/results/cpu-peers-2core.png`` from docs/benchmarks.md). Such a file is copied into
  the site at its repository path and the link is pointed at the copy; a link to a file that does
  not exist is left as it is, and ``--strict`` reports it.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
CLI_MARKER = re.compile(r"^<!-- cli-help: ([a-z ]+) -->$", re.MULTILINE)
LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\))")
HELP_COLUMNS = "100"  # argparse wraps at $COLUMNS: the same text on any terminal


def cli_help(words: list[str]) -> str:
    """The ``--help`` text of ``dalishare WORDS``, as this checkout's code prints it."""
    env = {**os.environ, "COLUMNS": HELP_COLUMNS}
    argv = [sys.executable, "-m", "dalishare", *words, "--help"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`dalishare {' '.join(words)} --help` failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout.rstrip()


def _repo_file(page: Path, target: str) -> str | None:
    """The repository path (POSIX, from the root) of a relative link ``target`` on the page whose
    source is ``page`` when it points outside docs/ at an existing file, else None."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    path = (page.parent / target).resolve()
    try:
        rel = path.relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[:1] == ("docs",) or not path.is_file():
        return None
    return rel.as_posix()


def on_files(files, config):
    """Add the repository files the pages link (outside docs/) to the site."""
    wanted = set()
    for page in sorted(Path(config["docs_dir"]).rglob("*.md")):
        for match in LINK.finditer(page.read_text(encoding="utf-8")):
            rel = _repo_file(page, match.group(2))
            if rel is not None:
                wanted.add(rel)
    for rel in sorted(wanted):
        if files.get_file_from_path(rel) is None:  # a Markdown file becomes a page outside the nav
            files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"],
                              inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown: str, page, config, files):
    """Insert the CLI help texts; point links at repository files to their copies in the site."""

    def help_block(match: re.Match) -> str:
        words = match.group(1).split()
        words = [] if words == ["dalishare"] else words
        command = " ".join(["dalishare", *words, "--help"])
        return f"```text\n$ {command}\n{cli_help(words)}\n```"

    markdown = CLI_MARKER.sub(help_block, markdown)
    source, site_dir = Path(page.file.abs_src_path), posixpath.dirname(page.file.src_uri) or "."

    def relink(match: re.Match) -> str:
        rel = _repo_file(source, match.group(2))
        if rel is None:
            return match.group(0)
        return match.group(1) + posixpath.relpath(rel, site_dir) + match.group(3)

    return LINK.sub(relink, markdown)
