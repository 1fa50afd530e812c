"""job/resume.py: the position a state saves, with batches taken ahead, and what a state is refused for."""

import pytest

from dalishare.errors import ConfigError
from dalishare.job.resume import Progress, check_state, job_order, make_state, same_data

JOB = job_order(seed=None, world=1, drop_last=False)
FINGERPRINT = {"dataset": "ab12", "samples": 30, "stage": "cd34", "output": "[224, 224, 3] uint8", "seed": 0,
               "shards": 1, "source": "cache"}


def test_a_state_is_the_position_after_the_last_batch_handed_out():
    progress = Progress(taken_ahead=0)
    assert progress.saved() == (0, 0)
    progress.begin(0, 0)
    progress.handed_out(0, 4)
    progress.handed_out(0, 8)
    assert progress.saved() == (0, 8)
    progress.epoch_read(0)
    assert progress.saved() == (1, 0)


def test_batches_taken_ahead_are_left_unread_in_the_state():
    progress = Progress(taken_ahead=1)  # a one-ahead fetcher: the batch after the step it runs is already taken
    progress.begin(2, 0)
    progress.handed_out(2, 4)
    assert progress.saved() == (2, 0)  # the step of batch 0 runs while batch 1 is taken
    progress.handed_out(2, 8)
    assert progress.saved() == (2, 4)
    progress.epoch_read(2)  # the fetcher learns the end after taking the last batch
    assert progress.saved() == (2, 8)
    progress.begin(3, 0)  # a new pass forgets the last one's batches
    assert progress.saved() == (3, 0)
    with pytest.raises(ValueError):
        Progress(taken_ahead=-1)


def test_a_state_round_trips_and_is_refused_for_other_data_or_seed():
    progress = Progress(0)
    progress.begin(1, 12)
    state = make_state(progress, "cache", FINGERPRINT, JOB, passes=1)
    assert check_state(state, "cache", FINGERPRINT, JOB) == (1, 12)
    for key, value in (("dataset", "ffff"), ("stage", "eeee"), ("seed", 3), ("shards", 2), ("samples", 31)):
        with pytest.raises(ConfigError, match=f"another {key}"):
            check_state(state, "cache", {**FINGERPRINT, key: value}, JOB)
    # the job's own order and share: a position in a rank's share means nothing to a lone job
    for other, what in ((job_order(7, 1, False), "seed 7"), (job_order(None, 2, False), "group size 2"),
                        (job_order(None, 1, True), "drop_last True")):
        with pytest.raises(ConfigError, match=f"this one has {what.split()[-1]}"):
            check_state(state, "cache", FINGERPRINT, other)
    for bad in ({**state, "version": 99}, [1, 2], {k: v for k, v in state.items() if k != "fingerprint"},
                {**state, "position": "12"}):
        with pytest.raises(ConfigError, match="not a dalishare iterator state"):
            check_state(bad, "cache", FINGERPRINT, JOB)


def test_a_state_from_the_other_source_keeps_only_its_epoch():
    progress = Progress(0)
    progress.begin(4, 20)
    state = make_state(progress, "ring", FINGERPRINT, JOB, passes=0)
    assert check_state(state, "cache", FINGERPRINT, JOB) == (4, 0)
    assert same_data(FINGERPRINT, dict(FINGERPRINT)) and not same_data(FINGERPRINT, {**FINGERPRINT, "source": "ring"})
