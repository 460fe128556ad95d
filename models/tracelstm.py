"""Trace anomaly detection (Nedelkoski, Cardoso, Kao; IEEE CLOUD 2019): structural and response-time
anomalies with a multimodal LSTM.

Spans. Each span becomes a *label* (service + operation, the operation's URL paths normalised as
the paper does: ids, numbers, UUIDs and hex tokens replaced, query strings dropped; plus the OTLP
status where the data has one — TrainTicket's CSVs have none) and a *response time* (its
duration, log-scaled then min-max scaled per label on the training spans; ``rt_scale="linear"``
is the paper's plain min-max). The ``max_labels`` most frequent training labels form the
vocabulary; index 0, ``!0``, is reserved for padding and the trace end (and, as the first input,
for "nothing yet", so the root span is predicted too). A label outside the vocabulary is always a
structural anomaly. Spans are taken in start-time order, except that a span never comes before
its parent: server spans stamped at millisecond resolution, or on a pod whose clock runs a little
behind, otherwise start "before" the client span that called them.

Heads (``head``):
  sad         next-label LSTM (two stacked layers): position i is a structural anomaly when the
              observed label (or the end) is not among the ``top_k`` most probable (the paper's
              rule) or has p < ``min_probability`` (0 turns it off: on TrainTicket a dropped span's
              successor is often ranked 2nd-10th with p ~ 1e-3, which top-k alone lets pass);
  rtad        next response-time regression from the response times alone;
  multimodal  one LSTM layer per modality, concatenated into the second layer, both outputs,
              joint loss cross-entropy + ``rt_loss_weight`` x MSE (the paper's best).
Response-time anomaly (rtad, multimodal): the squared error of the predicted response time lies
above the ``rt_confidence`` interval of a Gaussian fitted, per label, on the errors of validation
normal traces (traces held out of training). With ``alarm_rate`` set (the default, 0.01; None
keeps the paper's interval), the interval is widened (one z for all labels) until at most that
share of the validation traces would be flagged: the paper's 95% interval flags a few percent
of every label's spans, so most traces of 70 spans.

Concurrency (paper, III-D). The model's predicted distributions encode the execution path. After
training, for every position of the distinct training label sequences where two or more labels
are likely next (p >= ``concurrency_min_probability``), each candidate is fed in turn: two
candidates are *concurrent* when either leads to the other (they come in either order) or both
lead to the same next label; a transition is *certain* (the events are dependent) when the
model predicts it with p >= ``certain_probability`` in every training context. Verdicts name the
sibling spans whose labels are concurrent and the spans whose arrival was certain.
Siblings that start together arrive in any order; so that this order never makes a structural
false alarm, a trace with a structural flag is judged again in the order the model prefers for
its concurrent spans: at the earliest position up to the flag where a later span that ran
concurrently with the observed one (it started before that span ended, or within
``concurrency_tolerance_ms`` of its start; its parent already placed) has a label the model
expects more (in the top k, p >= ``concurrency_min_probability``), that span is moved ahead and
the trace judged again (at most ``max_reorders`` moves). Only concurrent spans move and the
labels stay the same, so a structural anomaly remains one: an inserted, dropped or swapped
label is still flagged where it shows.

``score`` is batched on the detector's device; every trace is judged on its own rows, so a verdict
does not depend on what else is in the batch.
"""
from __future__ import annotations

import heapq
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any, Iterable, Sequence as Seq

import numpy as np
import torch
from torch import nn

from models import artifacts
from models.base import Anomaly, Detector, Trace, Verdict, pick_device
from models.deeplog import _deterministic, _progress
from models.faults import read_faults

PAD = "!0"                      # padding, trace end and "nothing before"
UNK = "<unk>"                   # a label outside the vocabulary (never predicted)
PAD_ID, UNK_ID = 0, 1
END = "<end>"                   # what a verdict calls the trace end
WEIGHTS = "weights.safetensors"
HEADS = ("sad", "rtad", "multimodal")
RT_SCALES = ("log", "linear")
MIN_ERROR_STD = 1e-4            # a label whose validation errors never vary still gets a band
ABNORMAL_WINDOW_S = 180.0       # the labelling: a trace is abnormal when it starts in [t, t+180]
NORMAL_MARGIN_S = 300.0         # normal minutes: farther than 5 minutes from any injection
EXCLUDE_AFTER_S = 300.0         # --exclude-faults: drop traces starting within 5 min after an injection


# ----------------------------------------------------------------------------------------------
# labels and order
_SCHEME_HOST = re.compile(r"^[a-z][a-z0-9+.-]*://[^/]*", re.IGNORECASE)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_HEX_ID = re.compile(r"^(?=[0-9a-f]*\d)[0-9a-f]{4,}$", re.IGNORECASE)
_NUMBER = re.compile(r"^[+-]?\d+([.,]\d+)*$")
_VERSION = re.compile(r"^v\d+(\.\d+)*$", re.IGNORECASE)
_TOKEN = re.compile(r"^(?=(?:[^0-9]*[0-9]){3})(?=.*[a-z])[0-9a-z_-]{10,}$", re.IGNORECASE)  # 3+ digits: not "travel2service"


def _path_segment(segment: str) -> str:
    if not segment or _VERSION.match(segment) or (segment.startswith("{") and segment.endswith("}")):
        return segment
    if _UUID.match(segment) or _HEX_ID.match(segment) or _NUMBER.match(segment) or _TOKEN.match(segment):
        return "{id}"
    return segment


def normalise_operation(operation: str) -> str:
    """The paper's URL pattern: 'GET https://1.1.1.11/v2/a16d/servers/detail?x=1' ->
    'GET /v2/{id}/servers/detail'. Words without a '/' are kept as they are."""
    words = []
    for word in operation.split():
        if "/" in word:
            word = _SCHEME_HOST.sub("", word).split("?", 1)[0].split("#", 1)[0]
            word = "/".join(_path_segment(s) for s in word.split("/"))
        words.append(word)
    return " ".join(words)


def span_label(span) -> str:
    label = f"{span.service} {normalise_operation(span.operation)}"
    return label if span.status is None else f"{label} status={span.status}"


def causal_order(trace: Trace) -> list[int]:
    """Indices of ``trace.spans`` by start time, a span never before its parent (spans whose
    parent is not in the trace count as roots; spans caught in a parent cycle come last)."""
    spans = trace.spans
    position = {s.span_id: i for i, s in enumerate(spans)}
    children: dict[int, list[int]] = defaultdict(list)
    ready = []
    for i, s in enumerate(spans):
        parent = position.get(s.parent_id) if s.parent_id is not None else None
        if parent is None or parent == i:
            ready.append(i)
        else:
            children[parent].append(i)
    key = lambda i: (spans[i].start_ns, spans[i].span_id, i)       # noqa: E731
    heap = [key(i) for i in ready]
    heapq.heapify(heap)
    order = []
    while heap:
        i = heapq.heappop(heap)[2]
        order.append(i)
        for c in children.get(i, ()):
            heapq.heappush(heap, key(c))
    if len(order) < len(spans):
        placed = set(order)
        order += sorted((i for i in range(len(spans)) if i not in placed), key=key)
    return order


# ----------------------------------------------------------------------------------------------
# the network
class _Net(nn.Module):
    """Inputs per step: the previous span's label and scaled response time (``!0`` and 0 before
    the first span); outputs per step: next-label logits and the next span's response time."""

    def __init__(self, head: str, vocabulary: int, embedding: int, hidden: int, rt_sees_label: bool):
        super().__init__()
        self.head = head
        self.rt_sees_label = rt_sees_label and head == "multimodal"
        if head != "rtad":
            self.embed = nn.Embedding(vocabulary, embedding)
            self.label_lstm = nn.LSTM(embedding, hidden, batch_first=True)
        if head != "sad":
            self.rt_lstm = nn.LSTM(1, hidden, batch_first=True)
        self.joint = nn.LSTM(hidden * (2 if head == "multimodal" else 1), hidden, batch_first=True)
        if head != "rtad":
            self.label_out = nn.Linear(hidden, vocabulary)
        if head != "sad":
            self.rt_out = nn.Linear(hidden + (embedding if self.rt_sees_label else 0), 1)

    def forward(self, labels: torch.Tensor, rts: torch.Tensor, next_labels: torch.Tensor | None = None):
        """(B, T) ids, (B, T) scaled times -> (B, T, V) logits or None, (B, T) times or None.
        ``next_labels``: the label of the span whose time step t predicts (``rt_sees_label``)."""
        layers = []
        if self.head != "rtad":
            layers.append(self.label_lstm(self.embed(labels))[0])
        if self.head != "sad":
            layers.append(self.rt_lstm(rts.unsqueeze(-1))[0])
        states = self.joint(torch.cat(layers, dim=-1) if len(layers) > 1 else layers[0])[0]
        logits = self.label_out(states) if self.head != "rtad" else None
        rt = None
        if self.head != "sad":
            if self.rt_sees_label:
                states = torch.cat([states, self.embed(next_labels)], dim=-1)
            rt = self.rt_out(states).squeeze(-1)
        return logits, rt

    def step(self, labels: torch.Tensor, rts: torch.Tensor, state: dict | None):
        """One step from the given LSTM states (None: the start): (B, 1) inputs -> (B, 1, V)
        logits or None, and the states after it."""
        state, after, layers = state or {}, {}, []
        if self.head != "rtad":
            out, after["label"] = self.label_lstm(self.embed(labels), state.get("label"))
            layers.append(out)
        if self.head != "sad":
            out, after["rt"] = self.rt_lstm(rts.unsqueeze(-1), state.get("rt"))
            layers.append(out)
        out, after["joint"] = self.joint(torch.cat(layers, dim=-1) if len(layers) > 1 else layers[0], state.get("joint"))
        return (self.label_out(out) if self.head != "rtad" else None), after


@dataclass
class _Encoded:
    """One trace as the network sees it: spans in model order (at most ``max_spans``)."""
    order: list[int]                 # model position -> index in trace.spans
    ids: np.ndarray                  # (n,) vocabulary ids
    labels: list[str]                # (n,) label text (unknown ones too)
    rt: np.ndarray                   # (n,) scaled response times, NaN where the label is unknown
    duration_us: np.ndarray          # (n,) raw durations
    truncated: int                   # spans left out beyond max_spans
    weight: float = 1.0              # training: how many traces of its label sequence it stands for
    ended: bool = True               # the trace's end is judged (not cut: Trace.ended, no truncation)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def judged(self) -> int:
        """Model positions judged: every span, and the end when the trace ended."""
        return len(self.order) + (1 if self.ended else 0)


@dataclass
class _Judged:
    """Per position 0..n (n = the end) of one trace: the model's view of the observed label, and
    per span 0..n-1 its response-time error."""
    p_observed: np.ndarray           # (n+1,)
    rank: np.ndarray                 # (n+1,) labels strictly more probable than the observed one
    top_ids: np.ndarray              # (n+1, K)
    top_p: np.ndarray                # (n+1, K)
    rt_predicted: np.ndarray | None  # (n,)
    rt_error: np.ndarray | None      # (n,)


@dataclass
class _Gaussian:
    mean: float
    std: float
    count: int
    source: str                      # "validation" | "validation+training" | "pooled"


class TraceLSTM(Detector):
    name = "tracelstm"
    modality = "traces"

    OPTIONS = ("head", "top_k", "max_labels", "max_spans", "embedding", "hidden", "epochs", "batch_tokens",
               "lr", "seed", "device", "progress", "rt_scale", "rt_confidence", "alarm_rate", "rt_loss_weight",
               "rt_min_events", "validation", "max_per_sequence", "concurrency_min_probability",
               "certain_probability", "concurrency_tolerance_ms", "reorder", "max_reorders", "score_tokens",
               "rt_sees_label", "min_probability")

    def __init__(self, head: str = "multimodal", top_k: int = 10, max_labels: int = 1024, max_spans: int = 512,
                 embedding: int = 32, hidden: int = 64, epochs: int = 60, batch_tokens: int = 2048,
                 lr: float = 3e-3, seed: int = 1, device: str = "auto", progress: bool = False,
                 rt_scale: str = "log", rt_confidence: float = 0.95, alarm_rate: float | None = 0.01,
                 rt_loss_weight: float = 10.0, rt_min_events: int = 20, validation: float = 0.2,
                 max_per_sequence: int = 50, concurrency_min_probability: float = 0.1,
                 certain_probability: float = 0.99, concurrency_tolerance_ms: float = 1.0,
                 reorder: bool = True, max_reorders: int = 16, score_tokens: int = 32768,
                 rt_sees_label: bool = True, min_probability: float = 0.01):
        self.head, self.top_k, self.max_labels, self.max_spans = head, top_k, max_labels, max_spans
        self.embedding, self.hidden, self.epochs, self.batch_tokens = embedding, hidden, epochs, batch_tokens
        self.lr, self.seed, self.device_setting, self.progress = lr, seed, device, progress
        self.rt_scale, self.rt_confidence, self.alarm_rate = rt_scale, rt_confidence, alarm_rate
        self.rt_loss_weight, self.rt_min_events, self.validation = rt_loss_weight, rt_min_events, validation
        self.max_per_sequence = max_per_sequence
        self.concurrency_min_probability, self.certain_probability = concurrency_min_probability, certain_probability
        self.concurrency_tolerance_ms, self.reorder, self.max_reorders = concurrency_tolerance_ms, reorder, max_reorders
        self.score_tokens, self.rt_sees_label, self.min_probability = score_tokens, rt_sees_label, min_probability
        self._check_options()
        self.device = "cpu"
        self.vocabulary: list[str] = [PAD, UNK]
        self.index: dict[str, int] = {PAD: PAD_ID, UNK: UNK_ID}
        self.rt_low = np.zeros(2, np.float64)          # per label id: transformed min, range
        self.rt_range = np.ones(2, np.float64)
        self.gaussians: dict[int, _Gaussian] = {}      # label id -> squared-error Gaussian
        self.z = NormalDist().inv_cdf((1 + rt_confidence) / 2)
        self.concurrent: dict[tuple[str, str], int] = {}   # label pair (sorted) -> contexts seen
        self.dependent: dict[tuple[str, str], float] = {}  # (previous, next) -> min probability
        self.model: _Net | None = None
        self.training: dict[str, Any] = {}
        self.created: str | None = None

    # ------------------------------------------------------------------------------------------
    # configuration
    def _check_options(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"tracelstm: head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.rt_scale not in RT_SCALES:
            raise ValueError(f"tracelstm: rt_scale must be one of {', '.join(RT_SCALES)}, got {self.rt_scale!r}")
        for name in ("top_k", "max_labels", "max_spans", "embedding", "hidden", "epochs", "batch_tokens",
                     "rt_min_events", "max_per_sequence", "max_reorders", "score_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tracelstm: {name} must be a positive integer, got {value!r}")
        for name in ("rt_confidence", "validation", "concurrency_min_probability", "certain_probability"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"tracelstm: {name} must be in (0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.min_probability < 1:
            raise ValueError(f"tracelstm: min_probability must be in [0, 1), got {self.min_probability!r}")
        if self.alarm_rate is not None and not 0 < self.alarm_rate < 1:
            raise ValueError(f"tracelstm: alarm_rate must be in (0, 1) or None, got {self.alarm_rate!r}")
        if self.lr <= 0 or self.rt_loss_weight < 0 or self.concurrency_tolerance_ms < 0:
            raise ValueError("tracelstm: lr must be positive; rt_loss_weight and concurrency_tolerance_ms >= 0")

    def _apply(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"tracelstm: unknown option(s) {', '.join(unknown)}")
        for name, value in options.items():
            if value is not None:
                setattr(self, "device_setting" if name == "device" else name, value)
        self._check_options()

    def hyperparameters(self) -> dict[str, Any]:
        names = [n for n in self.OPTIONS if n not in ("device", "progress", "seed")]
        return {n: getattr(self, n) for n in names}

    @property
    def judges_structure(self) -> bool:
        return self.head != "rtad"

    @property
    def judges_time(self) -> bool:
        return self.head != "sad"

    # ------------------------------------------------------------------------------------------
    # encoding
    def _transform(self, duration_us: np.ndarray) -> np.ndarray:
        d = np.maximum(duration_us.astype(np.float64), 1.0)
        return np.log(d) if self.rt_scale == "log" else d

    def _untransform(self, value: float) -> float:
        return float(math.exp(min(value, 700.0))) if self.rt_scale == "log" else float(value)

    def _scaled_to_us(self, label_id: int, scaled: float) -> float:
        return self._untransform(self.rt_low[label_id] + scaled * self.rt_range[label_id])

    def _encode(self, trace: Trace) -> _Encoded:
        order = causal_order(trace)
        truncated = max(0, len(order) - self.max_spans)
        order = order[:self.max_spans]
        spans = [trace.spans[i] for i in order]
        labels = [span_label(s) for s in spans]
        ids = np.fromiter((self.index.get(x, UNK_ID) for x in labels), np.int64, len(labels))
        duration = np.fromiter((max(0, s.end_ns - s.start_ns) / 1e3 for s in spans), np.float64, len(spans))
        rt = (self._transform(duration) - self.rt_low[ids]) / self.rt_range[ids]
        rt[ids == UNK_ID] = np.nan
        return _Encoded(order, ids, labels, rt.astype(np.float32), duration, truncated,
                        ended=trace.ended and not truncated)

    @staticmethod
    def _with(enc: _Encoded, moved_from: int, moved_to: int) -> _Encoded:
        """The encoding with the span at position ``moved_from`` moved ahead to ``moved_to``."""
        perm = list(range(len(enc)))
        perm.insert(moved_to, perm.pop(moved_from))
        return _Encoded([enc.order[p] for p in perm], enc.ids[perm], [enc.labels[p] for p in perm],
                        enc.rt[perm], enc.duration_us[perm], enc.truncated, enc.weight, enc.ended)

    def _inputs(self, batch: list[_Encoded]):
        """Padded (B, T+1) inputs and targets; T = the longest trace. Input step 0 is ``!0``."""
        width = max(len(e) for e in batch) + 1
        x_ids = np.zeros((len(batch), width), np.int64)
        x_rt = np.zeros((len(batch), width), np.float32)
        y_ids = np.zeros((len(batch), width), np.int64)
        y_rt = np.zeros((len(batch), width), np.float32)
        for b, e in enumerate(batch):
            n = len(e)
            rt = np.nan_to_num(e.rt, nan=0.0)
            x_ids[b, 1:n + 1] = e.ids
            x_rt[b, 1:n + 1] = np.clip(rt, -1.0, 4.0)     # a huge delay must not saturate the input
            y_ids[b, :n] = e.ids
            y_rt[b, :n] = rt
        as_tensor = lambda a: torch.from_numpy(a).to(self.device)    # noqa: E731
        return as_tensor(x_ids), as_tensor(x_rt), as_tensor(y_ids), as_tensor(y_rt)

    def _batches(self, encoded: list[_Encoded], tokens: int, shuffle: torch.Generator | None = None):
        """Index batches of traces of similar length holding about ``tokens`` steps each."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        batches, current, longest = [], [], 0
        for i in order:
            longest = max(longest, len(encoded[i]) + 1)
            if current and longest * (len(current) + 1) > tokens:
                batches.append(current)
                current, longest = [], len(encoded[i]) + 1
            current.append(i)
        if current:
            batches.append(current)
        if shuffle is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=shuffle).tolist()]
        return batches

    # ------------------------------------------------------------------------------------------
    # training
    def fit(self, sequences: Seq[Trace], labels: Seq[int] | None = None, **options) -> dict:
        """Train on normal traces (label 0, or all when labels is None). ``validation``: normal
        traces for the response-time Gaussians and the concurrency analysis (default: the latest
        ``validation`` share of the training traces, by start time, held out of training).
        Options: any name in ``OPTIONS``."""
        validation_traces = options.pop("validation_traces", None)
        self._apply(options)
        traces = list(sequences)
        if labels is not None:
            if len(labels) != len(traces):
                raise ValueError(f"{len(traces)} traces but {len(labels)} labels")
            traces = [t for t, label in zip(traces, labels) if not label]
        traces = sorted((t for t in traces if t.spans), key=lambda t: (t.start_ns, t.trace_id))
        given = len(traces)
        if validation_traces is None:
            cut = int(round(len(traces) * (1 - self.validation)))
            traces, validation_traces = traces[:cut], traces[cut:]
        validation_traces = [t for t in validation_traces if t.spans]
        if not traces:
            raise ValueError("tracelstm: no normal trace to train on")
        started = time.perf_counter()
        self.device = pick_device(self.device_setting)
        self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        kept, stats = self._learn_vocabulary(traces)
        encoded = [self._encode(t) for t in kept]
        encoded, sequences_stats = self._subsample(encoded)
        with _deterministic(self.device):
            torch.manual_seed(self.seed)
            self.model = _Net(self.head, len(self.vocabulary), self.embedding, self.hidden,
                              self.rt_sees_label).to(self.device)
            loss = self._train(encoded)
            validation_stats = self._fit_thresholds([self._encode(t) for t in validation_traces], encoded)
            self._analyse_concurrency(encoded)
        self.training = {
            "traces_given": given, **stats, **sequences_stats, **validation_stats, "final_loss": loss,
            "labels": len(self.vocabulary) - 2, "seconds": round(time.perf_counter() - started, 2),
            "device": self.device, "seed": self.seed,
            "concurrent_pairs": len(self.concurrent), "certain_transitions": len(self.dependent),
        }
        return dict(self.training)

    def _learn_vocabulary(self, traces: list[Trace]) -> tuple[list[Trace], dict]:
        counts = Counter(span_label(s) for t in traces for s in t.spans)
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:self.max_labels]
        self.vocabulary = [PAD, UNK] + sorted(label for label, _ in top)
        self.index = {label: i for i, label in enumerate(self.vocabulary)}
        kept = [t for t in traces if all(span_label(s) in self.index for s in t.spans)]
        # Response-time scaling per label, from the spans of the traces trained on.
        values: dict[int, list[float]] = defaultdict(list)
        for t in kept:
            for s in t.spans:
                values[self.index[span_label(s)]].append(max(0, s.end_ns - s.start_ns) / 1e3)
        self.rt_low = np.zeros(len(self.vocabulary), np.float64)
        self.rt_range = np.ones(len(self.vocabulary), np.float64)
        for i, v in values.items():
            transformed = self._transform(np.asarray(v))
            lo, hi = float(transformed.min()), float(transformed.max())
            self.rt_low[i], self.rt_range[i] = lo, (hi - lo) if hi > lo else 1.0
        return kept, {"traces": len(traces), "traces_dropped_rare_labels": len(traces) - len(kept),
                      "labels_seen": len(counts), "label_counts": dict(top)}

    def _subsample(self, encoded: list[_Encoded]) -> tuple[list[_Encoded], dict]:
        """At most ``max_per_sequence`` traces of each distinct label sequence (the paper keeps
        1000 traces per length): the most common request shapes are thousands of copies. Each
        kept trace is weighted by how many it stands for, so the label probabilities are those of
        all the traffic (unweighted, a request type with few shapes would look rare)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, e in enumerate(encoded):
            groups[tuple(e.ids.tolist())].append(i)
        rng = np.random.default_rng(self.seed)
        keep = []
        for members in groups.values():
            if len(members) > self.max_per_sequence:
                weight = len(members) / self.max_per_sequence
                members = sorted(rng.choice(members, self.max_per_sequence, replace=False).tolist())
                for i in members:
                    encoded[i].weight = weight
            keep += members
        keep.sort()
        return [encoded[i] for i in keep], {"distinct_label_sequences": len(groups), "traces_trained": len(keep),
                                            "spans_trained": int(sum(len(encoded[i]) for i in keep))}

    def _losses(self, batch: list[_Encoded]):
        x_ids, x_rt, y_ids, y_rt = self._inputs(batch)
        logits, rt = self.model(x_ids, x_rt, y_ids)
        lengths = torch.tensor([len(e) for e in batch], device=self.device)
        steps = torch.arange(x_ids.shape[1], device=self.device).unsqueeze(0)
        # Label targets: every span and the end (not for a truncated or cut trace, whose end is unseen).
        end_seen = torch.tensor([e.ended for e in batch], device=self.device)
        label_mask = (steps < lengths.unsqueeze(1)) | ((steps == lengths.unsqueeze(1)) & end_seen.unsqueeze(1))
        span_mask = steps < lengths.unsqueeze(1)
        weight = torch.tensor([e.weight for e in batch], device=self.device).unsqueeze(1).expand_as(x_rt)
        ce = mse = None
        if logits is not None:
            losses = nn.functional.cross_entropy(logits[label_mask], y_ids[label_mask], reduction="none")
            ce = (losses * weight[label_mask]).sum() / weight[label_mask].sum()
        if rt is not None:
            mse = (((rt - y_rt) ** 2)[span_mask] * weight[span_mask]).sum() / weight[span_mask].sum()
        return ce, mse

    def _train(self, encoded: list[_Encoded]) -> float:
        optimiser = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        self.model.train()
        last = math.nan
        bar = _progress(range(self.epochs), self.progress, desc=f"tracelstm {self.head}", unit="epoch")
        for _ in bar:
            total, batches = 0.0, 0
            for batch in self._batches(encoded, self.batch_tokens, shuffle=generator):
                ce, mse = self._losses([encoded[i] for i in batch])
                loss = (ce if ce is not None else 0.0) + (self.rt_loss_weight * mse if mse is not None else 0.0)
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
                optimiser.step()
                total += float(loss.detach())
                batches += 1
            last = total / max(1, batches)
            bar.set_postfix(loss=f"{last:.4f}")
        self.model.eval()
        return round(last, 6)

    def _fit_thresholds(self, validation: list[_Encoded], trained: list[_Encoded]) -> dict:
        """Per label, the Gaussian of the squared response-time errors on validation traces
        (falling back to validation + training errors, then to all labels pooled, where a label
        has fewer than ``rt_min_events``); with ``alarm_rate``, the z that flags at most that
        share of validation traces."""
        self.gaussians = {}
        self.z = NormalDist().inv_cdf((1 + self.rt_confidence) / 2)
        stats = {"validation_traces": len(validation)}
        if not self.judges_time:
            return stats
        validation = [e for e in validation if not (e.ids == UNK_ID).any()]
        errors = self._errors_by_label(validation)
        pooled = np.concatenate(list(errors.values())) if errors else np.zeros(0)
        if len(pooled) < 2:
            raise ValueError(f"tracelstm: {len(validation)} validation traces give no response-time errors to fit")
        sparse = [i for i in range(2, len(self.vocabulary)) if len(errors.get(i, ())) < self.rt_min_events]
        training_errors = self._errors_by_label([e for e in trained if any(i in sparse for i in e.ids.tolist())]) if sparse else {}
        for i in range(2, len(self.vocabulary)):
            values, source = errors.get(i, np.zeros(0)), "validation"
            if len(values) < self.rt_min_events:
                values, source = np.concatenate([values, training_errors.get(i, np.zeros(0))]), "validation+training"
            if len(values) < self.rt_min_events:
                values, source = pooled, "pooled"
            self.gaussians[i] = _Gaussian(float(values.mean()), max(float(values.std()), MIN_ERROR_STD), len(values), source)
        stats["validation_rt_errors"] = int(len(pooled))
        stats["labels_by_gaussian_source"] = dict(Counter(g.source for g in self.gaussians.values()))
        if self.alarm_rate is not None and validation:
            worst = []
            for e, judged in zip(validation, self._judge(validation)):
                z = [(err - self.gaussians[i].mean) / self.gaussians[i].std
                     for i, err in zip(e.ids.tolist(), judged.rt_error.tolist())]
                worst.append(max(z) if z else -math.inf)
            calibrated = float(np.quantile(np.asarray(worst), 1 - self.alarm_rate, method="higher"))
            self.z = max(self.z, calibrated)
            stats["calibrated_z"] = round(self.z, 4)
        stats["z"] = round(self.z, 4)
        return stats

    def _errors_by_label(self, encoded: list[_Encoded]) -> dict[int, np.ndarray]:
        collected: dict[int, list[np.ndarray]] = defaultdict(list)
        for e, judged in zip(encoded, self._judge(encoded)):
            for i in np.unique(e.ids):
                collected[int(i)].append(judged.rt_error[e.ids == i])
        return {i: np.concatenate(v) for i, v in collected.items()}

    # ------------------------------------------------------------------------------------------
    # concurrency analysis (paper, III-D)
    @torch.no_grad()
    def _analyse_concurrency(self, encoded: list[_Encoded]) -> None:
        self.concurrent, self.dependent = {}, {}
        if not self.judges_structure or not encoded:
            return
        distinct: dict[tuple, _Encoded] = {}
        for e in encoded:
            distinct.setdefault(tuple(e.ids.tolist()), e)
        examples = list(distinct.values())
        judged = self._judge(examples)
        lowest: dict[tuple[str, str], float] = {}
        probes = []                                   # (example index, position, candidate id)
        for x, (e, j) in enumerate(zip(examples, judged)):
            previous = PAD
            for p in range(len(e)):
                edge = (previous, e.labels[p])
                lowest[edge] = min(lowest.get(edge, 1.0), float(j.p_observed[p]))
                previous = e.labels[p]
                # Candidates are events: the end (``!0``) is no event that runs concurrently.
                likely = [int(i) for i, q in zip(j.top_ids[p], j.top_p[p])
                          if q >= self.concurrency_min_probability and i > UNK_ID]
                if len(likely) >= 2:
                    probes += [(x, p, c) for c in likely]
        self.dependent = {edge: round(p, 4) for edge, p in sorted(lowest.items()) if p >= self.certain_probability}
        if not probes:
            return
        # Feed each candidate after the prefix: what does the model expect next?
        after = self._next_after(examples, probes)
        by_context: dict[tuple[int, int], dict[int, dict[int, float]]] = defaultdict(dict)
        for (x, p, c), nxt in zip(probes, after):
            by_context[(x, p)][c] = nxt
        theta = self.concurrency_min_probability
        for options in by_context.values():
            names = sorted(options)
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    x, y = names[a], names[b]
                    # Either order: after x, y is still likely, and after y, x.
                    either_order = options[x].get(y, 0.0) >= theta and options[y].get(x, 0.0) >= theta
                    # The paper's test: both lead to the same next event.
                    top_x, top_y = max(options[x], key=options[x].get), max(options[y], key=options[y].get)
                    converge = top_x == top_y and min(options[x][top_x], options[y][top_y]) >= 0.5
                    if either_order or converge:
                        pair = tuple(sorted((self.vocabulary[x], self.vocabulary[y])))
                        self.concurrent[pair] = self.concurrent.get(pair, 0) + 1

    def _next_after(self, examples: list[_Encoded], probes: list[tuple[int, int, int]]) -> list[dict[int, float]]:
        """For (example, position p, candidate label c): the model's most probable labels after
        the example's first p spans and c. The candidate comes with the response time of its
        span in the trace (the first one from p on with that label), else the middle of its
        label's range. The examples run step by step once; each candidate is one more step
        from the states at p (not a pass over its whole prefix)."""
        out: list[dict[int, float] | None] = [None] * len(probes)
        at: dict[int, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
        for n, (x, p, c) in enumerate(probes):
            at[x][p].append((n, c))
        keep = min(max(self.top_k, 5), len(self.vocabulary) - 1)
        chunk = 32
        wanted = sorted(at, key=lambda x: len(examples[x]))
        for start in range(0, len(wanted), chunk):
            rows = wanted[start:start + chunk]
            x_ids, x_rt, _, _ = self._inputs([examples[x] for x in rows])
            state = None
            for t in range(x_ids.shape[1] - 1):
                _, state = self.model.step(x_ids[:, t:t + 1], x_rt[:, t:t + 1], state)
                todo = [(b, n, c) for b, x in enumerate(rows) for n, c in at[x].get(t, ())]
                if not todo:
                    continue
                select = torch.tensor([b for b, _, _ in todo], device=self.device)
                branch = {k: (h[:, select], c[:, select]) for k, (h, c) in state.items()}
                values = []
                for b, n, c in todo:
                    e = examples[rows[b]]
                    later = np.flatnonzero(e.ids[t:] == c)
                    values.append(float(np.clip(np.nan_to_num(e.rt[t + later[0]]), -1.0, 4.0)) if len(later) else 0.5)
                labels = torch.tensor([[c] for _, _, c in todo], device=self.device)
                rts = torch.tensor([[v] for v in values], dtype=torch.float32, device=self.device)
                logits, _ = self.model.step(labels, rts, branch)
                logits = logits[:, 0].float()
                logits[:, UNK_ID] = -math.inf
                top_p, top_i = torch.softmax(logits, dim=-1).topk(keep, dim=-1)
                for (_, n, _), ps, ids in zip(todo, top_p.tolist(), top_i.tolist()):
                    out[n] = dict(zip(ids, ps))
        return out

    # ------------------------------------------------------------------------------------------
    # scoring
    @torch.no_grad()
    def _judge(self, encoded: list[_Encoded]) -> list[_Judged]:
        """The network's view of every position of every trace, batched by length."""
        out: list[_Judged | None] = [None] * len(encoded)
        if not encoded:
            return []
        self.model.eval()
        keep = min(max(self.top_k, 5), len(self.vocabulary) - 1)
        for batch in self._batches(encoded, self.score_tokens):
            items = [encoded[i] for i in batch]
            x_ids, x_rt, y_ids, y_rt = self._inputs(items)
            logits, rt = self.model(x_ids, x_rt, y_ids)
            if logits is not None:
                logits = logits.float()
                logits[..., UNK_ID] = -math.inf
                logp = torch.log_softmax(logits, dim=-1)
                observed = logp.gather(2, y_ids.unsqueeze(-1)).squeeze(-1)
                rank = (logp > observed.unsqueeze(-1)).sum(-1)
                top_p, top_i = logp.topk(keep, dim=-1)
                p_obs, rank, top_p, top_i = (observed.exp().cpu().numpy(), rank.cpu().numpy(),
                                             top_p.exp().cpu().numpy(), top_i.cpu().numpy())
            if rt is not None:
                rt = rt.float().cpu().numpy()
            for row, (i, e) in enumerate(zip(batch, items)):
                n = len(e)
                if logits is not None:
                    po, rk = p_obs[row, :n + 1].copy(), rank[row, :n + 1].copy()
                    unknown = np.flatnonzero(e.ids == UNK_ID)
                    po[unknown], rk[unknown] = 0.0, len(self.vocabulary)
                    judged = _Judged(po, rk, top_i[row, :n + 1], top_p[row, :n + 1], None, None)
                else:
                    judged = _Judged(np.ones(n + 1), np.zeros(n + 1, np.int64), np.zeros((n + 1, 0), np.int64),
                                     np.zeros((n + 1, 0)), None, None)
                if rt is not None:
                    judged.rt_predicted = rt[row, :n]
                    judged.rt_error = (e.rt.astype(np.float64) - rt[row, :n]) ** 2
                out[i] = judged
        return out

    def _structural_positions(self, e: _Encoded, j: _Judged) -> np.ndarray:
        if not self.judges_structure:
            return np.zeros(0, np.int64)
        last = e.judged
        return np.flatnonzero((j.rank[:last] >= self.top_k) | (j.p_observed[:last] < self.min_probability))

    def _time_positions(self, e: _Encoded, j: _Judged) -> np.ndarray:
        if not self.judges_time or j.rt_error is None:
            return np.zeros(0, np.int64)
        upper = np.array([self._upper(i) for i in e.ids.tolist()])
        return np.flatnonzero(np.nan_to_num(j.rt_error, nan=-1.0) > upper)

    def _upper(self, label_id: int) -> float:
        g = self.gaussians.get(label_id)
        return math.inf if g is None else g.mean + self.z * g.std

    def _concurrent_move(self, trace: Trace, e: _Encoded, j: _Judged, limit: int) -> tuple[int, int] | None:
        """The earliest position p <= ``limit`` where a later span that ran concurrently with the
        span at p has a label the model expects there more than the observed one (in the top k,
        p >= ``concurrency_min_probability``): (that span's position, p); None when there is none."""
        spans = trace.spans
        present = {spans[i].span_id for i in e.order}
        tolerance = self.concurrency_tolerance_ms * 1e6
        for p in np.flatnonzero(j.rank[:min(limit + 1, len(e))] > 0).tolist():
            wanted = {int(i): float(q) for i, q in zip(j.top_ids[p][:self.top_k], j.top_p[p][:self.top_k])
                      if q >= self.concurrency_min_probability and q > j.p_observed[p]}
            if not wanted:
                continue
            here = spans[e.order[p]]
            placed = {spans[i].span_id for i in e.order[:p]}
            best, best_p = None, -1.0
            for q in (p + 1 + np.flatnonzero(np.isin(e.ids[p + 1:], list(wanted)))).tolist():
                other = spans[e.order[q]]
                if other.parent_id in present and other.parent_id not in placed:
                    continue                            # its parent is not placed yet
                together = other.start_ns - here.start_ns <= tolerance or other.start_ns < here.end_ns
                if together and wanted[int(e.ids[q])] > best_p:
                    best, best_p = q, wanted[int(e.ids[q])]
            if best is not None:
                return best, p
        return None

    def score(self, sequences: Seq[Trace]) -> list[Verdict]:
        if self.model is None:
            raise RuntimeError("tracelstm: score() before fit() or load()")
        traces = list(sequences)
        encoded = [self._encode(t) for t in traces]
        judged = self._judge(encoded)
        moves: dict[int, list[tuple[int, int]]] = defaultdict(list)
        pending = list(range(len(traces))) if self.reorder and self.judges_structure else []
        for _ in range(self.max_reorders):
            retry = []
            for n in pending:
                flagged = self._structural_positions(encoded[n], judged[n])
                if not len(flagged):
                    continue
                move = self._concurrent_move(traces[n], encoded[n], judged[n], int(flagged[0]))
                if move is not None:
                    q, position = move
                    moves[n].append((encoded[n].order[q], encoded[n].order[position]))
                    encoded[n] = self._with(encoded[n], q, position)
                    retry.append(n)
            if not retry:
                break
            for n, j in zip(retry, self._judge([encoded[n] for n in retry])):
                judged[n] = j
            pending = retry
        return [self._verdict(traces[n], encoded[n], judged[n], moves.get(n, [])) for n in range(len(traces))]

    # ------------------------------------------------------------------------------------------
    # verdicts
    def _verdict(self, trace: Trace, e: _Encoded, j: _Judged, moves: list[tuple[int, int]]) -> Verdict:
        anomalies = [self._structural(e, j, p) for p in self._structural_positions(e, j).tolist()]
        anomalies += [self._slow(e, j, p) for p in self._time_positions(e, j).tolist()]
        anomalies.sort(key=lambda a: (a.position, a.kind != "structural"))
        judged = j.p_observed[:e.judged]                                 # not the end of a cut trace
        surprise = float((1.0 - judged).max()) if self.judges_structure and len(judged) else 0.0
        tail = 0.0
        if self.judges_time and j.rt_error is not None and len(e):
            tail = max((self._tail(i, err) for i, err in zip(e.ids.tolist(), j.rt_error.tolist())), default=0.0)
        details: dict[str, Any] = {
            "spans": len(trace.spans), "judged": len(e), "truncated": e.truncated,
            "concurrent_siblings": self._concurrent_siblings(trace, e),
            "certain_transitions": self._certain(e, j),
            "reordered": [{"span": a, "judged_before": b} for a, b in moves],
        }
        if anomalies:
            details["first_anomaly"] = anomalies[0].position
            details["diagnosis"] = anomalies[0].details.get("diagnosis")
        return Verdict(anomalous=bool(anomalies), score=max(surprise, tail), anomalies=anomalies, details=details)

    def _tail(self, label_id: int, error: float) -> float:
        g = self.gaussians.get(label_id)
        if g is None or not math.isfinite(error):
            return 0.0
        return NormalDist().cdf((error - g.mean) / g.std)

    def _position(self, e: _Encoded, p: int) -> int:
        """A model position as an index into trace.spans (the end: len(trace.spans))."""
        return e.order[p] if p < len(e) else len(e) + e.truncated

    def _structural(self, e: _Encoded, j: _Judged, p: int) -> Anomaly:
        at_end = p >= len(e)
        observed = END if at_end else e.labels[p]
        expected = [(END if int(i) == PAD_ID else self.vocabulary[int(i)], round(float(q), 6))
                    for i, q in zip(j.top_ids[p][:self.top_k], j.top_p[p][:self.top_k])]
        previous = e.labels[p - 1] if p > 0 else None
        unknown = not at_end and e.ids[p] == UNK_ID
        where = f"after {previous}" if previous else "at the trace start"
        note = " (never seen in training)" if unknown else ""
        return Anomaly(position=self._position(e, p), kind="structural", observed=observed, expected=expected,
                       score=round(1.0 - float(j.p_observed[p]), 6),
                       details={"probability": round(float(j.p_observed[p]), 6), "rank": int(j.rank[p]) + 1,
                                "previous": previous, "unknown": bool(unknown),
                                "diagnosis": f"{where} expected {'|'.join(k for k, _ in expected)}, saw {observed}{note}"})

    def _slow(self, e: _Encoded, j: _Judged, p: int) -> Anomaly:
        label_id = int(e.ids[p])
        g = self.gaussians[label_id]
        predicted = float(j.rt_predicted[p])
        upper = self._upper(label_id)
        band = math.sqrt(max(upper, 0.0))
        low_ms = self._scaled_to_us(label_id, predicted - band) / 1e3
        high_ms = self._scaled_to_us(label_id, predicted + band) / 1e3
        observed_ms = float(e.duration_us[p]) / 1e3
        expected_ms = self._scaled_to_us(label_id, predicted) / 1e3
        error = float(j.rt_error[p])
        return Anomaly(position=self._position(e, p), kind="response_time", observed=e.labels[p],
                       score=round(self._tail(label_id, error), 6),
                       details={"response_time_ms": round(observed_ms, 3), "expected_ms": round(expected_ms, 3),
                                "interval_ms": [round(low_ms, 3), round(high_ms, 3)],
                                "squared_error": round(error, 6),
                                "error_interval": [round(max(0.0, g.mean - self.z * g.std), 6), round(upper, 6)],
                                "diagnosis": f"{e.labels[p]} took {observed_ms:.1f} ms, expected {expected_ms:.1f} ms "
                                             f"(normal {low_ms:.1f}-{high_ms:.1f} ms)"})

    def _concurrent_siblings(self, trace: Trace, e: _Encoded) -> list[list[int]]:
        """Groups of sibling spans (one parent) whose labels the model found concurrent."""
        if not self.concurrent:
            return []
        by_parent: dict[str | None, list[int]] = defaultdict(list)
        for p in range(len(e)):
            by_parent[trace.spans[e.order[p]].parent_id].append(p)
        groups = []
        for members in by_parent.values():
            if len(members) < 2:
                continue
            linked: dict[int, set[int]] = defaultdict(set)
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    x, y = e.labels[members[a]], e.labels[members[b]]
                    if x != y and tuple(sorted((x, y))) in self.concurrent:
                        linked[members[a]].add(members[b])
                        linked[members[b]].add(members[a])
            seen: set[int] = set()
            for start in linked:
                if start in seen:
                    continue
                group, stack = set(), [start]
                while stack:
                    m = stack.pop()
                    if m not in group:
                        group.add(m)
                        stack.extend(linked[m] - group)
                seen |= group
                groups.append(sorted(e.order[m] for m in group))
        return sorted(groups)

    def _certain(self, e: _Encoded, j: _Judged) -> list[list[int]]:
        """Spans (as ranges of trace.spans indices) the model was certain would come next."""
        if not self.judges_structure:
            return []
        indices = sorted(e.order[p] for p in range(len(e)) if j.p_observed[p] >= self.certain_probability)
        ranges: list[list[int]] = []
        for i in indices:
            if ranges and ranges[-1][1] == i - 1:
                ranges[-1][1] = i
            else:
                ranges.append([i, i])
        return ranges

    # ------------------------------------------------------------------------------------------
    # artifacts
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.model is None:
            raise RuntimeError("tracelstm: save() before fit()")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors["rt.low"] = torch.from_numpy(self.rt_low.copy())
        tensors["rt.range"] = torch.from_numpy(self.rt_range.copy())
        save_file(tensors, str(directory / WEIGHTS))
        manifest = artifacts.read_manifest(directory) if (directory / artifacts.MANIFEST).exists() else {}
        manifest.update({
            "detector": self.name, "modality": self.modality, "version": manifest.get("version"),
            "created": self.created, "seed": self.seed, "weights": WEIGHTS,
            "hyperparameters": self.hyperparameters(), "vocabulary": self.vocabulary[2:],
            "special_labels": [PAD, UNK], "z": self.z,
            "thresholds": {self.vocabulary[i]: {"mean": g.mean, "std": g.std, "count": g.count, "source": g.source,
                                                "upper": g.mean + self.z * g.std}
                           for i, g in sorted(self.gaussians.items())},
            "concurrent_labels": [{"labels": list(pair), "contexts": n} for pair, n in sorted(self.concurrent.items())],
            "certain_transitions": [{"after": a, "next": b, "min_probability": p}
                                    for (a, b), p in sorted(self.dependent.items())],
            "training": self.training,
        })
        artifacts.write_manifest(directory, manifest)

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> "TraceLSTM":
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest = artifacts.read_manifest(directory)
        if manifest.get("detector") != cls.name:
            raise ValueError(f"{directory}: a {manifest.get('detector')!r} model, not {cls.name!r}")
        self = cls(**manifest["hyperparameters"], seed=manifest.get("seed", 1), device=device)
        self.device = pick_device(device)
        self.created = manifest.get("created")
        self.vocabulary = [PAD, UNK] + list(manifest["vocabulary"])
        self.index = {label: i for i, label in enumerate(self.vocabulary)}
        tensors = load_file(str(directory / manifest.get("weights", WEIGHTS)))
        self.rt_low, self.rt_range = tensors["rt.low"].numpy().copy(), tensors["rt.range"].numpy().copy()
        self.model = _Net(self.head, len(self.vocabulary), self.embedding, self.hidden, self.rt_sees_label)
        self.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.model.to(self.device).eval()
        self.z = float(manifest["z"])
        self.gaussians = {self.index[label]: _Gaussian(t["mean"], t["std"], t["count"], t["source"])
                          for label, t in manifest.get("thresholds", {}).items()}
        self.concurrent = {tuple(c["labels"]): c["contexts"] for c in manifest.get("concurrent_labels", [])}
        self.dependent = {(c["after"], c["next"]): c["min_probability"] for c in manifest.get("certain_transitions", [])}
        self.training = manifest.get("training", {})
        return self

    # ------------------------------------------------------------------------------------------
    # the CLI (`logwarden train|evaluate --detector tracelstm`)
    @classmethod
    def train_from_args(cls, args, device: str):
        from services.settings import UsageError

        _refuse(args, ("normal", "abnormal", "logs", "labels", "data", "labelled_fraction", "h", "templates"))
        if not getattr(args, "traces", None):
            raise UsageError("train --detector tracelstm needs --traces FILE_OR_DIR ...")
        files, traces = _read(args.traces)
        excluded = 0
        if getattr(args, "exclude_faults", None):
            faults = read_faults(args.exclude_faults)
            kept = [t for t in traces if not any(f.start <= t.start_ns / 1e9 < f.start + EXCLUDE_AFTER_S for f in faults)]
            traces, excluded = kept, len(traces) - len(kept)
        options = {"epochs": args.epochs, "seed": args.seed, "top_k": args.g, "device": device,
                   "progress": not args.no_progress}
        detector = cls()
        try:
            stats = detector.fit(traces, **{k: v for k, v in options.items() if v is not None})
        except ValueError as err:
            raise UsageError(str(err)) from None
        stats["traces_excluded_near_faults"] = excluded
        detector.training["traces_excluded_near_faults"] = excluded
        sources = [{"path": str(f.resolve()), "sha256": artifacts.sha256_file(f), "role": "train"} for f in files]
        return detector, stats, sources

    def evaluate_from_args(self, args) -> dict:
        from models.cli import score_in_chunks
        from services.settings import UsageError

        _refuse(args, ("normal", "abnormal", "logs", "labels", "data", "templates"))
        if not getattr(args, "traces", None) or not getattr(args, "faults", None):
            raise UsageError("evaluate --detector tracelstm needs --traces FILE_OR_DIR ... and --faults FAULTS.json")
        if args.g is not None:
            self.top_k = args.g
        faults = read_faults(args.faults)
        _, traces = _read(args.traces)
        verdicts = score_in_chunks(self, traces)
        return contract(fault_report(traces, verdicts, faults))


def _refuse(args, names: Iterable[str]) -> None:
    from services.settings import UsageError

    for name in names:
        if getattr(args, name, None):
            raise UsageError(f"--{name.replace('_', '-')} does not apply to --detector tracelstm")


def _read(paths) -> tuple[list[Path], list[Trace]]:
    from models.microservices import expand, read_traces
    from services.settings import UsageError

    files = expand(paths, "trace")
    traces = read_traces(files)
    if not traces:
        raise UsageError(f"no spans in {', '.join(map(str, files))}")
    return files, traces


# ----------------------------------------------------------------------------------------------
# evaluation against a fault list (the labelling)
def abnormal(trace: Trace, faults) -> bool:
    """Starts in [inject_time, inject_time + 180 s] and has a span on the injected pod."""
    start = trace.start_ns / 1e9
    return any(f.start <= start <= f.start + ABNORMAL_WINDOW_S and any(s.pod == f.target for s in trace.spans)
               for f in faults)


def normal_minutes(traces: Seq[Trace], faults) -> set[int]:
    """The data's minutes (epoch minute of some trace's start) farther than 5 minutes from any
    injection's window [inject_time, inject_time + 180 s]."""
    minutes = {int(t.start_ns // 60_000_000_000) for t in traces}
    return {m for m in minutes
            if all(m * 60 + 60 <= f.start - NORMAL_MARGIN_S or m * 60 >= f.start + ABNORMAL_WINDOW_S + NORMAL_MARGIN_S
                   for f in faults)}


def fault_report(traces: Seq[Trace], verdicts: Seq[Verdict], faults) -> dict:
    """The evaluation JSON (``contract``) plus per-fault detail and the normal-hour count."""
    from models.metrics import confusion

    truth = [abnormal(t, faults) for t in traces]
    normal = normal_minutes(traces, faults)
    hours = len(normal) / 60
    in_normal = [int(t.start_ns // 60_000_000_000) in normal for t in traces]
    # The faults the data covers: some trace starts in the fault's window (any pod).
    starts = np.sort(np.array([t.start_ns / 1e9 for t in traces]))
    covered = [f for f in faults
               if np.searchsorted(starts, f.start + ABNORMAL_WINDOW_S, "right") > np.searchsorted(starts, f.start, "left")]

    def part(flags: list[bool]) -> dict:
        per_fault = []
        for f in covered:
            window = [(t, flag) for t, flag in zip(traces, flags)
                      if f.start <= t.start_ns / 1e9 <= f.start + ABNORMAL_WINDOW_S and any(s.pod == f.target for s in t.spans)]
            ends = [t.end_ns / 1e9 for t, flag in window if flag]
            per_fault.append({"inject_time": datetime.fromtimestamp(f.start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                              "pod": f.target, "kind": f.kind, "traces": len(window), "flagged": len(ends),
                              "seconds_to_detect": round(min(ends) - f.start, 3) if ends else None})
        seconds = [p["seconds_to_detect"] for p in per_fault if p["seconds_to_detect"] is not None]
        false_alarms = sum(1 for flag, n in zip(flags, in_normal) if flag and n)
        return {"traces": confusion(truth, flags).as_dict(),
                "faults": {"total": len(covered), "detected": len(seconds),
                           "median_seconds_to_detect": round(float(np.median(seconds)), 3) if seconds else None},
                "false_alarms_per_normal_hour": round(false_alarms / hours, 3) if hours else None,
                "false_alarms": false_alarms, "per_fault": per_fault}

    report = part([v.anomalous for v in verdicts])
    report["normal_hours"] = round(hours, 3)
    report["by_kind"] = {kind: part([any(a.kind == kind for a in v.anomalies) for v in verdicts])
                         for kind in ("structural", "response_time")}
    return report


def contract(report: dict) -> dict:
    """The `logwarden evaluate --detector tracelstm` JSON, exactly the issue's keys."""
    def brief(part: dict) -> dict:
        return {"traces": part["traces"], "faults": part["faults"],
                "false_alarms_per_normal_hour": part["false_alarms_per_normal_hour"]}

    return {**brief(report), "by_kind": {k: brief(v) for k, v in report["by_kind"].items()}}
