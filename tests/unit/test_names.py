"""shm/names.py: whether a name is served, told without taking its lock (`dalishare status`)."""

import os
import subprocess
import sys

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
