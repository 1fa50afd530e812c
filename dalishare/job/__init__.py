"""A training job's side: `DaliShareIterator` and what it is made of. Never imports DALI."""

from .iterator import DaliShareIterator

__all__ = ["DaliShareIterator"]
