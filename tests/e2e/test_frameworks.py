"""A batch never changes under a training step: training loops that take the next batch before they
are done with this one (PyTorch Lightning's fetcher, a one-ahead prefetcher, Accelerate's
DataLoaderShard), each checked for exactly-once epochs and for pixels that stay the same across a
pause inside the step. The ring is as small as keep=2 allows (4 slots), and the producer is far
faster than the steps, so a slot given back too early is rewritten during the pause."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest
import torch

from helpers import N_SAMPLES, ROOT, Server
from dalishare import BatchHeldTooLong, DaliShareIterator

PAUSE_S = 0.05  # inside each step, between the two looks at its pixels
SLOTS = "4"     # keep + 2


def digest(images: torch.Tensor) -> str:
    return hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()


class StepChecks:
    """What a training loop saw: the samples of each epoch, and the steps whose pixels changed."""

    def __init__(self):
        self.epochs: dict[int, list[int]] = {}
        self.steps = self.changed = 0

    def step(self, batch: dict, epoch: int) -> None:
        before = digest(batch["images"])
        time.sleep(PAUSE_S)  # the model's forward and backward
        self.changed += digest(batch["images"]) != before
        self.steps += 1
        self.epochs.setdefault(epoch, []).extend(batch["indices"].tolist())

    def assert_clean(self, epochs: int) -> None:
        assert self.changed == 0, f"pixels changed under {self.changed} of {self.steps} steps"
        assert sorted(self.epochs) == list(range(epochs))
        for epoch, seen in self.epochs.items():
            assert sorted(seen) == list(range(N_SAMPLES)), f"epoch {epoch}: not every sample exactly once"


class NoLen:
    """An iterable without ``__len__`` around the loader, as many wrappers are (Lightning then
    fetches one batch ahead to find the end of the epoch)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


def one_ahead(iterable):
    """The prefetcher pattern (apex's data_prefetcher, timm's PrefetchLoader): take batch k+1, then
    hand out batch k."""
    it = iter(iterable)
    upcoming = next(it, None)
    while upcoming is not None:
        current, upcoming = upcoming, next(it, None)
        yield current


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))


def features(images: torch.Tensor) -> torch.Tensor:
    return images[:, ::16, ::16].float() / 255  # NHWC uint8 -> a small float copy


@pytest.mark.parametrize("wrap", ["bare", "no-len"])
def test_lightning_fit_sees_every_sample_once_and_no_batch_changes_under_a_step(dataset, wrap):
    lightning = pytest.importorskip("lightning")
    checks, epochs = StepChecks(), 2

    class Model(lightning.LightningModule):
        def __init__(self, loader):
            super().__init__()
            self.net, self.loader = tiny_model(), loader

        def training_step(self, batch, batch_idx):
            checks.step(batch, self.loader.epoch)
            return torch.nn.functional.cross_entropy(self.net(features(batch["images"])), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    with Server(dataset, "--batch-size", "4", "--slots", SLOTS, "--epochs", str(epochs)):
        with DaliShareIterator("t", batch_size=4, attach_timeout=30) as loader:
            trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                        enable_checkpointing=False, enable_progress_bar=False,
                                        enable_model_summary=False, num_sanity_val_steps=0)
            trainer.fit(Model(loader), train_dataloaders=loader if wrap == "bare" else NoLen(loader))
    checks.assert_clean(epochs)


def test_a_one_ahead_prefetching_loop_sees_every_sample_once_and_no_batch_changes(dataset):
    checks = StepChecks()
    with Server(dataset, "--batch-size", "4", "--slots", SLOTS, "--epochs", "2"):
        with DaliShareIterator("t", batch_size=4, attach_timeout=30) as loader:
            for _ in range(2):
                for batch in one_ahead(loader):
                    checks.step(batch, loader.epoch)
    checks.assert_clean(2)


def test_keep_0_is_unchecked_and_a_prefetching_loop_then_sees_changed_pixels(dataset):
    # the control for the tests above: with the old rule (a view lasts until the next step) the
    # same loop trains on batches that change under it, which the checks see
    checks = StepChecks()
    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "1"):
        with DaliShareIterator("t", batch_size=4, keep=0, attach_timeout=30) as loader:
            for batch in one_ahead(loader):
                checks.step(batch, loader.epoch)
    assert checks.changed > 0
    assert sorted(checks.epochs[0]) == list(range(N_SAMPLES))


def test_accelerate_training_loop_sees_every_sample_once_and_no_batch_changes(dataset):
    accelerate = pytest.importorskip("accelerate")
    from torch.utils.data import DataLoader, IterableDataset

    class Shared(IterableDataset):  # a DataLoader around the loader: Accelerate's DataLoaderShard
        def __init__(self, loader):  # then fetches one batch ahead to know the epoch's end
            self.loader = loader

        def __iter__(self):
            return iter(self.loader)

    checks, epochs = StepChecks(), 2
    config = accelerate.DataLoaderConfiguration(dispatch_batches=False)  # each process reads its own loader
    accelerator = accelerate.Accelerator(cpu=True, dataloader_config=config)
    model = tiny_model()
    model(features(torch.zeros(1, 224, 224, 3, dtype=torch.uint8)))  # materialise the lazy layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with Server(dataset, "--batch-size", "4", "--slots", SLOTS, "--epochs", str(epochs)):
        with DaliShareIterator("t", batch_size=4, attach_timeout=30) as loader:
            model, optimizer, batches = accelerator.prepare(model, optimizer, DataLoader(Shared(loader), batch_size=None))
            assert type(batches).__name__ == "DataLoaderShard"
            for _ in range(epochs):
                for batch in batches:
                    optimizer.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(features(batch["images"])), batch["labels"])
                    checks.step(batch, loader.epoch)
                    accelerator.backward(loss)
                    optimizer.step()
    checks.assert_clean(epochs)


def test_holding_views_longer_than_keep_is_an_error_and_their_pixels_stay_put(dataset):
    with Server(dataset, "--batch-size", "4", "--slots", "3", "--epochs", "3"):  # the free slot is rewritten
        with DaliShareIterator("t", batch_size=4, keep=1, attach_timeout=30) as loader:
            kept = []
            with pytest.raises(BatchHeldTooLong, match=r"keep=1 lets a batch.*clone\(\)"):
                for batch in loader:
                    corner = batch["images"][:, :8]  # a slice keeps the batch in use too
                    kept.append((corner, digest(corner)))
            assert len(kept) == 2  # the first is still used after one further batch: taking a third fails
            time.sleep(0.5)  # time enough for the producer to rewrite a slot given back
            assert [digest(corner) for corner, _ in kept] == [before for _, before in kept]


def in_ring(loader, images: torch.Tensor) -> bool:
    return any(s.data_ptr() <= images.data_ptr() < s.data_ptr() + s.numel() for s in loader._slot_tensors)


def test_views_dropped_in_time_and_copies_are_never_held(dataset):
    # a 2-slot ring: any batch held beyond its step would stop the job (BatchHeldTooLong)
    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "2"):
        with DaliShareIterator("t", batch_size=4, attach_timeout=30) as loader:
            owned = [batch["images"].clone() for batch in loader]  # each view dropped once cloned
        with DaliShareIterator("t", batch_size=4, copy=True, attach_timeout=30) as loader:
            kept = [batch["images"] for batch in loader]  # copies, kept for good
            assert not any(in_ring(loader, images) for images in kept)
    assert len(owned) == len(kept) == 8
    assert loader.job_id is None and loader.batch_size == 4 and len(loader) == 8  # figures outlive close()
    assert [digest(t) for t in owned] != [digest(t) for t in kept]  # epochs 0 and 1: other orders


def test_holding_the_whole_ring_is_an_error_at_once_not_a_hang(dataset):
    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "1"):
        with DaliShareIterator("t", batch_size=4, attach_timeout=30, batch_timeout=60) as loader:
            start, steps = time.monotonic(), 0
            with pytest.raises(BatchHeldTooLong, match="holds all 2 slots"):
                for batch in one_ahead(loader):  # uses two batches at once: the whole ring
                    assert in_ring(loader, batch["images"])
                    steps += 1
            assert steps == 1 and time.monotonic() - start < 10  # taking the third batch fails


@pytest.mark.parametrize("example", ["lightning_train.py", "accelerate_train.py"])
def test_the_examples_train_on_a_shared_stage(dataset, example):
    pytest.importorskip(example.split("_")[0])
    with Server(dataset, "--batch-size", "8", "--epochs", "2"):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--name", "t", "--batch-size", "8",
                               "--epochs", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for epoch in range(2):
        assert f"epoch {epoch}: {N_SAMPLES} samples, {N_SAMPLES} distinct" in proc.stdout, proc.stdout + proc.stderr


def test_the_lightning_example_resumes_mid_epoch_from_its_checkpoint(dataset, tmp_path):
    pytest.importorskip("lightning")
    run = [sys.executable, str(ROOT / "examples" / "lightning_train.py"), "--name", "t", "--batch-size", "4",
           "--epochs", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--every-n-steps", "1"]
    with Server(dataset, "--batch-size", "8", "--cache", "memory"):
        stopped = subprocess.run(run + ["--max-steps", "3"], capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0 and (tmp_path / "ckpt" / "last.ckpt").exists(), stopped.stdout + stopped.stderr
        assert "epoch 0: 12 samples, 12 distinct" in stopped.stdout, stopped.stdout  # stopped 3 steps into epoch 0
        state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]
        (saved,) = state["combined_loader"]
        assert (saved["epoch"], saved["position"]) == (0, 12)  # 3 steps of 4 (Lightning takes none ahead of a loader with len())
        resumed = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for epoch in range(2):  # the summary counts the samples trained before the stop too (from the checkpoint)
        assert f"epoch {epoch}: {N_SAMPLES} samples, {N_SAMPLES} distinct" in resumed.stdout, resumed.stdout
