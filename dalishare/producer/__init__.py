"""The producer side: dataset, feed, slots, jobs and the serve loop (which never runs DALI), and the
stage processes that do (worker.py, stage.py). Never imports torch."""

from .options import ServeOptions
from .server import Producer

__all__ = ["Producer", "ServeOptions"]
