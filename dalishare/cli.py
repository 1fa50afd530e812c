"""The ``dalishare`` command: serve, status, cleanup, cache, demo.

Each command's options, with their help texts, are what ``dalishare COMMAND --help`` prints; the
manual's command-line reference (docs/reference/cli.md) is built from those texts.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from pathlib import Path

from .errors import DalishareError
from .intervals import SHUTDOWN_LIMIT_S, STATUS_LOG_INTERVAL_S
from .producer import ServeOptions
from .producer.stage import GPU_STAGE_THREADS

DEFAULTS = ServeOptions()


def _serve(args: argparse.Namespace) -> None:
    from .producer import Producer
    from .producer.cache_policy import parse_size

    from .producer.reporting import StatusOutput

    producer = Producer(args.pipeline, args.data, ServeOptions(
        name=args.name, batch_size=args.batch_size, device=args.device, slots=args.slots, seed=args.seed,
        epochs=args.epochs, min_consumers=args.min_consumers, num_threads=args.threads,
        heartbeat_timeout=args.heartbeat_timeout, stall_timeout=args.stall_timeout,
        stage_timeout=args.stage_timeout, cache=args.cache, shard=args.shard,
        cache_limit=parse_size(args.cache_limit) if args.cache_limit is not None else None))

    # a stop or teardown that hangs (a native library's threads, say) prints where it hangs and ends
    watchdog = lambda: faulthandler.dump_traceback_later(SHUTDOWN_LIMIT_S, exit=True)  # noqa: E731

    def on_signal(signum, _frame):
        producer.stop(f"stopped by {signal.Signals(signum).name}")
        watchdog()

    producer.on_teardown = watchdog
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    exporter = None
    if args.metrics_port is not None:
        from .producer.metrics import MetricsExporter

        exporter = MetricsExporter(args.metrics_port, args.metrics_host)
    output = StatusOutput(args.console, args.status_interval)

    def on_status(report) -> None:
        output(report)
        if exporter is not None:
            exporter.update(report)

    producer.on_status = on_status
    try:
        producer.serve()
    finally:
        output.close()
        if exporter is not None:
            exporter.close()
        faulthandler.cancel_dump_traceback_later()  # the teardown is over in time


def _cleanup(args: argparse.Namespace) -> None:
    from .shm.names import clean_stale

    removed = clean_stale(args.name)
    print(f"removed {len(removed)} stale files" + "".join(f"\n  {p}" for p in removed))


def _cache_list(args: argparse.Namespace) -> None:
    from .shm.cache import in_use, list_caches

    found = list_caches(args.dir)
    print(f"{len(found)} cache files in {args.dir}")
    for path, layout, valid in found:
        busy = " (being filled by a live producer)" if in_use(path) else ""
        if layout is None:
            print(f"  {path.name}: not a complete cache file (remove it){busy}")
        else:
            size = path.stat().st_blocks * 512
            source = f" from {layout.source}" if layout.source else ""
            print(f"  {path.name}: {valid}/{layout.samples} samples of {layout.sample_shape} {layout.dtype}{source}, "
                  f"{size / 2**30:.2f} GiB on disk, key {layout.key[:12]}{busy}")


def _cache_remove(args: argparse.Namespace) -> None:
    from .shm.cache import in_use, list_caches

    chosen = [path for path, layout, _ in list_caches(args.dir)
              if args.all or (layout is not None and layout.key.startswith(args.key or "\0"))]
    removed = [path for path in chosen if not in_use(path)]
    for path in removed:
        path.unlink()
    print(f"removed {len(removed)} cache files" + "".join(f"\n  {p}" for p in removed))
    for path in sorted(set(chosen) - set(removed)):
        print(f"kept {path}: a live producer is filling or serving it; stop it first")


def _status(args: argparse.Namespace) -> None:
    from .status import run

    run(args.name, args.json, args.interval if args.watch else None)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(images_per_class=args.images_per_class, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    """The ``dalishare`` argument parser, one sub-command per task.

    Returns:
        argparse.ArgumentParser: ``serve``, ``status``, ``cleanup``, ``cache list/remove`` and
            ``demo``, each with its options; the parsed namespace's ``func`` runs the command.
    """
    parser = argparse.ArgumentParser(prog="dalishare", description="Shared DALI data loading for many training jobs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_tools(sub)
    return parser


def _add_serve(sub) -> None:
    """``dalishare serve``: one option per `ServeOptions` field, with its defaults."""
    serve = sub.add_parser("serve", help="run a shared stage and serve its batches")
    serve.add_argument("pipeline", help="stage file, e.g. pipelines/resnet.py")
    serve.add_argument("--data", required=True, help="a folder of class folders holding images; a file list of "
                       "'RELATIVE/PATH LABEL' lines; or WebDataset shards: a folder of .tar files or a pattern "
                       "such as 'DIR/train-{000000..000146}.tar'")
    serve.add_argument("--name", default=DEFAULTS.name, help="name jobs attach to (default: %(default)s)")
    serve.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="producer batch (default: %(default)s)")
    serve.add_argument("--device", default=DEFAULTS.device, help="where the stage runs: cpu, gpu or gpu:K, the K-th visible GPU (default: %(default)s)")
    serve.add_argument("--slots", type=int, default=DEFAULTS.slots, help="ring size in batches (default: %(default)s)")
    serve.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the epoch orders (default: %(default)s)")
    serve.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="stop after N epochs (default: run until stopped)")
    serve.add_argument("--min-consumers", type=int, default=DEFAULTS.min_consumers,
                       help="jobs to wait for before the first batch (default: %(default)s)")
    serve.add_argument("--threads", type=int, default=DEFAULTS.num_threads, help=f"DALI CPU threads (default: all cores; with --device gpu, at most {GPU_STAGE_THREADS})")
    serve.add_argument("--heartbeat-timeout", type=float, default=DEFAULTS.heartbeat_timeout,
                       help="seconds of silence before a job's socket is checked (default: %(default)s)")
    serve.add_argument("--stall-timeout", type=float, default=DEFAULTS.stall_timeout,
                       help="seconds a job may hold the others back before it is suspended (default: %(default)s)")
    serve.add_argument("--stage-timeout", type=float, default=DEFAULTS.stage_timeout,
                       help="seconds the stage worker may work on a batch before it is killed and replaced, "
                            "and a probe on one file before the file is excluded (default: %(default)s)")
    serve.add_argument("--cache", default=DEFAULTS.cache, metavar="auto|memory|gpu|off|DIR",
                       help="keep every decoded sample so each job reads at its own pace and nothing is decoded "
                            "twice: in host shared memory, on the producer's GPU, or in a file in folder DIR "
                            "(kept for later runs); auto: memory if it fits --cache-limit and the stage is "
                            "deterministic, else off, the ring paced by the slowest job (default: %(default)s)")
    serve.add_argument("--cache-limit", default=None, metavar="SIZE",
                       help="largest memory or GPU cache, e.g. 64G (default: half the memory available, or "
                            "of the GPU's free memory for --cache gpu)")
    serve.add_argument("--shard", default=DEFAULTS.shard, metavar="I/N|auto",
                       help="serve node I's share of each epoch, of N nodes (one producer per node); "
                            "auto: from SLURM_NODEID/SLURM_NNODES, NODE_RANK/NNODES or GROUP_RANK/GROUP_WORLD_SIZE "
                            "(default: %(default)s, everything)")
    serve.add_argument("--metrics-port", type=int, default=None, metavar="P",
                       help="serve the status figures for Prometheus at http://HOST:P/metrics (0: any free port)")
    serve.add_argument("--metrics-host", default="127.0.0.1",
                       help="address the metrics listen on (default: %(default)s, this machine only)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="json: one JSON object per log line, for log collectors (default: %(default)s)")
    serve.add_argument("--status-interval", type=float, default=STATUS_LOG_INTERVAL_S, metavar="SECONDS",
                       help="when the output is not a terminal, log a status line this often (default: %(default)s)")
    serve.set_defaults(func=_serve)


def _add_tools(sub) -> None:
    """``dalishare status``, ``cleanup``, ``cache list/remove`` and ``demo``."""
    status = sub.add_parser("status", help="what each producer of this user serves, and its jobs")
    status.add_argument("name", nargs="?", default=None, help="only this producer (default: all)")
    status.add_argument("--json", action="store_true", help="print JSON (one document per refresh) for scripts")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted (Ctrl-C)")
    status.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                        help="with --watch: seconds between refreshes (default: %(default)s)")
    status.set_defaults(func=_status)

    cleanup = sub.add_parser("cleanup", help="remove segments and sockets left by dead producers")
    cleanup.add_argument("--name", default=None, help="only this producer name (default: all)")
    cleanup.set_defaults(func=_cleanup)

    cache = sub.add_parser("cache", help="list or remove decoded-sample caches kept in a folder")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    listing = cache_sub.add_parser("list", help="the cache files in DIR, with their fill and size")
    listing.add_argument("dir", type=Path, help="the folder given to --cache")
    listing.set_defaults(func=_cache_list)
    remove = cache_sub.add_parser("remove", help="remove cache files from DIR")
    remove.add_argument("dir", type=Path, help="the folder given to --cache")
    which = remove.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="the cache whose key starts with this (as `cache list` shows it)")
    which.add_argument("--all", action="store_true", help="every cache file in DIR")
    remove.set_defaults(func=_cache_remove)

    demo = sub.add_parser("demo", help="one producer, three training jobs, and the same jobs loading alone")
    demo.add_argument("--images-per-class", type=int, default=96,
                      help="synthetic images in each of the three classes (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=3, help="epochs each job reads (default: %(default)s)")
    demo.set_defaults(func=_demo)


def _set_up_logging(args: argparse.Namespace) -> None:
    """Plain lines; JSON lines with ``serve --log-format json``; for ``serve`` on a terminal, a rich console.

    Serve's live status line stays under the rich console's log (`args.console`, else None).
    """
    level = logging.DEBUG if args.verbose else logging.INFO
    args.console = None
    if getattr(args, "log_format", "text") == "json":
        from .producer.reporting import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    elif args.command == "serve" and sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        args.console = Console(stderr=True)
        logging.basicConfig(level=level, format="%(message)s", datefmt="%H:%M:%S",
                            handlers=[RichHandler(console=args.console, show_path=False)])
    else:
        logging.basicConfig(level=level, format="%(asctime)s dalishare %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Run the ``dalishare`` command line (the ``dalishare`` script and ``python -m dalishare``).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit code: 0, or 2 after an error dalishare names (one line on stderr, or one JSON
            log record with ``serve --log-format json``).
    """
    args = build_parser().parse_args(argv)
    _set_up_logging(args)
    try:
        args.func(args)
    except DalishareError as exc:
        if getattr(args, "log_format", "text") == "json":  # a collector's parser sees the error too
            logging.getLogger("dalishare").error("%s", exc)
        else:
            print(f"dalishare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
