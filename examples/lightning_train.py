"""Train with PyTorch Lightning on a shared dalishare stage.

    dalishare serve pipelines/resnet.py --data DIR --name imnet &
    python examples/lightning_train.py --name imnet --epochs 2 --checkpoint-dir ckpt

The iterator goes to ``Trainer.fit`` as it is: one pass is one epoch, ``len()`` is the epoch's batch
count. Lightning fetches one batch ahead of the step it runs when it cannot tell the length (a wrapper
without ``len()``); that is safe because a yielded batch stays valid while it is in use, across the
``keep`` (default 2) batches after it.

Resume: the iterator has ``state_dict``/``load_state_dict``, so Lightning saves its position in every
checkpoint and restores it. Run the same command again after a crash (or after ``--max-steps``) and
it goes on from ``ckpt/last.ckpt``: from a cache at exactly the next sample of the epoch it was in.
Lightning knows the length here, so it takes no batch ahead of the step it checkpoints; behind a
wrapper without ``len()`` it takes one: pass ``taken_ahead=1`` then, so that batch is read again.
"""

import argparse
from pathlib import Path

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

    def on_save_checkpoint(self, checkpoint):  # what the epoch summary counts survives a restart too
        checkpoint["seen"] = self.seen

    def on_load_checkpoint(self, checkpoint):
        self.seen = checkpoint["seen"]

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
    parser.add_argument("--checkpoint-dir", type=Path, help="save last.ckpt here every --every-n-steps, and "
                        "resume from it when it exists")
    parser.add_argument("--every-n-steps", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (then run again "
                        "to resume)")
    args = parser.parse_args()
    augment = Compose([RandomHorizontalFlip(), ToDtype(torch.float32, scale=True),
                       Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])], seed=0)
    checkpoints = []
    if args.checkpoint_dir:
        checkpoints = [lightning.pytorch.callbacks.ModelCheckpoint(
            dirpath=args.checkpoint_dir, every_n_train_steps=args.every_n_steps, save_last=True, save_top_k=0)]
    last = args.checkpoint_dir / "last.ckpt" if args.checkpoint_dir else None
    with DaliShareIterator(args.name, batch_size=args.batch_size, augment=augment) as loader:
        trainer = lightning.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, accelerator="auto", devices=1,
                                    logger=False, enable_checkpointing=bool(checkpoints), callbacks=checkpoints,
                                    enable_progress_bar=False)
        trainer.fit(Classifier(len(loader.classes), loader), train_dataloaders=loader,
                    ckpt_path=last if last is not None and last.exists() else None)


if __name__ == "__main__":
    main()
