"""Control messages between a producer and its jobs, and their wire form.

Each message is a frozen dataclass. On the wire it is one msgpack map: ``{"t": TAG, field: value, ...}``.
Decoding checks the tag, the exact set of fields and each field's type, so a stranger's bytes become
a `ProtocolError` (which the receiver counts and drops), never code: no pickle anywhere.

Job -> producer: Hello, Release, Heartbeat, Resume, EpochDone, Bye.
Producer -> job: Starting, Welcome, Reject, Batch, Suspended, Heartbeat (a probe), GroupLost, Stop.
Anyone -> producer: StatusQuery; producer -> asker: StatusReport (or Reject).

NOTE [ Control protocol ]
=========================
Cited from the loops that implement it: the producer's (producer/server.py, and its modes in
producer/ring_serving.py and cache_serving.py) and the job's (job/session.py, its readers in
job/ring_reader.py and cache_reader.py, job/heartbeat.py). Every receive has a timeout and a liveness check behind it.

- Attach. Job: ``Hello(pid, keep, version)``, then waits up to ``attach_timeout`` for an answer.
  Producer: a hello of another protocol version gets ``Reject`` (the job raises `ProtocolError`).
  Before its ring exists (start-up: scanning the dataset, decoding the first batch, which sizes the
  ring) it answers ``Starting(pid, reason)`` and repeats it every STARTING_REPEAT_S; the job logs it
  once and keeps waiting while that pid lives and the repeats come (each one re-arms its wait:
  ``attach_timeout``, at least STARTING_SILENCE_S). A ``Stop`` instead: `ProducerLost` with the reason. Once the ring exists it registers the job under a random id and answers
  ``Welcome`` (id, ring layout, sample shape and dtype, epoch size, batch size, classes), then
  announces the resident batches of the current epoch (a late job gets the rest of it). With a
  cache, ``Welcome`` carries the cache instead of a ring and nothing is announced: the job reads at
  its own pace (NOTE [ Cache protocol ], producer/filling.py). No answer
  in time: `ProducerNotFound`; the starting producer gone: `ProducerLost`.
- Announcements. Producer: ``Batch`` to every active job for each slot it fills, in seq order;
  from then on the job holds the slot (NOTE [ Slot ownership ], shm/__init__.py).
- Releases. Job: ``Release(seq)`` when the keep rule lets a slot go (after its GPU reads, on a
  device ring). Producer: drops the hold; a release counts as progress for the stall policy.
- Heartbeats. Job: its heartbeat thread sends ``Heartbeat(taken)`` every ``heartbeat_interval``, and
  the training thread sends one when it starts to wait for a batch; ``taken`` is the newest seq it
  has begun to read. Producer: any message proves life; a job silent for ``--heartbeat-timeout`` is
  probed with a ``Heartbeat`` of its own (taken -1), and detached if the send fails (socket gone).
  Its process being gone (its lifeline released, checked every REAP_INTERVAL_S: NOTE [ Lifelines ]
  in shm/names.py) detaches it at once.
- Suspension and resume. Producer: a job that released nothing for ``--stall-timeout`` while
  another waits gets ``Suspended(reason, kept)``: only the seqs in ``kept`` stay held and its other
  announcements are void. Job: drops the voided announcements and answers ``Resume(after_seq)``;
  the producer announces the resident batches newer than ``after_seq`` and the job goes on.
- Stop. Producer: ``Stop`` to every job as it ends, with its kind (`StopKind`): FINISHED (``--epochs``
  served: the pass ends), STOPPED (a signal: the pass ends, or with ``reconnect=True`` the job waits
  for the next producer), FAILED (an exception: `ProducerLost` with its error, or reconnect).
  A producer that dies sends nothing: jobs notice its name lock released within their poll interval.
- Bye. Job: ``Bye(reason, failed)`` when it closes (``failed``: it leaves because of an error).
  Producer: frees its holds. A job that dies sends nothing: the producer notices its lifeline released.
- Groups. Job: a rank of a consumer group (a DDP job) says ``Hello(group, rank, world)``. Producer:
  refuses a rank already attached or a world size that differs from the group's (``Reject``). On
  the ring it announces nothing to the group's ranks (FORMING, producer/jobs.py) until all are
  attached, then starts them together at an epoch's first batch: the resident one, else the next
  one filled. From a cache each reads its share at its own pace. Job: reads positions p of each
  epoch with p % world == rank (DistributedSampler's cut: wire/order.share). When
  a rank dies, becomes unreachable or leaves with ``Bye(failed=True)``, it sends ``GroupLost(reason)`` to
  every other rank of the group and detaches them (the group cannot go on without it). Job: raises
  `GroupBroken` with the reason at its next batch (within PRODUCER_POLL_S while it reads or waits).
- Status. Anyone (``dalishare status``): ``StatusQuery(pid, version)`` on a socket of its own, then
  waits up to STATUS_TIMEOUT_S. Producer: answers at once, in any phase, with ``StatusReport`` (its
  figures, and one `JobStatus` row per attached job) or, for another protocol version, ``Reject``.
  It registers nothing: a query is not an attach. Jobs' figures come from their heartbeats
  (``Heartbeat.read``: samples read so far) and releases.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import msgpack

from ..errors import ProtocolError

PROTOCOL_VERSION = 8  # 2: Hello.keep, Heartbeat.taken; 3: Starting; 4: the cache (Welcome.cache, EpochDone);
# 5: consumer groups and shards (Hello.group/rank/world, Welcome.shard/fingerprint, GroupLost);
# 6: status (StatusQuery, StatusReport, Hello.batch_size, Heartbeat.read); 7: Hello.lifeline;
# 8: the device ring's layout names its pid namespace (RingLayout.pid_ns)
MAX_MESSAGE_BYTES = 1 << 20  # a batch announcement of 10,000 samples is ~170 kB


@dataclass(frozen=True)
class Hello:
    pid: int
    keep: int = 2  # the job's ``keep``: it may be reading its keep+2 oldest held slots (NOTE [ Slot ownership ])
    version: int = PROTOCOL_VERSION
    group: str = ""  # a consumer group's name ("" for an independent job): this job is rank ``rank`` of ``world``
    rank: int = 0
    world: int = 1
    batch_size: int = 0  # the job's own batch size (0: the producer's), for status
    lifeline: str = ""  # the token of the file the job holds locked while it lives (NOTE [ Lifelines ], shm/names.py)


@dataclass(frozen=True)
class Welcome:
    job_id: int
    producer_pid: int
    ring: dict              # ring.RingLayout.to_wire(), or {} when serving from a cache
    cache: dict             # filling.ServedCache.wire(), or {} when serving from a ring
    sample_shape: list      # e.g. [224, 224, 3]
    dtype: str              # numpy dtype name of the pixels, e.g. "uint8"
    epoch_size: int         # samples per epoch
    batch_size: int         # the producer's batch size
    classes: list
    seed: int               # the producer's --seed: a cache job computes the shared order from it
    epochs: int             # the producer's --epochs, 0 for none
    shard: list             # [I, N]: the producer serves node I's share of N ([0, 1]: everything)
    fingerprint: dict       # what ranks of one group compare (dataset, stage, seed, shards): filling.fingerprint


@dataclass(frozen=True)
class Starting:
    """The producer is alive but cannot welcome the job yet (its ring is sized by the first batch):
    ``reason`` says what it is doing. Repeated every STARTING_REPEAT_S until the ``Welcome``."""

    producer_pid: int
    reason: str


@dataclass(frozen=True)
class Reject:
    reason: str

    @classmethod
    def other_version(cls, version: int, fix: str) -> "Reject":
        """To a hello or query of another protocol version; ``fix`` says what to install."""
        return cls(f"protocol version {version} is not the producer's {PROTOCOL_VERSION}: {fix}")


@dataclass(frozen=True)
class Batch:
    """Slot ``slot`` holds samples ``start .. start+count-1`` of epoch ``epoch``'s order."""

    seq: int
    slot: int
    epoch: int
    start: int
    count: int
    last: bool              # the epoch's last batch
    epoch_size: int         # decodable samples in this epoch, as known when the batch was made
    excluded: int           # files excluded so far because DALI cannot decode them
    labels: bytes           # int64 little-endian, one per sample
    indices: bytes          # int64 little-endian stable sample indices
    sent_ns: int            # time.monotonic_ns() at send, for hand-off latency
    padded: bytes = b""     # uint8 per sample, 1 for a repeat that evens out a shard (b"": none)


@dataclass(frozen=True)
class Release:
    job_id: int
    seq: int


@dataclass(frozen=True)
class Heartbeat:
    """Liveness, from the job's heartbeat thread (and once from a job that starts waiting for a
    batch); ``taken`` is the seq of the newest batch the job has begun to read (-1: none), so the
    producer can tell a job that waits from one that still has unread batches. The producer's
    probes carry -1."""

    job_id: int
    taken: int = -1
    read: int = 0  # samples the job has read since it attached (all passes), for its rate in status


@dataclass(frozen=True)
class EpochDone:
    """A job reading from a cache finished a pass; it has read ``epochs`` epochs (for ``--epochs``)."""

    job_id: int
    epochs: int


@dataclass(frozen=True)
class GroupLost:
    """A rank of this job's consumer group is gone (``reason``): the group cannot go on; the producer
    has detached the job."""

    reason: str


@dataclass(frozen=True)
class Bye:
    job_id: int
    reason: str
    failed: bool = False  # the job leaves because of an error: a group it is a rank of cannot go on


@dataclass(frozen=True)
class Stop:
    """The producer ends; ``kind`` is a `StopKind` value. Build it with a named constructor."""

    reason: str
    kind: str = "stopped"

    @classmethod
    def finished(cls, reason: str) -> "Stop":
        return cls(reason, StopKind.FINISHED.value)

    @classmethod
    def stopped(cls, reason: str) -> "Stop":
        return cls(reason, StopKind.STOPPED.value)

    @classmethod
    def failed(cls, error: "BaseException | str") -> "Stop":
        reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        return cls(reason, StopKind.FAILED.value)


class StopKind(str, enum.Enum):
    """Why a producer stopped (NOTE [ Control protocol ])."""

    FINISHED = "finished"  # its --epochs are served
    STOPPED = "stopped"    # SIGINT/SIGTERM
    FAILED = "failed"      # an exception; the reason says which


@dataclass(frozen=True)
class Suspended:
    """The job held the others back for longer than the stall timeout: it gets no announcements
    until it resumes, its other announcements are void, and only the slots in ``kept`` (which it
    may be reading) stay held for it."""

    reason: str
    kept: list


@dataclass(frozen=True)
class Resume:
    """A suspended job is back; it has seen every batch up to ``after_seq``."""

    job_id: int
    after_seq: int


@dataclass(frozen=True)
class StatusQuery:
    """Asks a producer for a `StatusReport` (``dalishare status``); ``pid`` is the asker's."""

    pid: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class JobStatus:
    """One attached job, a row of `StatusReport.jobs` (checked field by field like a message)."""

    id: int
    pid: int
    group: str          # "" for an independent job
    rank: int
    world: int
    state: str          # producer/jobs.JobState's name: forming, active or suspended
    batch_size: int     # the job's own (the producer's if it did not choose)
    epoch: int          # the epoch it reads (the ring: the producer's; a cache: its own pass)
    read: int           # samples read since it attached
    images_per_s: float  # over the last STATUS_RATE_WINDOW_S
    behind: int         # the ring: batches announced to it and not begun; a cache: 0 (nobody waits)
    holds: int          # ring slots it holds
    paces: bool         # the ring is full and the producer waits for this job's releases
    attached_s: float   # seconds since it attached


@dataclass(frozen=True)
class StatusReport:
    """A producer's figures at the time of asking (``dalishare status``, and what --metrics-port
    exposes). Sizes in samples unless named otherwise; -1 where a figure does not apply yet."""

    version: int
    name: str
    pid: int
    phase: str           # Phase: scanning, measuring or serving
    uptime_s: float
    stage: str           # the stage file
    device: str          # "cpu" or "gpu:N": where the stage decodes
    data: str
    samples: int         # files in the dataset
    classes: int
    batch_size: int
    sample: str          # e.g. "[224, 224, 3] uint8"; "" before the first batch
    output: str          # "ring", "cache memory", "cache gpu", "cache disk"; "" before the first batch
    epoch: int           # the ring: the epoch being fed; a cache: -1 (each job reads its own)
    epoch_position: int  # the ring: samples of it fed so far
    epoch_size: int
    epochs: int          # --epochs, 0 for none
    cached: int          # a cache: samples in it (-1: no cache)
    excluded: int        # files excluded as undecodable
    slots: int           # ring slots (0: no ring)
    slots_in_use: int    # held by a job or being filled
    decoded: int         # samples decoded by the stage since start
    decode_per_s: float  # over the last STATUS_RATE_WINDOW_S
    worker_restarts: int
    dropped_messages: int
    jobs: list           # JobStatus rows, as maps


MESSAGES = {cls.__name__.lower(): cls
            for cls in (Hello, Starting, Welcome, Reject, Batch, Release, Heartbeat, EpochDone, GroupLost, Bye, Stop,
                         Suspended, Resume, StatusQuery, StatusReport)}
_TYPES = {"int": int, "str": str, "bytes": bytes, "dict": dict, "list": list, "bool": bool, "float": float}


def encode(msg) -> bytes:
    body = dataclasses.asdict(msg)
    body["t"] = type(msg).__name__.lower()
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes):
    """Parse one control message; anything malformed raises `ProtocolError`."""
    body, cls = parse(data, MESSAGES)
    if cls is Hello and body.get("version") != PROTOCOL_VERSION and isinstance(body.get("pid"), int) \
            and isinstance(body.get("version"), int):
        return Hello(pid=body["pid"], version=body["version"])  # another version's hello: to be refused by name
    check_fields(cls, body)
    if cls is Stop and body["kind"] not in {kind.value for kind in StopKind}:
        raise ProtocolError(f"Stop.kind {body['kind']!r} is none of {[kind.value for kind in StopKind]}")
    if cls is StatusReport:
        for row in body["jobs"]:
            if not isinstance(row, dict):
                raise ProtocolError(f"StatusReport.jobs holds a {type(row).__name__}, not a map")
            check_fields(JobStatus, row)
    return cls(**body)


def parse(data: bytes, messages: dict) -> tuple[dict, type]:
    """The body of one msgpack message and its class, looked up by tag in ``messages``."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable message: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    cls = messages.get(body.pop("t", None))
    if cls is None:
        raise ProtocolError("message has an unknown or missing type tag")
    return body, cls


def check_fields(cls: type, body: dict) -> None:
    """Raise `ProtocolError` unless ``body`` has exactly the fields of ``cls``, each of its type."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if set(body) != set(fields):
        raise ProtocolError(f"{cls.__name__} has fields {sorted(body)}, expected {sorted(fields)}")
    for key, type_name in fields.items():
        value = body[key]
        if not isinstance(value, _TYPES[type_name]) or (type_name == "int" and isinstance(value, bool)):
            raise ProtocolError(f"{cls.__name__}.{key} should be {type_name}, got {type(value).__name__}")
