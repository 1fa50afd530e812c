"""Each room imports only what its role allows, checked in a fresh interpreter per side, and the
package has no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dalishare"

RULES = {  # what importing a room must not load
    "dalishare.shm": ["torch", "zmq", "nvidia.dali"],
    "dalishare.wire": ["torch", "nvidia.dali", "cupy"],
    "dalishare.wire.channel": ["torch", "nvidia.dali", "cupy"],
    "dalishare.producer": ["torch", "cupy", "nvidia.dali"],  # DALI runs in the stage worker only
    "dalishare.job": ["nvidia.dali"],
    "dalishare.cli": ["torch", "nvidia.dali", "cupy"],
    "dalishare.errors": ["torch", "zmq", "nvidia.dali", "cupy", "numpy"],
}


def test_each_room_does_not_load_what_its_role_forbids():
    """One fresh interpreter per room, all at once (the job room imports torch, ~3 s alone)."""
    checks = {module: subprocess.Popen([sys.executable, "-c", f"import sys, {module}; "
                                        f"print([m for m in {forbidden!r} if m in sys.modules])"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for module, forbidden in RULES.items()}
    failures = []
    for module, check in checks.items():
        try:
            out, err = check.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            check.kill()
            out, err = check.communicate()
        if check.returncode != 0:
            failures.append(f"importing {module} failed: {err.strip()[-500:]}")
        elif out.strip() != "[]":
            failures.append(f"importing {module} loaded {out.strip()}")
    assert not failures, "\n".join(failures)


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (top level and inside functions)."""
    module, found = _module_of(path), set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("dalishare"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("dalishare"))
    return found


def test_the_package_has_no_import_cycle():
    modules = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    # a package imports its own modules through its face (__init__); that is not a cycle
    graph = {m: {t for t in targets if not (m == t.rsplit(".", 1)[0] and modules[m].name == "__init__.py")}
             for m, targets in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node, path):
        if node in visiting:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        visiting.discard(node)
        done.add(node)

    for m in sorted(graph):
        visit(m, [])
    assert not cycles, f"import cycles: {cycles}"
