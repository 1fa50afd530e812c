"""Benchmark: what a hyper-parameter sweep gains from one shared producer.

    python bench/sweep.py [--data DIR] [--trials 4] [--parallel 4] [--epochs 2 10] [--runs 2] [--out FILE]

Runs examples/sweep_optuna.py as a user does, both ways in each run, alternating which goes first: (shared) against
a producer serving DIR with ``--cache memory``, started and serving before the sweep's clock starts
(a standing service; its start-up is printed apart); (alone) with ``--alone DIR``, each trial
decoding the images itself (torchvision ImageFolder, PIL, in the trial's process). Both train the
same small CNN with each trial's own hyper-parameters (seeded samplers: the same draws both ways).
Figures: the sweep's wall time from launch to exit (Python start-up, imports and Optuna included)
and trials per hour from it; images/s per trial as the trial measures it (attach to last step);
CPU seconds of every process the variant ran (the producer and its stage worker included for
shared). Each trial's record is checked: every epoch every sample exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dalishare.testing import ProducerProcess

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "examples" / "sweep_optuna.py"
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera" / "train"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every child waited for, and theirs
    return usage.ru_utime + usage.ru_stime


def sweep(args, record: Path, *options: str) -> dict:
    """One run of the example; its wall time, CPU and the trials' records."""
    cpu, start = children_cpu(), time.monotonic()
    proc = subprocess.run([sys.executable, str(SWEEP), "--trials", str(args.trials), "--parallel", str(args.parallel),
                           "--epochs", str(args.epochs), "--record", str(record), *options],
                          capture_output=True, text=True, timeout=3600, check=False)
    seconds = time.monotonic() - start
    if proc.returncode:
        raise SystemExit(f"the sweep failed:\n{proc.stdout}{proc.stderr}")
    trials = [json.loads(p.read_text()) for p in sorted(record.glob("trial-*.json"))]
    samples = len(trials[0]["epochs"][0])
    once = all(sorted(e) == list(range(samples)) for t in trials for e in t["epochs"])
    return {"seconds": seconds, "cpu": children_cpu() - cpu, "img_s": [t["images_per_s"] for t in trials],
            "once": once, "samples": samples, "trials": len(trials)}


def shared(args, record: Path) -> dict:
    name = f"bench-sweep-{os.getpid()}"
    cpu, start = children_cpu(), time.monotonic()
    with ProducerProcess(args.data, "--cache", "memory", name=name) as producer:
        while "serving '" not in producer.log():  # listening; the fill starts with the first trial
            if producer.proc.poll() is not None:
                raise SystemExit(f"the producer failed:\n{producer.log()}")
            time.sleep(0.05)
        startup = time.monotonic() - start
        result = sweep(args, record, "--name", name)
    result["cpu"] = children_cpu() - cpu  # the producer's too, now that it was waited for
    return {**result, "startup": startup}


def alone(args, record: Path) -> dict:
    return sweep(args, record, "--alone", args.data)


def compare(args, epochs: int, tmp: str) -> list[str]:
    """``args.runs`` runs of each variant with ``epochs`` epochs per trial; the table's lines."""
    args.epochs, results = epochs, {"shared": [], "alone": []}
    for run in range(args.runs):
        for variant in (("shared", "alone") if run % 2 == 0 else ("alone", "shared")):
            results[variant].append((shared if variant == "shared" else alone)(args, Path(tmp, f"{epochs}-{variant}-{run}")))
            r = results[variant][-1]
            print(f"{epochs} epochs, run {run} {variant}: {r['seconds']:.1f} s, {r['cpu']:.0f} CPU s, per-trial img/s "
                  f"{' '.join(f'{x:.0f}' for x in r['img_s'])}", flush=True)

    def row(variant: str) -> tuple[float, float, float, float, bool]:
        runs = results[variant]
        seconds = statistics.mean(r["seconds"] for r in runs)
        return (seconds, args.trials / seconds * 3600, statistics.mean(x for r in runs for x in r["img_s"]),
                statistics.mean(r["cpu"] for r in runs), all(r["once"] for r in runs))

    startup = statistics.mean(r["startup"] for r in results["shared"])
    lines = [(f"{args.trials} trials, {args.parallel} at a time, {epochs} epochs each of {results['shared'][0]['samples']} "
              f"samples; mean of {args.runs} runs each, alternating (the producer's start-up, before the sweep: {startup:.1f} s)"),
             f"{'setup':<8}{'sweep s':>10}{'trials/hour':>13}{'img/s per trial':>17}{'CPU s':>8}  every sample once per epoch"]
    for variant in ("shared", "alone"):
        seconds, per_hour, img_s, cpu, once = row(variant)
        lines.append(f"{variant:<8}{seconds:>10.1f}{per_hour:>13.0f}{img_s:>17.0f}{cpu:>8.0f}  {'yes' if once else 'NO'}")
    (_, s_hour, s_img, s_cpu, _), (_, a_hour, a_img, a_cpu, _) = row("shared"), row("alone")
    lines.append(f"shared: {s_hour / a_hour:.2f}x the trials per hour, {s_img / a_img:.2f}x the img/s per trial, "
                 f"{s_cpu / a_cpu:.2f}x the CPU seconds")
    lines += [f"  run {i} {v}: {r['seconds']:.1f} s, {r['cpu']:.0f} CPU s, img/s {' '.join(f'{x:.0f}' for x in r['img_s'])}"
              for v in ("shared", "alone") for i, r in enumerate(results[v])]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HYMENOPTERA), help="image folder (default: ../shared/data/hymenoptera/train)")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 10], help="epochs per trial: a table for each")
    parser.add_argument("--runs", type=int, default=2, help="runs of each variant, alternating which goes first")
    parser.add_argument("--out", help="also write the figures to this file")
    args = parser.parse_args()
    lines = [(f"dalishare sweep benchmark: {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at "
              f"start), examples/sweep_optuna.py on {args.data}"),
             ("shared: one producer, --cache memory; alone: each trial decodes itself (torchvision ImageFolder, "
              "PIL, no DataLoader workers)")]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for epochs in args.epochs:
            lines += ["", *compare(args, epochs, tmp)]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
