"""The detect cores and the sessions stage: verdicts in event time, and alerts from them.

DeepLog is trained on the tiny grammar of tests/test_deeplog.py (a -> b -> (c | d c) -> e+ -> f);
sessions reach the judge through the real session book (services.cores.sessions), as in the
stream, with their lines spread over two hosts.
"""
from __future__ import annotations

import math
import random
import threading
import time

import msgspec
import pytest
from prometheus_client import REGISTRY

from models import artifacts
from models.base import Sequence
from models.deeplog import DeepLog
from services import stages
from services.cores.detect import SessionJudge, closed_sequence, released_sequence
from services.cores.sessions import Closed, Released, SessionBook, SessionConfig
from services.records import Alert, ParsedEvent, Source, decode, encode, numeric_params, stable_id
from tests.kafkautil import consume, produce_values
from tests.test_attgru import TEMPLATES as ATTGRU_TEXTS
from tests.test_attgru import trained as attgru_model  # noqa: F401,F811  (a fixture)
from tests.test_deeplog import SMALL, grammar_session

TEXTS = {"a": "Receiving block <*>", "b": "Allocate block <*>", "c": "Received block <*>", "d": "Retry <*>",
         "e": "PacketResponder <*> terminating", "f": "Deleting block <*>"}
CONFIG = SessionConfig(window_size=SMALL["h"], session_gap_s=1e9, allowed_lateness_s=0.0, watermark_grace_s=0.0,
                       idle_close_s=1e9, host_idle_s=1e9)


@pytest.fixture(scope="module")
def model_v1() -> DeepLog:
    rng = random.Random(0)
    detector = DeepLog(**SMALL)
    detector.fit([Sequence(grammar_session(rng)) for _ in range(200)], templates=TEXTS)
    return detector


def events(key: str, keys: list[str], t0: float = 1000.0, texts=TEXTS, hosts=("dn1", "dn2")) -> list[ParsedEvent]:
    """A session's lines, one per second, dealt over ``hosts`` (each host's file offsets its own)."""
    out = []
    for i, k in enumerate(keys):
        host = hosts[i % len(hosts)]
        src = Source(host=host, topic=f"logs.{host}", partition=0, offset=i, file_path="/var/log/x.log",
                     file_offset=i * 80, kafka_timestamp=time.time())
        out.append(ParsedEvent(event_id=stable_id(host, key, i), key=key, keys=[key], timestamp=t0 + i, level="INFO",
                               component="dfs.DataNode", template_id=k, template=texts[k], params=[key],
                               message=f"081109 2035{i:02d} 1 INFO dfs.DataNode: {texts[k].replace('<*>', key)}",
                               source=src))
    return out


def judged(model, sessions: dict[str, list[str]], arrival=None, texts=TEXTS, name="deeplog"):
    """Alerts of the sessions' events through a book and a judge; ``arrival`` reorders the
    events (default: in event time, the hosts interleaved as they write)."""
    stream = [e for key, keys in sessions.items() for e in events(key, keys, texts=texts)]
    stream = arrival(stream) if arrival else sorted(stream, key=lambda e: e.timestamp)
    book, judge = SessionBook(CONFIG), SessionJudge({name: ("v0001", model)})
    actions = [a for i, e in enumerate(stream) for a in book.add(e, i, 0.0)] + book.close_all()
    return judge.judge(actions, now=5.0), actions


def test_anomalous_session_opens_one_alert_and_closes_it_final(model_v1):
    alerts, _ = judged(model_v1, {"blk_1": ["a", "b", "e", "f"]})
    batch = model_v1.score([Sequence(["a", "b", "e", "f"])])[0]
    early = [a for a in batch.anomalies if a.position < 4]        # events, not the session's end
    assert [a.status for a in alerts] == ["open"] + ["update"] * (len(early) >= 2) + ["final"]
    assert len({a.alert_id for a in alerts}) == 1                           # one alert per session
    first = alerts[0]
    assert first.alert_id == stable_id("deeplog", stable_id("blk_1", events("blk_1", ["a"])[0].event_id))
    assert (first.first_anomaly.position, first.observed.template_id, first.kind) == (2, "e", "key")
    assert first.first_anomaly.message.endswith("PacketResponder blk_1 terminating")
    assert first.first_anomaly.source.file_offset == 160 and first.first_anomaly.source.host == "dn1"
    assert {k.template_id for k in first.expected} >= {"c", "d"}
    assert all(k.template == TEXTS[k.template_id] for k in first.expected if k.template_id in TEXTS)
    assert [k.template_id for k in first.window] == ["a", "b"]
    assert first.sequence.keys == ["a", "b", "e"] and not first.sequence.complete
    final = alerts[-1]
    assert final.anomalous and final.severity == "critical" and final.model_version == "v0001"
    assert final.first_anomaly.position == 2 and final.first_anomaly.message == first.first_anomaly.message
    assert final.hosts == ["dn1", "dn2"] and final.sequence.keys == ["a", "b", "e", "f"]
    # the final verdict is the batch verdict of the same model on the same session
    assert final.score == pytest.approx(batch.score) and final.anomalies == len(batch.anomalies)


def test_normal_sessions_give_no_alert(model_v1):
    alerts, actions = judged(model_v1, {"blk_2": ["a", "b", "c", "e", "f"], "blk_3": ["a", "b", "d", "c", "e", "e", "f"]})
    assert alerts == []
    assert len([a for a in actions if isinstance(a, Closed)]) == 2


def test_updates_come_only_for_a_new_kind_or_a_doubled_count(model_v1):
    broken = ["a", "b", "e", "f", "a", "f", "a", "f", "a", "f", "a", "f", "a", "f", "a", "f", "a", "f"]
    alerts, actions = judged(model_v1, {"blk_4": broken})
    early = [a for a in alerts if a.status != "final"]
    verdict = model_v1.score([closed_sequence(next(a for a in actions if isinstance(a, Closed)))])[0]
    key_anomalies = [a for a in verdict.anomalies if a.kind == "key"]
    assert len(key_anomalies) >= 6
    counts = [a.anomalies for a in early]
    assert early[0].status == "open" and all(a.status == "update" for a in early[1:])
    assert counts == [n for n in counts if n == 1 or n & (n - 1) == 0]   # 1, 2, 4, 8 ...
    assert len(early) < len(key_anomalies)


def test_every_early_anomaly_is_one_the_final_verdict_holds(model_v1):
    """Released in event time, every event is judged early with its final history: the early
    alerts' anomalies are the final verdict's (same position, same kind), session by session."""
    rng = random.Random(7)
    sessions = {}
    for i in range(60):
        keys = grammar_session(rng)
        if i % 3 == 0:                                           # break a third of them
            j = rng.randrange(len(keys))
            keys = keys[:j] + [rng.choice("abcdef")] + keys[j + 1:]
        sessions[f"blk_{i}"] = keys
    shuffle = random.Random(3)

    def interleave(stream):
        """Each host in its own order, the hosts mixed at random (one far ahead of the other at
        times); each host's first line first, so the book knows both hosts from the start."""
        per_host = {}
        for e in sorted(stream, key=lambda e: e.timestamp):
            per_host.setdefault(e.source.host, []).append(e)
        queues = list(per_host.values())
        out = [q.pop(0) for q in queues]
        while queues:
            q = shuffle.choice(queues)
            out.append(q.pop(0))
            if not q:
                queues.remove(q)
        return out

    alerts, actions = judged(model_v1, sessions, arrival=interleave)
    finals = {c.session.session_id: model_v1.score([closed_sequence(c)])[0]
              for c in actions if isinstance(c, Closed)}
    early = [a for a in alerts if a.status == "open"]
    assert early, "the broken sessions must raise early alerts"
    for a in early:
        sid = next(c.session.session_id for c in actions if isinstance(c, Closed) and c.session.key == a.key)
        final = finals[sid]
        assert final.anomalous
        assert (a.first_anomaly.position, a.kind) in {(x.position, x.kind) for x in final.anomalies}
    assert "cleared" not in {a.status for a in alerts}
    finals_flagged = {a.key for a in alerts if a.status == "final"}
    assert {a.key for a in early} <= finals_flagged


def test_late_input_that_changes_the_verdict_clears_the_early_alert(model_v1):
    """dn2's 'c' arrives after dn1 has moved on (dn2 was never seen before): 'e' was judged early
    after 'b' (an illegal step), the session in event time is legal: the alert is cleared."""
    retracted = REGISTRY.get_sample_value("logwarden_early_alerts_retracted_total", {"detector": "deeplog"}) or 0

    def late_c(stream):
        return [e for e in stream if e.template_id != "c"] + [e for e in stream if e.template_id == "c"]

    keys = ["a", "b", "c", "e", "f"]
    stream = events("blk_9", keys, hosts=("dn1",))
    stream[2] = stream[2].__class__(**{**{f: getattr(stream[2], f) for f in stream[2].__struct_fields__},
                                       "source": Source(host="dn2", topic="logs.dn2", partition=0, offset=0,
                                                        file_path="/var/log/x.log", file_offset=0)})
    book, judge = SessionBook(CONFIG), SessionJudge({"deeplog": ("v0001", model_v1)})
    actions = [a for i, e in enumerate(late_c(stream)) for a in book.add(e, i, 0.0)] + book.close_all()
    alerts = judge.judge(actions, now=5.0)
    assert book.late_events == 1
    assert [a.status for a in alerts] == ["open", "cleared"]
    assert alerts[0].alert_id == alerts[1].alert_id and not alerts[1].anomalous
    assert REGISTRY.get_sample_value("logwarden_early_alerts_retracted_total", {"detector": "deeplog"}) == retracted + 1


def test_the_stream_judges_the_sequences_evaluation_judges(model_v1):
    _, actions = judged(model_v1, {"blk_5": ["a", "b", "d", "e", "f"]})   # d -> e skips c
    rs = [a for a in actions if isinstance(a, Released)]
    flagged = [r.index for r in rs if model_v1.score([released_sequence(r)])[0].anomalous]
    closed = next(a for a in actions if isinstance(a, Closed))
    assert closed_sequence(closed).keys == ["a", "b", "d", "e", "f"]
    positions = [a.position for a in model_v1.score([closed_sequence(closed)])[0].anomalies if a.kind == "key"]
    assert flagged == positions and positions


def test_a_session_cut_at_max_events_or_evicted_is_not_judged_at_its_end(model_v1):
    from dataclasses import replace

    from services.cores.detect import session_window, window_sequence

    # a b c stops before e f: where it stops is a session end no normal session has
    assert any(a.kind == "end" for a in model_v1.score([Sequence(["a", "b", "c"])])[0].anomalies)
    stream = events("blk_6", ["a", "b", "c", "e", "f"])
    book = SessionBook(replace(CONFIG, session_max_events=3))
    actions = [a for i, e in enumerate(stream) for a in book.add(e, i, 0.0)] + book.close_all()
    cut, rest = [a for a in actions if isinstance(a, Closed)]
    assert cut.reason == "max_events" and [s.template_id for s in cut.steps] == ["a", "b", "c"]
    for seq in (closed_sequence(cut), window_sequence(session_window(cut, 60.0))):   # the stream's and a subscriber's
        assert seq.keys == ["a", "b", "c"] and not seq.complete
        assert not any(a.kind == "end" for a in model_v1.score([seq])[0].anomalies)
    evicted = Closed(cut.session, cut.steps, "evicted")
    assert not closed_sequence(evicted).complete
    # evicted to bound memory: the session's later events go on in a next part too
    small = SessionBook(replace(CONFIG, max_open_sessions=1))
    two = sorted(events("blk_8", ["a", "b", "c"]) + events("blk_9", ["a", "b"], t0=1000.5), key=lambda e: e.timestamp)
    closes = [(a.session.key, a.reason, a.session.before)
              for a in [a for i, e in enumerate(two) for a in small.add(e, i, 0.0)] + small.close_all()
              if isinstance(a, Closed)]
    assert ("blk_8", "evicted", 0) in closes and any(k == "blk_8" and before > 0 for k, _, before in closes)
    # the same three events closed by the gap, idle input or the end of the input did end there
    for reason in ("gap", "idle", "shutdown"):
        ended = Closed(cut.session, cut.steps, reason)
        assert closed_sequence(ended).complete
        assert any(a.kind == "end" for a in model_v1.score([closed_sequence(ended)])[0].anomalies)
    # the part after the cut goes on with the session: neither it nor its events start a session
    assert rest.reason == "shutdown" and rest.session.before == 3 and [s.template_id for s in rest.steps] == ["e", "f"]
    assert closed_sequence(rest).complete and not closed_sequence(rest).start
    assert session_window(rest, 60.0).first_index == 3 and not window_sequence(session_window(rest, 60.0)).start
    continued = [a for a in actions if isinstance(a, Released) and a.session is rest.session]
    assert continued and not any(released_sequence(r).start for r in continued)
    assert released_sequence(next(a for a in actions if isinstance(a, Released))).start      # blk_6's own first event


def test_a_cut_session_goes_on_in_its_next_part_on_the_replica_that_restores_it(model_v1):
    from dataclasses import replace

    config = replace(CONFIG, session_max_events=3)
    stream = events("blk_7", ["a", "b", "c", "e", "f"])
    book = SessionBook(config)
    # the watermark (the older of the two hosts' newest events) releases the first three, which cut
    # the session; e and f stay buffered
    closed = [a for i, e in enumerate(stream) for a in book.add(e, i, 0.0) if isinstance(a, Closed)]
    assert [c.reason for c in closed] == ["max_events"] and book.buffered == 2
    moved = SessionBook(config)                          # another machine, from the partition's state
    resume = moved.restore(book.entries(), 5)
    assert resume == 3                                   # the buffered events are read again
    actions = [a for i, e in enumerate(stream[resume:], start=resume) for a in moved.add(e, i, 0.0)] + moved.close_all()
    (rest,) = [a for a in actions if isinstance(a, Closed)]
    assert rest.session.before == 3 and [s.template_id for s in rest.steps] == ["e", "f"]
    assert not closed_sequence(rest).start


def _float_or_nothing(p: str) -> list[float]:
    """What numeric_params keeps of one param: float() of it, when that works and is finite."""
    try:
        value = float(p)
    except ValueError:
        return []
    return [value] if math.isfinite(value) else []


@pytest.mark.parametrize("param, values", [
    ("7", [7.0]), ("-3", [-3.0]), ("+2.5", [2.5]), (" 7", [7.0]), ("7\t\n", [7.0]), ("1e5", [1e5]),
    ("1E-3", [1e-3]), (".5", [0.5]), ("5.", [5.0]), ("1_000", [1000.0]), ("0x10", []), ("-0", [-0.0]),
    ("\u0661\u0662", [12.0]), ("\u00a07", [7.0]),                    # non-ASCII digits and spaces
    ("nan", []), ("-inf", []), ("Infinity", []), ("1e999", []),      # not finite: left out
    ("", []), ("-", []), (".", []), ("1_", []), ("_1", []), ("1__0", []), ("e5", []),
    ("blk_-1608999687919862906", []), ("10.250.19.102", []), ("/10.250.19.102:50010", []),
    ("1.2.3", []), ("12abc", []), ("\x1c7", []),
])
def test_numeric_params_is_float_of_the_finite_numbers(param, values):
    assert numeric_params([param]) == values == _float_or_nothing(param)
    if values:
        assert math.copysign(1, numeric_params([param])[0]) == math.copysign(1, values[0])


def test_numeric_params_agrees_with_float_on_random_strings():
    rng = random.Random(3)
    alphabet = list("0123456789.eE+-_ \t\n\x0b\x0c\r\x1cinfatyINFATY/:b") + ["\u0661", "\u00a0", "\u2003", "\uff17"]
    params = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 8))) for _ in range(50_000)]
    assert numeric_params(params) == [v for p in params for v in _float_or_nothing(p)]
    assert numeric_params(["a", "3", "b", "4.5"]) == [3.0, 4.5]          # order kept



# --------------------------------------------------------------------------------------------
def _run_sessions(settings, stop):
    runner = threading.Thread(target=stages.run, args=(["sessions"], settings), kwargs={"stop": stop})
    runner.start()
    return runner


def _send(settings, sessions, texts=TEXTS):
    stream = [e for key, keys in sessions.items() for e in events(key, keys, texts=texts)]
    for e in stream:
        produce_values(settings, settings.events_topic, [encode(e)], key=e.key)


@pytest.mark.slow
def test_sessions_stage_serves_deeplog_through_the_broker_and_hot_reloads(model_v1, kafka_settings, tmp_path):
    model_dir = tmp_path / "models"
    first = tmp_path / "v1"
    model_v1.save(first)
    artifacts.publish(first, model_dir)
    settings = kafka_settings.model_copy(update={
        "model_dir": model_dir, "reload_check_s": 0.5, "device": "cpu", "session_gap_s": 1e9, "idle_close_s": 2.0,
        "allowed_lateness_s": 0.0, "watermark_grace_s": 0.5, "state_dir": tmp_path / "state"})
    stop = threading.Event()
    runner = _run_sessions(settings, stop)
    try:
        _send(settings, {"blk_10": ["a", "b", "e", "f"], "blk_11": ["a", "b", "c", "e", "f"]})
        alerts = [decode(m.value(), Alert) for m in consume(settings, settings.alerts_topic, 2, timeout=60, settle=3)]
        assert {a.key for a in alerts} == {"blk_10"}
        statuses = [a.status for a in alerts]
        assert statuses[0] == "open" and statuses[-1] == "final" and set(statuses[1:-1]) <= {"update"}
        assert {a.model_version for a in alerts} == {"v0001"}

        # An operator says b -> e is fine: a new version learns it; the worker reloads it.
        second = tmp_path / "v2"
        updated = DeepLog.load(first, device="cpu")
        updated.update([Sequence(["a", "b", "e", "f"])], epochs=30)
        assert not updated.score([Sequence(["a", "b", "e", "f"])])[0].anomalous
        updated.save(second)
        artifacts.publish(second, model_dir)
        time.sleep(2.0)                                # > reload_check_s
        _send(settings, {"blk_12": ["a", "b", "e", "f"], "blk_13": ["a", "b", "d", "e", "f"]})
        every = [decode(m.value(), Alert) for m in consume(settings, settings.alerts_topic, 4, timeout=60, settle=3)]
        later = [a for a in every if a.key in ("blk_12", "blk_13")]
        assert {a.key for a in later} == {"blk_13"}, "blk_12 must pass under the reloaded model"
        assert {a.model_version for a in later} == {"v0002"}
    finally:
        stop.set()
        runner.join(30)
    assert REGISTRY.get_sample_value("logwarden_model_version_info", {"detector": "deeplog", "version": "v0002"}) == 0


@pytest.mark.slow
def test_attgru_is_served_through_the_broker_and_its_alert_shows_the_attention(attgru_model, kafka_settings, tmp_path):
    saved = tmp_path / "attgru"
    attgru_model.save(saved)
    settings = kafka_settings.model_copy(update={
        "model_dir": tmp_path / "models", "device": "cpu", "session_gap_s": 1e9, "idle_close_s": 2.0,
        "allowed_lateness_s": 0.0, "watermark_grace_s": 0.5, "state_dir": tmp_path / "state"})
    artifacts.publish(saved, settings.model_dir)
    normal = ["E1", "E2", "E2", "E2", "E3", "E4", "E4", "E3", "E3", "E4", "E5", "E5", "E5"]
    broken = normal[:6] + ["E6"] + normal[6:]
    assert not attgru_model.score([Sequence(normal, templates=[ATTGRU_TEXTS[k] for k in normal])])[0].anomalous
    stop = threading.Event()
    runner = _run_sessions(settings, stop)
    try:
        _send(settings, {"blk_20": normal, "blk_21": broken}, texts=ATTGRU_TEXTS)
        alerts = [decode(m.value(), Alert) for m in consume(settings, settings.alerts_topic, 2, timeout=60, settle=3)]
    finally:
        stop.set()
        runner.join(30)
    assert {a.key for a in alerts} == {"blk_21"}
    final = [a for a in alerts if a.status == "final"][0]
    assert final.detector == "attgru" and final.anomalous
    weights = final.details["attention"]
    assert len(weights) == len(final.details["window_keys"]) and abs(sum(weights) - 1) < 1e-4


class _FailsOn:
    """A detector that raises on any sequence holding ``key`` (a model bug on one session)."""

    def __init__(self, model, key: str):
        self.model, self.key = model, key

    def score(self, sequences):
        if any(self.key in s.keys for s in sequences):
            raise RuntimeError(f"cannot score {self.key}")
        return self.model.score(sequences)


def test_a_judge_that_raises_on_one_session_costs_only_that_sessions_verdicts(model_v1, tmp_path):
    """The book has released a batch's events before the judge sees them, so the shell's
    record-by-record retry would take them as duplicates: the stage judges each action again
    alone, and the one that still raises is dead-lettered with the session it belongs to."""
    from services.settings import Settings
    from services.shell import Out, Record, Reject

    settings = Settings(model_dir=tmp_path / "none", device="cpu", window_size=SMALL["h"], session_gap_s=1e9,
                        allowed_lateness_s=0.0, watermark_grace_s=0.0, idle_close_s=1e9, host_idle_s=1e9)
    sessions = {"blk_1": ["a", "b", "e", "f"], "blk_2": ["a", "b", "c", "e", "f"],
                "blk_bad": ["a", "b", "d", "c", "e", "f"], "blk_3": ["a", "f", "e", "b"]}
    stream = sorted((e for key, keys in sessions.items() for e in events(key, keys)), key=lambda e: e.timestamp)
    batch = [Record(settings.events_topic, 0, i, e.key.encode(), encode(e), 0) for i, e in enumerate(stream)]

    def run(second):       # two detectors: the first one's alert state must not outlive a failed pass
        stage = stages.SessionsStage(settings)
        stage.judge.models = {"deeplog": ("v0001", model_v1), "deeplog_b": ("v0001", second)}
        outs = stage.process(batch)
        return ([decode(o.value, Alert) for o in outs if type(o) is Out and o.topic == settings.alerts_topic],
                [o for o in outs if type(o) is Reject])

    want, none = run(model_v1)
    got, rejects = run(_FailsOn(model_v1, "d"))
    assert none == [] and {(a.key, a.detector) for a in want} == {(k, d) for k in ("blk_1", "blk_3")
                                                                   for d in ("deeplog", "deeplog_b")}

    def same(alerts):      # each alert's records in order (not all alerts'), the time they were made aside
        return {(a.key, a.detector): [encode(msgspec.structs.replace(b, detection_time=0.0)) for b in alerts
                                      if (b.key, b.detector) == (a.key, a.detector)]
                for a in alerts if a.key != "blk_bad"}

    assert same(got) == same(want)
    # every blk_bad event judged with d in its window is dead-lettered, named; none of another session
    assert rejects and {r.record.key for r in rejects} == {b"blk_bad"}
    assert {r.reason for r in rejects} == {"stage_error"} and all("cannot score d" in r.detail for r in rejects)
    letters = [msgspec.json.decode(r.record.value) for r in rejects]
    assert [x["template_id"] for x in letters] == ["d", "c", "e", "f"][:len(letters)]
    assert all(r.record.topic in ("logs.dn1", "logs.dn2") for r in rejects)


class _Counting:
    """A detector's score, counting the sequences it is asked about."""

    def __init__(self, model):
        self.model, self.scored = model, []

    def normal_depends_on(self):
        return self.model.normal_depends_on()

    def score(self, sequences):
        self.scored += [tuple(s.keys) for s in sequences]
        return self.model.score(sequences)


def _memo_stream(detector: str):
    """Sessions that repeat themselves (and a few anomalous ones) for ``detector``'s test model."""
    if detector == "deeplog":
        rng = random.Random(3)
        sessions = {f"blk_{i}": grammar_session(rng) for i in range(60)}
        sessions |= {"blk_x1": ["a", "b", "e", "f"], "blk_x2": ["a", "b", "e", "f"], "blk_x3": ["a", "f", "e", "b"]}
        texts = TEXTS
    else:
        from tests.test_attgru import dataset
        sessions = {f"blk_{i}": keys for i, (keys, _, _) in enumerate(dataset(seed=5, normal=50, abnormal=12))}
        texts = ATTGRU_TEXTS
    stream = [e for n, (key, keys) in enumerate(sessions.items())
              for e in events(key, keys, t0=1000.0 + 7 * n, texts=texts)]
    return sessions, sorted(stream, key=lambda e: e.timestamp)


@pytest.mark.parametrize("detector", ["deeplog", "attgru"])
def test_the_normal_memo_changes_no_alert_and_spares_the_model_the_windows_it_judged_normal(detector, request):
    """Released events and closed sessions whose inputs the model called normal before are not
    scored again; every alert (and every anomalous verdict, which is never remembered) is the one
    scoring gives."""
    model = request.getfixturevalue("model_v1" if detector == "deeplog" else "attgru_model")
    sessions, stream = _memo_stream(detector)

    def run(memo_size):
        counting = _Counting(model)
        book, judge = SessionBook(CONFIG), SessionJudge({detector: ("v0001", counting)}, memo_size=memo_size)
        alerts = []
        for start in range(0, len(stream), 37):             # batches, as the stage judges them
            actions = [a for i, e in enumerate(stream[start:start + 37], start) for a in book.add(e, i, 0.0)]
            alerts += judge.judge(actions, now=5.0)
        alerts += judge.judge(book.close_all(), now=5.0)
        return [encode(a) for a in alerts], counting.scored, judge

    plain, scored_plain, _ = run(0)
    memo, scored_memo, judge = run(10_000)
    assert memo == plain and len(plain) >= 6                       # byte-equal alerts
    held = judge._memos[detector][2]
    judged_count = len(stream) + len(sessions)                     # every event, and every session at its end
    assert held.hits + held.misses == judged_count and held.hits > len(stream) // 2
    assert len(scored_memo) == len(scored_plain) - held.hits       # only the hits were spared
    assert not any(v.anomalous for v in held.verdicts.values())
    # complete sessions repeat too: their normal verdicts are remembered
    assert any(k[0] == "session" for k in held.verdicts)
    if detector == "deeplog":
        # an anomalous window (a, b, e) is met in two sessions: scored both times
        assert scored_memo.count(("a", "b", "e")) == 2
    # a full memo is emptied, not grown
    small, _, judge_small = run(5)
    assert small == plain and len(judge_small._memos[detector][2].verdicts) <= 5
