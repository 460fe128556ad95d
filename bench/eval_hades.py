"""Hades on data the model did not see: lab recordings (train on one, judge another made with a
different seed and fault schedule) and TrainTicket 2023-01-30 (two folds of time blocks), beside
DeepLog on the chunks' logs, a metrics-only robust z-score, a trivial "the chunk holds logs"
rule (TrainTicket's logs exist only around faults), Hades' single-modality variants, Hades
trained on the labelled chunks alone (what the pseudo-labelled phase adds) and Hades trained with
every label (supervised).

    python -m bench.eval_hades --lab REC_A REC_B --data ../shared/datasets --json OUT
    python -m bench.eval_hades --data ../shared/datasets --days --json OUT

Chunks: every (entity, step) with a metric row, the chunk the ``steps`` steps ending there
(sliding: neighbouring chunks share steps, so the counts also give the non-overlapping chunks'
number, ``distinct``); a chunk is abnormal when its window overlaps a fault on its entity.
Labels: a seeded random ``fraction`` of the training chunks keeps its label (models.hades.
choose_labelled), the rest is unlabelled. Parsing: the training data mine templates, the judged
data are parsed with the frozen parse state (as `logwarden evaluate` does).

Splits:
  lab       train on recording A, judge recording B, and the other way round; counts summed.
  2023-01-30  the blocks of bench.eval_anofusion.fold_blocks (one per fault episode, 30-minute
            blocks outside them, alternating between folds A and B); a fold is judged by a model
            trained on the chunks whose whole window lies in the other fold; counts summed.
  days      (--days) train on the whole of 2023-01-29 (nezha_trainticket), judge 2023-01-30,
            and the other way round; reported per direction (the days' fault kinds differ).

Besides the chunk counts, each method's faults detected (models.hades.faults_detected: a flagged
chunk of the fault's entity overlaps it), by fault kind.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

DAY30 = "trainticket_2023-01-30"
DAY29 = "nezha_trainticket"
BASELINE_QUANTILE = 0.995


# --------------------------------------------------------------------------------------------
def read(data: Path, steps: int, core=None):
    from models.chunks import read_observations
    from models.hades import Hades, metric_interval

    options = Hades(steps=steps, step_s=metric_interval(data)).chunk_options()
    return read_observations(data, options, parse_core=core)


def with_steps(obs, steps: int):
    from models.chunks import ChunkOptions

    o = obs.options
    return dataclasses.replace(obs, options=ChunkOptions(step_s=o.step_s, steps=steps, modalities=o.modalities,
                                                         metric_window_s=o.metric_window_s),
                               _log_times={})


def cut(obs, faults, units=None):
    from models.hades import chunk_labels, chunk_units

    units = chunk_units(obs) if units is None else units
    chunks = list(obs.chunks(units))
    return chunks, chunk_labels(chunks, faults)


def confusion_dict(truth, flagged) -> dict:
    from models.metrics import confusion

    return confusion(truth, flagged).as_dict()


def add(a: dict | None, b: dict) -> dict:
    from models.metrics import Confusion

    if a is None:
        return b
    c = Confusion(a["tp"] + b["tp"], a["fp"] + b["fp"], a["tn"] + b["tn"], a["fn"] + b["fn"])
    return c.as_dict()


# --------------------------------------------------------------------------------------------
# baselines
class MetricsZ:
    """Metrics only, unsupervised: per service and channel, median and IQR of the training
    chunks' steps (models.hades' transform: signed log, counters as increases); a chunk's score
    is the largest |z| of its newest step; threshold: the BASELINE_QUANTILE of the training
    chunks not labelled abnormal."""

    def fit(self, hades, chunks, labels):
        self.hades = hades               # borrows the trained model's channels, counters and scales
        scores = self._scores([c for c, y in zip(chunks, labels) if y != 1])
        self.threshold = float(np.quantile(scores, BASELINE_QUANTILE))
        return self

    def _scores(self, chunks):
        # unclipped robust units (the network's inputs are clipped: a threshold among clipped
        # scores equals the clip and flags nothing)
        h = self.hades
        values = h._metric_values(chunks)[:, -1]
        rows = h._rows(chunks)
        z = np.abs((values - h.center[rows]) / h.scale[rows])
        return np.nan_to_num(z, nan=0.0).max(1) if z.shape[1] else np.zeros(len(chunks))

    def flag(self, chunks):
        return list(self._scores(chunks) > self.threshold)


class DeepLogChunks:
    """DeepLog on each chunk's template ids in time order (a window of the stream: start=False,
    complete=False; a position needs h events of history), trained on the training chunks not
    labelled abnormal (non-overlapping ones: the sliding chunks repeat the same events). A chunk
    without logs is not flagged."""

    def __init__(self, epochs: int = 20, h: int = 10):
        self.epochs, self.h = epochs, h

    @staticmethod
    def sequence(chunk, start=False):
        from models.base import Sequence

        return Sequence(keys=[e.template_id for e in chunk.logs], complete=False, start=start)

    def fit(self, chunks, labels, steps):
        from models.deeplog import DeepLog

        train = [self.sequence(c, start=True) for i, (c, y) in enumerate(zip(chunks, labels))
                 if y != 1 and i % steps == 0 and c.logs]
        self.model = DeepLog(h=self.h, epochs=self.epochs, device="cpu", param_min_events=10 ** 9)
        self.model.fit(train)
        return self

    def flag(self, chunks):
        out = [False] * len(chunks)
        judged = [i for i, c in enumerate(chunks) if len(c.logs) > self.h]
        for i, v in zip(judged, self.model.score([self.sequence(chunks[i]) for i in judged])):
            out[i] = v.anomalous
        return out


# --------------------------------------------------------------------------------------------
def run_pair(train_chunks, train_truth, test_chunks, test_truth, fraction, seed, steps, step_s, baselines=True,
             log=print, test_faults=None, **options) -> dict:
    """Hades (semi-supervised at ``fraction``, its single-modality variants, supervised) and the
    baselines, trained on one chunk set, judged on another: confusion dicts by method, and
    (``test_faults`` given) under "faults" each method's faults detected by kind."""
    from models.hades import Hades, choose_labelled, faults_detected

    flags, stats = {}, {}
    labels = choose_labelled(train_truth, fraction, seed)
    semi = Hades(steps=steps, step_s=step_s, seed=seed, **options)
    semi.fit(train_chunks, labels)
    stats["semi"] = semi.training
    for variant in ("both", "logs", "metrics"):
        probabilities = semi._probabilities(semi.nets[variant], variant, test_chunks)[:, 1]
        flags[f"hades_{variant}"] = list(probabilities > 0.5)
    log(f"  hades semi ({fraction:g} labelled, {semi.training['labelled_abnormal']} abnormal of "
        f"{semi.training['labelled']}): {confusion_dict(test_truth, flags['hades_both'])}")
    if baselines:
        sup = Hades(steps=steps, step_s=step_s, seed=seed, variants=("both",), pseudo_epochs=0, **options)
        sup.fit(train_chunks, list(train_truth))
        stats["supervised"] = sup.training
        flags["hades_supervised"] = list(sup._probabilities(sup.nets["both"], "both", test_chunks)[:, 1] > 0.5)
        log(f"  hades supervised: {confusion_dict(test_truth, flags['hades_supervised'])}")
        # what the semi-supervised phase adds: the same labels, no pseudo-labelled phase
        few = Hades(steps=steps, step_s=step_s, seed=seed, variants=("both",), pseudo_epochs=0, **options)
        few.fit(train_chunks, labels)
        flags["hades_labelled_only"] = list(few._probabilities(few.nets["both"], "both", test_chunks)[:, 1] > 0.5)
        log(f"  hades labelled chunks only: {confusion_dict(test_truth, flags['hades_labelled_only'])}")
        flags["metrics_z"] = MetricsZ().fit(semi, train_chunks, labels).flag(test_chunks)
        started = time.time()
        try:
            flags["deeplog"] = DeepLogChunks().fit(train_chunks, labels, steps).flag(test_chunks)
        except ValueError as err:                  # no logs to train on
            log(f"  deeplog: {err}")
        log(f"  deeplog ({time.time() - started:.0f} s): "
            f"{confusion_dict(test_truth, flags['deeplog']) if 'deeplog' in flags else None}")
        flags["logs_present"] = [bool(c.logs) for c in test_chunks]
    out = {method: confusion_dict(test_truth, flagged) for method, flagged in flags.items()}
    if test_faults is not None:
        out["faults"] = {method: faults_detected(test_chunks, flagged, test_faults) for method, flagged in flags.items()}
        out["where"] = where_flagged(test_chunks, flags["hades_both"], test_faults, step_s)
    out["training"] = {k: {"seconds": v["seconds"], "labelled": v["labelled"], "labelled_abnormal": v["labelled_abnormal"],
                           "pseudo": {n: (s["pseudo_labelled"], s["pseudo_abnormal"]) for n, s in v["variants"].items()}}
                       for k, v in stats.items()}
    return out


def where_flagged(chunks, flagged, faults, step_s: float) -> dict[str, list[int]]:
    """Abnormal chunks [flagged, all] by where the fault lies in the window (the newest step
    inside it, the fault over before the newest step, the fault starting in the newest step
    only), by its share of the window (>= or < half) and by fault kind: whether the misses
    are chunks the overlap rule calls abnormal on a sliver of fault, or all of them."""
    from models.faults import by_target

    groups = by_target(faults)
    out: dict[str, list[int]] = {}

    def count(key: str, hit: bool) -> None:
        cell = out.setdefault(key, [0, 0])
        cell[0] += hit
        cell[1] += 1

    for c, flag in zip(chunks, flagged):
        f = next((f for f in groups.get(c.entity, ()) if f.overlaps(c.start, c.end)), None)
        if f is None:
            continue
        newest = c.end - step_s
        if f.overlaps(newest, c.end):
            place = "fault starts in the newest step" if f.start >= newest else "newest step inside the fault"
        else:
            place = "fault over before the newest step"
        cover = (min(c.end, f.end) - max(c.start, f.start)) / (c.end - c.start)
        for key in (place, "fault covers half the window or more" if cover >= 0.5 else "fault covers under half",
                    f"kind {f.kind}"):
            count(key, bool(flag))
    return out


def _add_cells(into: dict, cells: dict) -> None:
    """Adds [hit, of] cells (faults detected by kind, flagged chunks by place) into ``into``."""
    for key, (hit, n) in cells.items():
        was = into.get(key, [0, 0])
        into[key] = [was[0] + hit, was[1] + n]


def summed(results: list[dict]) -> dict:
    total: dict = {}
    for r in results:
        for k, v in r.items():
            if k == "where":
                _add_cells(total.setdefault("where", {}), v)
            elif k == "faults":
                for method, kinds in v.items():
                    _add_cells(total.setdefault("faults", {}).setdefault(method, {}), kinds)
            elif k != "training":
                total[k] = add(total.get(k), v)
    return total


def describe(chunks, truth, steps) -> dict:
    return {"chunks": len(chunks), "abnormal": int(sum(truth)), "entities": len({c.entity for c in chunks}),
            "distinct": len(chunks) // steps, "distinct_abnormal": int(sum(truth)) // steps}


# --------------------------------------------------------------------------------------------
def lab(recordings: list[Path], fraction: float, steps: int, lengths: list[int], seed: int, log=print) -> dict:
    from models.faults import read_faults
    from models.hades import Hades
    from services.cores.parse import ParseCore

    res: dict = {"recordings": [str(p) for p in recordings], "steps": steps, "fraction": fraction}
    pairs = []
    for a, b in ((recordings[0], recordings[1]), (recordings[1], recordings[0])):
        core = ParseCore()
        train_obs = read(a, steps, core)
        test_obs = read(b, steps, ParseCore.from_snapshot(core.snapshot(), frozen=True))
        pairs.append((a, b, train_obs, test_obs, read_faults(a / "fault_list.json"), read_faults(b / "fault_list.json")))
    step_s = pairs[0][2].options.step_s
    res["step_s"] = step_s
    for length in sorted(set(lengths) | {steps}):
        runs = []
        for a, b, train_obs, test_obs, fa, fb in pairs:
            train_chunks, train_truth = cut(with_steps(train_obs, length), fa)
            test_chunks, test_truth = cut(with_steps(test_obs, length), fb)
            log(f"lab T={length}: train {a.name} {describe(train_chunks, train_truth, length)}, "
                f"judge {b.name} {describe(test_chunks, test_truth, length)}")
            res.setdefault(f"T{length}.data", []).append({"train": describe(train_chunks, train_truth, length),
                                                          "judged": describe(test_chunks, test_truth, length)})
            run = run_pair(train_chunks, train_truth, test_chunks, test_truth, fraction, seed, length, step_s,
                           baselines=(length == steps), log=log, test_faults=fb)
            res.setdefault(f"T{length}.training", []).append(run["training"])
            runs.append(run)
        res[f"T{length}"] = summed(runs)
    return res


def trainticket(data: Path, fraction: float, steps: int, seed: int, log=print) -> dict:
    from bench.eval_anofusion import fold_blocks, fold_of
    from models.faults import read_faults
    from models.hades import chunk_units
    from services.cores.parse import ParseCore

    faults = read_faults(data / DAY30 / "fault_list.json")
    started = time.time()
    obs = read(data / DAY30, steps, ParseCore())
    step_s = obs.options.step_s
    units = chunk_units(obs)
    log(f"2023-01-30: read {len(units)} units in {time.time() - started:.0f} s")
    first, last = min(s for _, s in units) * step_s, (max(s for _, s in units) + 1) * step_s
    blocks = fold_blocks(faults, first, last)
    runs, res = [], {"steps": steps, "step_s": step_s, "fraction": fraction}
    for fold in (0, 1):
        judged = [u for u in units if fold_of(u[1], step_s, blocks) == fold]
        train = [u for u in units if all(fold_of(k, step_s, blocks) != fold for k in range(u[1] - steps + 1, u[1] + 1))]
        train_chunks, train_truth = cut(obs, faults, train)
        test_chunks, test_truth = cut(obs, faults, judged)
        name = "fold" + "AB"[fold]
        res[name] = {"train": describe(train_chunks, train_truth, steps), "judged": describe(test_chunks, test_truth, steps)}
        log(f"2023-01-30 {name}: {res[name]}")
        # a fault is counted in the fold its injection falls in (a chunk of the next block can
        # reach back into it)
        mine = [f for f in faults if fold_of(int(f.start // step_s), step_s, blocks) == fold]
        run = run_pair(train_chunks, train_truth, test_chunks, test_truth, fraction, seed, steps, step_s, log=log,
                       test_faults=mine)
        res[name]["training"] = run["training"]
        runs.append(run)
    res["summed"] = summed(runs)
    res["seconds"] = round(time.time() - started)
    return res


def days(data: Path, fraction: float, steps: int, seed: int, log=print) -> dict:
    """Train on one TrainTicket day, judge the other (2023-01-29 -> 2023-01-30 and back): other
    pods (the hash suffixes change, so instances are found by service name), other fault kinds
    (01-29: bad return values, exceptions, CPU contention; 01-30: network delay, CPU contention),
    a model trained on the whole of one day."""
    from models.faults import read_faults
    from services.cores.parse import ParseCore

    started = time.time()
    folders = {"2023-01-29": data / DAY29, "2023-01-30": data / DAY30}
    res: dict = {"steps": steps, "fraction": fraction}
    for train_day, test_day in (("2023-01-29", "2023-01-30"), ("2023-01-30", "2023-01-29")):
        core = ParseCore()
        train_obs = read(folders[train_day], steps, core)
        test_obs = read(folders[test_day], steps, ParseCore.from_snapshot(core.snapshot(), frozen=True))
        test_faults = read_faults(folders[test_day] / "fault_list.json")
        train_chunks, train_truth = cut(train_obs, read_faults(folders[train_day] / "fault_list.json"))
        test_chunks, test_truth = cut(test_obs, test_faults)
        name = f"{train_day}->{test_day}"
        res["step_s"] = train_obs.options.step_s
        res[name] = {"train": describe(train_chunks, train_truth, steps), "judged": describe(test_chunks, test_truth, steps)}
        log(f"{name}: {res[name]}")
        run = run_pair(train_chunks, train_truth, test_chunks, test_truth, fraction, seed, steps, res["step_s"],
                       log=log, test_faults=test_faults)
        res[name].update(run)
    res["seconds"] = round(time.time() - started)
    return res


METHODS = (("deeplog", "DeepLog (logs, unsupervised)"), ("metrics_z", "metrics robust z-score (unsupervised)"),
           ("logs_present", "rule: the chunk holds logs"),
           ("hades_logs", "Hades, logs only (semi-supervised)"), ("hades_metrics", "Hades, metrics only (semi-supervised)"),
           ("hades_labelled_only", "Hades, the labelled chunks only (no pseudo-labels)"),
           ("hades_both", "**Hades (semi-supervised)**"), ("hades_supervised", "Hades (supervised, every label)"))


def table(counts: dict) -> list[str]:
    faults = counts.get("faults", {})
    head = "| method | TP | FP | FN | TN | precision | recall | F1 |" + (" faults detected |" if faults else "")
    out = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if faults else "")]
    for key, label in METHODS:
        if key in counts:
            c = counts[key]
            row = (f"| {label} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} | {c['precision']:.3f} | "
                   f"{c['recall']:.3f} | {c['f1']:.3f} |")
            if faults:
                kinds = faults.get(key, {})
                row += f" {sum(h for h, _ in kinds.values())} of {sum(n for _, n in kinds.values())} |"
            out.append(row)
    if faults:
        kinds = sorted({k for m in faults.values() for k in m})
        out += ["", "Faults detected by kind (a fault is detected when a flagged chunk of its entity overlaps it):", "",
                "| method | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
        for key, label in METHODS:
            if key in faults:
                out.append(f"| {label} | " + " | ".join(
                    "{} of {}".format(*faults[key].get(k, [0, 0])) for k in kinds) + " |")
    where = counts.get("where")
    if where:
        out += ["", "Abnormal chunks semi-supervised Hades flags, by where the fault lies in the window:", "",
                "| abnormal chunks | flagged |", "| --- | ---: |"]
        out += [f"| {key} | {hit} of {n} |" for key, (hit, n) in where.items()]
    return out


def render(results: dict) -> list[str]:
    """The BENCHMARKS.md tables of a results JSON (``--json``)."""
    out = []
    if "lab" in results:
        r = results["lab"]
        T = r["steps"]
        data = r[f"T{T}.data"]
        out += [f"Lab recordings (train on one, judge the other, both directions summed), T={T} steps of "
                f"{r['step_s']:g} s, {r['fraction']:g} of the training chunks labelled. Judged per direction: "
                + "; ".join(f"{d['judged']['chunks']} chunks ({d['judged']['abnormal']} abnormal; "
                            f"{d['judged']['distinct']} non-overlapping, {d['judged']['distinct_abnormal']} abnormal)"
                            for d in data) + ".", ""]
        out += table(r[f"T{T}"]) + [""]
        lengths = sorted(int(k[1:]) for k in r if k.startswith("T") and "." not in k and k[1:].isdigit())
        # Longer chunks overlap more faults, so more of them are abnormal and flagging every chunk
        # scores higher too: each length's F1 stands beside that rule's and the single modalities'.
        out += ["Chunk length (Hades semi-supervised, both directions summed; *flag every chunk*: F1 of calling "
                "every chunk abnormal at that length, 2a / (1 + a) for an abnormal share a):", "",
                "| T (steps) | seconds | abnormal share | precision | recall | F1 | flag every chunk | logs only | metrics only |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for length in lengths:
            run = r[f"T{length}"]
            c = run["hades_both"]
            share = (c["tp"] + c["fn"]) / max(1, c["tp"] + c["fn"] + c["fp"] + c["tn"])
            single = [f"{run[k]['f1']:.3f}" if k in run else "–" for k in ("hades_logs", "hades_metrics")]
            out.append(f"| {length} | {length * r['step_s']:g} | {share:.3f} | {c['precision']:.3f} | {c['recall']:.3f} "
                       f"| {c['f1']:.3f} | {2 * share / (1 + share):.3f} | {single[0]} | {single[1]} |")
        out.append("")
    if "trainticket" in results:
        r = results["trainticket"]
        out += [f"TrainTicket 2023-01-30 (two folds of time blocks, summed), T={r['steps']} steps of {r['step_s']:g} s, "
                f"{r['fraction']:g} labelled. Fold A: train {r['foldA']['train']}, judged {r['foldA']['judged']}; "
                f"fold B: train {r['foldB']['train']}, judged {r['foldB']['judged']}.", ""]
        out += table(r["summed"]) + [""]
    if "days" in results:
        r = results["days"]
        for name, run in r.items():
            if "->" in name:
                out += [f"TrainTicket, trained on {name.split('->')[0]} (the whole day), judged on {name.split('->')[1]}, "
                        f"T={r['steps']} steps of {r['step_s']:g} s, {r['fraction']:g} labelled. Train {run['train']}; "
                        f"judged {run['judged']}.", ""]
                out += table(run) + [""]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_hades", description=__doc__.splitlines()[0])
    p.add_argument("--lab", type=Path, nargs=2, metavar="RECORDING", help="two lab recordings")
    p.add_argument("--data", type=Path, help="../shared/datasets (TrainTicket 2023-01-30)")
    p.add_argument("--days", action="store_true",
                   help="with --data: train on one TrainTicket day, judge the other (instead of 01-30's folds)")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lengths", type=int, nargs="*", default=[3, 12], help="chunk lengths of the sensitivity study (lab)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON", help="print the tables of results files")
    args = p.parse_args(argv)
    if args.render:
        for path in args.render:
            print("\n".join(render(json.loads(path.read_text()))))
        return 0
    from models.base import limit_cpu_threads

    limit_cpu_threads()
    say = lambda m: print(m, file=sys.stderr, flush=True)
    results = {}
    if args.lab:
        results["lab"] = lab(args.lab, args.fraction, args.steps, args.lengths, args.seed, log=say)
        print(f"\nLab, T={args.steps}, {args.fraction:g} labelled (both directions summed):")
        print("\n".join(table(results["lab"][f"T{args.steps}"])))
        for length in sorted(set(args.lengths) | {args.steps}):
            c = results["lab"][f"T{length}"]["hades_both"]
            print(f"T={length}: F1 {c['f1']:.3f} P {c['precision']:.3f} R {c['recall']:.3f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.data and args.days:
        results["days"] = days(args.data, args.fraction, args.steps, args.seed, log=say)
        print("\n".join(render({"days": results["days"]})))
    elif args.data:
        results["trainticket"] = trainticket(args.data, args.fraction, args.steps, args.seed, log=say)
        print(f"\nTrainTicket 2023-01-30, T={args.steps}, {args.fraction:g} labelled (two folds summed):")
        print("\n".join(table(results["trainticket"]["summed"])))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
