"""The parts on their own: dataset scan, stage loading, the wire format, the CLI's errors, cleanup."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import RESNET, ROOT, make_dataset
from dalishare.shm import names as runtime
from dalishare.producer.dataset import scan
from dalishare.wire.order import epoch_order
from dalishare.errors import AlreadyServing, DatasetError, StageError
from dalishare.producer.stage import load_stage


def test_scan_gives_sorted_classes_stable_indices_and_warns_once_about_non_images(tmp_path, caplog):
    make_dataset(tmp_path, {"b": 2, "a": 3})
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / "labels.csv").write_text("x")
    with caplog.at_level(logging.WARNING):
        ds = scan(tmp_path)
    assert ds.classes == ["a", "b"]
    assert [Path(p).name for p in ds.files] == ["a_0000.jpg", "a_0001.jpg", "a_0002.jpg", "b_0000.jpg", "b_0001.jpg"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a/notes.txt" in warnings[0] and "b/labels.csv" in warnings[0]
    assert list(scan(tmp_path).files) == list(ds.files) and scan(tmp_path).digests == ds.digests


def test_scan_rejects_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "cls").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        scan(tmp_path)


def test_epoch_order_is_a_seeded_permutation_that_changes_each_epoch():
    a0, a1 = epoch_order(100, 3, 0), epoch_order(100, 3, 1)
    assert sorted(a0.tolist()) == list(range(100))
    assert not np.array_equal(a0, a1)
    assert np.array_equal(a0, epoch_order(100, 3, 0))
    assert not np.array_equal(a0, epoch_order(100, 4, 0))


def test_stage_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def stage(x, d):\n    return (x\n")
    with pytest.raises(StageError, match=r"bad\.py:\d+: syntax error") as exc:
        load_stage(bad)
    assert "\n" not in str(exc.value)
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(StageError, match="defines no stage"):
        load_stage(empty)
    assert callable(load_stage(RESNET))


@pytest.mark.parametrize("case", ["syntax", "no_stage", "no_data", "gpu"])
def test_serve_setup_errors_exit_2_with_one_line(tmp_path, case, dataset):
    pipeline, data, extra = RESNET, dataset, []
    if case == "syntax":
        pipeline = tmp_path / "p.py"
        pipeline.write_text("def stage(:\n")
    elif case == "no_stage":
        pipeline = tmp_path / "p.py"
        pipeline.write_text("")
    elif case == "no_data":
        data = tmp_path / "missing"
    else:
        extra = ["--device", "gpu"]
    proc = subprocess.run([sys.executable, "-m", "dalishare", "serve", str(pipeline), "--data", str(data),
                           "--name", "t", *extra], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "dalishare: error:" in line]
    assert len(lines) == 1, proc.stderr


def test_second_producer_of_a_name_is_refused_and_cleanup_removes_dead_owners_files():
    lock = runtime.ServeLock("twin")
    try:
        with pytest.raises(AlreadyServing, match=f"pid {os.getpid()}"):
            runtime.ServeLock("twin")
    finally:
        lock.release()
    # leftovers of a producer that was killed: a segment named after a dead pid, a socket, a free lock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    seg = runtime.SHM_DIR / runtime.shm_name("ghost", int(dead))
    seg.write_bytes(b"x")
    runtime.socket_path("ghost").write_text("")
    runtime.lock_path("ghost").write_text(dead)
    removed = runtime.clean_stale()
    assert str(seg) in removed and not seg.exists()
    assert not runtime.socket_path("ghost").exists() and not runtime.lock_path("ghost").exists()


def test_cleanup_command_removes_what_dead_producers_left():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    seg = runtime.SHM_DIR / runtime.shm_name("ghost", int(dead))
    seg.write_bytes(b"x")
    runtime.socket_path("ghost").write_text("")
    proc = subprocess.run([sys.executable, "-m", "dalishare", "cleanup"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "removed 2 stale files" in proc.stdout, proc.stdout + proc.stderr
    assert not seg.exists() and not runtime.socket_path("ghost").exists()


def test_runtime_dir_is_private(no_leaks: Path):
    assert runtime.runtime_dir() == no_leaks
    assert (no_leaks.stat().st_mode & 0o777) == 0o700


def test_ci_runs_the_readme_test_command():
    root = ROOT
    (command,) = [line for line in (root / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert "python -m pytest" in command
    assert command in (root / "README.md").read_text()


def test_a_probe_names_missing_empty_and_garbage_files_with_a_reason_in_one_process(tmp_path):
    from dalishare.producer.supervisor import ProbeRun

    make_dataset(tmp_path / "d", {"a": 2})
    good = sorted((tmp_path / "d" / "a").iterdir())
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("no image")
    files = [good[0], tmp_path / "gone.jpg", tmp_path / "empty.jpg", tmp_path / "text.jpg", good[1]]
    run = ProbeRun(str(RESNET), "cpu", files, suspects=list(range(5)), controls=[], timeout=60)
    deadline = time.monotonic() + 60
    while not run.done and time.monotonic() < deadline:
        run.poll(time.monotonic())
        time.sleep(0.01)
    assert run.done and not run.broken and run.processes == 1  # a file that raises does not end the probe
    assert sorted(run.failures) == [1, 2, 3]
    assert run.failures[1].startswith("FileNotFoundError") and run.failures[2] == "ValueError: empty file"
    assert run.failures[3].startswith("fn.decoders.image:") and "\n" not in run.failures[3]


class _ArrayBatch:
    """The ring's write protocol (`stage.StageBatch`) over a NumPy array."""

    def __init__(self, array: np.ndarray):
        self.array, self.nbytes = array, array.nbytes

    def copy_to(self, address: int) -> None:
        ctypes.memmove(address, self.array.ctypes.data, self.nbytes)


def test_a_worker_writes_slots_and_the_header_tells_a_reader_which_batch_a_slot_holds():
    from dalishare.shm.host import HostRing, HostRingView, HostRingWriter

    ring = HostRing("hdr", slots=3, slot_bytes=16)
    writer, view = HostRingWriter(ring.layout), HostRingView(ring.layout)
    try:
        assert not view.holds(1, 0)  # never written
        ring.mark(1, -1)
        writer.write(1, _ArrayBatch(np.arange(16, dtype=np.uint8)))
        assert not view.holds(1, 7)  # written, not marked yet: not announced
        ring.mark(1, 7)
        assert view.holds(1, 7) and not view.holds(0, 7)
        assert bytes(view.slot(1)) == bytes(range(16))
        assert bytes(view.slot(0)) == bytes(16) and bytes(view.slot(2)) == bytes(16)  # neighbours untouched
        with pytest.raises(ValueError, match="does not fit"):
            writer.write(2, _ArrayBatch(np.zeros(17, dtype=np.uint8)))
        ring.mark(1, -1)  # reused: a reader of batch 7 can tell
        writer.write(1, _ArrayBatch(np.zeros(16, dtype=np.uint8)))
        ring.mark(1, 9)
        assert not view.holds(1, 7) and view.holds(1, 9)
    finally:
        view.close()
        writer.close()
        ring.close()


def test_stateful_ops_names_the_random_operators_of_a_stage_and_none_of_the_resnet_stage(tmp_path):
    from dalishare.producer.stage import build_pipeline, stateful_ops

    random_stage = tmp_path / "random_stage.py"
    random_stage.write_text(
        "from nvidia.dali import fn\n"
        "def stage(jpegs, decoder_device):\n"
        "    images = fn.decoders.image(jpegs, device=decoder_device)\n"
        "    images = fn.random_resized_crop(images, size=[32, 32])\n"
        "    return fn.flip(images, horizontal=fn.random.coin_flip())\n")
    pipe = build_pipeline(load_stage(random_stage), None, batch_size=2)
    assert stateful_ops(pipe) == ["fn.random.coin_flip", "fn.random_resized_crop"]
    assert stateful_ops(build_pipeline(load_stage(RESNET), None, batch_size=2)) == []


def test_a_stage_batch_copies_each_sample_to_its_own_address_as_the_gpu_cache_fill_does(tmp_path):
    # issue 20: the GPU cache is filled sample by sample from DALI's buffers (no gather kernel); the
    # same method on a CPU batch, against the dense copy of the same batch
    from dalishare.producer.stage import StageBatch, build_pipeline, read_encoded

    dataset = make_dataset(tmp_path / "data", {"a": 3})
    pipe = build_pipeline(load_stage(RESNET), None, batch_size=3)
    pipe.feed_input("encoded", read_encoded(sorted(dataset.rglob("*.jpg"))))
    batch = StageBatch.of(pipe.run()[0])
    dense = batch.numpy().reshape(3, -1).copy()
    rows = np.zeros((5, dense.shape[1]), np.uint8)
    batch.copy_samples_to([rows[r].ctypes.data for r in (4, 0, 2)])
    assert (rows[[4, 0, 2]] == dense).all() and not rows[[1, 3]].any()
    with pytest.raises(ValueError, match="2 addresses for a batch of 3"):
        batch.copy_samples_to([rows[0].ctypes.data, rows[1].ctypes.data])
