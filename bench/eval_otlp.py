"""`python -m bench.run --only otlp`: bench.otlp_bench as a section of BENCHMARKS.md (spans/s and
metric points/s through the broker, beside a pass-through stage)."""
from __future__ import annotations

from pathlib import Path

SECTION = "otlp"
HOURS = ("11", "12")
COMMAND = "python -m bench.otlp_bench --data ../shared/datasets --hours 11 12"


def _flat(prefix: str, tree) -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(f"{prefix}.{key}", value))
    return out


def run(ctx) -> dict:
    from bench import otlp_bench

    result = otlp_bench.run(Path(ctx.data), ctx.broker().bootstrap, list(HOURS))
    return _flat(SECTION, {k: v for k, v in result.items() if k not in ("data", "hours")}) | {
        "otlp.hours": list(HOURS), "otlp.command": COMMAND}


def render(results: dict) -> list[str]:
    r = {k[len("otlp."):]: v for k, v in results.items() if k.startswith("otlp.")}
    if "spans.items" not in r:
        return []

    def n(value) -> str:
        return "-" if value is None else f"{value:,}"

    out = ["## OTLP ingest through Kafka (TrainTicket 2023-01-30)", "",
           f"Spans of the trace file(s) {', '.join(r.get('hours', HOURS))} and every pod's metric CSV (the whole day), "
           "replayed as a Collector writes them (otlp_proto, batch processor's batches), each signal on fresh topics; "
           "then a pass-through stage (the shell copying records unchanged) and the otlp stage on the same records, "
           "one after the other. Rates: items / (last - first CreateTime of the stage's output); per CPU-s: items / "
           "CPU seconds of the bench process while the stage ran (start-up and idle wait included).", "",
           "| signal | items | Kafka records | replay --fast | pass-through | otlp stage | otlp per CPU-s | "
           "otlp / pass-through (wall, CPU) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for signal, unit in (("spans", "spans_per_s"), ("metrics", "points_per_s")):
        p = f"{signal}."
        cpu_unit = unit.replace("_per_s", "_per_cpu_s")
        out.append(f"| {signal} | {n(r.get(p + 'items'))} | {n(r.get(p + 'kafka_records'))} | "
                   f"{n(r.get(p + 'replay.' + unit))}/s | {n(r.get(p + 'passthrough.' + unit))}/s | "
                   f"{n(r.get(p + 'otlp.' + unit))}/s | {n(r.get(p + 'otlp.' + cpu_unit))} | "
                   f"{r.get(p + 'otlp_vs_passthrough')}x, {r.get(p + 'otlp_vs_passthrough_cpu')}x |")
    out += ["", f"Command: `{r.get('command', COMMAND)}`.", ""]
    return out
