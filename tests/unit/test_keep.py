"""The keep rule (dalishare/keep.py) as a plain object: when a job may give a slot back, and when
holding a view is an error. Leases are stand-ins with the lifetime of a yielded view."""

from __future__ import annotations

import weakref

import pytest
import torch

from dalishare import BatchHeldTooLong
from dalishare.job.keep import KeepWindow
from dalishare.shm import RingLayout, attach_ring
from dalishare.shm.host import HostRing
from dalishare.job.views import leased_view


class Lease:
    """Anything weak-referenceable: the test decides how long it lives."""


def take(window: KeepWindow, seq: int, lease=None, consumed: bool = True) -> None:
    """One step of the job: a batch from producer batch ``seq`` (a view if ``lease``)."""
    if lease is not None:
        window.viewed(seq, lease)
    if consumed:
        window.consumed(seq)
    window.stepped()


def test_a_dropped_view_is_given_back_at_the_next_step_and_a_copy_at_once():
    window = KeepWindow(keep=2)
    take(window, 0, consumed=True)  # a spanning copy: no view
    assert window.releasable() == [0]
    lease = Lease()
    take(window, 1, lease)
    assert window.releasable() == []  # still referenced
    del lease
    assert window.releasable() == [1] and window.held == 0


def test_a_view_in_use_is_held_for_keep_further_batches_then_it_is_an_error():
    window, leases = KeepWindow(keep=2), [Lease() for _ in range(3)]
    take(window, 0, leases[0])
    assert window.releasable() == []  # taking batch 1: batch 0 still in use (a one-ahead prefetcher)
    take(window, 1, leases[1])
    assert window.releasable() == []  # taking batch 2: batch 0 in use across one further batch
    take(window, 2, leases[2])
    with pytest.raises(BatchHeldTooLong, match="step 0 is still referenced while this job takes batch 3: keep=2"):
        window.releasable()  # batch 0 was in use across batches 1 and 2: keep=2 ends there
    assert window.held == 3  # nothing given back: batch 0's pixels stay put
    del leases[0]
    assert window.releasable() == [0]


def test_a_slot_is_held_while_any_of_its_views_is_in_use_and_until_it_is_consumed():
    window, first, second = KeepWindow(keep=1), Lease(), Lease()
    take(window, 7, first, consumed=False)  # two job batches from one producer batch
    take(window, 7, second)
    del first
    assert window.releasable() == []  # the second view is still in use
    del second
    assert window.releasable() == [7]
    take(window, 8, Lease(), consumed=False)  # a dead view, but the batch is not consumed yet
    assert window.releasable() == []


def test_a_view_kept_alive_only_by_a_reference_cycle_is_collected_not_an_error():
    window, lease = KeepWindow(keep=1), Lease()
    cycle = {"lease": lease}
    cycle["self"] = cycle
    take(window, 0, lease)
    del lease, cycle
    take(window, 1)
    take(window, 2)
    assert window.releasable() == [0, 1, 2]


def test_keep_0_gives_back_at_the_next_step_unchecked():
    window, lease = KeepWindow(keep=0), Lease()
    take(window, 0, lease)
    take(window, 1, Lease())
    assert window.releasable() == [0, 1]  # views still referenced: unchecked by design
    with pytest.raises(ValueError):
        KeepWindow(keep=-1)


def test_leaving_gives_back_everything_and_a_lost_producer_nothing():
    window, lease = KeepWindow(keep=2), Lease()
    take(window, 0, lease)
    take(window, 1, Lease(), consumed=False)  # being read
    assert window.take_all() == [0, 1] and window.held == 0
    take(window, 2, lease)
    window.forget()
    assert window.held == 0 and window.releasable() == []


def test_a_leased_view_lives_as_long_as_anything_derived_from_it():
    ring = HostRing("lease", slots=2, slot_bytes=4 * 6)
    view = attach_ring(RingLayout.from_wire(ring.layout.to_wire()))
    try:
        images, lease = leased_view(view, 1, 6, (3, 2, 1), torch.uint8, torch.device("cpu"))
        assert images.shape == (3, 2, 1)
        alive = weakref.ref(lease)
        del lease
        derived = images.permute(2, 0, 1)[:, 1:]  # what an augmentation's NCHW view would be
        as_numpy = images.numpy()
        del images
        assert alive() is not None
        del derived
        assert alive() is not None
        del as_numpy
        assert alive() is None
        copy, lease = leased_view(view, 0, 0, (2,), torch.uint8, torch.device("cpu"))
        alive, copy = weakref.ref(lease), copy.clone()
        del lease
        assert alive() is None  # a clone does not keep the slot in use
    finally:
        view.close()
        ring.close()


def test_keep_0_never_gives_back_a_batch_in_the_step_that_yields_it():
    window, lease = KeepWindow(keep=0), Lease()
    window.viewed(0, lease)  # the iterator's order: view, consumed, give back, then stepped
    window.consumed(0)
    assert window.releasable() == []
    window.stepped()
    assert window.releasable() == [0]
