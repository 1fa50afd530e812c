"""The producer's serving modes (producer/serving.py, ring_serving.py, cache_serving.py, output.py) as
plain objects, driven the way the serve loop drives them, with fakes for the stage supervisor, the
ring's memory and the jobs' channel: what is announced, who sets the pace, when an epoch ends, group
starts, fill order, exclusions, careful re-makes, what a resume announces. No DALI, no sockets, no
subprocesses (a DIR cache is a small file in a temporary folder)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dalishare.producer import output as output_module
from dalishare.producer import ring_serving
from dalishare.producer.cache_policy import CacheChoice, CacheMode
from dalishare.producer.cache_serving import CacheServing
from dalishare.producer.dataset import Dataset
from dalishare.producer.jobs import JobRegistry, JobState
from dalishare.producer.options import ServeOptions
from dalishare.producer.ring_serving import RingServing
from dalishare.producer.serving import Context, Measuring, Serving
from dalishare.producer.supervisor import STAGE_TASKS_IN_FLIGHT, Done, InFlight, Lost
from dalishare.shm.cache import CacheLayout, Mark
from dalishare.shm.layout import RingKind
from dalishare.wire.messages import Batch, Hello, JobStatus, StatusReport, Suspended
from dalishare.wire.order import epoch_order, share
from dalishare.wire.stage import Task

SHAPE, DTYPE = [2, 2, 3], np.dtype("uint8")


class FakeStage:
    """The stage supervisor as the modes see it: tasks go in, the test says when they come back."""

    def __init__(self, stateful: list[str] | None = None):
        self.tasks: list[InFlight] = []  # in flight, oldest first
        self.stopped = ""
        self.mapped: dict = {}
        self.stateful = stateful or []

    def room(self) -> int:
        return 0 if self.stopped else STAGE_TASKS_IN_FLIGHT - len(self.tasks)

    def in_flight(self) -> int:
        return len(self.tasks)

    def plans(self) -> list:
        return [t.plan for t in self.tasks]

    def submit_batch(self, seq, slot, plan, careful=False):
        self.tasks.append(InFlight(Task(seq, slot, [], []), plan.indices.tolist(), plan, careful))

    def submit_rows(self, seq, rows, careful=False):
        self.tasks.append(InFlight(Task(seq, -1, [], list(rows)), list(rows), rows, careful))

    def map_ring(self, ring):
        self.mapped = ring

    def map_cache(self, cache):
        self.mapped = cache

    def stop(self, reason):
        self.stopped = reason

    def finish_oldest(self) -> Done:
        return Done(self.tasks.pop(0), SHAPE, DTYPE.name)

    def lose_all(self, culprits: dict[int, str]) -> Lost:
        tasks, self.tasks = self.tasks, []
        return Lost(tasks, culprits, "worker died")


class FakeRing:
    """A host ring's bookkeeping without its memory."""

    def __init__(self, kind=RingKind.HOST):
        self.layout = type("Layout", (), {"kind": kind, "to_wire": lambda self: {"fake": True}})()
        self.marks: dict[int, int] = {}
        self.closed = False

    def mark(self, k, seq):
        self.marks[k] = seq

    def close(self):
        self.closed = True


def make_ctx(tmp_path: Path, samples: int = 10, **options) -> tuple[Context, list]:
    """A context over ``samples`` files (never opened) and a list that records what jobs are sent."""
    files = [tmp_path / f"{i}.jpg" for i in range(samples)]
    (tmp_path / "stage.py").write_text("# the stage file: only its bytes matter here (a cache's key)\n")
    dataset = Dataset(tmp_path, ["a", "b"], files, np.arange(samples, dtype=np.int64) % 2)
    sent: list = []

    def send(job, msg) -> bool:
        sent.append((job.id, msg))
        return True

    stage = FakeStage()
    ctx = Context(ServeOptions(**options), tmp_path / "stage.py", tmp_path, dataset, b"listing", b"identity",
                  JobRegistry(alive=lambda job: True), send, lambda: stage)
    return ctx, sent


def attach(serving, ctx: Context, group: str = "", rank: int = 0, world: int = 1):
    """What the loop does with a Hello once it serves: register, welcome (not recorded), `attach`."""
    hello = Hello(os.getpid(), group=group, rank=rank, world=world)
    job = ctx.jobs.add(hello.pid, b"id", hello.keep, 0.0, group, rank, world, serving.initial_state(hello))
    serving.attach(job)
    return job


def batches_to(sent: list, job) -> list[Batch]:
    return [msg for to, msg in sent if to == job.id and isinstance(msg, Batch)]


def ring_mode(tmp_path, monkeypatch, samples=10, kind=RingKind.HOST, **options):
    monkeypatch.setattr(ring_serving, "create_ring", lambda *a, **k: FakeRing(kind))
    ctx, sent = make_ctx(tmp_path, samples, **options)
    stage = ctx.start_stage()
    measuring = Measuring(ctx, stage)
    serving = RingServing(ctx, measuring.feed, stage, SHAPE, DTYPE)
    serving.begin()
    return serving, ctx, sent, stage


def run(serving, stage, passes: int = 1) -> None:
    """``passes`` of the loop's stage step: submit what the mode wants, then the worker finishes all."""
    for _ in range(passes):
        while serving.can_submit():
            serving.submit()
        while stage.tasks:
            serving.on_filled(stage.finish_oldest())


# -- measuring ------------------------------------------------------------------------------------


def test_measuring_sends_one_task_at_a_time_and_serves_the_measured_batch_again(tmp_path):
    ctx, _ = make_ctx(tmp_path, batch_size=4)
    stage = ctx.start_stage()
    stage.stateful = ["fn.random.coin_flip"]
    measuring = Measuring(ctx, stage)
    assert measuring.can_submit()
    measuring.submit()
    assert not measuring.can_submit()  # the first batch goes alone
    measuring.on_filled(stage.finish_oldest())
    assert measuring.feed.position() == (0, 0) and ctx.stateful == ["fn.random.coin_flip"]


def test_measuring_excludes_the_culprits_and_remakes_an_unexplained_loss_one_file_at_a_time(tmp_path):
    ctx, _ = make_ctx(tmp_path, batch_size=4)
    stage = ctx.start_stage()
    measuring = Measuring(ctx, stage)
    measuring.submit()
    first = stage.tasks[0].indices
    measuring.on_lost(stage.lose_all({}))
    assert measuring.alone() and measuring.feed.careful()
    measuring.submit()  # the lost batch again, from its first file, alone
    assert stage.tasks[0].indices == first[:1] and stage.tasks[0].careful and not measuring.can_submit()
    measuring.on_filled(stage.finish_oldest())
    assert measuring.feed.position() == (0, 0)  # that batch is served again, into the output
    measuring.on_lost(Lost([], {first[0]: "broken JPEG"}, "probe"))
    assert measuring.excluded() == 1


def test_the_last_file_of_a_careful_remake_still_goes_as_a_careful_task(tmp_path):
    """A careful task's file is blamed if it fails the worker: the flag must hold up to the last one."""
    ctx, _ = make_ctx(tmp_path, batch_size=1)
    stage = ctx.start_stage()
    measuring = Measuring(ctx, stage)
    measuring.submit()
    measuring.on_lost(stage.lose_all({}))
    measuring.submit()  # the only file of the lost batch: the first and last of the careful range
    assert stage.tasks[0].careful and not measuring.feed.careful()


# -- the ring ---------------------------------------------------------------------------------------


def test_every_active_job_is_announced_each_filled_batch_and_holds_it_until_it_releases_it(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, batch_size=4, slots=4)
    a, b = attach(serving, ctx), attach(serving, ctx)
    run(serving, stage)
    assert [m.start for m in batches_to(sent, a)] == [0, 4, 8] == [m.start for m in batches_to(sent, b)]
    first = batches_to(sent, a)[0]
    assert first.last is False and batches_to(sent, a)[-1].last and batches_to(sent, a)[-1].count == 2
    assert serving.job_report(a)["holds"] == 3
    serving.on_release(a, first.seq)
    assert serving.job_report(a)["holds"] == 2 and set(serving.slots.slots[first.slot].holders) == {b.id}


def test_a_late_job_gets_the_resident_rest_of_the_epoch_and_nothing_of_a_finished_one(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, batch_size=4, slots=8, epochs=1)
    attach(serving, ctx)
    serving.submit()
    serving.on_filled(stage.finish_oldest())
    late = attach(serving, ctx)
    assert [m.start for m in batches_to(sent, late)] == [0]
    run(serving, stage)  # the rest of epoch 0
    later = attach(serving, ctx)
    assert batches_to(sent, later) == []  # epoch 0 is whole in the ring: its last batch is out


def test_the_slowest_job_sets_the_pace_on_a_full_ring(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, samples=40, batch_size=4, slots=3)
    fast, slow = attach(serving, ctx), attach(serving, ctx)
    run(serving, stage)
    assert not serving.can_submit()  # every slot held
    for msg in batches_to(sent, fast):
        serving.on_release(fast, msg.seq)
    assert not serving.can_submit()
    assert serving.job_report(slow)["paces"] and not serving.job_report(fast)["paces"]
    serving.on_release(slow, batches_to(sent, slow)[0].seq)
    assert serving.can_submit() and serving.report()["slots_in_use"] == 2


def test_a_staller_is_suspended_keeping_its_oldest_slots_and_resumes_with_the_resident_batches(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, samples=40, batch_size=4, slots=4, stall_timeout=5)
    waiter, staller = attach(serving, ctx), attach(serving, ctx)
    waiter.keep = staller.keep = 0
    run(serving, stage, passes=2)  # every slot filled
    for msg in batches_to(sent, waiter):
        serving.on_release(waiter, msg.seq)
    waiter.taken = batches_to(sent, waiter)[-1].seq  # it began every batch: it waits
    serving.reap(now=1.0)
    assert staller.state is JobState.ACTIVE  # not stalled for long enough yet
    serving.reap(now=10.0)
    suspended = [m for to, m in sent if to == staller.id and isinstance(m, Suspended)]
    assert staller.state is JobState.SUSPENDED and len(suspended[0].kept) == 2
    assert serving.can_submit()
    before = len(batches_to(sent, staller))
    serving.submit()  # the slots it gave up are written again meanwhile
    serving.on_filled(stage.finish_oldest())
    assert len(batches_to(sent, staller)) == before  # a suspended job is announced nothing
    serving.on_resume(staller, after_seq=suspended[0].kept[-1])
    resent = batches_to(sent, staller)[before:]
    assert staller.state is JobState.ACTIVE
    assert [m.seq for m in resent] == sorted(m.seq for m in resent) and resent[0].seq > suspended[0].kept[-1]
    assert resent[-1].seq == batches_to(sent, waiter)[-1].seq  # up to the newest batch, as the others got it


def test_with_epochs_the_ring_is_done_once_the_last_batch_is_out_and_a_job_finished_once_it_began_them_all(
        tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, batch_size=4, slots=8, epochs=1)
    job = attach(serving, ctx)
    run(serving, stage, passes=3)
    assert serving.done() and not serving.can_submit()
    assert not serving.finished_with(job)
    job.taken = batches_to(sent, job)[-1].seq
    assert serving.finished_with(job)  # a host ring stays mapped: having begun them all is enough
    assert serving.readers() == 0


def test_on_a_device_ring_a_job_is_finished_once_it_released_every_slot_and_a_reader_until_it_leaves(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, batch_size=4, slots=8, epochs=1,
                                          kind=RingKind.DEVICE)
    job = attach(serving, ctx)
    run(serving, stage)
    job.taken = batches_to(sent, job)[-1].seq
    assert not serving.finished_with(job) and serving.readers() == 1  # the job maps the ring
    for msg in batches_to(sent, job):
        serving.on_release(job, msg.seq)
    assert serving.finished_with(job) and serving.readers() == 1  # it maps it until it leaves or dies
    ctx.jobs.remove(job)
    assert serving.readers() == 0


def test_a_groups_ranks_start_together_at_an_epochs_first_batch(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, batch_size=4, slots=8)
    loner = attach(serving, ctx)
    serving.submit()
    serving.on_filled(stage.finish_oldest())  # epoch 0 begins without the group
    r0 = attach(serving, ctx, group="g", rank=0, world=2)
    assert r0.state is JobState.FORMING and batches_to(sent, r0) == []
    r1 = attach(serving, ctx, group="g", rank=1, world=2)
    # the resident epoch 0 is whole from its first batch on: the ranks start with it at once
    assert r0.state is r1.state is JobState.ACTIVE
    assert [m.start for m in batches_to(sent, r0)] == [0] == [m.start for m in batches_to(sent, r1)]
    assert len(batches_to(sent, loner)) == 1


def test_a_formed_group_alone_makes_the_producer_skip_to_the_next_epochs_start(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, samples=12, batch_size=4, slots=8)
    solo = attach(serving, ctx)
    serving.submit()
    serving.on_filled(stage.finish_oldest())
    ctx.jobs.remove(solo)
    serving.forget(solo)
    for k in range(8):  # the rest of the ring is overwritten meanwhile (epoch 0 no longer whole)
        serving.slots.slots[k].batch = None
    ranks = [attach(serving, ctx, group="g", rank=r, world=2) for r in range(2)]
    assert all(job.state is JobState.FORMING for job in ranks)
    serving.submit()  # nobody reads the rest of epoch 0: the feed skips to epoch 1
    serving.on_filled(stage.finish_oldest())
    got = [batches_to(sent, job) for job in ranks]
    assert [(m.epoch, m.start) for m in got[0]] == [(1, 0)] == [(m.epoch, m.start) for m in got[1]]


def test_a_lost_worker_frees_its_slots_excludes_the_culprits_and_feeds_again_from_the_oldest_lost_batch(
        tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, samples=12, batch_size=4, slots=8)
    job = attach(serving, ctx)
    serving.submit()
    serving.submit()
    culprit = stage.tasks[1].indices[0]
    serving.on_lost(stage.lose_all({culprit: "cannot decode"}))
    assert serving.report()["slots_in_use"] == 0 and serving.excluded() == 1
    run(serving, stage)
    got = batches_to(sent, job)
    served = np.concatenate([np.frombuffer(m.indices, "<i8") for m in got])
    assert sorted(served) == sorted(set(range(12)) - {culprit}) and got[-1].epoch_size == 11


def test_an_unexplained_loss_is_made_again_one_file_per_task_one_task_at_a_time(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, samples=12, batch_size=4, slots=8)
    job = attach(serving, ctx)
    serving.submit()
    serving.on_lost(stage.lose_all({}))
    sizes = []
    while serving.alone():
        assert serving.can_submit()
        serving.submit()
        assert stage.tasks[0].careful  # its file is blamed if it fails the worker
        assert not serving.alone() or not serving.can_submit()  # one in flight at a time
        sizes.append(len(stage.tasks[0].indices))
        serving.on_filled(stage.finish_oldest())
    assert sizes == [1, 1, 1, 1]
    serving.submit()
    assert len(stage.tasks[0].indices) == 4  # back to whole batches
    assert [m.count for m in batches_to(sent, job)] == [1, 1, 1, 1]


def test_the_ring_reports_its_epoch_and_its_jobs_what_they_hold(tmp_path, monkeypatch):
    serving, ctx, sent, stage = ring_mode(tmp_path, monkeypatch, batch_size=4, slots=8)
    job = attach(serving, ctx)
    serving.submit()
    serving.on_filled(stage.finish_oldest())
    report = serving.report()
    assert report["output"] == "ring" and report["epoch"] == 0 and report["epoch_position"] == 4
    assert report["sample"] == "[2, 2, 3] uint8" and report["slots"] == 8
    assert serving.job_report(job) == {"epoch": 0, "behind": 1, "holds": 1, "paces": False}
    assert serving.welcome()["epoch_size"] == 10 and serving.summary() == "1 batches announced"


def test_every_mode_reports_the_fields_of_a_status_report(tmp_path, monkeypatch):
    """What the loop spreads into StatusReport and JobStatus: a wrong key would only fail at run time."""
    report_fields = set(StatusReport.__dataclass_fields__)
    job_fields = set(JobStatus.__dataclass_fields__)
    (tmp_path / "ring").mkdir()  # its own folder: the cache below lives in tmp_path
    serving, ctx, _, stage = ring_mode(tmp_path / "ring", monkeypatch, batch_size=4)
    cache, cache_ctx, _, _ = cache_mode(tmp_path, batch_size=4)
    try:
        job = attach(serving, ctx)
        for mode in (Serving(), Measuring(ctx, stage), serving, cache):
            assert set(mode.report()) <= report_fields
            assert set(mode.job_report(job)) <= job_fields
    finally:
        cache.close()


# -- the cache --------------------------------------------------------------------------------------


def cache_mode(tmp_path, samples=10, excluded=None, **options):
    ctx, sent = make_ctx(tmp_path, samples, **options)
    layout = CacheLayout("key", samples, SHAPE, DTYPE.name)
    serving = CacheServing(ctx, CacheChoice(CacheMode.DISK, "test", tmp_path), layout, excluded or {}, stage=None)
    serving.begin()
    return serving, ctx, sent, ctx.start_stage()


def test_the_cache_fills_in_epoch_0s_order_as_fast_as_the_stage_goes_once_min_consumers_came(tmp_path):
    serving, ctx, sent, stage = cache_mode(tmp_path, batch_size=4, min_consumers=2, seed=3)
    try:
        assert not serving.can_submit()
        attach(serving, ctx)
        assert not serving.can_submit()
        attach(serving, ctx)
        while serving.can_submit():
            serving.submit()
        assert len(stage.tasks) == 3 and stage.mapped["layout"]["samples"] == 10
        rows = [i for t in stage.tasks for i in t.indices]
        assert rows == epoch_order(10, 3, 0).tolist()
        assert [m for _, m in sent] == []  # nothing is announced: every job reads at its own pace
    finally:
        serving.close()


def test_a_sharded_producer_fills_its_nodes_share_first(tmp_path):
    serving, ctx, _, stage = cache_mode(tmp_path, batch_size=10, shard="1/2")
    try:
        attach(serving, ctx)
        serving.submit()
        mine = share(epoch_order(10, 0, 0), 1, 2)[0]
        assert stage.tasks[0].indices[: len(mine)] == mine.tolist()
    finally:
        serving.close()


def test_filled_rows_are_marked_and_a_full_cache_ends_the_worker(tmp_path):
    serving, ctx, _, stage = cache_mode(tmp_path, batch_size=4)
    try:
        attach(serving, ctx)
        run(serving, stage)
        assert serving.store.valid_count() == 10 and stage.stopped == "the cache is full"
        assert serving.report()["cached"] == 10 and serving.summary() == "3 fill tasks done"
    finally:
        serving.close()


def test_a_lost_fill_excludes_the_culprits_and_decodes_the_other_rows_first_or_carefully(tmp_path):
    serving, ctx, _, stage = cache_mode(tmp_path, batch_size=4, excluded={9: "found while measuring"})
    try:
        attach(serving, ctx)
        assert serving.excluded() == 1 and serving.welcome()["epoch_size"] == 9
        serving.submit()
        lost_rows = stage.tasks[0].indices
        serving.on_lost(stage.lose_all({lost_rows[0]: "cannot decode"}))
        serving.submit()
        assert stage.tasks[0].indices[:3] == lost_rows[1:]  # the lost task's other rows come first
        serving.on_lost(stage.lose_all({}))  # nobody to blame: one row per task, one task at a time
        serving.submit()
        assert len(stage.tasks[0].indices) == 1 and stage.tasks[0].careful and not serving.can_submit()
        assert serving.store.marks[lost_rows[0]] == Mark.EXCLUDED
    finally:
        serving.close()


def test_with_epochs_the_cache_is_done_once_a_job_read_them_and_waits_for_every_job(tmp_path):
    serving, ctx, _, stage = cache_mode(tmp_path, batch_size=4, epochs=2)
    try:
        a, b = attach(serving, ctx), attach(serving, ctx)
        a.epochs_read = 2
        serving.on_epoch_done(a)
        assert serving.done() and serving.finished_with(a) and not serving.finished_with(b)
        assert serving.job_report(b) == {"epoch": 0, "behind": 0, "holds": 0, "paces": False}
        assert serving.readers() == 0  # a host cache stays readable in the jobs
    finally:
        serving.close()


# -- the choice -------------------------------------------------------------------------------------


def test_the_output_is_the_cache_the_options_allow_else_the_ring(tmp_path, monkeypatch):
    monkeypatch.setattr(ring_serving, "create_ring", lambda *a, **k: FakeRing())
    ctx, _ = make_ctx(tmp_path, cache="off")
    stage = ctx.start_stage()
    measuring = Measuring(ctx, stage)
    assert isinstance(output_module.open_output(ctx, measuring.feed, stage, SHAPE, DTYPE), RingServing)
    ctx.options.cache, ctx.stateful = "auto", ["fn.random.uniform"]  # a random stage is never cached
    assert isinstance(output_module.open_output(ctx, measuring.feed, stage, SHAPE, DTYPE), RingServing)
    ctx.options.cache, ctx.stateful = str(tmp_path / "cache"), []
    (tmp_path / "cache").mkdir()
    cached = output_module.open_output(ctx, measuring.feed, stage, SHAPE, DTYPE)
    try:
        assert isinstance(cached, CacheServing) and cached.source == "cache"
    finally:
        cached.close()
