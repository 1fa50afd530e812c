"""A Ray Tune sweep on one node whose trials share one dalishare producer: the images are decoded
once, not once per trial (the ask of ray-project/ray#28171).

    dalishare serve pipelines/resnet.py --data DIR --name sweep --cache memory &
    python examples/sweep_ray_tune.py --name sweep --trials 8 --parallel 4 --epochs 2

Each trial runs in a Ray actor process, attaches to the producer by name with its own batch size,
augments on its side, trains a small CNN and reports its loss every epoch with ``tune.report``
(Ray 2.41 or later). With ``--cache memory`` each trial reads whole epochs at its own pace,
whenever Tune starts it. On the ring (``--cache off``) the trials read one stream: start them
together (``--trials`` equal to ``--parallel``, and serve with ``--min-consumers`` as many). Do not
serve a sweep with ``--epochs``: the producer would stop after the first trial.

The trials find the producer through the runtime dir (``DALISHARE_RUNTIME_DIR``, else
``XDG_RUNTIME_DIR``), which reaches them through ``runtime_env``, also on a Ray cluster started
beforehand (``ray start --head``). Each trial asks Tune for one CPU (``--parallel`` of them are
declared to Ray); on a GPU machine give each trial its share with
``tune.with_resources(trial, {"cpu": 8, "gpu": 1})``. ``--record DIR``: each trial writes its
hyper-parameters, loss, images/s and the samples it trained on per epoch to DIR/TRIAL.json, and
the sweep writes DIR/study.json.
"""

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import ray
import torch
from ray import tune
from torch import nn, optim

from dalishare import DaliShareIterator
from dalishare.augment import ColorJitter, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToDtype


def augmentation(kind: str, seed: int) -> Compose:
    """The trial's own augmentation (a hyper-parameter), on uint8 NHWC batches: float NCHW out."""
    crop = {"flip": [], "crop": [RandomResizedCrop(160, scale=(0.35, 1.0))],
            "jitter": [RandomResizedCrop(160, scale=(0.35, 1.0)), ColorJitter(0.3, 0.3, 0.3)]}[kind]
    return Compose([*crop, RandomHorizontalFlip(), ToDtype(torch.float32, scale=True),
                    Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])], seed=seed)


def trial(config: dict) -> None:
    """One trial, in a Ray actor process: attach, train, report every epoch. (It names no ``torch``:
    Ray pickles this function by value, and its cloudpickle then takes ``loader.classes`` for the
    module ``torch.classes``, which does not pickle.)"""
    name = tune.get_context().get_trial_name()
    augment = augmentation(config["augment"], seed=zlib.crc32(name.encode()))
    with DaliShareIterator(config["name"], batch_size=config["batch_size"], augment=augment) as loader:
        model = nn.Sequential(nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(16, len(loader.classes)))
        optimizer = optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
        start, seen, steps = time.monotonic(), [], []
        for epoch in range(config["epochs"]):
            seen.append([])
            losses = []  # one per step
            for batch in loader:  # one pass, one epoch
                loss = nn.functional.cross_entropy(model(batch["images"]), batch["labels"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                seen[-1] += batch["indices"].tolist()
            steps.append(len(losses))
            images_s = sum(map(len, seen)) / (time.monotonic() - start)
            if config["record"]:  # every epoch: a scheduler may stop the trial at any report
                record = {"trial": name, "params": {k: config[k] for k in ("lr", "batch_size", "augment")},
                          "loss": sum(losses) / len(losses), "images_per_s": images_s, "epochs": seen, "steps": steps}
                Path(config["record"], f"{name}.json").write_text(json.dumps(record))
            tune.report({"loss": sum(losses) / len(losses), "images_per_s": images_s,
                         "samples": len(seen[-1]), "distinct": len(set(seen[-1]))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="default", help="the producer's --name")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4, help="trials at a time, each in a Ray actor process")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    parser.add_argument("--storage", metavar="DIR", help="Tune's results (default: Ray's, ~/ray_results)")
    parser.add_argument("--record", metavar="DIR", help="write each trial's record here")
    args = parser.parse_args()
    record = os.path.abspath(args.record) if args.record else None  # trials run in their own directories
    if record:
        os.makedirs(record, exist_ok=True)
    where = {k: os.environ[k] for k in ("DALISHARE_RUNTIME_DIR", "XDG_RUNTIME_DIR") if k in os.environ}
    ray.init(num_cpus=args.parallel, include_dashboard=False, runtime_env={"env_vars": where})
    try:
        start = time.monotonic()
        tuner = tune.Tuner(
            trial,
            param_space={"lr": tune.loguniform(1e-3, 0.3), "batch_size": tune.choice([16, 32, 64]),
                         "augment": tune.choice(["flip", "crop", "jitter"]),
                         "name": args.name, "epochs": args.epochs, "record": record},
            tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=args.trials,
                                        max_concurrent_trials=args.parallel),
            run_config=tune.RunConfig(storage_path=args.storage and os.path.abspath(args.storage), verbose=0))
        results = tuner.fit()
        seconds = time.monotonic() - start
    finally:
        ray.shutdown()
    for result in results:
        if result.error:
            raise SystemExit(f"a trial failed: {result.error}")
        m = result.metrics
        print(f"trial {m['trial_id']}: lr {result.config['lr']:.4f}, batch {result.config['batch_size']}, "
              f"{result.config['augment']}: loss {m['loss']:.3f}, {m['images_per_s']:.0f} img/s, "
              f"last epoch {m['samples']} samples, {m['distinct']} distinct")
    best = results.get_best_result()
    params = {k: best.config[k] for k in ("lr", "batch_size", "augment")}
    print(f"best trial: loss {best.metrics['loss']:.3f}, {params}")
    print(f"{len(results)} trials in {seconds:.1f} s: {len(results) / seconds * 3600:.0f} trials/hour")
    if record:
        summary = {"best": {"loss": best.metrics["loss"], "params": params}, "trials": len(results), "seconds": seconds}
        Path(record, "study.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
