"""Soak: one producer for N minutes while jobs join, leave, stall and get killed at random, and
its stage worker is SIGKILLed at random times.

    python bench/soak.py [--minutes 10] [--jobs 4] [--worker-kills-per-min 2] [--seed 0] [--out FILE]

At the end it prints: batches served, jobs seen, stage worker kills and restarts, for every pass a
job made over a whole epoch whether it got each decodable sample exactly once, the samples lost and
duplicated in those passes (both must be 0), leaked segments/sockets/processes (must be 0), and the
producer's memory growth after warm-up (must stay under 10 %). The dataset is generated (with
broken JPEGs among the images: empty, text, truncated, flipped, bad markers, spliced) in a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dalishare.testing import ProducerProcess

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "pipelines" / "resnet.py"
BEHAVIOURS = ("normal", "leave", "stall", "killed")


def job_main(spec: dict) -> None:
    """One job: attach, run passes, write what each pass got after every pass."""
    from dalishare import DaliShareIterator

    rng, passes = random.Random(spec["seed"]), []
    with DaliShareIterator(spec["name"], batch_size=spec["batch_size"], attach_timeout=60) as loader:
        for p in range(spec["passes"]):
            missed_before, suspended_before, indices, stop_at = loader.missed_samples, loader.suspensions, [], None
            if spec["behaviour"] == "leave" and p == spec["passes"] - 1:
                stop_at = rng.randint(1, 5)
            for n, batch in enumerate(loader):
                indices += batch["indices"].tolist()
                if spec["behaviour"] == "stall" and p == 0 and n == 2:
                    time.sleep(spec["stall_s"])
                time.sleep(spec["step_s"])
                if stop_at is not None and n + 1 == stop_at:
                    break  # then close: leaves mid-epoch
            passes.append({"epoch": loader.epoch, "indices": indices, "complete": stop_at is None,
                           "missed": loader.missed_samples - missed_before, "epoch_size": loader.samples_per_epoch,
                           "suspended": loader.suspensions - suspended_before})
            Path(spec["out"]).write_text(json.dumps(passes))
            if stop_at is not None or loader.stop_reason:
                break


def make_data(root: Path) -> tuple[Path, int]:
    from dalishare.testing import PATTERNS, make_image_folder

    from dalishare.testing import corrupt_jpegs

    make_image_folder(root, {p: 100 for p in PATTERNS})
    (root / PATTERNS[0] / "zz_empty.jpg").write_bytes(b"")
    (root / PATTERNS[1] / "zz_text.jpg").write_text("not an image")
    corrupt_jpegs(sorted((root / PATTERNS[2]).iterdir()), root / "zz_broken", 20)
    return root, 3


def stage_processes() -> list[int]:
    """Pids of every live stage worker or probe on the machine."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"dalishare.producer.worker" in (proc / "cmdline").read_bytes() and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def worker_pid(log: str) -> int | None:
    pids = re.findall(r"stage worker (?:started|restarted) \(pid (\d+)", log)
    return int(pids[-1]) if pids else None


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--jobs", type=int, default=4, help="jobs alive at most at once")
    parser.add_argument("--worker-kills-per-min", type=float, default=2.0,
                        help="SIGKILLs of the stage worker per minute, at random times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job from a JSON spec
    args = parser.parse_args()
    if args.job:
        return job_main(json.loads(args.job))

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="dalishare-soak-"))
    os.environ["DALISHARE_RUNTIME_DIR"] = str(tmp / "run")
    data, _ = make_data(tmp / "data")
    name = "soak"
    server = ProducerProcess(data, "--batch-size", "32", "--slots", "8", "--stall-timeout", "5", "--cache", "off",
                             name=name, pipeline=STAGE)  # the ring: what stalls, suspensions and releases are about
    producer = server.proc
    start = time.monotonic()
    deadline, warmup_end = start + args.minutes * 60, start + max(60.0, args.minutes * 12)
    jobs: list[dict] = []
    rss_warm = None
    kills, next_kill = 0, start + rng.expovariate(args.worker_kills_per_min / 60) if args.worker_kills_per_min else deadline
    while time.monotonic() < deadline:
        if time.monotonic() > next_kill:
            pid = worker_pid(server.log())
            if pid is not None and pid in stage_processes():
                os.kill(pid, signal.SIGKILL)
                kills += 1
            next_kill = time.monotonic() + rng.expovariate(args.worker_kills_per_min / 60)
        alive = [j for j in jobs if j["proc"].poll() is None]
        if len(alive) < args.jobs and rng.random() < 0.5:
            behaviour = rng.choice(BEHAVIOURS)
            spec = {"name": name, "batch_size": rng.choice([7, 16, 32, 50, 100]), "passes": rng.randint(1, 3),
                    "behaviour": behaviour, "step_s": rng.choice([0.0, 0.02, 0.05]), "stall_s": 8.0,
                    "seed": rng.random(), "out": str(tmp / f"job{len(jobs)}.json")}
            proc = subprocess.Popen([sys.executable, __file__, "--job", json.dumps(spec)],
                                    stdout=subprocess.DEVNULL, stderr=open(tmp / f"job{len(jobs)}.err", "w"))
            jobs.append({"spec": spec, "proc": proc, "kill_at": time.monotonic() + rng.uniform(2, 30)
                         if behaviour == "killed" else None})
        for j in alive:
            if j["kill_at"] and time.monotonic() > j["kill_at"]:
                j["proc"].kill()
        if rss_warm is None and time.monotonic() > warmup_end:
            rss_warm = rss_kb(producer.pid)
        time.sleep(rng.uniform(0.5, 2.0))
    rss_end = rss_kb(producer.pid)
    for j in jobs:
        if j["proc"].poll() is None:
            j["proc"].kill()
        j["proc"].wait(timeout=30)
    code = server.stop(timeout=60)
    time.sleep(1)  # the stage processes die with their producer (PR_SET_PDEATHSIG)
    print_report(args, tmp, jobs, code, rss_warm, rss_end, name, server.log(), kills)


def print_report(args, tmp: Path, jobs: list[dict], code: int, rss_warm, rss_end, name: str, text: str,
                 kills: int) -> None:
    """``text``: the producer's log."""
    from dalishare.producer.dataset import scan

    served = re.search(r"(\d+) batches announced, \d+ samples decoded, (\d+) stage worker restarts, (\d+) control messages "
                       r"dropped", text)
    excluded = set(re.findall(r"excluded (\S+) \(sample (\d+)\)", text))
    decodable = set(range(len(scan(tmp / "data")))) - {int(i) for _, i in excluded}
    whole = ok = dup = lost = duplicates = 0
    skipped = {"left early": 0, "suspended (samples missed, counted by the job)": 0, "first pass of a late job": 0}
    for j in jobs:
        path = Path(j["spec"]["out"])
        for n, p in enumerate(json.loads(path.read_text()) if path.exists() else []):
            dup += len(p["indices"]) != len(set(p["indices"]))
            if not p["complete"]:
                skipped["left early"] += 1
            elif p["missed"] or p["suspended"]:  # the job counts what it missed when it continues
                skipped["suspended (samples missed, counted by the job)"] += 1
            elif n == 0 and len(p["indices"]) < p["epoch_size"]:
                skipped["first pass of a late job"] += 1  # attached mid-epoch: it gets the rest of it
            else:  # a pass that began at an epoch's start and ran to its end: each decodable sample once
                whole += 1
                ok += sorted(p["indices"]) == sorted(decodable)
                lost += len(decodable - set(p["indices"]))
                duplicates += len(p["indices"]) - len(set(p["indices"]))
    segments = [p.name for p in Path("/dev/shm").glob(f"dalishare.{name}.*")]
    runtime_files = os.listdir(tmp / "run") if (tmp / "run").exists() else []
    children = [j["proc"].pid for j in jobs if j["proc"].poll() is None] + stage_processes()
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    kinds = {b: sum(j["spec"]["behaviour"] == b for j in jobs) for b in BEHAVIOURS}
    failed = [j["spec"]["out"] for j in jobs if j["proc"].returncode not in (0, -signal.SIGKILL)]
    lines = [
        f"dalishare soak: {args.minutes:g} min, up to {args.jobs} jobs at once, seed {args.seed}, {os.cpu_count()} cores",
        f"producer exit code: {code} (0 = clean stop on SIGTERM)",
        f"batches served: {served.group(1) if served else '?'}; control messages dropped (malformed, or from "
        f"jobs already gone): {served.group(3) if served else '?'}",
        f"stage worker: {kills} SIGKILLs by the soak, {served.group(2) if served else '?'} restarts "
        f"(kills, plus failures on broken files); "
        f"decoder crashes blamed on a file: {len(re.findall(r'crashed the decoder', text))}",
        f"jobs seen: {len(jobs)} ({', '.join(f'{k} {v}' for k, v in kinds.items())}); "
        f"suspensions: {text.count('suspended until it resumes')}, resumes: {text.count('resumed after batch')}",
        f"jobs that failed (exit code other than 0, or a kill by the soak): {len(failed)} {failed}",
        f"files excluded as undecodable: {len(excluded)}; decodable samples: {len(decodable)}",
        f"whole-epoch passes: {whole}, each decodable sample exactly once: {ok}/{whole}; "
        f"in them, samples lost: {lost} (must be 0), duplicates: {duplicates} (must be 0); "
        f"passes of any kind with a duplicate sample: {dup}; passes not checked for loss: "
        f"{', '.join(f'{why} {count}' for why, count in skipped.items())}",
        f"leaked: segments {len(segments)}, runtime files {len(runtime_files)}, processes {len(children)}",
        f"producer RSS: {rss_warm} kB after warm-up, {rss_end} kB at the end: growth {growth:+.1%} (limit +10%)",
        f"logs and job records: {tmp}",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
