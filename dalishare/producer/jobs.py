"""The producer's registry of attached jobs and its liveness and stall decisions.

Plain Python: it decides who is dead, who to probe, who stalls; it sends nothing (the serve loop
acts on its decisions). The message sequence is NOTE [ Control protocol ] in wire/messages.py.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..shm import names
from ..wire.messages import JobStatus
from .rates import Rate
from .slots import SlotTable


class JobState(enum.Enum):
    """ACTIVE -> SUSPENDED when it stalls (`JobRegistry.stallers`); SUSPENDED -> ACTIVE when it sends
    ``Resume``. A rank of a consumer group on the ring starts FORMING -> ACTIVE, with all its group's
    ranks at once, at an epoch's first batch once they are all attached (`JobRegistry.activate`).
    A job leaves the registry from any state (``Bye``, death, unreachable)."""

    ACTIVE = "active"        # gets every announcement
    SUSPENDED = "suspended"  # stalled: gets no announcements until it resumes
    FORMING = "forming"      # a group's rank waiting for its other ranks or the next epoch: gets nothing, holds nothing


@dataclass
class Job:
    id: int                   # random, so messages a job sent to an earlier producer of the name match none here
    pid: int
    identity: bytes           # its control socket's ZeroMQ identity
    keep: int                 # from its Hello: it may be reading its keep+2 oldest held slots
    last_seen: float          # its last message of any kind (monotonic s)
    lifeline: Path | None = None  # the file it holds locked while it lives (NOTE [ Lifelines ], shm/names.py)
    taken: int = -1           # newest seq it has begun to read (heartbeats); held seqs above it are unread
    state: JobState = JobState.ACTIVE
    silent: bool = False      # warned about a missing heartbeat; cleared by its next message
    last_progress: float = 0.0  # its last release, attach or resume: a stall is measured from here
    next_probe: float = 0.0   # when to check a silent job's socket again
    epochs_read: int = 0      # with a cache: the passes it finished (its EpochDone), for --epochs
    group: str = ""           # its consumer group ("" for an independent job), in which it is rank ``rank``
    rank: int = 0
    world: int = 1
    batch_size: int = 0       # its own, from its Hello (0: the producer's); for status
    attached_at: float = 0.0  # monotonic s
    reads: Rate = field(default_factory=Rate)  # samples read (its heartbeats' ``read``) over time: images/s

    @property
    def suspended(self) -> bool:
        return self.state is JobState.SUSPENDED


def job_status(job: Job, now: float, mode_fields: dict) -> dict:
    """``job``'s row of a `StatusReport` (a `JobStatus` as a dict); ``mode_fields``: what the ring or the
    cache adds (`Serving.job_report`)."""
    return asdict(JobStatus(id=job.id, pid=job.pid, group=job.group, rank=job.rank, world=job.world,
                            state=job.state.value, batch_size=job.batch_size, read=job.reads.total,
                            images_per_s=float(job.reads.per_s(now)), attached_s=float(now - job.attached_at),
                            **mode_fields))


@dataclass
class JobRegistry:
    """Attached jobs by id, and what to do about them."""

    # whether a job lives: by its lifeline, whatever pid namespace it runs in (NOTE [ Lifelines ]);
    # injectable for the unit tests
    alive: Callable[[Job], bool] = lambda job: job.lifeline is not None and names.held(job.lifeline)
    _jobs: dict[int, Job] = field(default_factory=dict)

    def add(self, pid: int, identity: bytes, keep: int, now: float, group: str = "", rank: int = 0,
            world: int = 1, state: JobState = JobState.ACTIVE, batch_size: int = 0,
            lifeline: Path | None = None) -> Job:
        job_id = secrets.randbits(31)
        while job_id in self._jobs:
            job_id = secrets.randbits(31)
        job = Job(job_id, pid, identity, keep, last_seen=now, lifeline=lifeline, last_progress=now,
                  group=group, rank=rank, world=world, state=state, batch_size=batch_size, attached_at=now)
        self._jobs[job_id] = job
        return job

    def refusal(self, name: str, hello) -> str | None:
        """Why the job of ``hello`` cannot attach to producer ``name`` now (its lifeline, its group), or None."""
        try:
            names.lifeline_path(name, hello.lifeline)
        except ValueError as exc:
            return f"its hello names no valid lifeline ({exc}): install the same dalishare version in the job"
        return self.group_refusal(hello.group, hello.rank, hello.world) if hello.group else None

    def group_refusal(self, group: str, rank: int, world: int) -> str | None:
        """Why rank ``rank`` of ``world`` cannot join ``group`` now, or None."""
        if not 0 <= rank < world:
            return f"rank {rank} is not between 0 and the world size {world} - 1"
        for job in self.group(group):
            if job.world != world:
                return f"group {group!r} has world size {job.world}, not {world}: its ranks disagree"
            if job.rank == rank:
                return f"rank {rank} of group {group!r} is already attached (pid {job.pid})"
        return None

    def group(self, group: str) -> list[Job]:
        """The attached ranks of ``group`` (none for "")."""
        return [job for job in self._jobs.values() if group and job.group == group]

    def formed(self) -> list[str]:
        """Groups whose ranks are all attached and still FORMING: to start at the next epoch's first batch."""
        names = {job.group for job in self._jobs.values() if job.state is JobState.FORMING}
        return sorted(g for g in names if len(self.group(g)) == self.group(g)[0].world)

    def activate(self, group: str, now: float) -> list[Job]:
        """FORMING -> ACTIVE for every rank of ``group``; its ranks."""
        ranks = self.group(group)
        for job in ranks:
            job.state, job.last_progress = JobState.ACTIVE, now
        return ranks

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def remove(self, job: Job) -> bool:
        """Forget the job (and the lifeline file of one that died); False if it was already gone."""
        if job.lifeline is not None and not names.held(job.lifeline):
            job.lifeline.unlink(missing_ok=True)
        return self._jobs.pop(job.id, None) is not None

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def active(self) -> list[Job]:
        return [job for job in self._jobs.values() if job.state is JobState.ACTIVE]

    # -- events ---------------------------------------------------------------------------------

    def heard_from(self, job: Job, now: float) -> None:
        job.last_seen, job.silent = now, False

    def reported(self, job: Job, taken: int, read: int, now: float) -> None:
        """Its heartbeat: the newest batch it has begun, and the samples it has read in all."""
        job.taken = max(job.taken, taken)
        job.reads.update(read, now)

    def progressed(self, job: Job, now: float) -> None:
        job.last_progress = now

    def suspend(self, job: Job) -> None:
        job.state = JobState.SUSPENDED

    def resume(self, job: Job, now: float) -> bool:
        """The suspended job is back; False if it was not suspended."""
        if not job.suspended:
            return False
        job.state, job.last_progress = JobState.ACTIVE, now
        return True

    # -- decisions ------------------------------------------------------------------------------

    def dead(self) -> list[Job]:
        """Jobs whose process is gone: their lifeline is no longer held."""
        return [job for job in self._jobs.values() if not self.alive(job)]

    def to_probe(self, now: float, heartbeat_timeout: float) -> list[Job]:
        """Jobs silent for ``heartbeat_timeout``, due for a probe of their socket (once per timeout)."""
        due = [job for job in self._jobs.values()
               if now - job.last_seen > heartbeat_timeout and now >= job.next_probe]
        for job in due:
            job.next_probe = now + heartbeat_timeout
        return due

    def stallers(self, table: SlotTable, now: float, stall_timeout: float) -> list[Job]:
        """Active jobs to suspend, called while the producer cannot write (no free slot, or its last
        epoch is served): those that released nothing for ``stall_timeout`` while batches they were
        sent lie unread, if some other active job waits (has begun to read every batch it holds). A
        job that waits itself is no staller, though it holds the views it uses."""
        active = self.active()
        if all(table.unread(job.id, job.taken) for job in active):  # nobody waits
            return []
        return [job for job in active  # a group's ranks are never suspended: they would skip different samples
                if not job.group and table.unread(job.id, job.taken) and now - job.last_progress >= stall_timeout]
