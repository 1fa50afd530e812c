"""Cost of a typical training recipe per 256x224x224 batch: dalishare.augment vs torchvision.transforms.v2 per sample.

    python bench/augment.py [--device cpu|cuda] [--batch 256] [--reps 7] [--out FILE]

On the CPU it also times dalishare.augment forced to run each op over the whole batch (the GPU
way), which is how its sample-by-sample CPU default was chosen.

The recipe: RandomResizedCrop(224), RandomHorizontalFlip(), ColorJitter, ToDtype(float32, scale=True),
Normalize(ImageNet mean, std), on a uint8 NHWC batch as the ring holds it (photos from
../shared/data/hymenoptera when present, else random pixels). Two jitters: (0.4, 0.4, 0.4), the
usual ImageNet one, and (0.4, 0.4, 0.4, 0.1), with hue. torchvision gets each sample as a CHW view
and the results are stacked, as a per-sample Dataset + DataLoader collate would do; dalishare.augment
gets the whole batch. Runs alternate, and the median (and min) of ``--reps`` timed runs is printed.
Without torchvision only dalishare.augment is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dalishare.augment import ColorJitter, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToDtype

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera" / "train"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
JITTERS = {"jitter 0.4/0.4/0.4": (0.4, 0.4, 0.4, 0.0), "jitter 0.4/0.4/0.4/hue 0.1": (0.4, 0.4, 0.4, 0.1)}


def make_batch(n: int) -> torch.Tensor:
    """n uint8 224x224x3 images: photos (shorter side 256, centre crop 224) when available."""
    files = sorted(PHOTOS.rglob("*.jpg"))[:n] if PHOTOS.is_dir() else []
    if not files:
        return torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8)
    from PIL import Image

    images = []
    for i in range(n):
        img = Image.open(files[i % len(files)]).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
        left, top = (img.width - 224) // 2, (img.height - 224) // 2
        images.append(np.asarray(img.crop((left, top, left + 224, top + 224))))
    return torch.from_numpy(np.stack(images))


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = make_batch(args.batch).to(device)
    try:
        from torchvision.transforms import v2
    except ImportError:
        v2 = None
    lines = [f"dalishare.augment vs torchvision.transforms.v2 per sample: {args.batch}x224x224x3 uint8 NHWC on "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'}, "
             f"torch {torch.__version__}" + (f", torchvision {__import__('torchvision').__version__}" if v2 else
                                             ", torchvision not installed") + f"; median (min) of {args.reps} runs"]
    for name, jitter in JITTERS.items():
        ours = Compose([RandomResizedCrop(224), RandomHorizontalFlip(), ColorJitter(*jitter),
                        ToDtype(torch.float32, scale=True), Normalize(MEAN, STD)], seed=0)
        runs = {"dalishare.augment": lambda: ours({"images": batch})}
        if device.type == "cpu":  # what the GPU way (each op over the whole batch) costs on the CPU
            ops = Compose(ours.transforms, seed=0, sample_by_sample=False)
            runs["dalishare.augment, whole-batch ops"] = lambda: ops({"images": batch})
        if v2 is not None:
            theirs = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), v2.ColorJitter(*jitter),
                                 v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
            runs["torchvision v2, sample by sample"] = lambda: torch.stack([theirs(img.permute(2, 0, 1)) for img in batch])
        times = {label: [] for label in runs}
        for label, fn in runs.items():  # warm-up
            timed(fn, device)
        for _ in range(args.reps):
            for label, fn in runs.items():
                times[label].append(timed(fn, device))
        for label, values in times.items():
            lines.append(f"  {name:28s} {label:36s} {statistics.median(values):8.1f} ms ({min(values):.1f}) per batch")
        if v2 is not None:
            ratio = statistics.median(times["torchvision v2, sample by sample"]) / statistics.median(
                times["dalishare.augment"])
            lines.append(f"  {name:28s} {'speed-up of dalishare.augment':36s} {ratio:8.2f}x")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
