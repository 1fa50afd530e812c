"""The control channels: the only module that imports zmq.

A producer binds one ROUTER (`ProducerChannel`); each job connects DEALERs (`JobChannel`: the
training thread's, and its heartbeat thread's own). Sending never blocks and never raises: it
returns whether the message went out, and a peer that cannot be reached is the caller's decision.
Receiving decodes strictly (messages.py) and drops and counts what is malformed. The message
sequence is NOTE [ Control protocol ] in messages.py.
"""

from __future__ import annotations

import logging
import threading

import zmq

from ..errors import ProtocolError
from ..intervals import CONTEXT_TERM_GRACE_S
from .messages import MAX_MESSAGE_BYTES, decode, encode

log = logging.getLogger(__name__)

SEND_HWM = 100_000  # producer: messages queued per job before a job that stopped reading counts as unreachable


class ProducerChannel:
    """The producer's ROUTER socket at ``endpoint``; peers are known by their ZeroMQ identity."""

    def __init__(self, endpoint: str):
        self._ctx = zmq.Context()
        try:
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer is an error, not a silent drop
            self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # bigger: the sender is cut off
            self._sock.bind(endpoint)
        except BaseException:
            self.close(linger_ms=0)
            raise
        self.dropped = 0  # messages received and dropped (malformed, wrong frames); the caller adds its own
        self.last_drop = ""

    def send(self, identity: bytes, msg) -> bool:
        """Queue ``msg`` for the peer; False if its socket is gone (EHOSTUNREACH) or full (EAGAIN)."""
        try:
            self._sock.send_multipart([identity, encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def receive(self, timeout_ms: int, wake=()):
        """Yield ``(identity, message)`` for everything that arrives within ``timeout_ms`` (then what
        is already queued), dropping and counting what does not decode. The wait also ends as soon
        as one of ``wake`` (objects with ``fileno()``: the stage processes' links) is readable."""
        if wake:
            poller = zmq.Poller()
            for source in (self._sock, *wake):
                poller.register(source, zmq.POLLIN)
            if self._sock not in dict(poller.poll(timeout_ms)):
                return
        elif not self._sock.poll(timeout_ms):
            return
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.drop(f"{len(frames)} frames")
                continue
            try:
                msg = decode(frames[1])
            except ProtocolError as exc:
                self.drop(str(exc))
                continue
            yield frames[0], msg

    def drop(self, why: str) -> None:
        self.dropped += 1
        self.last_drop = why
        log.debug("dropped a control message: %s", why)

    def close(self, linger_ms: int = 500) -> None:
        """Close the socket (queued messages get ``linger_ms`` to go out), then the context, waiting
        for that at most CONTEXT_TERM_GRACE_S longer: libzmq's term has rare known hangs
        (zeromq/libzmq#2586), and a stopping producer must not hang with it."""
        if getattr(self, "_sock", None) is not None:
            self._sock.close(linger=linger_ms)
        term = threading.Thread(target=self._ctx.term, name="dalishare-zmq-term", daemon=True)
        term.start()
        term.join(linger_ms / 1000 + CONTEXT_TERM_GRACE_S)
        if term.is_alive():
            log.warning("the ZeroMQ context did not terminate within %.1f s; exiting without it",
                        linger_ms / 1000 + CONTEXT_TERM_GRACE_S)


class JobChannel:
    """A job's DEALER socket connected to its producer's ``endpoint``."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self.dropped = 0  # messages received that did not decode
        self.last_drop = ""

    def send(self, msg) -> bool:
        """Queue ``msg`` for the producer; False if it could not go out now (a gone producer is
        found by the caller's next liveness check)."""
        try:
            self._sock.send(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def wait(self, timeout_ms: float) -> bool:
        """Whether something arrived within ``timeout_ms``."""
        return bool(self._sock.poll(timeout_ms))

    def receive(self):
        """Yield every message already queued, dropping and counting what does not decode."""
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield decode(data)
            except ProtocolError as exc:
                self.dropped += 1
                self.last_drop = str(exc)

    def close(self, linger_ms: int = 100) -> None:
        if not self._sock.closed:
            self._sock.close(linger=linger_ms)
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

    def sibling(self, endpoint: str) -> "JobChannel":
        """Another channel in the same ZeroMQ context (for a thread of the same job)."""
        return JobChannel(endpoint, self._ctx)
