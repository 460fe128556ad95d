"""Serving traces and chunks (section ``serve``): records/s through the detect stage's core
(services.cores.score.ScoreCore: decode the wire record, convert it to the detector's item,
batched ``score``, alerts), on the CPU and on CUDA when torch finds one.

    python -m bench.eval_serve [--data ../shared/datasets] [--seconds 10]

Models: a TraceLSTM of the default size (hidden 64, embedding 32) trained for 2 epochs on the
2023-01-30 16 h traces, an AnoFusion of the default size (hidden 16, three variants; the stage
scores "all") trained for 1 epoch on three pods' chunks of 16-18 h: throughput does not depend
on how long a model was trained. Records: the 17 h traces and the 11 h chunks of those pods,
encoded as the assemble stage produces them, fed to the core in batches of
LOGWARDEN_DETECT_BATCH (256, the stage's default) per detector. The broker is not in the
figure (bench/e2e_bench measures the shell around a core).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SECTION = "serve"
PODS = ("ts-basic-service", "ts-contacts-service", "ts-station-service")


def _slice(day: Path, root: Path) -> Path:
    for kind in ("trace", "metric", "log"):
        (root / kind).mkdir(parents=True)
    for hour in ("11", "16", "17", "18"):
        os.symlink((day / "trace" / f"{hour}.csv.gz").resolve(), root / "trace" / f"{hour}.csv.gz")
    for path in sorted((day / "metric").iterdir()):
        if path.name.startswith(PODS):
            os.symlink(path.resolve(), root / "metric" / path.name)
    for path in sorted((day / "log").iterdir())[:3]:
        os.symlink(path.resolve(), root / "log" / path.name)
    return root


def _rate(core, topic: str, values: list[bytes], seconds: float, batch: int) -> dict:
    from services.shell import Record

    done = alerts = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        part = [values[(done + i) % len(values)] for i in range(batch)]
        outs = core.process([Record(topic, 0, done + i, None, v, 0) for i, v in enumerate(part)])
        alerts += len(outs)
        done += len(part)
    elapsed = time.perf_counter() - started
    return {"records": done, "per_s": round(done / elapsed, 1), "outputs": alerts,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def measure(data: Path, seconds: float = 10.0) -> dict:
    import torch

    from models.anofusion import AnoFusion
    from models.base import limit_cpu_threads
    from models.chunks import ChunkOptions, read_observations
    from models.microservices import read_traces
    from models.tracelstm import TraceLSTM
    from services.cores.parse import ParseCore
    from services.cores.score import ScoreCore, chunk_record, trace_record
    from services.records import encode

    limit_cpu_threads()
    day = data / "trainticket_2023-01-30"
    tracelstm = TraceLSTM(epochs=2, device="cpu")
    tracelstm.fit(read_traces([day / "trace" / "16.csv.gz"]))
    traces = read_traces([day / "trace" / "17.csv.gz"])
    with tempfile.TemporaryDirectory() as tmp:
        core = ParseCore()
        obs = read_observations(_slice(day, Path(tmp) / "day"), ChunkOptions(), parse_core=core)
    units = [u for u in obs.units() if u[0].startswith(PODS)]
    first = min(step for _, step in units)
    anofusion = AnoFusion(epochs=1, device="cpu")
    anofusion.fit(list(obs.chunks([u for u in units if u[1] >= first + 120])))
    chunks = list(obs.chunks([u for u in units if u[1] < first + 120]))
    trace_values = [encode(trace_record(t)) for t in traces]
    chunk_values = [encode(chunk_record(c)) for c in chunks]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {"traces": len(traces), "spans_mean": round(sum(len(t.spans) for t in traces) / len(traces), 1),
              "chunks": len(chunks), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "by_device": {}}
    batch = 256
    for device in devices:
        for d in (tracelstm, anofusion):
            d.device = device
            for module in ([d.model] if hasattr(d, "model") else [v.net for v in d.variants.values()]):
                module.to(device)
        served = {"traces": {"tracelstm": ("bench", tracelstm)}, "chunks": {"anofusion": ("bench", anofusion)}}
        core = ScoreCore(lambda: served, traces_topic="traces", chunks_topic="chunks", alerts_topic="alerts",
                         batch_size=batch, episode_gap_s=1e12)
        _rate(core, "traces", trace_values, 1.0, batch)          # warm-up (CUDA kernels, allocator)
        report["by_device"][device] = {"batch": batch,
                                       "traces": _rate(core, "traces", trace_values, seconds, batch),
                                       "chunks": _rate(core, "chunks", chunk_values, seconds, batch)}
    return report


def run(ctx) -> dict:
    return {f"{SECTION}.report": measure(ctx.data)}


def render(results: dict) -> list[str]:
    rep = results.get(f"{SECTION}.report")
    if rep is None:
        return ["## Serving traces and chunks (detect stage)", "", f"Failed: {results.get(f'{SECTION}.error')}", ""]
    out = ["## Serving traces and chunks (detect stage)", "",
           "Records/s through the detect stage's core (services.cores.score: decode the TraceRecord / ChunkRecord, "
           "convert, batched `score` of the served TraceLSTM / AnoFusion, alerts and episodes), batches of "
           f"{rep['by_device'][next(iter(rep['by_device']))]['batch']}, "
           f"TrainTicket 2023-01-30 (17 h traces: {rep['traces']}, {rep['spans_mean']} spans each on average; "
           f"{rep['chunks']} chunks of three pods, 10 steps of 60 s). Default-size models; the broker is not "
           "in the figure. `python -m bench.eval_serve`.", "",
           "| device | traces/s | chunks/s | load (1 min) |", "| --- | ---: | ---: | ---: |"]
    for device, r in rep["by_device"].items():
        out.append(f"| {device} ({rep['torch_threads']} torch thread(s) of {rep['cpus']} CPUs) | "
                   f"{r['traces']['per_s']:,} | {r['chunks']['per_s']:,} | {r['traces']['load_avg_1m']} |"
                   if device == "cpu" else
                   f"| {device} | {r['traces']['per_s']:,} | {r['chunks']['per_s']:,} | {r['traces']['load_avg_1m']} |")
    if "cuda" not in rep["by_device"]:
        out += ["", "No GPU in this session: the CUDA row is not measured."]
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "datasets")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    report = measure(args.data, args.seconds)
    json.dump(report, sys.stdout, indent=2)
    print()
    print("\n".join(render({f"{SECTION}.report": report})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
