"""The control messages on their own: round trips, strict decoding, named constructors."""

from __future__ import annotations

import msgpack
import pytest

from dalishare.errors import ProtocolError
from dalishare.wire import messages as protocol
from dalishare.wire.messages import Stop, StopKind


def test_messages_round_trip_and_malformed_ones_raise_protocol_error():
    msg = protocol.Batch(seq=3, slot=1, epoch=0, start=8, count=8, last=False, epoch_size=30, excluded=0, labels=b"\0" * 64,
                         indices=b"\1" * 64, sent_ns=5)
    assert protocol.decode(protocol.encode(msg)) == msg
    for data in (b"\xff\x00garbage", protocol.encode(protocol.Stop("x"))[:-2],
                 b"\x81\xa1t\xa6pickle", msgpack.packb({"t": "release", "job_id": "1", "seq": 2}),
                 msgpack.packb({"t": "hello", "pid": 1}), b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1)):
        with pytest.raises(ProtocolError):
            protocol.decode(data)


def test_hello_carries_keep_and_another_versions_hello_is_still_understood_well_enough_to_refuse():
    hello = protocol.decode(protocol.encode(protocol.Hello(pid=5, keep=3)))
    assert hello.keep == 3 and hello.version == protocol.PROTOCOL_VERSION
    import msgpack

    old = protocol.decode(msgpack.packb({"t": "hello", "pid": 5, "version": 1}))  # protocol 1 had no keep
    assert old.version == 1 and old.pid == 5
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(msgpack.packb({"t": "hello", "pid": 5, "version": protocol.PROTOCOL_VERSION}))
    beat = protocol.decode(protocol.encode(protocol.Heartbeat(job_id=1, taken=9)))
    assert beat.taken == 9


def test_stop_is_built_by_kind_and_an_unknown_kind_is_refused():
    assert Stop.finished("done") == Stop("done", "finished")
    assert Stop.stopped("SIGTERM").kind == StopKind.STOPPED
    failed = Stop.failed(RuntimeError("the stage broke"))
    assert failed.kind == StopKind.FAILED and failed.reason == "RuntimeError: the stage broke"
    assert protocol.decode(protocol.encode(failed)) == failed
    with pytest.raises(ProtocolError, match="Stop.kind 'paused'"):
        protocol.decode(msgpack.packb({"t": "stop", "reason": "x", "kind": "paused"}))


def _report(**changes) -> "protocol.StatusReport":
    row = dict(id=7, pid=123, group="", rank=0, world=1, state="active", batch_size=64, epoch=2, read=640,
               images_per_s=120.5, behind=1, holds=2, paces=True, attached_s=3.0)
    fields = dict(version=protocol.PROTOCOL_VERSION, name="imnet", pid=99, phase="serving", uptime_s=1.5,
                  stage="pipelines/resnet.py", device="cpu", data="/d", samples=100, classes=2, batch_size=64,
                  sample="[224, 224, 3] uint8", output="ring", epoch=2, epoch_position=64, epoch_size=100,
                  epochs=0, cached=-1, excluded=0, slots=8, slots_in_use=3, decoded=264, decode_per_s=80.0,
                  worker_restarts=0, dropped_messages=0, jobs=[row])
    fields.update(changes)
    return protocol.StatusReport(**fields)


def test_a_status_report_round_trips_and_its_job_rows_are_checked_field_by_field():
    report = _report()
    assert protocol.decode(protocol.encode(report)) == report
    assert protocol.decode(protocol.encode(protocol.StatusQuery(pid=5))) == protocol.StatusQuery(5)
    row = dict(report.jobs[0])
    for bad_rows, why in (([{**row, "paces": "yes"}], "JobStatus.paces should be bool"),
                          ([{k: v for k, v in row.items() if k != "pid"}], "JobStatus has fields"),
                          ([[1, 2]], "not a map")):
        with pytest.raises(ProtocolError, match=why):
            protocol.decode(protocol.encode(_report(jobs=bad_rows)))
    with pytest.raises(ProtocolError, match="decode_per_s should be float"):
        protocol.decode(protocol.encode(_report(decode_per_s=80)))
