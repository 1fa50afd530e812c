"""Where the pixels go: `RandomHorizontalFlip` and `RandomResizedCrop`.

Batched: on a GPU the crops of a whole batch are one ``grid_sample``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import Transform, _rows
from .colour import _back_to

__all__ = ["RandomHorizontalFlip", "RandomResizedCrop"]


class RandomHorizontalFlip(Transform):
    """Mirror each sample left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None):
        """Flip with probability ``p``.

        Args:
            p: the probability that a sample is flipped.
            generator: draw from this generator rather than the `Compose`'s.

        Raises:
            ValueError: ``p`` outside [0, 1].
        """
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p, self.generator = p, generator

    def make_params(self, n, height, width, generator):
        """``flip``: a bool per sample."""
        return {"flip": torch.rand(n, generator=generator) < self.p}

    def apply_one(self, image, params):
        """The sample, mirrored if its ``flip`` says so."""
        return image.flip(-1) if params["flip"] else image  # never written to: no copy needed

    def apply(self, images, params):
        """A copy of the batch with the flagged samples mirrored."""
        rows = _rows(params["flip"], images.device)
        out = images.clone()
        if len(rows):
            out[rows] = images[rows].flip(-1)
        return out

    def __repr__(self) -> str:
        """``RandomHorizontalFlip(p=...)``."""
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResizedCrop(Transform):
    """Crop a random area and aspect ratio of each sample and resize it to ``size``.

    The boxes are drawn as torchvision draws them (ten tries, then a centre crop); on a GPU all
    samples are cropped and resized in one batched bilinear ``grid_sample``.
    """

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = "bilinear", antialias: bool = False,
                 *, generator: torch.Generator | None = None):
        """Crop and resize to ``size``.

        Args:
            size: the output's side, or its (height, width).
            scale: the range of the crop's area, as a share of the image's.
            ratio: the range of the crop's aspect ratio (width / height).
            interpolation: only ``"bilinear"``.
            antialias: only False (resizing here is bilinear without antialiasing).
            generator: draw from this generator rather than the `Compose`'s.

        Raises:
            ValueError: a bad ``size``, ``scale`` or ``ratio``, another interpolation, or
                ``antialias=True`` (refused rather than ignored).
        """
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be an int or (height, width), got {size}")
        if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be increasing positive ranges, got {scale} and {ratio}")
        if interpolation != "bilinear" or antialias:
            raise ValueError("RandomResizedCrop here is bilinear without antialiasing (interpolation='bilinear', "
                             "antialias=False)")
        self.scale, self.ratio, self.generator = tuple(scale), tuple(ratio), generator

    def output_size(self, height, width):
        """``size``, whatever the input's."""
        return self.size

    def make_params(self, n, height, width, generator):
        """``box``: (top, left, height, width) per sample, as float, torchvision's way."""
        tries = 10
        area = height * width * torch.empty(n, tries).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator)
        aspect = torch.exp(log_ratio)
        w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.int().argmax(dim=1, keepdim=True)  # the first try that fits
        w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), ok.any(dim=1)
        fw, fh = self._fallback(height, width)
        w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
        u = torch.rand(n, 2, generator=generator)
        top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), float((height - fh) // 2))
        left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), float((width - fw) // 2))
        return {"box": torch.stack((top, left, h, w), dim=1)}  # float: it goes to the device

    def _fallback(self, height: int, width: int) -> tuple[int, int]:
        """The centre crop torchvision takes when no try fits: (width, height)."""
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            return width, int(round(width / min(self.ratio)))
        if in_ratio > max(self.ratio):
            return int(round(height * max(self.ratio))), height
        return width, height

    def apply_one(self, image, params):
        """The sample's box, cropped as a view and resized (uint8 natively on the CPU)."""
        top, left, h, w = (int(v) for v in params["box"])  # crop a view, resize it (uint8 natively)
        crop = image[:, :, top : top + h, left : left + w]
        if image.dtype not in (torch.uint8, torch.float32):  # uint8 and float32 resize natively on the CPU
            return _back_to(F.interpolate(crop.float(), size=self.size, mode="bilinear", align_corners=False), image.dtype)
        return F.interpolate(crop, size=self.size, mode="bilinear", align_corners=False, antialias=False)

    def apply(self, images, params):
        """Every sample's box, cropped and resized in one ``grid_sample``."""
        top, left, h, w = params["box"].to(torch.float32).unbind(dim=1)
        height, width = images.shape[-2:]
        grid = torch.stack((_axis(left, w, self.size[1], width)[:, None, :].expand(-1, self.size[0], -1),
                            _axis(top, h, self.size[0], height)[:, :, None].expand(-1, -1, self.size[1])), dim=-1)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return _back_to(out, images.dtype)

    def __repr__(self) -> str:
        """``RandomResizedCrop(size=..., scale=..., ratio=...)``."""
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def _axis(start: torch.Tensor, length: torch.Tensor, out: int, full: int) -> torch.Tensor:
    """Normalized grid coordinates (n, out) that sample [start, start + length) of an axis.

    The axis has ``full`` pixels; the ``out`` points are where bilinear
    ``interpolate(align_corners=False)`` of the crop would sample.
    """
    dst = torch.arange(out, device=start.device, dtype=torch.float32)
    src = ((dst + 0.5) * (length / out)[:, None] - 0.5).clamp_(min=0)
    src = torch.minimum(src, (length - 1)[:, None]) + start[:, None]
    return (2 * src + 1) / full - 1
