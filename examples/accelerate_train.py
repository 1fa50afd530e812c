"""Train with Hugging Face Accelerate on a shared dalishare stage.

    dalishare serve pipelines/resnet.py --data DIR --name imnet &
    python examples/accelerate_train.py --name imnet --epochs 2

The usual Accelerate loop. The iterator goes through ``accelerator.prepare`` wrapped in a
``DataLoader`` (as Accelerate expects), whose shard fetches one batch ahead of the step; that is
safe because a yielded batch stays valid while it is in use, across the ``keep`` (default 2)
batches after it.
"""

import argparse

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, IterableDataset

from dalishare import DaliShareIterator
from dalishare.augment import Compose, Normalize, RandomHorizontalFlip, ToDtype


class SharedBatches(IterableDataset):
    """The loader as a dataset of whole batches: one pass is one epoch."""

    def __init__(self, loader: DaliShareIterator):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="default", help="the producer's --name")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    # each process reads its own loader: no dispatching of batches from process 0
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    augment = Compose([RandomHorizontalFlip(), ToDtype(torch.float32, scale=True),
                       Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])], seed=0)
    with DaliShareIterator(args.name, batch_size=args.batch_size, augment=augment) as loader:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, len(loader.classes)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model, optimizer, batches = accelerator.prepare(model, optimizer, DataLoader(SharedBatches(loader), batch_size=None))
        for _ in range(args.epochs):
            seen, losses = [], []
            for batch in batches:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(batch["images"]), batch["labels"])
                accelerator.backward(loss)
                optimizer.step()
                seen += batch["indices"].tolist()
                losses.append(loss.item())
            accelerator.print(f"epoch {loader.epoch}: {len(seen)} samples, {len(set(seen))} distinct, "
                              f"loss {sum(losses) / len(losses):.3f}")


if __name__ == "__main__":
    main()
