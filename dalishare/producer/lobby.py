"""The jobs that said hello before the producer can serve them (NOTE [ Control protocol ], Attach):
each is answered ``Starting`` at once and again every STARTING_REPEAT_S (each re-arms its attach
timeout), and is welcomed once the output exists."""

from __future__ import annotations

import logging
import os
from typing import Callable

from ..intervals import STARTING_REPEAT_S
from ..shm import names
from ..wire.channel import ProducerChannel
from ..wire.messages import Hello, Starting

log = logging.getLogger(__name__)


class Lobby:
    """Hellos by identity until `leave`; ``reason()`` says what the producer is doing meanwhile."""

    def __init__(self, channel: ProducerChannel, name: str, reason: Callable[[], str]):
        self._channel, self._name, self._reason = channel, name, reason
        self._hellos: dict[bytes, Hello] = {}  # emptied by leave(), once serving
        self._next_repeat = 0.0

    def __bool__(self) -> bool:
        return bool(self._hellos)

    def wait(self, identity: bytes, hello: Hello) -> None:
        if identity not in self._hellos:
            log.info("a job (pid %d) waits for the start: %s", hello.pid, self._reason())
        self._hellos[identity] = hello
        self._channel.send(identity, Starting(os.getpid(), self._reason()))

    def repeat(self, now: float) -> None:
        """Tell the waiting jobs that we still start, every STARTING_REPEAT_S; forget those whose
        process is gone."""
        if not self._hellos or now < self._next_repeat:
            return
        self._next_repeat = now + STARTING_REPEAT_S
        for identity, hello in list(self._hellos.items()):
            if not self._alive(hello) or \
                    not self._channel.send(identity, Starting(os.getpid(), self._reason())):
                del self._hellos[identity]

    def tell(self, msg) -> None:
        """Send every waiting job ``msg`` (the producer's ``Stop``)."""
        for identity in self._hellos:
            self._channel.send(identity, msg)

    def leave(self) -> list[tuple[bytes, Hello]]:
        """The serving starts: the hellos of the jobs still alive, to attach; the lobby is empty."""
        hellos, self._hellos = self._hellos, {}
        return [(identity, hello) for identity, hello in hellos.items() if self._alive(hello)]

    def _alive(self, hello: Hello) -> bool:
        """By its lifeline (NOTE [ Lifelines ], shm/names.py); a hello without one is never welcomed."""
        try:
            return names.held(names.lifeline_path(self._name, hello.lifeline))
        except ValueError:
            return False
