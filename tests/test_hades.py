"""Hades on synthetic chunks: the shapes of its encoders, training lowers the loss, a log-only,
a metric-only and a both-modalities fault are each caught on a renamed pod of another "day" while
normal chunks are not flagged, the single-modality variants miss the other modality's fault,
verdicts survive save/load and do not depend on the batch; and the CLI contract (train with
--labels/--labelled-fraction, evaluate's OUT) on a tiny lab-like recording, with one-line errors."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.hadesdata import KINDS, STEP, chunks_of, fault_objects, series
from models.hades import (ASPECTS, EventEmbedder, Hades, _Net, aspect_of, chunk_labels, choose_labelled,
                          faults_detected)

LENGTH = 6
SMALL = dict(steps=LENGTH, step_s=STEP, hidden=16, metric_hidden=4, embedding=16, epochs=8, pseudo_epochs=2,
             batch_size=64, device="cpu")
POD_A, POD_B = "ts-alpha-service-5f55b6cf68-77cfw", "ts-beta-service-84cbf6c798-7njv6"
POD_A_OTHER_DAY = "ts-alpha-service-5f55b6cf68-zzzzz"


def training_set():
    chunks, faults = [], []
    for s, pod in enumerate((POD_A, POD_B)):
        plan = [(kind, 100 + 50 * i + 7 * s, 104 + 50 * i + 7 * s) for i, kind in enumerate(KINDS * 2)]
        chunks += chunks_of(pod, series(420, s, 100, plan), LENGTH)
        faults += fault_objects(pod, plan)
    return chunks, chunk_labels(chunks, faults)


@pytest.fixture(scope="module")
def trained() -> Hades:
    chunks, truth = training_set()
    detector = Hades(**SMALL)
    detector.fit(chunks, choose_labelled(truth, 0.3, seed=1))
    return detector


@pytest.fixture(scope="module")
def other_day():
    at = {"log": 1040, "metric": 1080, "both": 1120}
    plan = [(kind, step, step + 4) for kind, step in at.items()]
    chunks = chunks_of(POD_A_OTHER_DAY, series(170, seed=9, first=1000, faults=plan), LENGTH)
    return chunks, chunk_labels(chunks, fault_objects(POD_A_OTHER_DAY, plan)), at


def test_aspects_group_trainticket_and_hadoop_metrics():
    assert aspect_of("CpuUsageRate(%)") == "cpu" and aspect_of("jvm_metrics_gc_time_millis") == "cpu"
    assert aspect_of("MemoryUsage(Mi)") == "memory" and aspect_of("jvm_metrics_mem_heap_used_m") == "memory"
    assert aspect_of("SyscallRead") == "io" and aspect_of("data_node_activity_bytes_written") == "io"
    assert aspect_of("NetworkReceiveBytes") == "network" and aspect_of("rpc_activity_rpc_queue_time_avg_time") == "network"
    assert aspect_of("PodWorkload(Ops)") == "application"


def test_encoder_shapes():
    torch.manual_seed(0)
    B, T, M, L, E = 3, LENGTH, 5, 4, 16
    aspects = np.array([0, 1, 2, 3, 4])
    net = _Net("both", aspects, T, E, hidden=8, metric_hidden=4, max_events=L)
    batch = {"metrics": torch.randn(B, T, M), "metric_present": torch.ones(B, T, M, dtype=torch.bool),
             "events": torch.randn(B, T, L, E), "event_mask": torch.zeros(B, T, L, dtype=torch.bool),
             "log_extras": torch.zeros(B, T, 3), "metric_level": torch.zeros(B, M)}
    batch["event_mask"][0, 2, :3] = True                       # one step of one chunk holds logs
    batch["metric_present"][1, :, 2] = False                   # a metric absent from one chunk
    logits, weights, winners = net(batch)
    assert logits.shape == (B, 2) and weights.shape == (B, 2 * T) and winners.shape == (B, M)
    assert torch.allclose(weights.sum(1), torch.ones(B))
    assert winners[1, 2] == 0                                  # an absent metric never wins the max
    steps, _ = net.metrics(batch["metrics"], batch["metric_present"], batch["metric_level"])
    assert steps.shape == (B, T, 8)
    assert net.logs(batch["events"], batch["event_mask"], batch["log_extras"]).shape == (B, T, 8)
    assert set(_Net("logs", aspects, T, E, 8, 4, L)(batch)[0].shape) == {B, 2}


def test_training_lowers_the_loss_and_pseudo_labels(trained):
    for variant, stats in trained.training["variants"].items():
        losses = stats["losses"]
        # a single modality cannot see the other modality's faults: its loss stays higher
        assert losses[stats["phase1_epochs"] - 1] < (0.2 if variant == "both" else 0.8) * losses[0], (variant, losses)
        assert stats["pseudo_labelled"] > 0                    # phase 2 ran on pseudo-labelled chunks
    assert trained.training["labelled_abnormal"] > 0
    assert trained.counters == [False, False, True, False]     # NetworkReceiveBytes: cumulative


def test_each_fault_kind_is_caught_and_normal_chunks_are_not(trained, other_day):
    chunks, truth, at = other_day
    verdicts = trained.score(chunks)
    newest = {round(c.end / STEP) - 1: v for c, v in zip(chunks, verdicts)}
    for kind, step in at.items():
        caught = [newest[k].anomalous for k in range(step, step + 4)]
        assert all(caught), (kind, [newest[k].score for k in range(step, step + 4)])
    assert newest[at["log"] + 1].details["modality"] == "logs"
    assert newest[at["metric"] + 1].details["modality"] == "metrics"
    assert newest[at["both"] + 1].details["modality"] == "logs+metrics"
    assert newest[at["metric"] + 1].details["metrics"][0]["metric"] == "CpuUsageRate(%)"
    assert newest[at["log"] + 1].details["log_events"][0]["template_id"] == "Tfail"
    assert newest[at["log"] + 1].details["known_service"]      # the renamed pod, by its service
    normal = [v for v, y in zip(verdicts, truth) if not y]
    assert len(normal) > 100 and sum(v.anomalous for v in normal) <= 2


def test_faults_detected_counts_a_fault_once_its_entity_has_a_flagged_chunk_over_it(trained, other_day):
    from models.faults import Fault

    chunks, truth, at = other_day
    flagged = [v.anomalous for v in trained.score(chunks)]
    first, last = min(c.start for c in chunks), max(c.end for c in chunks)
    elsewhere = Fault(first, first + STEP, "ts-gamma-service-1-abcde", "log")     # no chunk of its entity
    quiet = Fault(last - 3 * STEP, last - 2 * STEP, POD_A_OTHER_DAY, "quiet")     # the entity, nothing flagged there
    faults = [*fault_objects(POD_A_OTHER_DAY, [(k, s, s + 4) for k, s in at.items()]), elsewhere, quiet]
    overlapping = [c for c in chunks if quiet.overlaps(c.start, c.end)]
    assert overlapping and not any(f for c, f in zip(chunks, flagged) if quiet.overlaps(c.start, c.end))
    assert faults_detected(chunks, flagged, faults) == {"log": [1, 1], "metric": [1, 1], "both": [1, 1], "quiet": [0, 1]}
    assert faults_detected(chunks, [False] * len(chunks), faults)["metric"] == [0, 1]


def test_single_modality_variants_miss_the_other_modality(trained, other_day):
    chunks, truth, at = other_day
    index = {round(c.end / STEP) - 1: i for i, c in enumerate(chunks)}
    logs = trained.score(chunks, variant="logs")
    metrics = trained.score(chunks, variant="metrics")
    middle = lambda kind: index[at[kind] + 2]
    assert not logs[middle("metric")].anomalous and logs[middle("log")].anomalous
    assert not metrics[middle("log")].anomalous and metrics[middle("metric")].anomalous


def test_verdicts_do_not_depend_on_the_batch(trained, other_day):
    chunks = other_day[0][:40]
    whole = [v.score for v in trained.score(chunks)]
    trained.score_batch = 7
    try:
        parts = [v.score for v in trained.score(chunks)]
        one = [trained.score([c])[0].score for c in chunks[:10]]
    finally:
        trained.score_batch = SMALL.get("score_batch", 256)
    assert np.allclose(whole, parts, atol=1e-6) and np.allclose(whole[:10], one, atol=1e-6)


def test_save_load_round_trip(trained, other_day, tmp_path):
    chunks = other_day[0]
    trained.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["detector"] == "hades" and manifest["variants"] == ["both", "logs", "metrics"]
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))
    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as fh:
        assert "embedder.vectors_ngrams" in fh.keys()
    loaded = Hades.load(tmp_path, device="cpu")
    for variant in ("both", "logs", "metrics"):
        before = [v.score for v in trained.score(chunks, variant=variant)]
        after = [v.score for v in loaded.score(chunks, variant=variant)]
        assert np.allclose(before, after, atol=1e-9), variant
    # the restored FastText gives a template it never saw the same vector as the trained one
    text = "disk quota exceeded on volume <*>"
    assert np.allclose(trained.embedder.vector(text), loaded.embedder.vector(text), atol=1e-6)


def test_event_embeddings_read_unseen_templates_by_their_words():
    corpus = ["connection refused by <*>", "request served in <*> ms", "block <*> written to disk"] * 10
    embedder = EventEmbedder.fit(corpus, vector_size=16, seed=1)
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    near = embedder.vector("connection refused by server <*>")
    assert cos(near, embedder.vector("connection refused by <*>")) > cos(near, embedder.vector("request served in <*> ms"))


def test_bad_options_and_labels_are_refused():
    with pytest.raises(ValueError, match="steps"):
        Hades(steps=0)
    with pytest.raises(ValueError, match="variants"):
        Hades(variants=("logs",))
    chunks, truth = training_set()
    with pytest.raises(ValueError, match="both are needed"):
        Hades(**SMALL).fit(chunks[:50], [0] * 50)
    with pytest.raises(ValueError, match="labels"):
        Hades(**SMALL).fit(chunks[:50], None)
    with pytest.raises(ValueError, match="unknown option"):
        Hades(**SMALL).fit(chunks, truth, colour="red")
    labels = choose_labelled([0, 1] * 50, 0.1, seed=3)
    assert sum(l is not None for l in labels) == 10 and labels == choose_labelled([0, 1] * 50, 0.1, seed=3)


# --------------------------------------------------------------------------------------------
# the CLI on a tiny lab-like recording (raw log4j files, 10 s metric rows)
T0 = 1_764_630_000                  # 2025-12-01 23:00:00 UTC, a multiple of 10 s
RECORDING_STEPS = 240


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S,") + f"{int(t * 1000) % 1000:03d}"


def write_recording(root: Path, seed: int, faults: list[tuple[str, str, int, int]]) -> Path:
    """metric/<host>_metric.csv, log/<host>.log and fault_list.json; ``faults``: (kind, host,
    first step, end step), kind "log" (ERROR lines) or "metric" (heap x3)."""
    from models.faults import Fault, write_faults

    rng = random.Random(seed)
    (root / "metric").mkdir(parents=True)
    (root / "log").mkdir()
    for host in ("dn1", "dn2"):
        rows = ["Time,TimeStamp,PodName,jvm_metrics_mem_heap_used_m,rpc_activity_rpc_processing_time_avg_time\n"]
        lines = []
        for k in range(RECORDING_STEPS):
            t = T0 + k * STEP
            kind = next((f for f, h, a, b in faults if h == host and a <= k < b), None)
            heap = (100 + rng.gauss(0, 3)) * (3 if kind == "metric" else 1)
            rows.append(f"x,{t + 9.5},{host},{heap:.2f},{2 + rng.gauss(0, 0.1):.3f}\n")
            for j in range(3):
                lines.append(f"{_clock(t + 2 * j + 0.5)} INFO org.apache.hadoop.hdfs.server.datanode.DataNode: "
                             f"Receiving block blk_{1073741825 + k * 3 + j}_{1001 + k} src: /127.0.0.1:{40000 + j} "
                             f"dest: /127.0.0.1:9866")
            if kind == "log":
                lines += [f"{_clock(t + 7 + 0.1 * j)} ERROR org.apache.hadoop.hdfs.server.datanode.DataNode: "
                          f"IOException in BlockReceiver.run(): java.io.IOException: Connection reset by peer"
                          for j in range(6)]
        (root / "metric" / f"{host}_metric.csv").write_text("".join(rows))
        (root / "log" / f"{host}.log").write_text("\n".join(lines) + "\n")
    write_faults(root / "fault_list.json",
                 [Fault(T0 + a * STEP, T0 + b * STEP, host, kind) for kind, host, a, b in faults])
    return root


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    logwarden = Path(sys.executable).with_name("logwarden")
    return subprocess.run([str(logwarden), *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LOGWARDEN_DEVICE": "cpu"})


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    root = tmp_path_factory.mktemp("recordings")
    train = write_recording(root / "one" / "nested", 1, [("log", "dn1", 40, 46), ("metric", "dn2", 80, 86),
                                                          ("log", "dn2", 130, 136), ("metric", "dn1", 180, 186)])
    test = write_recording(root / "two", 2, [("metric", "dn1", 60, 66), ("log", "dn2", 150, 156)])
    return root / "one", train / "fault_list.json", test, test / "fault_list.json"


def test_cli_train_and_evaluate_contract(recordings, tmp_path):
    one, faults1, two, faults2 = recordings
    model = tmp_path / "model"
    done = run_cli("train", "--detector", "hades", "--data", str(one), "--labels", str(faults1),
                   "--labelled-fraction", "0.5", "--out", str(model), "--epochs", "10")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trained hades")
    assert "hades both: phase 1 epoch 10/10" in done.stderr     # progress goes to stderr
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["chunk_options"]["step_s"] == 10.0          # the recording's metric spacing
    assert manifest["training_data"][0]["labelled_fraction"] == 0.5
    out = tmp_path / "out.json"
    done = run_cli("evaluate", "--detector", "hades", "--model", str(model), "--data", str(two),
                   "--faults", str(faults2), "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"chunks", "by_source", "labelled_fraction"} <= set(result)
    assert set(result["chunks"]) == {"tp", "fp", "tn", "fn", "precision", "recall", "f1"}
    assert set(result["by_source"]) == {"logs", "metrics", "both"} and result["labelled_fraction"] == 0.5
    c = result["chunks"]
    # a 6-step fault overlaps 6 + 5 sliding 6-step chunks of its host
    assert c["tp"] + c["fn"] == 22
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == 2 * (RECORDING_STEPS - LENGTH + 1)
    assert c["f1"] >= 0.8, result


def test_cli_errors_are_one_line(recordings, tmp_path):
    one, faults1, _, _ = recordings
    cases = [
        (("train", "--detector", "hades", "--labels", str(faults1), "--out", str(tmp_path / "m")), "--data"),
        (("train", "--detector", "hades", "--data", str(one), "--out", str(tmp_path / "m")), "--labels"),
        (("train", "--detector", "hades", "--data", str(one), "--labels", str(faults1), "--labelled-fraction", "0",
          "--out", str(tmp_path / "m")), "(0, 1]"),
        (("train", "--detector", "hades", "--data", str(one), "--labels", str(faults1), "--labelled-fraction",
          "0.001", "--out", str(tmp_path / "m")), "both are needed"),
        (("train", "--detector", "hades", "--data", str(one), "--labels", str(tmp_path / "none.json"),
          "--out", str(tmp_path / "m")), "no such file"),
        (("train", "--detector", "hades", "--data", str(one), "--labels", str(faults1), "--normal", "x",
          "--out", str(tmp_path / "m")), "--normal"),
        (("evaluate", "--detector", "hades", "--model", str(tmp_path / "nothing"), "--data", str(one),
          "--faults", str(faults1), "--json", str(tmp_path / "o.json")), "no model"),
    ]
    for argv, expected in cases:
        done = run_cli(*argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, (argv, done.stderr)


def test_one_alert_per_entity_and_fault_episode(trained, other_day):
    from models.hades import episode_alerts

    chunks, _, at = other_day
    alerts = episode_alerts(chunks, trained.score(chunks))
    assert len(alerts) == 3, alerts
    by_start = sorted(alerts, key=lambda a: a["start"])
    assert [a["modality"] for a in by_start] == ["logs", "metrics", "logs+metrics"]
    for alert, kind in zip(by_start, ("log", "metric", "both")):
        assert alert["entity"] == POD_A_OTHER_DAY
        assert alert["start"] < (at[kind] + 4) * STEP and alert["end"] > at[kind] * STEP
    assert by_start[1]["metrics"][0] == "CpuUsageRate(%)" and by_start[0]["log_events"][0]["template_id"] == "Tfail"


@pytest.mark.slow
def test_the_detect_stage_serves_hades_through_the_broker_with_the_offline_verdicts(trained, other_day, kafka_settings,
                                                                                     tmp_path):
    """Chunks as the join stage writes them (ChunkRecords keyed by entity) through the real broker
    and the detect stage: its Hades episodes hold exactly the chunks and scores offline `score` gives."""
    import threading
    import time

    from confluent_kafka import Producer

    from models import artifacts
    from services import stages
    from services.cores.score import chunk_record
    from services.records import Alert, decode, encode
    from services.shell import StageRunner, ensure_topics
    from tests.kafkautil import consume

    chunks, _, _ = other_day
    verdicts = trained.score(chunks)
    expected = {chunk_record(c).chunk_id: v.score for c, v in zip(chunks, verdicts) if v.anomalous}
    assert 0 < len(expected) < len(chunks)
    trained.save(tmp_path / "hades")
    artifacts.publish(tmp_path / "hades", tmp_path / "models")
    settings = kafka_settings.model_copy(update={"model_dir": tmp_path / "models", "device": "cpu", "detect_batch": 16,
                                                 "state_dir": tmp_path / "state"})
    ensure_topics(settings)
    spec = stages.build("detect", settings)
    spec.core.core.episode_idle_s = 3.0       # the episodes still open when input ends close soon after
    stop = threading.Event()
    thread = threading.Thread(target=StageRunner(settings, spec, stop).run, daemon=True)
    thread.start()
    try:
        producer = Producer(settings.kafka_config() | {"enable.idempotence": True, "linger.ms": 5})
        for c in chunks:
            producer.produce(settings.chunks_topic, encode(chunk_record(c)), c.entity)
        assert producer.flush(30) == 0
        deadline = time.monotonic() + 120
        while True:
            alerts = [decode(m.value(), Alert) for m in consume(settings, settings.alerts_topic, 1, timeout=2)]
            finals = [a for a in alerts if a.detector == "hades" and a.status == "final"]
            seen = {i["id"]: i["score"] for a in finals for i in a.details["items"]}
            if len(seen) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
    assert seen == expected
    assert all(a.modality == "chunks" and a.entity == POD_A_OTHER_DAY for a in finals)
