"""bench/scale.py at 100 k files, as CI can afford (the 1.28 M run is the benchmark:
bench/results/cpu-scale-2core.txt): the compact listing keeps the producer small and the job's
memory flat (issue 21)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT


def test_a_100k_file_tree_is_served_with_a_small_producer(tmp_path):
    figures = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--sizes", "100000", "--classes", "100",
                           "--keep-trees", str(tmp_path / "trees"), "--out", str(tmp_path / "scale.txt"),
                           "--json", str(figures), "--timeout", "240"], capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(figures.read_text())
    assert row["size"] == 100_000 and row["at"]["first"] > row["at"]["serving"] > 0
    # an object per sample (~450 bytes) would be ~45 MB more; the listing itself is ~4 MB
    assert row["producer"]["hwm"] < 90 * 1024, f"producer peak {row['producer']['hwm'] / 1024:.0f} MiB at 100 k files"
    assert "100,000" in (tmp_path / "scale.txt").read_text()
