"""AnoFusion (Zhao, Ma, Zhong, Zhang et al., KDD 2023: "Robust Multimodal Failure Detection for
Microservice Systems"): unsupervised failure detection per service instance from its metrics,
logs and traces together.

The paper's design, as built here. The channels of one instance (each metric; per-step log
counts; per-step trace statistics) are the nodes of a heterogeneous graph whose edges are typed
by the pair of modalities they join (metric-metric, log-log, trace-trace, metric-log,
metric-trace, log-trace) and weighted by how strongly the two channels co-vary in normal data.
A Graph Transformer Network (GTN) learns soft selections of edge types and multiplies two of them
into meta-path adjacencies; a graph attention network (GAT) passes messages between channels
along them at every time step; a GRU carries each channel's state through the window and the
model predicts every channel's value at the newest step. Trained on normal data only, with a
squared-error (Huber) loss; the anomaly score is the prediction error, and the threshold is set
on normal validation data.

Departures, and why:
  * One network for all instances, with per-service normalisation, per-service edge weights and
    per-service error scales, instead of one network per instance: ~45 instances with ~12 h of
    minutes each are too little data for 45 networks, and a model trained on one day must find
    renamed pods (new hash suffixes) on another day by service name.
  * A fixed channel schema: the metric columns, eight trace statistics (span count, errors,
    duration p50/p90/p99, call-gap p50/p90/p99: models.chunks) and four log counts per step
    (lines, WARN/ERROR lines, lines of a template the service never logged in training, distinct
    templates) instead of one node per log template: templates differ per service and per day,
    a fixed schema lets one network serve them all, and unseen templates are what the paper's
    per-template channels catch anyway.
  * Edge weights: |Pearson correlation| of the two channels over the service's normal training
    steps (the paper: normalised mutual information), cheaper and as informative for this use.
  * Masking instead of the paper's interpolation and zero-filling: a channel absent at a step
    is left out of the attention (it sends no message), its GRU state is carried over unchanged
    (GRU-D style), and it is neither a training target nor scored. TrainTicket's logs exist only
    in fault windows, so a model that read absent logs as zeros, or scored "logs present" as
    unusual, would learn presence, not behaviour (tests/test_anofusion.py checks it does not).
  * Each channel is read relative to its own level in the chunk (the median of its history
    steps) and the history is clipped to +-``clip`` robust units: an instance that settles at
    another level (a restart, a load change) stops deviating after half a window, while a
    failure shorter than that neither moves the level nor drags the forecast along (a
    forecaster following a 2 s delay would stop seeing it after one step). Errors are measured
    on the unclipped values. Span and log-line counts are scored upward only: the data sets'
    recorded windows start and stop mid-minute, and a partly observed minute has fewer of them.
  * Host-level metrics (TrainTicket's Node* columns: the node's CPU, memory, network) are left
    out: they move for every pod on a node at once and say nothing about one instance.
  * Score: for each present channel, its error beyond the service's usual error for that
    channel (the ``error_quantile`` of training errors), in units of the channel's normal tail
    (the mean excess over that quantile, as peaks-over-threshold methods fit it), so a channel
    with heavy-tailed normal errors must deviate further; the chunk's score is the largest over
    present channels (the paper: errors normalised by the median and a quartile across
    channels). The verdict names the channels that deviate most, with observed and expected
    values in their own units.
  * Threshold: the ``threshold_quantile`` of the scores of normal validation chunks (every
    fifth 30-step time block of the training data, held out of training), not below
    MIN_THRESHOLD, instead of the paper's choice on labelled test data. The quantile is 0.995,
    not the maximum: the normal data hold unlabelled incidents (pod restarts, a delay injected
    at 11:44 on 2023-01-30 that no fault list names), which a maximum would make the threshold.
  * Training reads at most ``max_train_chunks`` (a seeded sample) so training time stays
    bounded on a small CPU.

Verdicts are per chunk and independent of the batch (no batch statistics; every operation is per
chunk), on CUDA when present.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence as Seq

import numpy as np
import torch
from torch import nn

from models import artifacts
from models.base import Chunk, Detector, Verdict, limit_cpu_threads, pick_device
from models.chunks import (MIN_SAMPLES, MIN_SCALE, POOLED, ChunkOptions, Observations, per_service_robust,
                           read_observations, signed_log)

WEIGHTS = "weights.safetensors"
PARSE_STATE = "parse_state.json"
TRACE_FIELDS = ("spans", "errors", "p50_ms", "p90_ms", "p99_ms", "gap_p50_ms", "gap_p90_ms", "gap_p99_ms")
LOG_CHANNELS = ("lines", "warn_error", "unseen_templates", "templates")
ALERT_LEVELS = frozenset({"WARN", "WARNING", "ERROR", "FATAL", "SEVERE", "CRITICAL"})
MODALITY_INDEX = {"metrics": 0, "logs": 1, "traces": 2}
# The paper's six edge types: one per unordered pair of modalities (metrics, logs, traces).
EDGE_TYPES = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
VARIANTS = {"metrics": ("metrics",), "metrics+traces": ("metrics", "traces"), "all": ("metrics", "traces", "logs")}
# TrainTicket's pod CSVs also carry their node's CPU, memory and network: host-level channels
# that move for every pod on the node at once, so they say nothing about one instance.
HOST_CHANNELS = ("NodeCpuUsageRate(%)", "NodeMemoryUsageRate(%)", "NodeNetworkReceiveBytes")
VALIDATION_QUANTILES = (0.99, 0.995, 0.999, 0.9995, 1.0)
MIN_THRESHOLD = 3.0               # see the threshold in fit(): a floor for small validation sets
# Counts that also fall when a step is only partly observed (the data sets' recorded windows
# start and stop mid-minute): only a rise is scored. A pod that stops serving still shows in its
# workload and network metrics, which are complete.
UPWARD_ONLY = frozenset({"trace:spans", "log:lines", "log:templates"})
VALIDATION_BLOCK = 30             # steps per time block of the training/validation split


# --------------------------------------------------------------------------------------------
# Channels
class Schema:
    """The channels (graph nodes) of one variant and how a chunk becomes their values."""

    def __init__(self, modalities: tuple[str, ...], metric_channels: list[str]):
        self.modalities = modalities
        self.metric_channels = list(metric_channels) if "metrics" in modalities else []
        self.names = ([f"metric:{c}" for c in self.metric_channels]
                      + ([f"trace:{f}" for f in TRACE_FIELDS] if "traces" in modalities else [])
                      + ([f"log:{c}" for c in LOG_CHANNELS] if "logs" in modalities else []))
        prefix = {"metric": "metrics", "trace": "traces", "log": "logs"}
        self.modality_of = np.array([MODALITY_INDEX[prefix[n.split(":", 1)[0]]] for n in self.names], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def values(self, chunk: Chunk, known_templates: set[str] | None) -> tuple[np.ndarray, np.ndarray]:
        """(raw values [steps, channels] float64 with NaN where absent, present mask)."""
        steps = chunk.steps
        out = np.full((steps, len(self.names)), np.nan)
        col = 0
        for channel in self.metric_channels:
            series = chunk.metrics.get(channel) or []
            for i, v in enumerate(series[:steps]):
                if v is not None:
                    out[i, col] = v
            col += 1
        if "traces" in self.modalities:
            for i, stats in enumerate(chunk.traces[:steps]):
                if stats is not None:
                    for j, name in enumerate(TRACE_FIELDS):
                        v = getattr(stats, name)
                        if v is not None:
                            out[i, col + j] = v
            col += len(TRACE_FIELDS)
        if "logs" in self.modalities and chunk.logs:
            per_step: dict[int, list] = defaultdict(list)
            for event in chunk.logs:
                per_step[chunk.step_of(event.timestamp)].append(event)
            for i, events in per_step.items():
                out[i, col] = len(events)
                out[i, col + 1] = sum(1 for e in events if (e.level or "").upper() in ALERT_LEVELS)
                out[i, col + 2] = sum(1 for e in events if known_templates is None or e.template_id not in known_templates)
                out[i, col + 3] = len({e.template_id for e in events})
        return out, ~np.isnan(out)


# --------------------------------------------------------------------------------------------
# The network: GTN (meta-path adjacency) -> GAT per step -> GRU over steps -> next-value head
class _GTN(nn.Module):
    """Soft selections of edge types (and the identity), multiplied into 2-hop meta-paths."""

    def __init__(self, channels: int):
        super().__init__()
        self.first = nn.Parameter(torch.zeros(channels, len(EDGE_TYPES) + 1))
        self.second = nn.Parameter(torch.zeros(channels, len(EDGE_TYPES) + 1))

    def forward(self, typed: torch.Tensor) -> torch.Tensor:          # (S, 7, N, N) -> (S, C, N, N)
        a = torch.einsum("ck,sknm->scnm", torch.softmax(self.first, -1), typed)
        b = torch.einsum("ck,sknm->scnm", torch.softmax(self.second, -1), typed)
        meta = a @ b
        return meta / meta.sum(-1, keepdim=True).clamp_min(1e-9)


class _Net(nn.Module):
    def __init__(self, nodes: int, modality_of: np.ndarray, hidden: int, gtn_channels: int):
        super().__init__()
        self.hidden = hidden
        self.node = nn.Embedding(nodes, hidden)
        self.register_buffer("modality_of", torch.as_tensor(modality_of, dtype=torch.long), persistent=False)
        self.modality = nn.Embedding(len(MODALITY_INDEX), hidden)
        self.value = nn.Linear(2, hidden)          # (value - level, level - service center)
        self.gtn = _GTN(gtn_channels)
        self.query = nn.Linear(hidden, hidden * gtn_channels)
        self.key = nn.Linear(hidden, hidden * gtn_channels)
        self.message = nn.Linear(hidden, hidden * gtn_channels)
        self.mix = nn.Parameter(torch.zeros(gtn_channels))
        self.norm = nn.LayerNorm(hidden)
        self.gru = nn.GRUCell(hidden, hidden)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, level: torch.Tensor, present: torch.Tensor, adjacency: torch.Tensor,
                service: torch.Tensor) -> torch.Tensor:
        """x, present: (B, T, N) history relative to each channel's level in the chunk (clipped,
        0 where absent); level: (B, N) that level relative to the service's center (clipped);
        adjacency: (S, 7, N, N) typed edge weights per service; service: (B,) index into it.
        Returns the predicted value (relative to the level) of every node at the step after the
        history: (B, N)."""
        B, T, N = x.shape
        C, H = self.gtn.first.shape[0], self.hidden
        log_meta = torch.log(self.gtn(adjacency) + 1e-6)[service]               # (B, C, N, N)
        identity = self.node.weight + self.modality(self.modality_of)          # (N, H)
        state = x.new_zeros(B * N, H)
        for t in range(T):
            seen = present[:, t]                                               # (B, N)
            h = self.value(torch.stack([x[:, t], level], -1)) + identity        # (B, N, H)
            q = self.query(h).view(B, N, C, H).transpose(1, 2)                  # (B, C, N, H)
            k = self.key(h).view(B, N, C, H).transpose(1, 2)
            v = self.message(h).view(B, N, C, H).transpose(1, 2)
            logits = q @ k.transpose(-1, -2) / math.sqrt(H) + log_meta          # (B, C, N, N)
            logits = logits.masked_fill(~seen[:, None, None, :], float("-inf"))
            weights = torch.softmax(logits, -1).nan_to_num(0.0)                 # no present sender: 0
            messages = (weights @ v)                                           # (B, C, N, H)
            mixed = (torch.softmax(self.mix, 0)[None, :, None, None] * messages).sum(1)
            inputs = self.norm(h + mixed).reshape(B * N, H)
            updated = self.gru(inputs, state)
            keep = seen.reshape(B * N, 1)
            state = torch.where(keep, updated, state)                          # absent: carried over
        features = torch.cat([state.view(B, N, H), identity.expand(B, N, H)], -1)
        return self.head(features).squeeze(-1)


# --------------------------------------------------------------------------------------------
class _Variant:
    """One member of the model family: a channel schema, per-service statistics, a network.
    Row s of every table is ``services[s]``; row 0 is POOLED, for services training never saw."""
    TABLES = ("center", "scale", "error_scale", "tail", "adjacency")

    def __init__(self, name: str, schema: Schema, hidden: int, gtn_channels: int):
        self.name = name
        self.schema = schema
        self.net = _Net(len(schema), schema.modality_of, hidden, gtn_channels)
        self.services: list[str] = [POOLED]
        self.center = np.zeros((1, len(schema)))      # per service and channel (transformed units)
        self.scale = np.ones((1, len(schema)))
        self.error_scale = np.ones((1, len(schema)))  # |prediction error| scale (robust units)
        self.tail = np.ones((1, len(schema)))         # per channel: mean excess of scaled errors over 1
        self.adjacency = np.zeros((1, len(EDGE_TYPES) + 1, len(schema), len(schema)))
        self.threshold = float("inf")
        self.training: dict[str, Any] = {}

    def rows(self, chunks: Seq[Chunk]) -> np.ndarray:
        index = {s: i for i, s in enumerate(self.services)}
        return np.array([index.get(c.service or "", 0) for c in chunks], dtype=np.int64)


class AnoFusion(Detector):
    name = "anofusion"
    modality = "chunks"

    OPTIONS = ("steps", "step_s", "hidden", "gtn_channels", "epochs", "batch_size", "lr", "clip",
               "validation_fraction", "threshold_quantile", "error_quantile", "seed", "device",
               "progress", "score_batch", "variants", "top_channels", "max_train_chunks", "drop_channels")

    def __init__(self, steps: int = 10, step_s: float = 60.0, hidden: int = 16, gtn_channels: int = 2,
                 epochs: int = 5, batch_size: int = 512, lr: float = 5e-3, clip: float = 5.0,
                 validation_fraction: float = 0.2, threshold_quantile: float = 0.995,
                 error_quantile: float = 0.99, seed: int = 1, device: str = "auto", progress: bool = False,
                 score_batch: int = 1024, variants: tuple[str, ...] = tuple(VARIANTS), top_channels: int = 3,
                 max_train_chunks: int = 6000, drop_channels: tuple[str, ...] = HOST_CHANNELS):
        self.steps, self.step_s, self.hidden, self.gtn_channels = steps, step_s, hidden, gtn_channels
        self.epochs, self.batch_size, self.lr, self.clip = epochs, batch_size, lr, clip
        self.validation_fraction, self.threshold_quantile = validation_fraction, threshold_quantile
        self.error_quantile, self.seed, self.device_setting = error_quantile, seed, device
        self.progress, self.score_batch, self.top_channels = progress, score_batch, top_channels
        self.variant_names = tuple(variants)
        self.max_train_chunks, self.drop_channels = max_train_chunks, tuple(drop_channels)
        self._check_options()
        self.device = "cpu"
        self.variants: dict[str, _Variant] = {}
        self.templates: dict[str, set[str]] = {}      # service -> template ids it logged in training
        self.parse_state: bytes | None = None         # the parse core's state the templates come from
        self.training: dict[str, Any] = {}
        self.created: str | None = None

    # ---------------------------------------------------------------------------------------
    def _check_options(self) -> None:
        for name in ("steps", "hidden", "gtn_channels", "epochs", "batch_size", "score_batch", "top_channels",
                     "max_train_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"anofusion: {name} must be a positive integer, got {value!r}")
        if self.steps < 2:
            raise ValueError("anofusion: steps must be at least 2 (history and the judged step)")
        for name in ("validation_fraction", "threshold_quantile", "error_quantile"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"anofusion: {name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.lr <= 0 or self.clip <= 0 or self.step_s <= 0:
            raise ValueError("anofusion: lr, clip and step_s must be positive")
        unknown = [v for v in self.variant_names if v not in VARIANTS]
        if unknown or "all" not in self.variant_names:
            raise ValueError(f"anofusion: variants must include 'all' and be among {', '.join(VARIANTS)}")

    def _apply(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"anofusion: unknown option(s) {', '.join(unknown)}")
        for name, value in options.items():
            if value is not None:
                setattr(self, {"device": "device_setting", "variants": "variant_names"}.get(name, name),
                        tuple(value) if name in ("variants", "drop_channels") else value)
        self._check_options()

    def chunk_options(self) -> ChunkOptions:
        return ChunkOptions(step_s=self.step_s, steps=self.steps)

    def hyperparameters(self) -> dict[str, Any]:
        return {"steps": self.steps, "step_s": self.step_s, "hidden": self.hidden,
                "gtn_channels": self.gtn_channels, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "clip": self.clip, "validation_fraction": self.validation_fraction,
                "threshold_quantile": self.threshold_quantile, "error_quantile": self.error_quantile,
                "variants": list(self.variant_names), "top_channels": self.top_channels,
                "max_train_chunks": self.max_train_chunks, "drop_channels": list(self.drop_channels)}

    # ---------------------------------------------------------------------------------------
    # features
    def _raw(self, variant: _Variant, chunks: Seq[Chunk]) -> tuple[np.ndarray, np.ndarray]:
        """Transformed values (B, T, N) with NaN where absent, and the present mask."""
        T, N = self.steps, len(variant.schema)
        values = np.full((len(chunks), T, N), np.nan)
        for b, chunk in enumerate(chunks):
            if chunk.steps != T:
                raise ValueError(f"anofusion: chunk of {chunk.entity} has {chunk.steps} steps; the model judges {T}")
            raw, _ = variant.schema.values(chunk, self.templates.get(chunk.service or "", set()))
            values[b] = raw
        values = signed_log(values)
        return values, ~np.isnan(values)

    def _tensors(self, variant: _Variant, chunks: Seq[Chunk]):
        """z (B, T, N): robust units relative to each channel's level in the chunk (the median of
        its history steps; the service's center where the history holds none), NaN where absent;
        the present mask; the clipped history and level the network reads; each chunk's service
        row. Relative to its own recent level, an instance that settles at another level (a
        restart, a load change) stops deviating after half a window, while a failure shorter than
        that does not move the level."""
        values, present = self._raw(variant, chunks)
        rows = variant.rows(chunks)
        z = (values - variant.center[rows][:, None, :]) / variant.scale[rows][:, None, :]
        with warnings.catch_warnings():                 # a channel absent all through: NaN, said once
            warnings.simplefilter("ignore", RuntimeWarning)
            level = np.nanmedian(np.where(present[:, :-1], z[:, :-1], np.nan), axis=1) \
                if z.shape[1] > 1 else np.full(z[:, 0].shape, np.nan)
        level = np.nan_to_num(level, nan=0.0)
        z = z - level[:, None, :]
        history = np.nan_to_num(np.clip(z[:, :-1], -self.clip, self.clip), nan=0.0)
        return z, present, history, level, rows

    # ---------------------------------------------------------------------------------------
    # training
    def fit(self, chunks: Seq[Chunk], labels: Seq[int] | None = None, **options) -> dict:
        """Train every variant on ``chunks`` (normal behaviour; chunks labelled 1 are left out).
        The last ``validation_fraction`` of each entity's chunks in time (a held-out block)
        sets the error scales and the threshold."""
        self._apply(options)
        self.device = pick_device(self.device_setting)
        if self.device == "cpu":
            limit_cpu_threads()
        chunks = [c for i, c in enumerate(chunks) if not (labels is not None and labels[i])]
        if len(chunks) < 10:
            raise ValueError(f"anofusion: {len(chunks)} training chunks; at least 10 are needed")
        started = time.time()
        self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.templates = defaultdict(set)
        for chunk in chunks:
            self.templates[chunk.service or ""].update(e.template_id for e in chunk.logs)
        self.templates = dict(self.templates)
        train, validation = self._split(chunks)
        if len(train) > self.max_train_chunks:          # a seeded sample bounds the training time
            keep = np.sort(np.random.default_rng(self.seed).choice(len(train), self.max_train_chunks, replace=False))
            train = [train[i] for i in keep]
        metric_channels = sorted({c for chunk in chunks for c in chunk.metrics} - set(self.drop_channels))
        self.variants = {}
        for name in self.variant_names:
            torch.manual_seed(self.seed)                   # the same weights whatever ran before
            variant = _Variant(name, Schema(VARIANTS[name], metric_channels), self.hidden, self.gtn_channels)
            self._fit_variant(variant, train, validation)
            self.variants[name] = variant
        self.training = {"chunks": len(chunks), "train_chunks": len(train), "validation_chunks": len(validation),
                         "services": sorted({c.service or "" for c in chunks}),
                         "seconds": round(time.time() - started, 1), "device": self.device,
                         "variants": {n: v.training for n, v in self.variants.items()}}
        return self.training

    def _period(self) -> int:
        return max(2, round(1 / self.validation_fraction))

    def _split(self, chunks: list[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
        """Time blocks of VALIDATION_BLOCK steps, every n-th one held out (n = 1 / fraction):
        validation spreads over the whole period (load changes during a day), and its judged
        steps are never training targets."""
        period = self._period()
        train, validation = [], []
        for chunk in chunks:
            block = (round(chunk.end / chunk.step_s) - 1) // VALIDATION_BLOCK
            (validation if block % period == period - 1 else train).append(chunk)
        if not validation or not train:
            raise ValueError(f"anofusion: {len(train)} training and {len(validation)} validation chunks; "
                             f"the data must span more than {period} blocks of {VALIDATION_BLOCK} steps")
        return train, validation

    def _statistics(self, variant: _Variant, chunks: list[Chunk]) -> None:
        """Per service: robust center and scale of every channel, and the typed edge weights."""
        values, _ = self._raw(variant, chunks)
        newest = values[:, -1]                     # each step once: the judged step of its chunk
        variant.services, variant.center, variant.scale = per_service_robust(newest, (c.service or "" for c in chunks))
        rows = variant.rows(chunks)
        z = (newest - variant.center[rows]) / variant.scale[rows]
        variant.adjacency = np.stack([_typed_adjacency(z if i == 0 else z[rows == i], variant.schema.modality_of)
                                      for i in range(len(variant.services))])

    def _fit_variant(self, variant: _Variant, train: list[Chunk], validation: list[Chunk]) -> None:
        started = time.time()
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self._statistics(variant, train)
        z, present, history, level, rows = self._tensors(variant, train)
        level = np.clip(level, -self.clip, self.clip)
        target = np.nan_to_num(np.clip(z[:, -1], -4 * self.clip, 4 * self.clip), nan=0.0)
        device = self.device
        tensors = [torch.as_tensor(a, dtype=torch.float32) for a in (history, level, target)]
        masks = [torch.as_tensor(present[:, :-1]), torch.as_tensor(present[:, -1])]
        services = torch.as_tensor(rows)
        adjacency = torch.as_tensor(variant.adjacency, dtype=torch.float32, device=device)
        net = variant.net.to(device)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.lr)
        loss_fn = nn.HuberLoss(reduction="none", delta=1.0)
        losses = []
        net.train()
        for epoch in range(self.epochs):
            order = rng.permutation(len(train))
            total, count = 0.0, 0
            for i in range(0, len(order), self.batch_size):
                idx = torch.as_tensor(order[i:i + self.batch_size])
                x, lv, y = (t[idx].to(device) for t in tensors)
                seen, judged = (m[idx].to(device) for m in masks)
                if not judged.any():
                    continue
                predicted = net(x, lv, seen, adjacency, services[idx].to(device))
                loss = (loss_fn(predicted, y) * judged).sum() / judged.sum()
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                optimiser.step()
                total += float(loss.detach()) * int(judged.sum())
                count += int(judged.sum())
            losses.append(round(total / max(count, 1), 5))
            if self.progress:
                print(f"anofusion {variant.name}: epoch {epoch + 1}/{self.epochs} loss {losses[-1]}",
                      file=sys.stderr, flush=True)
        net.eval()
        # Error scales per service and channel, and each channel's tail, from the training
        # chunks (a few hundred per service: the held-out blocks hold too few for a tail
        # quantile); the threshold from the held-out blocks, which training never fitted.
        errors, judged, _ = self._errors(variant, train)
        rows = variant.rows(train)
        pooled = _error_scale(errors, judged, self.error_quantile)
        scales = [pooled]
        for i in range(1, len(variant.services)):
            scale = _error_scale(errors[rows == i], judged[rows == i], self.error_quantile)
            few = judged[rows == i].sum(0) < MIN_SAMPLES
            scale[few] = pooled[few]
            scales.append(scale)
        variant.error_scale = np.stack(scales)
        variant.tail = _tails(np.where(judged, errors / variant.error_scale[rows], np.nan))[None, :]
        errors, judged, _ = self._errors(variant, validation)
        scores = self._scores(variant, validation, errors, judged)[0]
        # the floor: MIN_THRESHOLD tail means beyond a channel's usual error (an exponential tail
        # puts that at 1e-2 * e^-3 ~ 5e-4 per channel), so a small validation set cannot put
        # the threshold inside the normal range
        variant.threshold = _threshold_at(scores, self.threshold_quantile)
        variant.training = {"losses": losses, "seconds": round(time.time() - started, 1),
                            "channels": len(variant.schema), "validation_score_max": round(float(scores.max()), 3),
                            "threshold": round(variant.threshold, 4),
                            # the thresholds other quantiles would set (the evaluation shows what they trade)
                            "thresholds_by_quantile": {str(q): _threshold_at(scores, q) for q in VALIDATION_QUANTILES}}

    # ---------------------------------------------------------------------------------------
    # scoring
    @torch.no_grad()
    def _errors(self, variant: _Variant, chunks: Seq[Chunk]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The error of every channel at the judged step (robust units; one-sided channels
        count only when above the prediction), which channels are present there, and the
        prediction (robust units from the service's center)."""
        N = len(variant.schema)
        errors, predicted = np.zeros((len(chunks), N)), np.zeros((len(chunks), N))
        judged = np.zeros((len(chunks), N), dtype=bool)
        net = variant.net.to(self.device).eval()
        adjacency = torch.as_tensor(variant.adjacency, dtype=torch.float32, device=self.device)
        upward = np.array([n in UPWARD_ONLY for n in variant.schema.names])
        for i in range(0, len(chunks), self.score_batch):
            part = chunks[i:i + self.score_batch]
            z, present, history, level, rows = self._tensors(variant, part)
            guess = net(torch.as_tensor(history, dtype=torch.float32, device=self.device),
                        torch.as_tensor(np.clip(level, -self.clip, self.clip), dtype=torch.float32, device=self.device),
                        torch.as_tensor(present[:, :-1], device=self.device), adjacency,
                        torch.as_tensor(rows, device=self.device)).cpu().numpy()
            residual = np.nan_to_num(z[:, -1] - guess, nan=0.0)
            errors[i:i + len(part)] = np.where(upward, np.maximum(residual, 0.0), np.abs(residual))
            predicted[i:i + len(part)] = guess + level
            judged[i:i + len(part)] = present[:, -1]
        return errors, judged, predicted

    def _scores(self, variant: _Variant, chunks: Seq[Chunk], errors: np.ndarray, judged: np.ndarray):
        """Per channel: the error beyond its usual size (its service's ``error_quantile`` on
        normal validation chunks), in units of the channel's normal tail (the mean excess over
        that size): a channel whose normal errors are heavy-tailed must deviate further. The
        score is the largest over present channels."""
        scaled = errors / variant.error_scale[variant.rows(chunks)]
        deviation = np.where(judged, np.maximum(scaled - 1.0, 0.0) / variant.tail[0], 0.0)
        return (deviation.max(1) if len(chunks) else np.zeros(0)), deviation

    def score(self, chunks: Seq[Chunk], variant: str = "all") -> list[Verdict]:
        """Batched verdicts, one per chunk; the judged step is each chunk's newest."""
        if not self.variants:
            raise RuntimeError("anofusion: score() before fit() or load()")
        v = self.variants[variant]
        chunks = list(chunks)
        if not chunks:
            return []
        errors, judged, predicted = self._errors(v, chunks)
        scores, deviation = self._scores(v, chunks, errors, judged)
        rows = v.rows(chunks)
        # the expected value in the channel's own units: undo the robust scaling and the log
        expected = _signed_exp(predicted * v.scale[rows] + v.center[rows])
        verdicts = []
        for b, chunk in enumerate(chunks):
            order = np.argsort(-deviation[b], kind="stable")[:self.top_channels]
            observed, _ = v.schema.values(_newest_step(chunk), self.templates.get(chunk.service or "", set()))
            channels = [{"channel": v.schema.names[j], "deviation": round(float(deviation[b, j]), 2),
                         "observed": _rounded(observed[0, j]), "expected": _rounded(expected[b, j])}
                        for j in order if judged[b, j] and deviation[b, j] > 0]
            verdicts.append(Verdict(anomalous=bool(scores[b] > v.threshold), score=float(scores[b]),
                                    details={"entity": chunk.entity, "service": chunk.service,
                                             "step_start": chunk.end - chunk.step_s, "channels": channels,
                                             "threshold": v.threshold, "variant": variant,
                                             "known_service": bool(rows[b] != 0)}))
        return verdicts

    # ---------------------------------------------------------------------------------------
    # artifacts
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if not self.variants:
            raise RuntimeError("anofusion: save() before fit()")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        variants: dict[str, Any] = {}
        for name, v in self.variants.items():
            for k, t in v.net.state_dict().items():
                tensors[f"{name}.net.{k}"] = t.detach().cpu().contiguous()
            for table in v.TABLES:
                tensors[f"{name}.{table}"] = torch.as_tensor(getattr(v, table), dtype=torch.float64).contiguous()
            variants[name] = {"modalities": list(v.schema.modalities), "channels": v.schema.names,
                              "metric_channels": v.schema.metric_channels, "services": v.services,
                              "threshold": v.threshold, "training": v.training}
        save_file(tensors, str(directory / WEIGHTS))
        if self.parse_state is not None:
            (directory / PARSE_STATE).write_bytes(self.parse_state)
        manifest = artifacts.read_manifest(directory) if (directory / artifacts.MANIFEST).exists() else {}
        manifest.update({
            "detector": self.name, "modality": self.modality, "version": manifest.get("version"),
            "created": self.created, "seed": self.seed, "weights": WEIGHTS,
            "parse_state": PARSE_STATE if self.parse_state is not None else None,
            "hyperparameters": self.hyperparameters(), "chunk_options": self.chunk_options().as_dict(),
            "variants": variants, "templates": {s: sorted(t) for s, t in sorted(self.templates.items())},
            "training": self.training,
        })
        artifacts.write_manifest(directory, manifest)

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> "AnoFusion":
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest = artifacts.manifest_of(directory, cls.name)
        detector = cls(**manifest["hyperparameters"], device=device)
        detector.device = pick_device(device)
        tensors = load_file(str(directory / WEIGHTS))
        for name, doc in manifest["variants"].items():
            schema = Schema(tuple(doc["modalities"]), doc["metric_channels"])
            if schema.names != doc["channels"]:
                raise ValueError(f"{directory}: variant {name} channels do not match its schema")
            v = _Variant(name, schema, detector.hidden, detector.gtn_channels)
            prefix = f"{name}.net."
            v.net.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
            v.net.to(detector.device).eval()
            v.services = list(doc["services"])
            for table in v.TABLES:
                setattr(v, table, tensors[f"{name}.{table}"].numpy())
            v.threshold, v.training = float(doc["threshold"]), doc.get("training", {})
            detector.variants[name] = v
        detector.templates = {s: set(t) for s, t in manifest.get("templates", {}).items()}
        if manifest.get("parse_state"):
            detector.parse_state = (directory / manifest["parse_state"]).read_bytes()
        detector.training, detector.created = manifest.get("training", {}), manifest.get("created")
        return detector

    def parse_core(self):
        """A frozen parse core with the training data's templates: a line of a template the model
        knows gets its id, any other line "unknown" (an unseen template)."""
        from services.cores.parse import ParseCore

        if self.parse_state is None:
            return ParseCore(frozen=True)
        return ParseCore.from_snapshot(self.parse_state, frozen=True)

    # ---------------------------------------------------------------------------------------
    # the CLI: logwarden train|evaluate --detector anofusion --data DIR ...
    @classmethod
    def train_from_args(cls, args, device: str):
        from services.cores.parse import ParseCore
        from services.settings import UsageError

        if not getattr(args, "data", None):
            raise UsageError("train --detector anofusion needs --data DIR (metric/, trace/, log/ below it)")
        detector = cls(seed=args.seed if args.seed is not None else 1, device=device,
                       progress=not getattr(args, "no_progress", False))
        if getattr(args, "epochs", None):
            detector.epochs = args.epochs
        if getattr(args, "h", None):
            detector.steps = args.h + 1
        detector._check_options()
        core = ParseCore()
        obs = read_observations(args.data, detector.chunk_options(), parse_core=core)
        faults = _faults(args.exclude_faults) if getattr(args, "exclude_faults", None) else []
        units = [u for u in obs.units() if not _near_fault(u, faults, obs.options)]
        if not units:
            raise UsageError(f"{args.data}: no (pod, minute) with data to train on")
        detector.parse_state = core.snapshot()
        try:
            stats = detector.fit(list(obs.chunks(units)))
        except ValueError as err:
            raise UsageError(str(err)) from None
        sources = [{"path": str(Path(args.data).resolve()), "role": "normal", "units": len(units),
                    "excluded_faults": str(Path(args.exclude_faults).resolve()) if faults else None,
                    "skipped_log_lines": obs.skipped_log_lines}]
        return detector, stats, sources

    def evaluate_from_args(self, args) -> dict:
        from services.settings import UsageError

        if not getattr(args, "data", None) or not getattr(args, "faults", None):
            raise UsageError("evaluate --detector anofusion needs --data DIR and --faults FAULTS.json")
        faults = _faults(args.faults)
        obs = read_observations(args.data, self.chunk_options(), parse_core=self.parse_core())
        return evaluate(self, obs, faults)


# --------------------------------------------------------------------------------------------
# evaluation: (pod, minute) units
def unit_labels(units: list[tuple[str, int]], faults, step_s: float) -> list[int]:
    """1 where the pod is a fault's target and the step starts within its window."""
    from models.faults import by_target

    groups = by_target(faults)
    return [int(any(f.covers(step * step_s) for f in groups.get(pod, ()))) for pod, step in units]


def fault_outcomes(units: list[tuple[str, int]], flagged: list[bool], faults, step_s: float) -> dict:
    """Faults with at least one judged unit (``total``) and those with one flagged (``detected``)."""
    from models.faults import faults_judged_and_hit

    judged, hit = faults_judged_and_hit(units, flagged, list(faults), lambda f, step: f.covers(step * step_s))
    return {"total": len(judged), "detected": len(hit)}


def outcome(units, labels, flagged, faults, step_s) -> dict:
    from models.metrics import confusion

    return {"units": confusion(labels, flagged).as_dict(), "faults": fault_outcomes(units, flagged, faults, step_s)}


def evaluate(detector: AnoFusion, obs: Observations, faults, units: list[tuple[str, int]] | None = None) -> dict:
    """OUT of `logwarden evaluate --detector anofusion`: units, faults, and by_modality for every
    variant the model holds."""
    units = obs.units() if units is None else units
    labels = unit_labels(units, faults, obs.options.step_s)
    chunks = list(obs.chunks(units))
    by_modality = {}
    for name in detector.variants:
        flagged = [v.anomalous for v in detector.score(chunks, variant=name)]
        by_modality[name] = outcome(units, labels, flagged, faults, obs.options.step_s)
    return {"units": by_modality["all"]["units"], "faults": by_modality["all"]["faults"], "by_modality": by_modality}


def _faults(path):
    from models.faults import read_faults

    return read_faults(path)


def _near_fault(unit: tuple[str, int], faults, options: ChunkOptions) -> bool:
    """A training chunk of a fault's target pod whose window touches the fault (one step of
    margin either side): it is not normal behaviour, neither as target nor as history."""
    pod, step = unit
    start, end = (step - options.steps + 1) * options.step_s, (step + 1) * options.step_s
    return any(f.target == pod and f.overlaps(start - options.step_s, end + options.step_s) for f in faults)


# --------------------------------------------------------------------------------------------
def _typed_adjacency(z: np.ndarray, modality_of: np.ndarray) -> np.ndarray:
    """(7, N, N): |Pearson r| between channels (pairs observed together at least MIN_SAMPLES
    times), split by the paper's six edge types, plus the identity."""
    N = z.shape[1]
    weights = np.zeros((N, N))
    present = ~np.isnan(z)
    filled = np.nan_to_num(z)
    for i in range(N):
        for j in range(i + 1, N):
            both = present[:, i] & present[:, j]
            if both.sum() < MIN_SAMPLES:
                continue
            a, b = filled[both, i], filled[both, j]
            if a.std() < 1e-9 or b.std() < 1e-9:
                continue
            weights[i, j] = weights[j, i] = abs(float(np.corrcoef(a, b)[0, 1]))
    typed = np.zeros((len(EDGE_TYPES) + 1, N, N))
    for k, (p, q) in enumerate(EDGE_TYPES):
        pair = ((modality_of[:, None] == p) & (modality_of[None, :] == q)) | \
               ((modality_of[:, None] == q) & (modality_of[None, :] == p))
        typed[k] = np.where(pair, weights, 0.0)
    typed[-1] = np.eye(N)
    return typed


def _signed_exp(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.expm1(np.minimum(np.abs(values), 700.0))


def _rounded(value: float) -> float | None:
    return None if value != value else float(f"{value:.4g}")


def _newest_step(chunk: Chunk) -> Chunk:
    """The chunk cut down to its judged step (for the observed values a verdict reports)."""
    start = chunk.end - chunk.step_s
    return Chunk(entity=chunk.entity, service=chunk.service, start=start, end=chunk.end, step_s=chunk.step_s,
                 metrics={c: values[-1:] for c, values in chunk.metrics.items()}, traces=chunk.traces[-1:],
                 logs=[e for e in chunk.logs if e.timestamp >= start])


def _tails(scaled: np.ndarray) -> np.ndarray:
    """Per channel, the mean excess over 1 of the scaled errors that exceed 1 (an exponential
    tail's scale, as peaks-over-threshold methods fit it); a floor keeps a channel whose errors
    never exceed its scale from dividing by nothing."""
    tail = np.ones(scaled.shape[1])
    for j in range(scaled.shape[1]):
        column = scaled[:, j][~np.isnan(scaled[:, j])]
        excess = column[column > 1.0] - 1.0
        if len(excess) >= 5:
            tail[j] = max(float(excess.mean()), 0.1)
    return tail


def _threshold_at(scores: np.ndarray, quantile: float) -> float:
    """The threshold a quantile of the normal validation scores sets, never under MIN_THRESHOLD."""
    return max(float(np.quantile(scores, quantile)), MIN_THRESHOLD)


def _error_scale(errors: np.ndarray, judged: np.ndarray, quantile: float) -> np.ndarray:
    scale = np.full(errors.shape[1], 1.0)
    for j in range(errors.shape[1]):
        column = errors[judged[:, j], j]
        if len(column):
            scale[j] = max(float(np.quantile(column, quantile)), MIN_SCALE * 4)
    return scale
