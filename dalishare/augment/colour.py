"""Colour adjustments and dtype conversion for `dalishare.augment`.

torchvision.transforms.v2.functional's formulas, on whole batches, in place on float images whose
values run up to ``bound`` (255 for uint8 input, 1 for float), with one float factor or one factor
per sample (shape (n, 1, 1, 1)).
"""

from __future__ import annotations

import torch


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
