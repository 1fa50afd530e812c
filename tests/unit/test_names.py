"""shm/names.py: whether a name is served, told without taking its lock (`dalishare status`), and
the lifelines that tell whether a producer or a job lives."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dalishare.shm import names


def test_a_name_is_served_while_the_pid_in_its_lock_lives():
    assert not names.is_served("nobody")  # no lock file
    lock = names.lock_path("t")
    lock.write_text(str(os.getpid()))
    assert names.is_served("t")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())
    assert not names.is_served("t") and names.leftovers("t") == [str(lock)]
    lock.write_text("")  # a producer writing its pid right now
    assert names.is_served("t")
    lock.unlink()


# -- NOTE [ Lifelines ]: liveness by locks the kernel drops, in any pid namespace ---------------------


def test_a_lifeline_is_held_until_released_and_its_file_goes_with_it():
    life = names.Lifeline("t")
    assert life.path.name == f"t.job-{life.token}.life" and names.held(life.path)
    life.release()
    assert not names.held(life.path) and not life.path.exists()
    with pytest.raises(ValueError):
        names.lifeline_path("t", "../x")  # a token from a hello names a file in the runtime dir only


def test_a_lifeline_is_dropped_by_the_kernel_when_its_holder_is_killed_and_clean_stale_removes_it():
    holder = subprocess.Popen([sys.executable, "-c", "from dalishare.shm import names; life = names.Lifeline('t'); "
                               "print(life.path, flush=True); import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        path = Path(holder.stdout.readline().strip())
        assert names.held(path)
        mine = names.Lifeline("t")
        assert names.clean_stale("t") == []  # both held: nothing is stale
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()
    assert not names.held(path) and path.exists()  # killed: nothing released but the lock
    assert names.clean_stale("t") == [str(path)] and names.held(mine.path)
    mine.release()


def test_a_producer_is_alive_while_it_holds_its_name_lock_and_still_says_the_same():
    assert not names.held(names.lock_path("t"))
    lock = names.ServeLock("t")
    text = names.lock_text("t")
    assert text == str(os.getpid()) and names.held(names.lock_path("t"), text)
    assert not names.held(names.lock_path("t"), "12345")  # a later producer of the name is another one
    lock.release()
    assert not names.held(names.lock_path("t"), text) and names.lock_text("t") is None


def test_the_job_registry_finds_a_job_dead_by_its_lifeline_and_removes_the_file():
    from dalishare.producer.jobs import JobRegistry

    jobs, life = JobRegistry(), names.Lifeline("t")
    job = jobs.add(pid=1, identity=b"x", keep=2, now=0.0, lifeline=life.path)  # pid 1: another namespace's
    assert jobs.dead() == []
    os.close(life._fd)  # as the kernel does when the job dies: the lock goes, the file stays
    life._fd = -1
    assert jobs.dead() == [job]
    jobs.remove(job)
    assert not life.path.exists()
    from dalishare.wire.messages import Hello

    assert "no valid lifeline" in jobs.refusal("t", Hello(pid=1, lifeline="zz"))
    assert jobs.refusal("t", Hello(pid=1, lifeline="ab12")) is None
