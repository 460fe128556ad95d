"""Detector scoring throughput on CPU: the sliding windows the stream builds from real HDFS lines,
scored in batches as the detect stage scores them.

    python -m bench.detect_bench --data ../shared/datasets --models MODEL_DIR [--json OUT]

Windows: HDFS_20000.log dealt over 3 hosts (line i -> host i % 3), parsed by the parse core with
the loghub HDFS catalog and windowed by the window core with its defaults (h = 10): one sliding
window per event. For each detector in MODEL_DIR (its newest version) and each batch size:
  score   Detector.score(to_sequence(w) for w in batch)   (the model alone)
  core    DetectCore.process(batch)                        (sequences + score + alerts, as the
                                                           stage runs it, without JSON and Kafka)
Rates are windows per CPU second of this process (time.process_time; torch limited to
cores - 1 threads, as the detect stage and training limit it: models.base.limit_cpu_threads) and
per wall-clock second, each over at most ``seconds``.
``threads``: the same core at two batch sizes with torch's own default thread count against one
thread, on an idle machine and beside one busy process per core: on busy cores torch's intra-op
threads wait for each other (why the stage limits them).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import save_report
from models import artifacts
from services.cores.detect import DetectCore, to_sequence
from services.records import Source, Window

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m bench.detect_bench --data ../shared/datasets --models MODEL_DIR"
BATCHES = (32, 256, 4096)       # the latency run's setting, LOGWARDEN_DETECT_BATCH's default, large


def stream_windows(data: Path, hosts: int = 3) -> list[Window]:
    """Sliding windows of HDFS_20000.log as the parse and window cores emit them."""
    from services.cores.parse import ParseConfig, ParseCore, load_catalog
    from services.cores.window import WindowCore

    hdfs = data / "hdfs"
    parser = ParseCore(ParseConfig.load(), catalog=load_catalog(hdfs / "HDFS_templates.csv"))
    windows = WindowCore()
    offsets = [0] * hosts
    out: list[Window] = []
    with open(hdfs / "HDFS_20000.log", "rb") as fh:
        for number, raw in enumerate(fh):
            index = number % hosts
            host = f"host{index}"
            source = Source(host=host, topic=f"logs.{host}", partition=0, offset=number // hosts,
                            file_path="/var/log/hadoop/hdfs.log", file_offset=offsets[index])
            offsets[index] += len(raw)
            for event in parser.parse(raw.decode("utf-8").rstrip("\r\n"), host, source, 0.0):
                out += [w for w in windows.process(event, 0.0) if w.kind == "sliding"]
    return out


def timed(step, windows: list, batch: int, seconds: float) -> dict:
    """Call ``step`` on consecutive batches until every window is done or ``seconds`` passed."""
    cpu, wall, done = time.process_time(), time.perf_counter(), 0
    while done < len(windows) and time.perf_counter() - wall < seconds:
        chunk = windows[done:done + batch]
        step(chunk)
        done += len(chunk)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"batch": batch, "windows": done, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "windows_per_cpu_s": round(done / cpu), "windows_per_s": round(done / wall)}


def torch_default_threads() -> int:
    """torch's intra-op threads in a fresh process, before anything limits them."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def compare_threads(detector, name: str, version: str, windows: list[Window], seconds: float) -> list[dict]:
    """DetectCore.process with torch's default thread count and with one thread, on an idle
    machine and with one busy process per core beside it (as parse, window and the broker are
    beside detect when the stages share a host)."""
    import torch

    limited, rows = torch.get_num_threads(), []
    for competitors in (0, os.cpu_count() or 1):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
        try:
            for threads in sorted({torch_default_threads(), 1}, reverse=True):
                torch.set_num_threads(threads)
                for batch in (32, 256):
                    rows.append({"threads": threads, "busy_processes": competitors,
                                 **timed(DetectCore({name: (version, detector)}).process, windows, batch, seconds)})
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    torch.set_num_threads(limited)
    return rows


def run(data: Path, models_dir: Path, seconds: float = 10.0, batches=BATCHES) -> dict:
    """detect.* keys of bench/results.json for every detector found in ``models_dir``."""
    from models.base import limit_cpu_threads

    limit_cpu_threads()
    import torch

    windows = stream_windows(data)
    sequences = [to_sequence(w) for w in windows]
    result: dict = {"detect.command": COMMAND, "detect.windows": len(windows), "detect.torch_threads": torch.get_num_threads(),
                    "detect.torch": torch.__version__, "detect.machine": platform.machine(),
                    "detect.windows_per_s_gpu": "not measured: no GPU machine was lent to this session"}
    headline = {}
    for name in artifacts.DETECTORS:
        path = artifacts.latest(models_dir, name)
        if path is None:
            result[f"detect.{name}"] = "not measured: no model in MODEL_DIR"
            continue
        try:
            detector = artifacts.load(path, device="cpu")
        except Exception as err:       # a model its code can no longer read: say so, go on
            result[f"detect.{name}"] = f"not measured: {path.name} does not load ({type(err).__name__}: {err})"
            continue
        detector.score(sequences[:batches[0]])            # first-call setup outside the timing
        per_batch = []
        for batch in batches:
            core = DetectCore({name: (path.name, detector)})
            per_batch.append({"score": timed(detector.score, sequences, batch, seconds),
                              "core": timed(core.process, windows, batch, seconds)})
        result[f"detect.{name}.per_batch"] = per_batch
        result[f"detect.{name}.threads"] = compare_threads(detector, name, path.name, windows, seconds)
        default = next(r for b, r in zip(batches, per_batch) if b == 256)
        result[f"detect.{name}.windows_per_s_cpu"] = default["core"]["windows_per_cpu_s"]
        headline[name] = default["core"]["windows_per_cpu_s"]
    # The stage scores every window with every served detector: its rate is the harmonic sum.
    if headline:
        result["detect.windows_per_s_cpu"] = round(1 / sum(1 / r for r in headline.values()))
        result["detect.windows_per_s_cpu_detectors"] = sorted(headline)
    return result


def markdown(result: dict) -> str:
    rows = ["| detector | batch | score only: windows/CPU-s | DetectCore.process: windows/CPU-s | windows/s (wall) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name in artifacts.DETECTORS:
        for r in result.get(f"detect.{name}.per_batch") or []:
            rows.append(f"| {name} | {r['score']['batch']} | {r['score']['windows_per_cpu_s']:,} | "
                        f"{r['core']['windows_per_cpu_s']:,} | {r['core']['windows_per_s']:,} |")
    rows += ["", "Torch threads (DetectCore.process; *busy*: processes spinning beside it, one per core):", "",
             "| detector | busy processes | torch threads | batch | windows/CPU-s | windows/s (wall) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in artifacts.DETECTORS:
        for r in result.get(f"detect.{name}.threads") or []:
            rows.append(f"| {name} | {r.get('busy_processes', 0)} | {r['threads']} | {r['batch']} | "
                        f"{r['windows_per_cpu_s']:,} | {r['windows_per_s']:,} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.detect_bench", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("LOGWARDEN_DATASETS", REPO_ROOT.parent / "shared" / "datasets")))
    p.add_argument("--models", type=Path, required=True, help="MODEL_DIR (<dir>/<detector>/vNNNN/)")
    p.add_argument("--seconds", type=float, default=10.0, help="most time per detector and batch size")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(args.data, args.models, args.seconds)
    save_report(result, args.json, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
