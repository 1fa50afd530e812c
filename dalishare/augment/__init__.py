"""Per-job augmentation of whole batches: torchvision's names, per-sample random parameters, any device.

The shared stage stops at decode and resize; each job adds its own light, random augmentation on its
side. These transforms take a whole batch and draw every random parameter per sample, from the job's
own generator, so two jobs reading the same shared batch augment it differently, and a seed
reproduces a job's augmentations (see the example below).

Layout: called on a batch dict (what `DaliShareIterator` yields: ``images`` uint8 NHWC), a transform
views the images as NCHW (no copy) and returns the dict with new NCHW images; called on a tensor, it
expects NCHW, like torchvision. The input is never written to (it may be a view of the shared ring).

How it runs: parameters are drawn on the CPU, for the whole batch, before any is applied (so a seed
gives the same parameters on any device) and sent to the batch's device without a GPU sync. On a GPU
there is no Python loop over samples: each op runs on the whole batch at once (the crop-and-resize of
all samples is one ``grid_sample``). On the CPU each sample goes through the whole chain while it is
in cache, which bench/augment.py measured faster there than whole-batch ops.

Differences from torchvision, on purpose: resizing is bilinear without antialiasing (torchvision's
``antialias=False``; identical to its default whenever a crop is not larger than the output, as for
crops of 224-pixel ring images resized to 224), and ColorJitter draws its random order of the four
adjustments per sample rather than per call.

Example:
    ```python
    from dalishare import DaliShareIterator
    from dalishare.augment import (ColorJitter, Compose, Normalize, RandomHorizontalFlip,
                                   RandomResizedCrop, ToDtype)

    augment = Compose([ToDtype(torch.float32, scale=True), RandomResizedCrop(224), RandomHorizontalFlip(),
                       ColorJitter(0.4, 0.4, 0.4, 0.1), Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])],
                      seed=1)
    loader = DaliShareIterator("imnet", batch_size=256, augment=augment)  # yields float NCHW batches
    ```
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .colour import ADJUSTMENTS, max_value, to_dtype

__all__ = ["Compose", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToDtype", "Normalize", "Transform"]

class Transform:
    """A batched transform: the base class of this module's transforms.

    Subclasses draw per-sample parameters in `make_params` (on the CPU) and apply them to a whole
    batch in `apply` (on the images' device), or to one sample on the CPU in `apply_one`.
    Floating-point parameters are moved to the images' device; integer and boolean ones stay on the
    CPU, so they can pick samples without a GPU sync.

    Attributes:
        generator: the generator this transform draws from, or None: the `Compose`'s.
    """

    generator: torch.Generator | None = None

    def make_params(self, n: int, height: int, width: int, generator: torch.Generator | None) -> dict:
        """Draw the random parameters of ``n`` samples of ``height`` x ``width`` pixels, on the CPU.

        Args:
            n: samples in the batch.
            height: the images' height.
            width: the images' width.
            generator: where the random numbers come from (None: torch's global generator).

        Returns:
            dict: tensors whose first dimension is the sample (none for a transform without
                random parameters).
        """
        return {}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """Apply the transform to a whole batch.

        Args:
            images: an (N, C, H, W) batch, never written to.
            params: what `make_params` drew for it, floating-point ones on the images' device.

        Returns:
            torch.Tensor: the new (N, C, H', W') batch.
        """
        raise NotImplementedError

    def apply_one(self, image: torch.Tensor, params: dict) -> torch.Tensor:
        """Apply the transform to one sample on the CPU (the sample-by-sample way).

        Args:
            image: one sample, (1, C, H, W), on the CPU.
            params: its parameters as Python values.

        Returns:
            torch.Tensor: the new (1, C, H', W') sample.
        """
        return self.apply(image, {k: torch.tensor([v]) for k, v in params.items()})

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) this transform makes of images of ``height`` x ``width``."""
        return height, width

    def __call__(self, batch, generator: torch.Generator | None = None):
        """Apply this transform alone, as ``Compose([self])`` would.

        Args:
            batch (dict | torch.Tensor): a batch dict (``images`` NHWC, as the iterator yields it) or
                an NCHW tensor.
            generator: draw from this generator (default: the transform's own, else torch's global).

        Returns:
            dict | torch.Tensor: the batch dict with new NCHW ``images``, or the new NCHW tensor.
        """
        return Compose([self], generator=generator or self.generator)(batch)


class Compose:
    """Apply ``transforms`` in order.

    Random parameters come from ``generator``, or from a new one seeded with ``seed``, or else from
    torch's global generator (a transform given its own ``generator`` keeps drawing from that one).
    Other callables (a torchvision transform, a function on an NCHW tensor) may be mixed in: they
    get the whole batch.
    """

    def __init__(self, transforms: Sequence[Callable], *, seed: int | None = None,
                 generator: torch.Generator | None = None, sample_by_sample: bool | None = None):
        """Chain ``transforms``.

        Args:
            transforms: this module's transforms, or any callables on an NCHW batch.
            seed: draw the random parameters from a new generator seeded with this.
            generator: draw them from this generator (not together with ``seed``).
            sample_by_sample: run each sample through the whole chain (fastest on the CPU) rather
                than each op over the whole batch (the GPU way); default: on the CPU only, and only
                when every transform is one of this module's. Both ways draw the same parameters.

        Raises:
            ValueError: both ``seed`` and ``generator`` were given.
        """
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        self.transforms = list(transforms)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator
        self.sample_by_sample = sample_by_sample

    def __call__(self, batch):
        """Augment ``batch``; the input is never written to (it may be a view of the shared ring).

        Args:
            batch (dict | torch.Tensor): a batch dict (what `DaliShareIterator` yields: ``images``
                uint8 NHWC) or an (N, C, H, W) tensor.

        Returns:
            dict | torch.Tensor: the batch dict with new NCHW ``images`` (its other entries as they
                were), or the new NCHW tensor.

        Raises:
            ValueError: ``sample_by_sample=True`` on a GPU batch or with other callables, or a
                batch of the wrong shape.
            TypeError: neither a batch dict nor a 4-d tensor.
        """
        images, rebuild = _images_of(batch)
        possible = images.device.type == "cpu" and all(isinstance(t, Transform) for t in self.transforms)
        if self.sample_by_sample and not possible:
            raise ValueError("sample_by_sample needs a CPU batch and dalishare.augment transforms only")
        if len(images) and (self.sample_by_sample or (self.sample_by_sample is None and possible)):
            out = self._sample_by_sample(images)
        else:
            out = images
            for t in self.transforms:  # each op's parameters drawn just before it, from the current shape
                out = t.apply(out, self._params(t, out)) if isinstance(t, Transform) else t(out)
        if out.untyped_storage().data_ptr() == images.untyped_storage().data_ptr():
            out = out.clone()  # the output never aliases the input (which may be the shared ring)
        return rebuild(out)

    def _params(self, t: Transform, images: torch.Tensor, size: tuple[int, int] | None = None) -> dict:
        """``t``'s parameters for ``images`` (of ``size``, when given).

        From its own generator if it has one, else from this Compose's; floating-point ones on the
        images' device.
        """
        n, height, width = len(images), *(size or images.shape[-2:])
        return _to_device(t.make_params(n, height, width, t.generator or self.generator), images.device)

    def _sample_by_sample(self, images: torch.Tensor) -> torch.Tensor:
        """The CPU way: each sample through the whole chain while it is in cache.

        bench/augment.py measured this faster than whole-batch ops on the CPU, which stream every op
        through memory.
        """
        params, size = [], tuple(images.shape[-2:])
        for t in self.transforms:  # the same draws, in the same order, as the whole-batch way
            params.append(self._params(t, images, size))
            size = t.output_size(*size)
        values = [{k: v.tolist() for k, v in p.items()} for p in params]
        out = None
        for i in range(len(images)):
            x = images[i : i + 1]
            for t, p in zip(self.transforms, values):
                x = t.apply_one(x, {k: v[i] for k, v in p.items()})
            if out is None:
                out = torch.empty((len(images), *x.shape[1:]), dtype=x.dtype)
            out[i] = x[0]
        return out

    def __repr__(self) -> str:
        """``Compose([...])`` with the transforms' own reprs."""
        return f"Compose({self.transforms!r})"


class ToDtype(Transform):
    """Convert the images' dtype; with ``scale``, uint8 [0, 255] <-> float [0, 1] (torchvision's rule)."""

    def __init__(self, dtype: torch.dtype = torch.float32, scale: bool = False):
        """Convert to ``dtype``.

        Args:
            dtype: the images' new dtype.
            scale: rescale the values between integer and floating-point ranges, as torchvision's
                ``ToDtype(scale=True)``.
        """
        self.dtype, self.scale = dtype, scale

    def apply(self, images, params):
        """The converted batch (the input itself when it already has ``dtype``)."""
        return to_dtype(images, self.dtype, self.scale)

    def __repr__(self) -> str:
        """``ToDtype(dtype, scale=...)``."""
        return f"ToDtype({self.dtype}, scale={self.scale})"


class Normalize(Transform):
    """``(images - mean) / std`` per channel, on float images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        """Normalize with these channel means and standard deviations.

        Args:
            mean: one value per channel.
            std: one value per channel, none zero.

        Raises:
            ValueError: a zero in ``std``.
        """
        self.mean, self.std = list(mean), list(std)
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must not contain zeros, got {self.std}")

    def apply(self, images, params):
        """The normalized batch.

        Raises:
            TypeError: the images are not floating-point (put ``ToDtype(torch.float32, scale=True)``
                first).
        """
        if not images.is_floating_point():
            raise TypeError(f"Normalize needs float images, got {images.dtype}: put ToDtype(torch.float32, scale=True) first")
        mean, std = (_per_channel(v, images.dtype, images.device) for v in (self.mean, self.std))
        return images.sub(mean).div_(std)

    def __repr__(self) -> str:
        """``Normalize(mean=..., std=...)``."""
        return f"Normalize(mean={self.mean}, std={self.std})"


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


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).view(-1, 1, 1).to(device)


def _per_channel(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a (C, 1, 1) tensor, made once per device (a copy to a GPU would sync it)."""
    return _constant(tuple(values), dtype, device)


def _back_to(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 results back to the input's dtype (integers rounded and clamped)."""
    if dtype.is_floating_point:
        return images.to(dtype)
    return images.round_().clamp_(0, max_value(dtype)).to(dtype)


def _axis(start: torch.Tensor, length: torch.Tensor, out: int, full: int) -> torch.Tensor:
    """Normalized grid coordinates (n, out) that sample [start, start + length) of an axis.

    The axis has ``full`` pixels; the ``out`` points are where bilinear
    ``interpolate(align_corners=False)`` of the crop would sample.
    """
    dst = torch.arange(out, device=start.device, dtype=torch.float32)
    src = ((dst + 0.5) * (length / out)[:, None] - 0.5).clamp_(min=0)
    src = torch.minimum(src, (length - 1)[:, None]) + start[:, None]
    return (2 * src + 1) / full - 1


class ColorJitter(Transform):
    """Random brightness, contrast, saturation and hue, with torchvision's arguments and formulas.

    Each sample gets its own factors and its own random order of the four adjustments. On uint8
    images it computes in float and rounds once (torchvision rounds after each adjustment: results
    differ by a level or two).
    """

    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0, *, generator: torch.Generator | None = None):
        """Jitter within these ranges (torchvision's ``ColorJitter`` arguments).

        Args:
            brightness (float | tuple[float, float]): v: a factor from [max(0, 1 - v), 1 + v]; or
                its (min, max).
            contrast (float | tuple[float, float]): likewise.
            saturation (float | tuple[float, float]): likewise.
            hue (float | tuple[float, float]): v: a shift from [-v, v], within [-0.5, 0.5]; or its
                (min, max).
            generator: draw from this generator rather than the `Compose`'s.

        Raises:
            ValueError: a negative number or a range out of bounds.
            TypeError: neither a number nor a pair.
        """
        self.ranges = [_jitter_range(brightness, "brightness"), _jitter_range(contrast, "contrast"),
                       _jitter_range(saturation, "saturation"),
                       _jitter_range(hue, "hue", center=0, bound=(-0.5, 0.5), clip_first_on_zero=False)]
        self.generator = generator

    def make_params(self, n, height, width, generator):
        """``order``: a permutation of the four adjustments per sample; ``factors``: their factors."""
        order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # a random permutation per sample
        factors = torch.ones(n, 4)
        factors[:, 3] = 0
        for k, bounds in enumerate(self.ranges):
            if bounds is not None:
                factors[:, k] = torch.empty(n).uniform_(*bounds, generator=generator)
        return {"order": order, "factors": factors}

    def apply(self, images, params):
        """The adjusted batch, in float, rounded once at the end for integer images."""
        order, factors = params["order"], params["factors"]
        bound = max_value(images.dtype)
        out = images.to(torch.float32, copy=True)  # adjusted in place, in float; rounded once at the end
        for position in range(4):
            for k, adjust in enumerate(ADJUSTMENTS):
                rows = _rows(order[:, position] == k, out.device) if self.ranges[k] is not None else ()
                if len(rows):
                    out[rows] = adjust(out[rows], factors[rows, k].view(-1, 1, 1, 1), bound)
        return _back_to(out, images.dtype)

    def apply_one(self, image, params):
        """The adjusted sample, its adjustments in its own order."""
        out = image.to(torch.float32, copy=True)
        for k in params["order"]:
            if self.ranges[k] is not None:
                out = ADJUSTMENTS[k](out, params["factors"][k], max_value(image.dtype))
        return _back_to(out, image.dtype)

    def __repr__(self) -> str:
        """``ColorJitter(...)`` with the ranges that are not the identity."""
        names = ("brightness", "contrast", "saturation", "hue")
        return "ColorJitter(" + ", ".join(f"{n}={r}" for n, r in zip(names, self.ranges) if r) + ")"


def _jitter_range(value, name: str, center: float = 1.0, bound=(0.0, float("inf")), clip_first_on_zero=True):
    """Check a ColorJitter argument as torchvision's ``_check_input``: a number v means [center - v, center + v]."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"If {name} is a single number, it must be non negative.")
        value = [center - value, center + value]
        if clip_first_on_zero:
            value[0] = max(value[0], 0.0)
    elif isinstance(value, Sequence) and len(value) == 2:
        value = [float(v) for v in value]
    else:
        raise TypeError(f"{name}={value} should be a single number or a sequence with length 2.")
    if not bound[0] <= value[0] <= value[1] <= bound[1]:
        raise ValueError(f"{name} values should be between {bound} and increasing, but got {value}.")
    return None if value[0] == value[1] == center else (float(value[0]), float(value[1]))


# -- plumbing ------------------------------------------------------------------------------------

def _images_of(batch) -> tuple[torch.Tensor, Callable]:
    """The NCHW images of ``batch`` and how to put new images back in its place."""
    if isinstance(batch, dict):
        images = batch["images"]
        if images.dim() != 4:
            raise ValueError(f"batch['images'] must be N,H,W,C, got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2), lambda new: {**batch, "images": new}
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
        raise TypeError(f"expected a batch dict or an N,C,H,W tensor, got {type(batch).__name__}")
    if batch.shape[1] not in (1, 3) and batch.shape[-1] in (1, 3):
        raise ValueError(f"tensor of shape {tuple(batch.shape)} looks N,H,W,C: pass the batch dict, or "
                         f"images.permute(0, 3, 1, 2)")
    return batch, lambda new: new


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices of the True rows of a CPU mask, on ``device`` (no GPU sync: the mask is on the CPU)."""
    return _to_device({"rows": mask.nonzero().squeeze(1)}, device)["rows"]


def _to_device(params: dict, device: torch.device) -> dict:
    """Parameters to ``device``: floating-point ones always, integer ones too when they are row indices.

    They go from pinned memory and non-blocking, so the CPU does not wait for the GPU.
    """
    if device.type == "cpu":
        return params
    moved = {}
    for key, value in params.items():
        if value.is_floating_point() or key == "rows":
            value = value.pin_memory().to(device, non_blocking=True)
        moved[key] = value
    return moved
