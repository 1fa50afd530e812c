"""The manual's parts that can drift from the code (issue 22): the Grafana dashboard's metric names,
the docstrings the API reference is built from, the CLI help markers, the titles of the shell blocks,
the nav, and the front page's length and links. `mkdocs build --strict` itself runs in .ci/run; the
``runs here`` blocks run in tests/e2e/test_docs_commands.py."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from helpers.docs import DOCS, TITLES, blocks, pages, shell_blocks

DASHBOARD = DOCS / "grafana-dashboard.json"
METRIC = re.compile(r"\bdalishare_[a-z_]+\b")
FRONT_PAGE_LINES = 200
CI_TEST_COMMAND = ".venv/bin/python -m pytest"
RUFF_D = ["check", "--select", "D", "--config", "lint.pydocstyle.convention='google'",
          "dalishare/__init__.py", "dalishare/errors.py", "dalishare/job/iterator.py", "dalishare/augment",
          "dalishare/cli.py"]


def _exported_metrics() -> set[str]:
    """The names of the samples `dalishare serve --metrics-port` exposes, from its collector fed a
    report with one job (every field filled in by its type, so a new field needs no change here)."""
    from dalishare.producer.metrics import _ReportCollector
    from dalishare.wire import messages

    fake = {"int": 1, "float": 1.0, "str": "x", "bool": True, "dict": {}, "bytes": b""}

    def filled(cls, **given):
        kinds = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(cls)}
        return {**{name: fake.get(kind, 0) for name, kind in kinds.items()}, **given}

    row = filled(messages.JobStatus)
    collector = _ReportCollector()
    collector.report = messages.StatusReport(**filled(messages.StatusReport, jobs=[row]))
    return {sample.name for family in collector.collect() for sample in family.samples}


def test_the_grafana_dashboard_loads_with_a_prometheus_source_and_a_producer_variable():
    board = json.loads(DASHBOARD.read_text())
    assert isinstance(board["schemaVersion"], int) and board["title"] and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    name = variables["name"]
    assert name["type"] == "query" and "label_values(dalishare_jobs, name)" in json.dumps(name["query"])
    assert name["datasource"]["uid"] == "${DS_PROMETHEUS}"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["refId"], panel["title"]
            assert 'name=~"$name"' in target["expr"], (panel["title"], target["expr"])


def test_every_metric_the_dashboard_and_the_docs_name_is_one_dalishare_exports():
    exported = _exported_metrics()
    assert {"dalishare_jobs", "dalishare_decoded_samples_total", "dalishare_producer_info",
            "dalishare_job_images_per_second"} <= exported  # the collector was really fed
    queried = {m for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])
               for m in METRIC.findall(t["expr"])}
    assert queried and queried <= exported, sorted(queried - exported)
    assert {"dalishare_jobs", "dalishare_decoded_samples_total", "dalishare_job_images_per_second",
            "dalishare_cache_samples", "dalishare_producer_info"} <= queried
    named = {m: page for page in pages() for m in METRIC.findall(page.read_text())}
    unknown = {m: str(page.relative_to(ROOT)) for m, page in named.items() if m not in exported}
    assert not unknown, unknown


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None and shutil.which("ruff") is None,
                    reason="ruff is not installed (pip install -e '.[docs]' brings it)")
def test_the_public_api_has_google_style_docstrings():
    command = [sys.executable, "-m", "ruff"] if importlib.util.find_spec("ruff") else [shutil.which("ruff")]
    proc = subprocess.run(command + RUFF_D, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _undocumented(cls) -> list[str]:
    """``cls``'s own public methods and properties without a docstring."""
    missing = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__call__", "__iter__", "__len__", "__enter__", "__exit__"):
            continue
        if (isinstance(member, property) or inspect.isfunction(member)) and not (member.__doc__ or "").strip():
            missing.append(f"{cls.__name__}.{name}")
    return missing


def test_every_public_name_has_a_docstring():
    import dalishare
    from dalishare import DaliShareIterator, augment

    public = [getattr(dalishare, name) for name in dalishare.__all__]
    public += [getattr(augment, name) for name in augment.__all__]
    assert {cls.__name__ for cls in vars(augment).values()  # every public class of the module is exported
            if inspect.isclass(cls) and cls.__module__.startswith(augment.__name__) and not cls.__name__.startswith("_")
            } == set(augment.__all__)
    assert DaliShareIterator in public and augment.Compose in public
    missing = [obj.__name__ for obj in public if not (obj.__doc__ or "").strip()]
    missing += [m for obj in public for m in _undocumented(obj)]
    assert not missing, missing
    assert len(_undocumented(DaliShareIterator)) == 0 and isinstance(DaliShareIterator.device, property)


def _commands(parser: argparse.ArgumentParser, words=()):
    """(words, parser) for the parser and every sub-command under it."""
    yield tuple(words), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice, sub in action.choices.items():
                yield from _commands(sub, (*words, choice))


def test_every_command_and_option_has_help_and_the_cli_reference_shows_every_command():
    from dalishare.cli import build_parser

    commands = dict(_commands(build_parser()))
    for words, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # its help is each sub-command's
                assert {c.dest for c in action._choices_actions if c.help} == set(action.choices), words
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, (words, action.dest)
    reference = (DOCS / "reference" / "cli.md").read_text()
    markers = {tuple(m.split()) for m in re.findall(r"^<!-- cli-help: ([a-z ]+) -->$", reference, re.MULTILINE)}
    shown = {() if words == ("dalishare",) else words for words in markers}
    assert shown == set(commands), (sorted(set(commands) - shown), sorted(shown - set(commands)))


def test_every_shell_block_says_whether_it_runs_here_or_what_it_needs():
    all_blocks = [b for page in pages() for b in blocks(page)]
    assert [b for b in all_blocks if not b.language] == [], "every fence names its language"
    untitled = [f"{b.where} ({b.title!r})" for b in shell_blocks() if b.title not in TITLES]
    assert not untitled, f"shell blocks without one of the titles {sorted(TITLES)}: {untitled}"
    table = (DOCS / "getting-started.md").read_text()
    assert all(f"| `{title}` |" in table for title in TITLES)  # the page that explains them lists them all


def _nav_pages(nav) -> list[str]:
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += _nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_the_nav_lists_every_page_once_and_the_config_is_the_one_the_issue_asks_for():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == on_disk and len(nav) == len(set(nav))
    assert config["theme"]["name"] == "material" and config["strict"] is True
    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in config["plugins"]}
    python = plugins["mkdocstrings"]["mkdocstrings"]["handlers"]["python"]
    assert "search" in plugins and python["paths"] == ["."] and python["options"]["docstring_style"] == "google"
    for hook in config["hooks"]:
        assert (ROOT / hook).is_file()


def test_the_front_page_is_short_has_the_set_up_commands_and_its_links_resolve():
    front = pages()[-1]
    text = front.read_text()
    if front.name == "README.md" and len(text.splitlines()) > FRONT_PAGE_LINES:
        pytest.skip("README.md is still the old manual and README.new.md is not there")
    assert len(text.splitlines()) <= FRONT_PAGE_LINES
    (ci_command,) = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert CI_TEST_COMMAND in ci_command and ci_command in text
    head = "\n".join(text.splitlines()[:60])
    assert ".venv/bin/dalishare demo" in head and CI_TEST_COMMAND in head  # the two set-up commands come first
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local) and any(link.endswith(".png") for link in local)
    broken = [link for link in local if not (ROOT / link).exists()]
    assert not broken, broken


def test_the_hooks_turn_links_to_repository_files_into_links_to_their_copies(tmp_path):
    """docs/hooks.py without MkDocs' build: a link that GitHub resolves from docs/ is pointed at the
    file's copy in the site, one to a missing file is left as it is."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)

    class Page:
        class file:
            abs_src_path = str(DOCS / "reference" / "x.md")
            src_uri = "reference/x.md"

    text = "![chart](../../bench/results/cpu-peers-2core.png) [gone](../../bench/nope.txt) [page](../cache.md#a)"
    out = hooks.on_page_markdown(text, Page, {}, None)
    assert out == "![chart](../bench/results/cpu-peers-2core.png) [gone](../../bench/nope.txt) [page](../cache.md#a)"
    assert "usage: dalishare cleanup" in hooks.on_page_markdown("<!-- cli-help: cleanup -->", Page, {}, None)
    assert Path(hooks.__file__).parent == DOCS
