"""Files DALI cannot decode are excluded and reported once; everything decodable is still served
exactly once per epoch; odd but valid images come out as 3-channel RGB."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from helpers import Server
from dalishare import DaliShareIterator


def _photo(h: int = 240, w: int = 320, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).convert(mode)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def write_odd_files(folder) -> None:
    """One file of each kind the issue lists, made here from a generated photo."""
    good = _jpeg(_photo())
    sof = good.index(b"\xff\xc0")  # baseline frame header: precision, height, width follow
    flipped = bytearray(good)
    for i in range(200, len(flipped), 97):
        flipped[i] ^= 0xFF
    huge, twelve, arithmetic = bytearray(good), bytearray(good), bytearray(good)
    huge[sof + 5 : sof + 9] = (65500).to_bytes(2, "big") * 2
    twelve[sof + 4] = 12
    arithmetic[sof + 1] = 0xC9  # SOF9: arithmetic-coded
    png = io.BytesIO()
    _photo().save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    files = {
        "truncated.jpg": good[: len(good) // 2], "flipped.jpg": bytes(flipped), "empty.jpg": b"",
        "text.jpg": b"this is not an image\n" * 10, "png_named.jpg": png.getvalue(),
        "huge_dims.jpg": bytes(huge), "twelve_bit.jpg": bytes(twelve), "arithmetic.jpg": bytes(arithmetic),
        "cmyk.jpg": _jpeg(_photo(mode="CMYK")), "gray.jpg": _jpeg(_photo(mode="L")),
        "progressive.jpg": _jpeg(_photo(), progressive=True),
        "exif_rotated.jpg": _jpeg(_photo(200, 320), exif=exif.tobytes()),
    }
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


MUST_DECODE = {"png_named.jpg", "cmyk.jpg", "gray.jpg", "progressive.jpg", "exif_rotated.jpg"}
CANNOT_DECODE = {"empty.jpg", "text.jpg"}


def test_undecodable_files_are_excluded_once_and_the_rest_served_exactly_once(tmp_path):
    from helpers import make_dataset

    data = make_dataset(tmp_path / "data", {"good_a": 9, "good_b": 6})
    write_odd_files(data / "odd")
    files = sorted(p.relative_to(data) for p in data.rglob("*.jpg"))  # index order: class, then name
    names = [p.name for p in files]
    with Server(data, "--batch-size", "4", "--slots", "2", "--epochs", "2") as server:
        with DaliShareIterator("t", batch_size=3, attach_timeout=30) as loader:
            epochs, gray = [], None
            for _ in range(2):
                seen = []
                for batch in loader:
                    assert batch["images"].shape[1:] == (224, 224, 3)
                    for img, idx in zip(batch["images"], batch["indices"].tolist()):
                        seen.append(idx)
                        if names[idx] == "gray.jpg":
                            gray = img.clone()
                epochs.append(seen)
            excluded_seen_by_job = loader.excluded_samples
        assert server.wait(30) == 0, server.log()
    log = server.log()
    excluded = {m for m in re.findall(r"excluded (?:\S+/)?odd/(\S+) \(sample \d+\): \S", log)}
    for name in excluded:  # reported once, with a reason, in both epochs
        assert log.count(f"odd/{name} ") == 1, log
    assert CANNOT_DECODE <= excluded and not (MUST_DECODE & excluded), log
    served = {i for i, n in enumerate(names) if n not in excluded}
    for seen in epochs:
        assert sorted(seen) == sorted(served), "decodable samples not served exactly once"
    assert excluded_seen_by_job == len(excluded)
    assert f"{len(excluded)} of {len(names)} samples excluded so far" in log
    assert gray is not None and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
