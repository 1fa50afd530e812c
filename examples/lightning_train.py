"""Train with PyTorch Lightning on a shared dalishare stage.

    dalishare serve pipelines/resnet.py --data DIR --name imnet &
    python examples/lightning_train.py --name imnet --epochs 2

The iterator goes to ``Trainer.fit`` as it is: one pass is one epoch, ``len()`` is the epoch's batch
count. Lightning fetches one batch ahead of the step it runs; that is safe because a yielded batch
stays valid while it is in use, across the ``keep`` (default 2) batches after it.
"""

import argparse

import lightning
import torch

from dalishare import DaliShareIterator
from dalishare.augment import Compose, Normalize, RandomHorizontalFlip, ToDtype


class Classifier(lightning.LightningModule):
    def __init__(self, classes: int, loader: DaliShareIterator):
        super().__init__()
        self.loader, self.seen = loader, {}
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, classes))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.net(batch["images"]), batch["labels"])
        self.seen.setdefault(self.loader.epoch, []).extend(batch["indices"].tolist())
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def on_train_epoch_end(self):
        seen = self.seen.get(self.loader.epoch, [])
        print(f"epoch {self.loader.epoch}: {len(seen)} samples, {len(set(seen))} distinct, "
              f"loss {self.trainer.callback_metrics.get('train_loss', float('nan')):.3f}", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="default", help="the producer's --name")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    augment = Compose([RandomHorizontalFlip(), ToDtype(torch.float32, scale=True),
                       Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])], seed=0)
    with DaliShareIterator(args.name, batch_size=args.batch_size, augment=augment) as loader:
        trainer = lightning.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(Classifier(len(loader.classes), loader), train_dataloaders=loader)


if __name__ == "__main__":
    main()
