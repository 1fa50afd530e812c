"""Every shell block of the manual titled ``runs here`` runs here (issue 22).

Each block runs as a bash script (``-e -o pipefail``) in a fresh folder where ``pipelines/`` and
``examples/`` are the checkout's, with this interpreter's environment first on PATH (as after
``. .venv/bin/activate``), in a session of its own. It must exit 0 within BLOCK_TIMEOUT_S and leave
no process of its session behind; the leak check of tests/conftest.py adds the runtime dir and
/dev/shm. The blocks together take about 45 s here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.docs import runnable_blocks

BLOCK_TIMEOUT_S = 180
LINKED = ("pipelines", "examples")  # what the blocks use from the checkout, as a user in it would
BLOCKS = runnable_blocks()


def _session_processes(sid: int) -> list[str]:
    """The live processes of session ``sid`` (what a block left running)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != b"Z":
            found.append(f"pid {entry}: {cmdline[:120]}")
    return found


def test_the_manual_has_runnable_blocks_on_its_main_pages():
    pages = {block.path.name for block in BLOCKS}
    assert {"getting-started.md", "serving.md", "attaching.md", "cache.md", "observing.md"} <= pages, pages


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_a_runs_here_block_runs_here(block, tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    script = tmp_path / "block.sh"
    script.write_text(block.text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", str(script)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{block.where} ran past {BLOCK_TIMEOUT_S} s:\n{output}")
    deadline = time.monotonic() + 10
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    logs = "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')}" for log in tmp_path.glob("*.log"))
    assert proc.returncode == 0, f"{block.where} exited {proc.returncode}:\n{output}{logs}"
    assert not left, f"{block.where} left processes running: {left}\n{output}"
