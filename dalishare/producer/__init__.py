"""The producer side: dataset, feed, the DALI stage, and the serve loop. Never imports torch."""

from .options import ServeOptions
from .server import Producer

__all__ = ["Producer", "ServeOptions"]
