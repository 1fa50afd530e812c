"""An Optuna sweep whose parallel trials, each a process with its own hyper-parameters, share one
dalishare producer: the images are decoded once, not once per trial.

    dalishare serve pipelines/resnet.py --data DIR --name sweep --cache memory &
    python examples/sweep_optuna.py --name sweep --trials 8 --parallel 4 --epochs 2

``--parallel`` worker processes share one study through a journal file (Optuna's way to run trials
in several processes); each runs its share of the trials one after the other. A trial attaches
with its own batch size, augments on its side, trains a small CNN and reports its last epoch's
loss. With ``--cache memory`` the producer decodes each image once, however many trials read it,
and every trial reads whole epochs at its own pace, whenever it starts. On the ring (``--cache
off``) the trials read one stream at the slowest one's pace, and a trial that attaches mid-epoch
gets the rest of that epoch first: there start them together (``--trials`` equal to ``--parallel``,
and serve with ``--min-consumers`` as many). Do not serve a sweep with ``--epochs``: the producer
would stop after the first trial.

``--alone DIR``: each trial decodes DIR itself (torchvision ``ImageFolder`` in a ``DataLoader``, as
without dalishare); bench/sweep.py compares the two. ``--record DIR``: each trial writes its
hyper-parameters, loss, images/s and the samples it trained on per epoch to DIR/trial-K.json, and
the sweep writes DIR/study.json.
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import optuna
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from dalishare import DaliShareIterator
from dalishare.augment import ColorJitter, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToDtype

STUDY = "dalishare-sweep"
optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial prints its own line


def augmentation(kind: str, seed: int) -> Compose:
    """The trial's own augmentation (a hyper-parameter), on uint8 NHWC batches: float NCHW out."""
    crop = {"flip": [], "crop": [RandomResizedCrop(160, scale=(0.35, 1.0))],
            "jitter": [RandomResizedCrop(160, scale=(0.35, 1.0)), ColorJitter(0.3, 0.3, 0.3)]}[kind]
    return Compose([*crop, RandomHorizontalFlip(), ToDtype(torch.float32, scale=True),
                    Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])], seed=seed)


class Indexed(torch.utils.data.Dataset):
    """A dataset whose items also carry their index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


class OwnLoader:
    """A trial decoding the images itself (resize 256, centre crop 224, as pipelines/resnet.py), as
    without dalishare: the same batch dicts, one pass per epoch. ImageFolder numbers the samples as
    dalishare does (by class, then path)."""

    def __init__(self, root: str, batch_size: int, augment, workers: int):
        from torchvision import datasets, transforms

        folder = datasets.ImageFolder(root, transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()]))
        self.classes, self.augment = folder.classes, augment
        self.batches = torch.utils.data.DataLoader(Indexed(folder), batch_size, shuffle=True, num_workers=workers,
                                                   persistent_workers=workers > 0)

    def __iter__(self):
        for images, labels, indices in self.batches:
            yield self.augment({"images": images.permute(0, 2, 3, 1), "labels": labels, "indices": indices})


def objective(trial: optuna.Trial, args) -> float:
    params = {"lr": trial.suggest_float("lr", 1e-3, 0.3, log=True),
              "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64]),
              "augment": trial.suggest_categorical("augment", ["flip", "crop", "jitter"])}
    augment = augmentation(params["augment"], seed=trial.number)
    if args.alone:
        loader = nullcontext(OwnLoader(args.alone, params["batch_size"], augment, args.workers))
    else:  # attach to the producer, with this trial's batch size
        loader = DaliShareIterator(args.name, batch_size=params["batch_size"], augment=augment)
    with loader as batches:
        torch.manual_seed(trial.number)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, len(batches.classes)))
        optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=0.9)
        start, seen, steps, pruned = time.monotonic(), [], [], False
        for epoch in range(args.epochs):
            seen.append([])
            losses = []  # one per step
            for batch in batches:  # one pass, one epoch
                loss = torch.nn.functional.cross_entropy(model(batch["images"]), batch["labels"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                seen[-1] += batch["indices"].tolist()
            steps.append(len(losses))
            mean_loss = sum(losses) / len(losses)
            trial.report(mean_loss, epoch)
            if trial.should_prune():  # an unpromising trial stops early: it just detaches
                pruned = True
                break
    seconds = time.monotonic() - start
    images_s = sum(map(len, seen)) / seconds
    print(f"trial {trial.number}: lr {params['lr']:.4f}, batch {params['batch_size']}, {params['augment']}: "
          f"loss {mean_loss:.3f}, {images_s:.0f} img/s, epochs of {[len(s) for s in seen]} samples, "
          f"{[len(set(s)) for s in seen]} distinct", flush=True)
    if args.record:
        record = {"trial": trial.number, "params": params, "loss": mean_loss, "pruned": pruned,
                  "images_per_s": images_s, "seconds": seconds, "epochs": seen, "steps": steps}
        Path(args.record, f"trial-{trial.number}.json").write_text(json.dumps(record))
    if pruned:
        raise optuna.TrialPruned()
    return mean_loss


def worker(args, journal: str, trials: int, index: int) -> None:
    """One process of the sweep: runs ``trials`` trials of the shared study, one after the other."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.parallel))
    sampler = optuna.samplers.TPESampler(seed=args.seed + index)  # each worker its own draws
    study = optuna.load_study(study_name=STUDY, storage=JournalStorage(JournalFileBackend(journal)), sampler=sampler)
    study.optimize(lambda trial: objective(trial, args), n_trials=trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="default", help="the producer's --name")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4, help="trials at a time, each in its own process")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    parser.add_argument("--alone", metavar="DIR", help="each trial decodes DIR itself instead (no producer)")
    parser.add_argument("--workers", type=int, default=0, help="with --alone: DataLoader workers per trial "
                        "(default 0: the trial decodes; workers are spawned, as the trial is)")
    parser.add_argument("--record", metavar="DIR", help="write each trial's record here")
    args = parser.parse_args()
    if args.record:
        os.makedirs(args.record, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        journal = os.path.join(tmp, "journal.log")
        storage = JournalStorage(JournalFileBackend(journal))
        study = optuna.create_study(study_name=STUDY, storage=storage, direction="minimize")
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, as on a GPU machine
        shares = [args.trials // args.parallel + (i < args.trials % args.parallel) for i in range(args.parallel)]
        workers = [spawn.Process(target=worker, args=(args, journal, n, i)) for i, n in enumerate(shares) if n]
        for p in workers:
            p.start()
        for p in workers:
            p.join()
        seconds = time.monotonic() - start
        if any(p.exitcode for p in workers):
            raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in workers]}")
        best = study.best_trial
        print(f"best trial {best.number}: loss {best.value:.3f}, {best.params}")
        print(f"{len(study.trials)} trials in {seconds:.1f} s: {len(study.trials) / seconds * 3600:.0f} trials/hour")
        if args.record:
            summary = {"best": {"trial": best.number, "loss": best.value, "params": best.params},
                       "trials": len(study.trials), "seconds": seconds}
            Path(args.record, "study.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
