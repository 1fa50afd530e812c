"""The layouts ``--data`` names besides class folders (issue 21): a file list and WebDataset shards,
served end to end: exactly once, their labels, the same pixels as the same photo in a class folder,
the cache and --shard; and their errors: a bad line, incomplete and undecodable members, an empty
shard, a missing one."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import RESNET, Job, Server
from dalishare.producer.stage import load_stage, standalone_batches
from dalishare.testing import corrupt_jpegs


def pixels_of(files: list[Path]) -> dict[Path, str]:
    """Each file's sha1 of the pixels the ResNet stage gives it (what job_script.py records), by DALI on the CPU."""
    digests, files = {}, list(files)
    for start, batch in zip(range(0, len(files), 8), standalone_batches(load_stage(RESNET), files, 8)):
        for path, image in zip(files[start : start + 8], batch.numpy()):
            digests[path] = hashlib.sha1(image.tobytes()).hexdigest()
    return digests


def read_epochs(data, tmp_path: Path, *options: str, name: str = "t", passes: int = 1,
                repeats: bool = False) -> tuple[list[dict], str]:
    """Each pass of one job as {index: (label, pixel digest)} (every index once, unless ``repeats``: a
    sharded producer evens its share out with repeats), and the producer's log."""
    with Server(data, "--batch-size", "8", "--epochs", str(passes), *options, name=name) as server:
        record = Job(tmp_path / f"{name}.json", name=name, passes=passes).result()
        assert server.wait() == 0, server.log()
    epochs = []
    for p in record["passes"]:
        samples = {}
        for batch in p["batches"]:
            for index, label, digest in zip(batch["indices"], batch["labels"], batch["digest"]):
                assert repeats or index not in samples, f"sample {index} twice in one epoch"
                samples[index] = (label, digest)
        epochs.append(samples)
    return epochs, server.log()


def serve_error(data) -> str:
    """``dalishare serve --data DATA`` that must fail at start: its one error line."""
    proc = subprocess.run([sys.executable, "-m", "dalishare", "serve", str(RESNET), "--data", str(data), "--name", "t"],
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if "dalishare: error:" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


# -- file lists ------------------------------------------------------------------------------------

def test_a_file_list_serves_its_lines_in_order_with_their_labels_and_the_folders_pixels(dataset, tmp_path):
    files = sorted(dataset.rglob("*.jpg"))[::-1][:20]  # not the folder's order
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    labels = [(7 * i) % 5 for i in range(len(files))]
    lines = [f"{os.path.relpath(f, listing.parent)} {label}" for f, label in zip(files, labels)]
    listing.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")  # a blank line is no sample
    (epoch,), _ = read_epochs(listing, tmp_path, "--cache", "off")
    reference = pixels_of(files)
    assert sorted(epoch) == list(range(len(files)))
    for index, path in enumerate(files):
        assert epoch[index] == (labels[index], reference[path]), f"line {index + 1} ({path.name})"


@pytest.mark.parametrize("line, number", [("a/x.jpg", 2), ("a/x.jpg first", 2), ("/abs/x.jpg 1", 2), ("x.jpg -1", 2)])
def test_a_bad_line_of_a_file_list_is_one_error_naming_it(tmp_path, line, number):
    listing = tmp_path / "train.txt"
    listing.write_text(f"a/ok.jpg 0\n{line}\n")
    error = serve_error(listing)
    assert f"line {number}" in error and repr(line) in error and "RELATIVE/PATH LABEL" in error


# -- WebDataset shards ----------------------------------------------------------------------------

def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A WebDataset shard: each sample's members KEY.EXT, one after the other."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(dataset, tmp_path) -> tuple[Path, list[Path], list[int]]:
    """Three shards of the first 24 photos (the last one empty), with labels 2 - class: the folder,
    the photos in sample order, their labels. Also in them: a sample without a label, one without
    an image, one whose image does not decode."""
    folder, files = tmp_path / "shards", sorted(dataset.rglob("*.jpg"))[:24]
    folder.mkdir()
    classes = sorted(p.name for p in dataset.iterdir())
    labels = [2 - classes.index(f.parent.name) for f in files]
    good = [(f"sample{i:04d}", {"jpg": f.read_bytes(), "cls": f"{label}\n".encode(), "json": b"{}"})
            for i, (f, label) in enumerate(zip(files, labels))]
    broken = corrupt_jpegs(files[:1], tmp_path / "broken", 1)[0].read_bytes()  # cut short: does not decode
    write_shard(folder / "train-000.tar", good[:12] + [("nolabel", {"jpg": files[0].read_bytes()}),
                                                       ("noimage", {"cls": b"1"})])
    write_shard(folder / "train-001.tar", good[12:18] + [("broken", {"jpeg": broken, "cls": b"0"})] + good[18:])
    write_shard(folder / "train-002.tar", [])
    return folder, files, labels


@pytest.mark.parametrize("spelling", ["folder", "pattern"])
def test_webdataset_shards_serve_each_complete_sample_once_with_its_label_and_pixels(shards, tmp_path, spelling):
    folder, files, labels = shards
    data = folder if spelling == "folder" else f"{folder}/train-{{000..002}}.tar"
    (epoch,), log = read_epochs(data, tmp_path, "--cache", "off")
    reference = pixels_of(files)
    # samples in shard and member order: 12 good, then (skipped: nolabel, noimage) 6 good, broken, 6 good
    photos = {**{i: files[i] for i in range(18)}, **{i + 1: files[i] for i in range(18, 24)}}
    assert sorted(epoch) == sorted(photos), "every complete sample but the one that does not decode, once"
    for index, path in photos.items():
        assert epoch[index] == (labels[files.index(path)], reference[path]), f"sample {index}"
    assert "train-001.tar:broken.jpeg" in log  # excluded as a bad file is, named by shard and member
    assert "skipped 2 samples" in log and "train-000.tar:nolabel" in log and "train-000.tar:noimage" in log
    assert "1 shards" in log and "train-002.tar" in log  # the empty one, named


def test_shards_are_cached_and_split_by_shard_as_folders_are(shards, tmp_path):
    folder, files, _ = shards
    cached, _ = read_epochs(folder, tmp_path, "--cache", "memory", passes=2)
    assert cached[0] == cached[1] and len(cached[0]) == 24  # two epochs from the cache, the same 24
    halves = [read_epochs(folder, tmp_path, "--cache", "off", "--shard", f"{k}/2", name=f"s{k}",
                          repeats=True)[0][0] for k in (0, 1)]
    # together the two shares are the epoch; they overlap only where a share evens out with a repeat
    # (the sample that does not decode leaves one share short)
    assert {**halves[0], **halves[1]} == cached[0] and len(set(halves[0]) & set(halves[1])) <= 1


def test_a_missing_or_unreadable_shard_is_one_error_naming_it(shards, tmp_path):
    folder, _, _ = shards
    assert "train-009.tar" in serve_error(f"{folder}/train-{{000..009}}.tar") and "do not exist" in serve_error(
        f"{folder}/train-{{000..009}}.tar")
    (folder / "train-003.tar").write_bytes(b"this is no tar file" * 100)
    assert "train-003.tar is not a readable tar file" in serve_error(folder)


def test_status_and_the_cache_name_the_source(shards, tmp_path):
    folder, _, _ = shards
    data, caches = f"{folder}/train-{{000..002}}.tar", tmp_path / "caches"
    caches.mkdir()
    with Server(data, "--batch-size", "8", "--cache", str(caches)) as server:
        Job(tmp_path / "job.json").result()
        status = subprocess.run([sys.executable, "-m", "dalishare", "status", "t", "--json"], capture_output=True,
                                text=True, timeout=60)
        (entry,) = json.loads(status.stdout)
        server.stop()
    assert entry["report"]["data"] == f"shards {data}" and entry["report"]["samples"] == 25
    listing = subprocess.run([sys.executable, "-m", "dalishare", "cache", "list", str(caches)], capture_output=True,
                             text=True, timeout=60).stdout
    assert f"24/25 samples of [224, 224, 3] uint8 from shards {data}," in listing, listing
    assert "read the index" not in server.log() and len(list(caches.glob("shards-*.npz"))) == 1
    with Server(data, "--batch-size", "8", "--cache", str(caches), "--epochs", "1") as again:  # the index is kept
        Job(tmp_path / "again.json").result()
        assert again.wait() == 0, again.log()
    assert "read the index of 25 samples in 3 shards" in again.log()


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_a_consumer_group_reads_shards_exactly_once_per_epoch(shards, tmp_path, cache):
    """Two DDP ranks (helpers/ddp_job.py, started by hand) of one group on a shard set, as on folders."""
    from collections import Counter

    folder, _, _ = shards
    out, spec = tmp_path / "ranks", {"names": ["t"], "batch_size": 4, "epochs": 2}
    spec["out"] = str(out)
    with Server(folder, "--batch-size", "8", "--cache", cache, "--epochs", "2", "--min-consumers", "2") as server:
        ranks = [subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "helpers" / "ddp_job.py"),
                                   json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                       "LOCAL_WORLD_SIZE": "2"}) for r in range(2)]
        outputs = [rank.communicate(timeout=180)[0] for rank in ranks]
        assert all(rank.returncode == 0 for rank in ranks), "\n".join(outputs)
        assert server.wait() == 0, server.log()
    records = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    for epoch in (0, 1):
        real = Counter(i for record in records for i, pad in zip(record["epochs"][epoch]["indices"],
                                                                 record["epochs"][epoch]["padded"]) if not pad)
        assert set(real.values()) == {1} and len(real) == 24, f"epoch {epoch}: not each decodable sample once"
