"""`dalishare demo` runs end to end and prints its table."""

import re
import subprocess
import sys


def test_demo_trains_three_jobs_shared_and_alone():
    proc = subprocess.run([sys.executable, "-m", "dalishare", "demo", "--images-per-class", "24", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600, env={"COLUMNS": "120", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│\s+([ABC]|all)\s+│(.*)", proc.stdout)}
    assert set(rows) == {"A", "B", "C", "all"}, proc.stdout
    for label in "ABC":  # batch, augment, shared img/s, shared loss, alone img/s, alone loss
        cells = [c.strip() for c in rows[label].split("│")[:6]]
        assert float(cells[2]) > 0 and float(cells[4]) > 0
        assert 0 < float(cells[3]) < 5 and 0 < float(cells[5]) < 5
