"""Names and places of everything a producer creates, and removal of what dead producers left.

Every resource of a producer named NAME with process id PID:

- ``<runtime dir>/NAME.lock``  held with ``flock`` while the producer lives (one producer per name);
  it also records the producer's pid for error messages.
- ``<runtime dir>/NAME.sock``  the ZeroMQ ``ipc://`` control endpoint.
- ``/dev/shm/dalishare.NAME.PID``  the host ring (one POSIX shared-memory segment), or the header of
  a device ring.
- ``/dev/shm/dalishare.NAME.PID.dscache``  a ``--cache memory`` or ``--cache gpu`` cache file (a
  ``--cache DIR`` file lives in DIR and outlives the producer on purpose).

The runtime directory is per user and mode 0700: ``$DALISHARE_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/dalishare``, else ``/tmp/dalishare-UID``. `clean_stale` removes whatever a dead
producer left; a producer calls it at start and ``dalishare cleanup`` calls it by hand.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
from pathlib import Path

from ..errors import AlreadyServing, ConfigError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "dalishare."
# Everything a producer may leave behind, from which `clean_stale` works: per name, in the runtime
# dir, files named NAME + suffix (the lock guards the others); per producer, a segment in SHM_DIR
# named SHM_PREFIX + NAME.PID, and its cache file, that name + CACHE_SUFFIX (stale once PID is dead).
RUNTIME_FILES = {"socket": ".sock", "lock": ".lock"}
CACHE_SUFFIX = ".dscache"  # a cache file's, in /dev/shm or in a --cache folder
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid producer name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


def runtime_dir() -> Path:
    """The per-user directory for locks and sockets, created with mode 0700."""
    base = os.environ.get("DALISHARE_RUNTIME_DIR")
    if base:
        path = Path(base)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "dalishare"
    else:
        path = Path(f"/tmp/dalishare-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise ConfigError(f"runtime directory {path} belongs to another user; set DALISHARE_RUNTIME_DIR")
    os.chmod(path, 0o700)
    return path


def socket_path(name: str) -> Path:
    return runtime_dir() / f"{check_name(name)}{RUNTIME_FILES['socket']}"


def endpoint(name: str) -> str:
    return f"ipc://{socket_path(name)}"


def lock_path(name: str) -> Path:
    return runtime_dir() / f"{check_name(name)}{RUNTIME_FILES['lock']}"


def shm_name(name: str, pid: int) -> str:
    return f"{SHM_PREFIX}{check_name(name)}.{pid}"


def memory_cache_path(name: str, pid: int) -> Path:
    return SHM_DIR / f"{shm_name(name, pid)}{CACHE_SUFFIX}"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (state is [0], start time [19]); None if no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` lives (not a zombie), in this pid namespace: for the names of segments
    this user's producers made (a job and its producer use lifelines instead: NOTE [ Lifelines ])."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def pid_namespace() -> int:
    """This process's pid namespace (the inode of /proc/self/ns/pid): CUDA IPC handles open only in
    the namespace they were made in; 0 where the kernel does not say."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def try_lock(path: Path, create: bool) -> int | None:
    """flock ``path`` without blocking: its fd, or None if another process holds it (or, without
    ``create``, it does not exist).

    Whoever holds the lock may unlink the file, so after locking we check that the path still names
    the file we locked, else try again: two processes can never both hold "the" lock of a name.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # unlinked or replaced while we locked it


class ServeLock:
    """The one-producer-per-name lock; the kernel drops it when its holder dies, however it dies."""

    def __init__(self, name: str):
        self.path = lock_path(name)
        fd = try_lock(self.path, create=True)
        if fd is None:
            try:
                holder = self.path.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise AlreadyServing(f"a producer named {name!r} is already running (pid {holder}); "
                                 f"stop it first or serve under another --name")
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)  # while still locked: see _lock
            os.close(self._fd)
            self._fd = -1


# NOTE [ Lifelines ]
# =================
# Whether the other side lives is decided by what the kernel releases when a process dies, in
# whatever pid namespace it runs (a job in `docker run` without --pid=host sees other pids, or none):
# a flock on a file in the shared runtime dir. The producer's is its name lock (`ServeLock`), which
# holds its pid as written in its own namespace: a job keeps that text from its attach, so a later
# producer of the name is not taken for the one it attached to. A job holds a lock on
# NAME.job-TOKEN.life (`Lifeline`) from before its Hello (which names TOKEN) until it closes; the
# producer checks it each liveness pass and removes the file of a job found dead, and all of its
# jobs' files once it has told them to stop (`remove_lifelines`); `clean_stale` removes those no
# live job holds (a job killed while no producer ran).

LIFELINE_SUFFIX = ".life"


def lifeline_path(name: str, token: str) -> Path:
    """The file a job of producer ``name`` holds locked while it lives."""
    if not re.fullmatch(r"[0-9a-f]{1,32}", token):
        raise ValueError(f"a lifeline token is 1 to 32 hex digits, got {token!r}")
    return runtime_dir() / f"{check_name(name)}.job-{token}{LIFELINE_SUFFIX}"


class Lifeline:
    """This process's lifeline for producer ``name``: a new file, locked until `release` or death."""

    def __init__(self, name: str):
        self.token = secrets.token_hex(8)
        self.path = lifeline_path(name, self.token)
        self._fd = try_lock(self.path, create=True)
        if self._fd is None:  # a fresh random name: nobody else can hold it
            raise RuntimeError(f"cannot lock the new lifeline file {self.path}")

    def release(self) -> None:
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)  # while still locked, as ServeLock
            os.close(self._fd)
            self._fd = -1


def held(path: Path, text: str | None = None) -> bool:
    """Whether a live process holds the lock on ``path`` (and, given ``text``, the file still says
    it: the same holder as when it was read). Never takes the lock for longer than the test."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held exclusively: its holder lives
            return text is None or os.pread(fd, 64, 0).decode(errors="replace").strip() == text
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_lifelines(name: str) -> None:
    """A stopping producer's last word on its jobs' lifelines: none is checked any more, so a job
    killed after this leaves no file (one still running holds its lock on the unlinked file)."""
    for path in runtime_dir().glob(f"{check_name(name)}.job-*{LIFELINE_SUFFIX}"):
        path.unlink(missing_ok=True)


def lock_text(name: str) -> str | None:
    """What producer ``name``'s lock file says now (its pid, in its namespace), or None."""
    try:
        return lock_path(name).read_text().strip()
    except FileNotFoundError:
        return None


def producer_names() -> list[str]:
    """Names with a socket or lock in this user's runtime dir: live producers and dead ones' leftovers."""
    return sorted({p.stem for p in runtime_dir().iterdir() if p.suffix in RUNTIME_FILES.values()})


def is_served(name: str) -> bool:
    """Whether a live producer holds ``name``'s lock, by the pid it wrote there. Without taking the
    lock: a producer starting meanwhile must never find it held by us."""
    try:
        holder = lock_path(name).read_text().strip()
    except FileNotFoundError:
        return False
    return not holder.isdigit() or pid_alive(int(holder))  # empty: one is writing its pid now


def leftovers(name: str) -> list[str]:
    """The files a dead producer of ``name`` left (what `clean_stale` would remove)."""
    found = [str(p) for p in (runtime_dir() / f"{name}{suffix}" for suffix in RUNTIME_FILES.values()) if p.exists()]
    for seg in SHM_DIR.glob(f"{SHM_PREFIX}{name}.*"):
        parts = seg.name.split(".")
        if len(parts) in (3, 4) and parts[2].isdigit() and not pid_alive(int(parts[2])):
            found.append(str(seg))
    return found


def clean_stale(name: str | None = None) -> list[str]:
    """Remove segments, sockets and locks whose producer is dead; return what was removed.

    With ``name`` only that producer's leftovers are considered, else every name of this user.
    """
    removed: list[str] = []
    for seg in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        parts = seg.name.split(".")  # dalishare.NAME.PID, or with the cache suffix
        if len(parts) not in (3, 4) or (name and parts[1] != name) or not parts[2].isdigit():
            continue
        try:
            if seg.stat().st_uid == os.getuid() and not pid_alive(int(parts[2])):
                seg.unlink()
                removed.append(str(seg))
        except FileNotFoundError:
            pass
    rdir = runtime_dir()
    names = [name] if name else producer_names()
    for n in names:
        fd = try_lock(lock_path(n), create=False)
        if fd is None and lock_path(n).exists():
            continue  # a live producer holds it
        try:  # nobody serves n: remove its socket and lock, the lock while we hold it
            for path in (rdir / f"{n}{suffix}" for suffix in RUNTIME_FILES.values()):
                if path.exists():
                    path.unlink(missing_ok=True)
                    removed.append(str(path))
        finally:
            if fd is not None:
                os.close(fd)
    for path in rdir.glob(f"{name or '*'}.job-*{LIFELINE_SUFFIX}"):  # NOTE [ Lifelines ]
        fd = try_lock(path, create=False)
        if fd is not None:  # no live job holds it
            path.unlink(missing_ok=True)
            os.close(fd)
            removed.append(str(path))
    for item in removed:
        log.info("removed stale %s", item)
    return removed
