"""The compact listing (producer/listing.py) and the layouts' scanners (producer/sources.py), on small
files: names in one blob, locators made on demand, tar members read by offset, the file list's rules."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from dalishare.errors import DatasetError
from dalishare.producer.listing import Names, read_sample
from dalishare.producer.sources import scan
from dalishare.shm.cache import listing_digests


def test_names_are_one_blob_and_an_offset_array():
    builder = Names.build()
    for name in ["a/x.jpg", "", "b/ü n.JPEG"]:
        builder.add(name)
    names = builder.done()
    assert list(names) == ["a/x.jpg", "", "b/ü n.JPEG"] and names[-1] == "b/ü n.JPEG" and names[1:] == ["", "b/ü n.JPEG"]
    assert names.nbytes == len("a/x.jpgb/ü n.JPEG".encode()) + 4 * 8


def test_class_folders_keep_their_order_labels_and_digests(tmp_path):
    for rel in ["b/2.jpg", "a/z/1.jpg", "a/y.jpg", "a-b/0.jpg", "a/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    ds = scan(str(tmp_path))
    assert ds.classes == ["a", "a-b", "b"] and ds.labels.dtype == np.int32 and ds.labels.tolist() == [0, 0, 1, 2]
    assert [ds.describe(i) for i in range(len(ds))] == ["a/y.jpg", "a/z/1.jpg", "a-b/0.jpg", "b/2.jpg"]  # as pathlib sorts
    assert read_sample(ds.files[1]).tobytes() == b"a/z/1.jpg" and ds.source == f"folders {tmp_path}"
    assert ds.digests == listing_digests(tmp_path, [tmp_path / ds.describe(i) for i in range(len(ds))])


def test_a_file_list_keeps_its_line_order_and_its_labels(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("p.jpg", "q r.jpg"):
        (tmp_path / "imgs" / name).write_bytes(name.encode())
    (tmp_path / "train.txt").write_text("imgs/q r.jpg 3\n\nimgs/p.jpg 0\nimgs/gone.jpg 1\n")
    ds = scan(str(tmp_path / "train.txt"))
    assert [ds.describe(i) for i in range(3)] == ["imgs/q r.jpg", "imgs/p.jpg", "imgs/gone.jpg"]
    assert ds.labels.tolist() == [3, 0, 1] and ds.classes == ["0", "1", "2", "3"]
    assert read_sample(ds.files[0]).tobytes() == b"q r.jpg"
    with pytest.raises(OSError):  # a missing file fails in the worker, whose probe excludes it
        read_sample(ds.files[2])
    (tmp_path / "bad.txt").write_text("imgs/p.jpg 0\nimgs/q r.jpg three\n")
    with pytest.raises(DatasetError, match=r"bad\.txt, line 2: 'imgs/q r\.jpg three'"):
        scan(str(tmp_path / "bad.txt"))


def test_shard_members_are_read_by_offset_and_a_cut_shard_says_so(tmp_path):
    with tarfile.open(tmp_path / "s-0.tar", "w") as tar:
        for name, data in [("k1.jpg", b"one"), ("k1.cls", b"4"), ("d/k2.webp", b"two!"), ("d/k2.cls", b" 1\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = scan(f"{tmp_path}/s-{{0..0}}.tar", index_dir=tmp_path)
    assert [read_sample(ds.files[i]).tobytes() for i in range(2)] == [b"one", b"two!"]
    assert ds.labels.tolist() == [4, 1] and ds.describe(1) == "s-0.tar:d/k2.webp"
    again = scan(str(tmp_path), index_dir=tmp_path)  # the index kept in index_dir, read back
    assert list(again.files) == list(ds.files) and again.labels.tolist() == [4, 1]
    offset, size, path = ds.files[0][len("tar:"):].split(":", 2)
    with open(path, "r+b") as f:
        f.truncate(int(offset) + 1)
    with pytest.raises(OSError, match="cut short"):
        read_sample(ds.files[0])
