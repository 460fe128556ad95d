"""Checkpoints: the atomic snapshot file, the change log beside it, and the window stage's
snapshot-then-changes checkpoints restoring exactly the state an uninterrupted stage has."""
from __future__ import annotations

import pytest

from services import checkpoint, stages
from services.settings import load_settings
from services.shell import Record
from services.stages import WindowStage
from services.cores.window import hdfs_parsed_events


def test_change_log_round_trips_and_a_torn_or_damaged_tail_ends_it(tmp_path):
    log = tmp_path / "p-0.changes"
    records = [(b'{"ops":[%d]}' % i, {"next": 10 * i}) for i in range(1, 4)]
    for state, offsets in records:
        checkpoint.append(log, state, offsets)
    assert checkpoint.load_log(log) == records
    whole = log.read_bytes()
    log.write_bytes(whole[:-3])                      # a crash in the middle of the last append
    assert checkpoint.load_log(log) == records[:2]
    damaged = bytearray(whole)
    damaged[whole.index(b"[2]") + 1] = ord("7")      # a flipped byte in the second record
    log.write_bytes(bytes(damaged))
    assert checkpoint.load_log(log) == records[:1]
    assert checkpoint.load_log(tmp_path / "missing") == []


@pytest.fixture(scope="module")
def events(datasets):
    return hdfs_parsed_events(datasets / "hdfs" / "HDFS_20000.log", hosts=3)[:6000]


def _stage(tmp_path) -> WindowStage:
    settings = load_settings(kafka_bootstrap="127.0.0.1:1", state_dir=tmp_path / "state",
                             idle_close_s=1e9)
    return WindowStage(settings)


def _feed(stage: WindowStage, events, start: int, stop: int) -> list[list[bytes]]:
    """The windows each event at offsets [start, stop) produced."""
    out = []
    for offset in range(start, stop):
        event = events[offset]
        record = Record("events", 0, offset, event.key.encode(), event.model_dump_json(by_alias=True).encode(), 0)
        out.append([o.value for o in stage.handle(record)])
    return out


def _close(stage: WindowStage, tp) -> list[bytes]:
    return [w.model_dump_json(by_alias=True).encode() for w in stage.cores[tp].close_all()]


def test_window_stage_restores_from_a_snapshot_and_its_change_log(tmp_path, events, monkeypatch):
    monkeypatch.setattr(stages, "WINDOW_SNAPSHOT_S", 1e9)    # after the first, only change sets
    tp = ("events", 0)
    reference = _stage(tmp_path / "ref")
    reference.on_assign([tp])
    expected = _feed(reference, events, 0, len(events))
    expected_closed = _close(reference, tp)

    stage = _stage(tmp_path)
    assert stage.on_assign([tp]) == {}
    cut = [0, 3000, 3400, 3800, 4200, 4500]
    for start, stop in zip(cut, cut[1:]):
        assert _feed(stage, events, start, stop) == expected[start:stop]
        stage.checkpoint({tp: stop})
    # one snapshot, then one change set per checkpoint after it, each smaller than the state
    log = checkpoint.load_log(stage._log_path(tp))
    assert len(log) == len(cut) - 2
    assert all(len(delta) < len(checkpoint.load(stage._path(tp))[0]) for delta, _ in log)
    _feed(stage, events, 4500, 5000)                 # processed, never checkpointed: replayed below

    restarted = _stage(tmp_path)                      # a crash, and a new owner of the partition
    assert restarted.on_assign([tp]) == {tp: 4500}
    assert _feed(restarted, events, 4500, len(events)) == expected[4500:]
    assert _close(restarted, tp) == expected_closed


def test_a_final_checkpoint_is_a_full_snapshot_and_clears_the_log(tmp_path, events, monkeypatch):
    monkeypatch.setattr(stages, "WINDOW_SNAPSHOT_S", 1e9)
    tp = ("events", 0)
    stage = _stage(tmp_path)
    stage.on_assign([tp])
    _feed(stage, events, 0, 1000)
    stage.checkpoint({tp: 1000})
    _feed(stage, events, 1000, 2000)
    stage.checkpoint({tp: 2000})
    assert stage._log_path(tp).exists()
    stage.checkpoint({tp: 2000}, final=True)          # nothing new: nothing written
    assert stage._log_path(tp).exists()
    _feed(stage, events, 2000, 2100)
    stage.checkpoint({tp: 2100}, final=True)
    assert not stage._log_path(tp).exists()
    assert checkpoint.load(stage._path(tp))[1] == {"next": 2100}
