"""Scale: time to serving, time to a job's first batch, and memory, against the number of files.

    python bench/scale.py [--sizes 1000,100000,1281000] [--classes 1000] [--keep-trees DIR] [--out FILE]
                          [--cache off] [--timeout 900]

For each size it builds (once; kept in --keep-trees for later runs) an ImageNet-shaped tree, CLASSES
folders ``n%08d`` of files ``n%08d_K.JPEG``, each a hard link to one of 32 small JPEGs, so the tree
costs directory entries and no inodes or data. It lists the tree once (the figures are for a warm
cache), then starts ``dalishare serve pipelines/resnet.py`` and one job at the same moment; the job
takes one batch of 64. Printed per size: the producer's phases (its JSON log's times), the job's
first batch, the peak (VmHWM) and current (VmRSS) memory of the producer and its stage worker after
that batch, and the job's peak; then the growth per sample between sizes.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "pipelines" / "resnet.py"
SOURCES = 32  # distinct JPEGs; ext4 allows 65,000 links to one, so up to ~2 M files
STEPS = ("scanning", "worker", "serving", "imported", "attached", "first")  # producer's, then the job's
PHASES = {"scanning": "': scanning ", "worker": "stage worker started (pid ", "serving": "serving '"}  # log lines


def job_main(name: str, out: str) -> None:
    """One job: attach, take one batch, write its times and memory (wall clock) to ``out``."""
    started = time.time()
    from dalishare import DaliShareIterator  # torch comes with it

    imported = time.time()
    with DaliShareIterator(name, batch_size=64, attach_timeout=600) as loader:
        attached = time.time()
        next(iter(loader))
        first = time.time()
        mem = memory("self")
    times = {"started": started, "imported": imported, "attached": attached, "first": first}
    Path(out + ".tmp").write_text(json.dumps({**times, **mem}))
    os.rename(out + ".tmp", out)


def memory(pid) -> dict:
    """VmHWM and VmRSS of a process, in kB (0 when it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {"hwm": 0, "rss": 0}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {"hwm": int(fields["VmHWM"].split()[0]), "rss": int(fields["VmRSS"].split()[0])}


def build_tree(work: Path, size: int, classes: int) -> Path:
    """``work/tree-SIZE-CLASSES``, built once (in a ``.partial`` folder, resumed after a kill, then renamed)."""
    tree = work / f"tree-{size}-{classes}"
    if tree.is_dir():
        return tree
    if size > SOURCES * 60_000:
        raise SystemExit(f"{size} files would need more than 60,000 hard links to one of {SOURCES} JPEGs")
    sources = work / f"sources-{SOURCES}"
    if not sources.is_dir():
        from dalishare.testing import make_image_folder

        make_image_folder(work / f"{sources.name}.partial", {"src": SOURCES}).rename(sources)
    jpegs = sorted(str(p) for p in (sources / "src").iterdir())
    partial, start = work / f"{tree.name}.partial", time.monotonic()
    for c in range(classes):
        folder = partial / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(c, size, classes):  # sample i in class i % classes, as file number i
            try:
                os.link(jpegs[(i // classes + c) % SOURCES], f"{folder}/n{c:08d}_{i}.JPEG")
            except FileExistsError:
                pass
    partial.rename(tree)
    took = time.monotonic() - start
    print(f"built {tree}: {size:,} hard links in {took:.1f} s ({size / took:,.0f}/s)", flush=True)
    return tree


def warm(tree: Path, size: int) -> None:
    start = time.monotonic()
    found = sum(len(os.listdir(d)) for d in os.scandir(tree))
    if found != size:
        raise SystemExit(f"{tree} holds {found} files, not {size}: remove it and run again")
    print(f"listed {tree} ({found:,} files) in {time.monotonic() - start:.1f} s to warm the cache", flush=True)


def log_times(log: Path) -> tuple[dict, int | None]:
    """Wall-clock time of each phase's first log line, and the stage worker's pid."""
    times, worker = {}, None
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the stage worker's own lines
        message = record.get("message", "")
        for phase, text in PHASES.items():
            if phase not in times and text in message:
                local = datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%f")
                times[phase] = local.timestamp()
        if worker is None and message.startswith("stage worker started (pid "):
            worker = int(message.split("pid ")[1].split(")")[0])
    return times, worker


def measure(tree: Path, size: int, args, logs: Path) -> dict:
    """Serve ``tree`` and attach one job at the same moment; their figures after the first batch."""
    name, log, out = f"scale-{size}", logs / f"serve-{size}.log", logs / f"job-{size}.json"
    out.unlink(missing_ok=True)
    with open(log, "wb") as log_file, open(logs / f"job-{size}.err", "wb") as job_err:  # this run's only
        start = time.time()
        serve = subprocess.Popen([sys.executable, "-m", "dalishare", "serve", str(STAGE), "--data", str(tree),
                                  "--name", name, "--cache", args.cache, "--batch-size", "64", "--epochs", "1000",
                                  "--log-format", "json"], stdout=log_file, stderr=subprocess.STDOUT)
        job = subprocess.Popen([sys.executable, __file__, "--job", name, str(out)], stdout=job_err, stderr=job_err)
    worker = None
    try:
        deadline = time.monotonic() + args.timeout
        while not out.exists():
            if serve.poll() is not None or job.poll() not in (None, 0) or time.monotonic() > deadline:
                raise RuntimeError(f"serve exit {serve.poll()}, job exit {job.poll()}, "
                                   f"{time.monotonic() - deadline + args.timeout:.0f} s after the start")
            time.sleep(0.05)
        times, worker = log_times(log)
        producer, stage, result = memory(serve.pid), memory(worker), json.loads(out.read_text())
        at = {**{p: t - start for p, t in times.items()},
              **{k: result[k] - start for k in ("imported", "attached", "first")}}
        return {"size": size, "at": at, "producer": producer, "worker": stage,
                "job": {"hwm": result["hwm"], "rss": result["rss"]}}
    except BaseException:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print(f"--- {log} (last 40 lines)\n" + "\n".join(tail) + f"\n--- job stderr: {logs}/job-{size}.err")
        raise
    finally:
        stop(serve, job, worker, name)


def stop(serve: subprocess.Popen, job: subprocess.Popen, worker: int | None, name: str) -> None:
    """SIGTERM the producer and wait; kill what outlives its time; then ``dalishare cleanup``."""
    for proc, what, timeout in ((serve, "producer", 60), (job, "job", 10)):
        if proc.poll() is None and proc is serve:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{what} pid {proc.pid} did not end {timeout} s after the producer's stop: killed")
            proc.kill()
            proc.wait(timeout=10)
    if worker and memory(worker)["rss"]:
        time.sleep(2)  # it dies with its producer (PR_SET_PDEATHSIG)
        if memory(worker)["rss"]:
            print(f"stage worker pid {worker} outlived its producer: killed")
            os.kill(worker, signal.SIGKILL)
    cleanup = subprocess.run([sys.executable, "-m", "dalishare", "cleanup", "--name", name], timeout=60,
                             capture_output=True, text=True, check=False)
    if "removed 0 " not in cleanup.stdout:
        print(f"dalishare cleanup --name {name}: {cleanup.stdout.strip()} {cleanup.stderr.strip()}")


def mib(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def report(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="per size (seconds from `serve` start; memory in MiB after the job's first batch)",
                  caption="scanning: the producer's first log line; worker: the scan is done, the stage worker "
                          "starts; serving: its first batch is measured, jobs are welcome; job import: the job "
                          "imported DaliShareIterator (torch); peak: VmHWM; rss: VmRSS")
    for column in ("files", "scanning", "worker", "serving", "job import", "job attach", "1st batch", "prod. peak",
                   "prod. rss", "worker peak", "worker rss", "job peak"):
        table.add_column(column, justify="right")
    for r in rows:
        times = [f"{r['at'][k]:.1f}" if k in r["at"] else "?" for k in STEPS]
        table.add_row(f"{r['size']:,}", *times, mib(r["producer"]["hwm"]), mib(r["producer"]["rss"]),
                      mib(r["worker"]["hwm"]), mib(r["worker"]["rss"]), mib(r["job"]["hwm"]))
    console.print(table)
    growth = Table(title="growth between sizes (bytes per sample; seconds per 100 k samples)")
    for column in ("from", "to", "producer peak", "producer rss", "worker peak", "job peak", "to serving",
                   "to first batch"):
        growth.add_column(column, justify="right")
    for small, big in itertools.pairwise(rows):
        n = big["size"] - small["size"]
        per = [f"{(big[p][k] - small[p][k]) * 1024 / n:.0f}"
               for p, k in (("producer", "hwm"), ("producer", "rss"), ("worker", "hwm"), ("job", "hwm"))]
        secs = [f"{(big['at'][k] - small['at'][k]) * 1e5 / n:.2f}" if k in big["at"] and k in small["at"] else "?"
                for k in ("serving", "first")]
        growth.add_row(f"{small['size']:,}", f"{big['size']:,}", *per, *secs)
    console.print(growth)


def machine() -> str:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False).stdout.strip()

    dirty = " + uncommitted changes in dalishare/" if git("status", "--porcelain", "dalishare") else ""
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, commit {git('rev-parse', '--short', 'HEAD')}{dirty}; "
            f"{os.cpu_count()} cores, {int(mem) / 2**20:.1f} GiB memory, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.2f} at the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1281000", help="files per tree, comma-separated")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--keep-trees", type=Path, default=Path("/var/tmp/dalishare-scale"),
                        help="where the trees are built and kept for later runs (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu-scale-2core.txt")
    parser.add_argument("--cache", default="off", help="serve's --cache (default: off)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per size to the job's first batch")
    parser.add_argument("--json", type=Path, help="also write the figures of each size as JSON here")
    parser.add_argument("--job", nargs=2, help=argparse.SUPPRESS)  # internal: NAME OUT, one job
    args = parser.parse_args()
    if args.job:
        return job_main(*args.job)
    from rich.console import Console

    console, header = Console(record=True, width=140), machine()
    logs = args.keep_trees / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sorted(int(s) for s in args.sizes.split(",")):
        tree = build_tree(args.keep_trees, size, args.classes)
        warm(tree, size)
        rows.append(measure(tree, size, args, logs))
        at = rows[-1]["at"]
        print(f"{size:,} files: serving at {at.get('serving', float('nan')):.1f} s, first batch at {at['first']:.1f} s",
              flush=True)
    console.print(f"dalishare scale: {args.classes} classes, --cache {args.cache}, batches of 64, "
                  f"one job started with `serve`\n{header}", soft_wrap=True)
    report(rows, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(console.export_text())
    if args.json:
        args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
