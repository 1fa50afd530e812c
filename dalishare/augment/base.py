"""The frame of every transform: `Transform` and `Compose`, and the plumbing they share.

A transform takes a batch dict or an NCHW tensor and gives the same back; its random parameters are
drawn per sample on the CPU, then applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Compose", "Transform"]


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
