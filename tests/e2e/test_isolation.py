"""Another local user can neither attach nor read batches; a second producer of a name is refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import zmq

from helpers import RESNET, Server
from dalishare import DaliShareIterator
from dalishare.shm import names as runtime
from dalishare.wire import messages as protocol

NOBODY = 65534


def _as_other_user(rundir: str, segment: str) -> dict:
    """Fork, drop to uid/gid 65534, and try what a stranger would; report what happened."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec (the interpreter may live where the other user cannot read)
        report = {}
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            for what, attempt in (("list runtime dir", lambda: os.listdir(rundir)),
                                  ("open segment", lambda: os.close(os.open(segment, os.O_RDONLY)))):
                try:
                    attempt()
                    report[what] = "allowed"
                except PermissionError:
                    report[what] = "denied"
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(f"ipc://{rundir}/t.sock")
            sock.send(protocol.encode(protocol.Hello(pid=os.getpid())))
            report["attach"] = "answered" if sock.poll(2000) else "no answer"
            sock.close(linger=0)
            ctx.term()
        except BaseException as exc:  # report, never run the parent's test code in the child
            report["error"] = repr(exc)
        os.write(write_fd, json.dumps(report).encode())
        os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as f:
        return json.loads(f.read())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_another_user_can_neither_attach_nor_read_batches(dataset, no_leaks):
    with Server(dataset, "--batch-size", "8"):
        with DaliShareIterator("t", attach_timeout=30) as loader:  # the owner attaches fine
            next(iter(loader))
            segment = runtime.SHM_DIR / loader._ring.layout.segment
            assert segment.stat().st_mode & 0o777 == 0o600
            report = _as_other_user(str(no_leaks), str(segment))
    assert report == {"list runtime dir": "denied", "open segment": "denied", "attach": "no answer"}, report


def test_a_second_producer_of_a_name_refuses_to_start_and_names_the_first(dataset):
    with Server(dataset, "--batch-size", "8") as first:
        with DaliShareIterator("t", attach_timeout=30):  # the first is up and serving
            pass
        second = subprocess.run([sys.executable, "-m", "dalishare", "serve", str(RESNET), "--data", str(dataset),
                                 "--name", "t"], capture_output=True, text=True, timeout=60)
        assert first.proc.poll() is None, "the first producer must keep serving"
    assert second.returncode == 2
    assert f"already running (pid {first.proc.pid})" in second.stderr


def test_floods_and_garbage_on_the_control_socket_do_not_stop_honest_jobs(dataset):
    from helpers import N_SAMPLES

    with Server(dataset, "--batch-size", "4", "--slots", "2", "--epochs", "1") as server:
        with DaliShareIterator("t", batch_size=4, attach_timeout=30) as loader:
            it = iter(loader)
            got = next(it)["indices"].tolist()
            with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as rogue:
                rogue.connect(runtime.endpoint("t"))
                junk = [os.urandom(n) for n in (1, 7, 100, 5000)]
                junk += [protocol.encode(protocol.Release(job_id=loader.job_id + 1, seq=0)),
                         protocol.encode(protocol.Heartbeat(job_id=12345)), b"\x81\xa1t\xa5hello",
                         protocol.encode(protocol.Hello(pid=os.getpid(), version=99))]
                for _ in range(50):
                    for frame in junk:
                        rogue.send(frame)
                rogue.send_multipart([b"two", b"frames"])
                rogue.send(b"x" * (2 << 20))  # oversized: the producer cuts this peer off
                time.sleep(0.5)
                rogue.close(linger=0)
            got += [i for b in it for i in b["indices"].tolist()]
        assert server.wait(30) == 0
    assert sorted(got) == list(range(N_SAMPLES))
    dropped = int(re.search(r"(\d+) control messages dropped", server.log()).group(1))
    assert dropped >= 50 * len(junk) + 1, server.log()
