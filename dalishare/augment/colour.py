"""The pixels' values: `ToDtype`, `Normalize`, `ColorJitter`, and the adjustments under them.

The adjustments are torchvision.transforms.v2.functional's formulas, on whole batches, in place on
float images whose values run up to ``bound`` (255 for uint8 input, 1 for float), with one float
factor or one factor per sample (shape (n, 1, 1, 1)).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .base import Transform, _rows

__all__ = ["ColorJitter", "Normalize", "ToDtype"]


def max_value(dtype: torch.dtype) -> float:
    """The largest value of an image of ``dtype``: 1 for floating point, else the integer maximum."""
    return 1.0 if dtype.is_floating_point else float(torch.iinfo(dtype).max)


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend_(images: torch.Tensor, other: torch.Tensor, ratio, bound: float) -> torch.Tensor:
    """``ratio * images + (1 - ratio) * other``, clamped, into ``images``."""
    return images.mul_(ratio).add_(other.mul_(1.0 - ratio)).clamp_(0, bound)


def _brightness_(images, factor, bound):
    return images.mul_(factor).clamp_(0, bound)


def _contrast_(images, factor, bound):
    return _blend_(images, _gray(images).mean(dim=(-3, -2, -1), keepdim=True), factor, bound)


def _saturation_(images, factor, bound):
    return _blend_(images, _gray(images), factor, bound)


def _hue_(images, factor, bound):
    hsv = _rgb_to_hsv(images if bound == 1 else images.mul_(1.0 / bound))
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(factor if isinstance(factor, float) else factor.view(-1, 1, 1)).remainder_(1.0)
    rgb = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return rgb if bound == 1 else rgb.mul_(bound)


ADJUSTMENTS = (_brightness_, _contrast_, _saturation_, _hue_)  # torchvision's fn_idx order


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / divisor).unbind(dim=-3)
    maxc_neq_r, maxc_eq_g = maxc != r, maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub_(gc).mul_(~maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(maxc_neq_r.logical_and_(maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = _hsv_select(img.device)[:, i].moveaxis(0, -3)
    return vpqt.gather(-3, select)


_SELECT: dict = {}


def _hsv_select(device: torch.device) -> torch.Tensor:
    """Which of (v, p, q, t) each of r, g, b is, by hue sector.

    Made once per device (a copy to a GPU would sync it).
    """
    if device not in _SELECT:
        table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long)
        _SELECT[device] = table.to(device)
    return _SELECT[device]


def to_dtype(images: torch.Tensor, dtype: torch.dtype, scale: bool) -> torch.Tensor:
    """Convert ``images`` to ``dtype`` as torchvision's ``to_dtype`` for images does.

    Args:
        images: any batch.
        dtype: the new dtype.
        scale: rescale between integer and floating-point value ranges.

    Returns:
        torch.Tensor: the converted images (``images`` itself when it already has ``dtype``).

    Raises:
        TypeError: scaling from one integer dtype to another.
    """
    if images.dtype == dtype:
        return images
    if not scale:
        return images.to(dtype)
    if images.is_floating_point():
        if dtype.is_floating_point:
            return images.to(dtype)
        return images.mul(max_value(dtype) + 1.0 - 1e-3).to(dtype)  # torchvision's eps: no rounding pass
    if dtype.is_floating_point:
        return images.to(dtype).mul_(1.0 / max_value(images.dtype))
    raise TypeError(f"scaling {images.dtype} to {dtype} is not supported")


# -- the transforms -------------------------------------------------------------------------------

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
