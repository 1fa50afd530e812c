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

from .base import Compose, Transform
from .colour import ColorJitter, Normalize, ToDtype
from .geometry import RandomHorizontalFlip, RandomResizedCrop

__all__ = ["Compose", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToDtype", "Normalize", "Transform"]
