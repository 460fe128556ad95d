"""DeepLog (Du, Li, Zheng, Srikumar; CCS 2017): log-key LSTM, parameter-value LSTMs, workflow.

Key model. An LSTM reads the h template ids before an event and predicts a distribution over the
next one; the event is anomalous when it is not among the g most probable keys (decided by rank:
anomalous when g or more keys are strictly more probable, so ties never count against it).
Every session is padded the same way, in training and in scoring: h ``<start>`` keys before its
first event and, for a closed session, an ``<end>`` key after its last. Both keys occur in every
normal training session, so a short session is judged on what normal sessions look like, and the
end of a closed session is itself predicted (a session that stops early is caught). A template id
never seen in training (``<unk>``) is never among the top g.

Probability floor. With HDFS's 14 keys and ``<end>``, the top 9 of 15 candidates hold keys the
model gives a probability of 1e-4 or less: top-g alone passed every anomalous session that stops
after two or three events. A key is therefore also anomalous when its probability lies under a
floor chosen on normal data the key model did not train on: fit() holds out a seeded share of
the normal sessions (``floor_validation``, 0.2), trains the key model on the rest, and takes the
``floor_quantile``-th of the held-out sessions' lowest probabilities, never above the lowest
probability of a window the model trained on. The default quantile is 0, the lowest: no held-out
normal session falls under the floor. DeepLog's own false-positive rate on HDFS (0.0015, 833 of
553,366) picked, of deeplog_hdfs_train's 982 held-out sessions, the second-lowest, a single session
whose low moved 13x between two trainings with the same seed on two CPUs (3.7e-6 on an Intel Xeon,
5.0e-5 on an AMD EPYC: float sums differ) and with it the dev set's false positives (3, 6 of 1,000):
a quantile needs far more held-out sessions than 1/q. With 0 the AMD training gives 3 (the
Intel one gave 3 with no general floor at all).

``<end>`` has a floor of its own (``end_floor``): ``end_margin`` (0.1) times the
lowest probability the model gives a held-out session's end, never above the lowest it gives a
training session's end nor under the general floor. Normal HDFS sessions end where the model gives
``<end>`` 0.03 or more; sessions that stop early (``5 22``) where it gives ~1e-4, which the general
floor, set by the rarest normal transitions, lets through. The held-out sessions only calibrate;
the served model is the one they were held out from. The key model trains ``epochs`` (400) passes over the distinct windows, weighted by how
often each occurs: at 40, rare but normal HDFS windows (replication: 29 of 4,855 sessions) were
still ranked last.

Parameter-value model. For each key with enough training events, a small LSTM regresses the
event's parameter vector — seconds since the previous event and the numeric parameters, each
normalised with the training mean and std — from the vectors of the same key among the previous
h events (the very events a sliding window of the stream holds, so a verdict in the stream equals
the verdict in evaluation). Its squared error on a validation split of the normal sessions gives a
Gaussian N(mu, sigma); an event whose error lies above mu + z*sigma is a parameter anomaly.

Workflow model. From the trained key model, for every training context: the transitions
"last key -> next key" it predicts with probability >= ``workflow_min_probability``. The result
is a finite-state view (from ``<start>`` to ``<end>``) used to name the transition that diverged:
"after E9 expected E11|E26, saw E3".

Scoring (``score``) follows ``models.base.Sequence``: positions judge_from..len(keys)-1 are judged
(and the end, position len(keys), when ``complete``); a position needs h events of history, which
``start=True`` supplies with ``<start>`` keys; positions of a ``start=False`` sequence with fewer
than h events before them are not judged (``Verdict.details["unjudged"]``).
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence as Seq

import numpy as np
import torch
from torch import nn

from models import artifacts
from models.base import Anomaly, Detector, Sequence, Verdict, pick_device
from models.data import holdout, normal_sessions, template_id_order as _key_order
from models.memo import DEFAULT_SIZE, FIXED_ROWS, RowMemo, fixed_chunks

START, UNK, END = "<start>", "<unk>", "<end>"
SPECIAL = (START, UNK, END)
START_ID, UNK_ID, END_ID = 0, 1, 2
WEIGHTS = "weights.safetensors"
PARAM_BATCH = 64        # parameter samples per step (each key has a few hundred to thousands)
MIN_ERROR_STD = 0.05


class _KeyLSTM(nn.Module):
    def __init__(self, vocabulary: int, embedding: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        self.lstm = nn.LSTM(embedding, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, vocabulary)

    def forward(self, history: torch.Tensor) -> torch.Tensor:          # (B, h) -> (B, V) logits
        states, _ = self.lstm(self.embed(history))
        return self.out(states[:, -1])


class _ParamLSTM(nn.Module):
    """Input per step: the normalised vector and a 1 (a real event) / 0 (left padding) flag."""

    def __init__(self, dims: int, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(dims + 1, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, dims)

    def forward(self, history: torch.Tensor) -> torch.Tensor:          # (B, h, d+1) -> (B, d)
        states, _ = self.lstm(history)
        return self.out(states[:, -1])


@dataclass
class _ParamKey:
    """A trained parameter model for one key and its normal-error interval."""
    dims: int
    model: _ParamLSTM
    mean: torch.Tensor                  # per-dimension normalisation (training data)
    std: torch.Tensor
    error_mean: float = 0.0             # Gaussian of the validation squared error
    error_std: float = 0.0
    z: float = 2.576
    train_events: int = 0
    validation_events: int = 0

    @property
    def upper(self) -> float:
        # The floor keeps float noise from flagging keys whose vectors never vary (error 0).
        return self.error_mean + self.z * self.error_std + 1e-6

    def interval(self) -> list[float]:
        return [max(0.0, self.error_mean - self.z * self.error_std), self.upper]


@dataclass
class _Windows:
    """Unique (history, next) windows with how often each occurred."""
    history: np.ndarray                  # (N, h) int64
    target: np.ndarray                   # (N,) int64
    count: np.ndarray = field(default=None)  # (N,) float32

    def __len__(self) -> int:
        return len(self.target)


@contextmanager
def _deterministic(device: str):
    """Deterministic kernels for the duration of training only (a process-wide torch flag)."""
    # torch.use_deterministic_algorithms also sets inductor's flag, importing the compiler stack
    # (seconds per process); nothing here is compiled, so set the kernel flag alone.
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", torch.use_deterministic_algorithms)
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    set_flag(True, warn_only=device != "cpu")
    try:
        yield
    finally:
        set_flag(before, warn_only=warn)


def _progress(iterable, enabled: bool, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=not enabled, file=sys.stderr, dynamic_ncols=True, **kwargs)


class DeepLog(Detector):
    name = "deeplog"

    # Options fit() accepts (besides `templates`); None means "keep the current value".
    OPTIONS = ("h", "g", "layers", "hidden", "embedding", "epochs", "batch_size", "lr", "seed",
               "device", "progress", "param_min_events", "param_hidden", "param_layers",
               "param_epochs", "param_confidence", "param_validation", "workflow_min_probability",
               "score_batch", "floor_validation", "floor_quantile", "end_margin", "memo_size")

    def __init__(self, h: int = 10, g: int = 9, layers: int = 2, hidden: int = 64, embedding: int = 16,
                 epochs: int = 400, batch_size: int = 256, lr: float = 5e-3, seed: int = 1,
                 device: str = "auto", progress: bool = False,
                 param_min_events: int = 200, param_hidden: int = 32, param_layers: int = 2,
                 param_epochs: int = 20, param_confidence: float = 0.99, param_validation: float = 0.2,
                 workflow_min_probability: float = 0.2, score_batch: int = 4096,
                 floor_validation: float = 0.2, floor_quantile: float = 0.0, end_margin: float = 0.1,
                 memo_size: int = DEFAULT_SIZE):
        self.h, self.g, self.layers, self.hidden, self.embedding = h, g, layers, hidden, embedding
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.device_setting, self.progress = device, progress
        self.param_min_events, self.param_hidden, self.param_layers = param_min_events, param_hidden, param_layers
        self.param_epochs, self.param_confidence, self.param_validation = param_epochs, param_confidence, param_validation
        self.workflow_min_probability, self.score_batch = workflow_min_probability, score_batch
        self.floor_validation, self.floor_quantile = floor_validation, floor_quantile
        self.end_margin = end_margin
        self._check_options()
        self.floor = 0.0                                # probability floor, chosen by fit()
        self.end_floor = 0.0                            # the floor of <end>, chosen by fit()
        self.floor_choice: dict[str, Any] = {}
        self.memo = RowMemo(memo_size)                  # history -> next-key distribution
        self.device = "cpu"
        self.vocabulary: list[str] = list(SPECIAL)      # index -> template id
        self.index: dict[str, int] = {k: i for i, k in enumerate(self.vocabulary)}
        self.templates: dict[str, str] = {}            # template id -> text, where known
        self.model: _KeyLSTM | None = None
        self.params: dict[str, _ParamKey] = {}          # template id -> parameter model
        self.workflow: dict[str, dict[str, float]] = {}
        self.train_windows: _Windows | None = None     # unique training windows (for update())
        self.training: dict[str, Any] = {}
        self.created: str | None = None

    # ---------------------------------------------------------------------------------------
    # configuration
    def _check_options(self) -> None:
        for name in ("h", "g", "layers", "hidden", "embedding", "epochs", "batch_size",
                     "param_min_events", "param_hidden", "param_layers", "param_epochs", "score_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"deeplog: {name} must be a positive integer, got {value!r}")
        if not 0 < self.param_confidence < 1:
            raise ValueError(f"deeplog: param_confidence must be in (0, 1), got {self.param_confidence!r}")
        if not 0 < self.param_validation < 1:
            raise ValueError(f"deeplog: param_validation must be in (0, 1), got {self.param_validation!r}")
        if not 0 <= self.floor_validation < 1:
            raise ValueError(f"deeplog: floor_validation must be in [0, 1), got {self.floor_validation!r}")
        if not 0 <= self.floor_quantile < 1:
            raise ValueError(f"deeplog: floor_quantile must be in [0, 1), got {self.floor_quantile!r}")
        if not 0 <= self.end_margin <= 1:
            raise ValueError(f"deeplog: end_margin must be in [0, 1], got {self.end_margin!r}")
        if self.lr <= 0:
            raise ValueError(f"deeplog: lr must be positive, got {self.lr!r}")

    def _apply(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"deeplog: unknown option(s) {', '.join(unknown)}")
        for name, value in options.items():
            if value is None:
                continue
            if name == "memo_size":
                self.memo = RowMemo(value)
            else:
                setattr(self, "device_setting" if name == "device" else name, value)
        self._check_options()

    def hyperparameters(self) -> dict[str, Any]:
        return {"h": self.h, "g": self.g, "layers": self.layers, "hidden": self.hidden,
                "embedding": self.embedding, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "param_min_events": self.param_min_events,
                "param_hidden": self.param_hidden, "param_layers": self.param_layers,
                "param_epochs": self.param_epochs, "param_confidence": self.param_confidence,
                "param_validation": self.param_validation,
                "workflow_min_probability": self.workflow_min_probability,
                "floor_validation": self.floor_validation, "floor_quantile": self.floor_quantile,
                "end_margin": self.end_margin}

    # ---------------------------------------------------------------------------------------
    # vocabulary and windows
    def _set_vocabulary(self, keys: list[str]) -> None:
        self.vocabulary = list(SPECIAL) + sorted(set(keys) - set(SPECIAL), key=_key_order)
        self.index = {k: i for i, k in enumerate(self.vocabulary)}

    def _learn_texts(self, sequences: Seq[Sequence], templates: dict[str, str] | None) -> None:
        for seq in sequences:
            for key, text in zip(seq.keys, seq.templates or []):
                if text and key in self.index:
                    self.templates.setdefault(key, text)
        for key, text in (templates or {}).items():
            if text and key in self.index:
                self.templates[key] = text

    def _padded(self, seq: Sequence) -> tuple[list[int], int]:
        """Vocabulary indices of the padded sequence, and the padding length before keys[0]."""
        pad = self.h if seq.start else 0
        ids = [START_ID] * pad + [self.index.get(k, UNK_ID) for k in seq.keys]
        if seq.complete:
            ids.append(END_ID)
        return ids, pad

    def _windows(self, sequences: Seq[Sequence]) -> _Windows:
        """Every (history, next) window of the sequences, counted once per distinct window."""
        rows = []
        for seq in sequences:
            ids, pad = self._padded(seq)
            if len(ids) <= self.h:
                continue
            rows.append(np.lib.stride_tricks.sliding_window_view(np.asarray(ids, np.int64), self.h + 1))
        if not rows:
            return _Windows(np.zeros((0, self.h), np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        unique, counts = np.unique(np.concatenate(rows), axis=0, return_counts=True)
        return _Windows(np.ascontiguousarray(unique[:, :-1]), np.ascontiguousarray(unique[:, -1]),
                        counts.astype(np.float32))

    # ---------------------------------------------------------------------------------------
    # training
    def fit(self, sequences: Seq[Sequence], labels: Seq[int] | None = None, **options) -> dict:
        """Train on the normal sequences (label 0, or all when labels is None). Options: any name
        in ``OPTIONS`` (None keeps the current value) and ``templates`` (id -> text)."""
        templates = options.pop("templates", None)
        self._apply(options)
        sequences = normal_sessions(sequences, labels, self.name)
        started = time.perf_counter()
        self.device = pick_device(self.device_setting)
        self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        trained, held_out = self._floor_split(sequences)
        self._set_vocabulary([k for s in trained for k in s.keys])
        self.templates = {}
        self._learn_texts(sequences, templates)

        with _deterministic(self.device):
            torch.manual_seed(self.seed)
            self.model = _KeyLSTM(len(self.vocabulary), self.embedding, self.hidden, self.layers).to(self.device)
            self.train_windows = self._windows(trained)
            if not len(self.train_windows):
                raise ValueError(f"deeplog: no training window (sessions need events; h={self.h})")
            loss = self._train_key_model(self.train_windows, self.epochs, desc="deeplog keys")
            self.floor_choice = self._choose_floor(held_out)
            self.floor = self.floor_choice["floor"]
            self.end_floor = self.floor_choice.get("end_floor", self.floor)
            self.workflow = self._build_workflow()
            param_stats = self._fit_params(sequences)
        self.training = {
            "sessions": len(sequences), "key_model_sessions": len(trained), "held_out_sessions": len(held_out),
            "events": sum(len(s.keys) for s in sequences),
            "windows": int(self.train_windows.count.sum()), "unique_windows": len(self.train_windows),
            "keys": len(self.vocabulary) - len(SPECIAL), "final_loss": round(loss, 6),
            "floor": self.floor_choice,
            "parameter_models": param_stats, "seconds": round(time.perf_counter() - started, 2),
            "device": self.device, "seed": self.seed,
        }
        return dict(self.training)

    def _floor_split(self, sequences: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        """(sessions the key model trains on, normal sessions held out to choose the floor)."""
        if not self.floor_validation or len(sequences) < 2:
            return sequences, []
        held = holdout(len(sequences), self.floor_validation, self.seed)
        if held.all() or not held.any():
            return sequences, []
        return [s for s, h in zip(sequences, held) if not h], [s for s, h in zip(sequences, held) if h]

    def _lowest_training_probability(self, target: int | None = None) -> float:
        """The lowest probability the model gives a window it trained on (of ``target`` only)."""
        windows = self.train_windows
        rows = np.arange(len(windows)) if target is None else np.flatnonzero(windows.target == target)
        if not len(rows):
            return 1.0
        probs = self._probabilities(np.ascontiguousarray(windows.history[rows]))
        return float(probs.gather(1, torch.from_numpy(windows.target[rows]).unsqueeze(1)).min())

    def _choose_floor(self, validation: Seq[Sequence]) -> dict[str, Any]:
        """The probability floor, from normal sessions the key model did not train on.

        Each held-out session's lowest probability of an observed key (its end included) is
        what a floor must stay under for that normal session to pass; the floor is the
        ``floor_quantile``-th of these lows (0: the lowest, so no held-out normal session is
        flagged), and never above the lowest probability the model gives a window it trained on
        (those sessions are normal by definition). Keys the trained part never had are left out:
        the served model flags them as unknown whatever the floor."""
        lowest = self._lowest_training_probability()
        if not validation:
            reason = ("floor_validation is 0: top-g alone" if not self.floor_validation
                      else "too few sessions to hold some out: top-g alone")
            return {"floor": 0.0, "end_floor": 0.0, "reason": reason, "lowest_training_probability": lowest}
        _, windows, owners = self._judged_windows(validation)
        _, observed, _ = self._observe(windows)
        lows = np.full(len(validation), np.inf)
        known = windows[:, -1] != UNK_ID
        np.minimum.at(lows, owners[known], observed[known].numpy().astype(np.float64))
        lows = np.sort(lows[np.isfinite(lows)])
        allowed = min(int(self.floor_quantile * len(lows)), len(lows) - 1)
        held_out = float(lows[allowed]) if len(lows) else 0.0
        floor = min(held_out, lowest)
        # The end of a session, the one event every normal session has, gets a floor of its own:
        # held-out normal sessions end where the model gives <end> 0.03 or more (HDFS), sessions
        # that stop early where it gives 1e-4 (DeepLog's "5 22"), far under any other key's
        # lows, which set the general floor. ``end_margin`` times the lowest end probability of
        # a held-out session, never above the lowest the model gives a training session's end.
        ends = windows[:, -1] == END_ID
        end_lowest = float(observed[torch.from_numpy(ends)].min()) if ends.any() else 0.0
        end_training = self._lowest_training_probability(END_ID)
        end_floor = max(floor, min(self.end_margin * end_lowest, end_training))
        return {"floor": floor, "end_floor": end_floor, "held_out": held_out, "lowest_training_probability": lowest,
                "lowest_held_out_end_probability": end_lowest, "lowest_training_end_probability": end_training,
                "end_margin": self.end_margin,
                "validation_sessions": len(validation),
                "distinct_validation_sequences": len({tuple(s.keys) for s in validation}),
                "quantile": self.floor_quantile, "lowest_session_probabilities": [float(v) for v in lows[:5]]}

    def _batches(self, n: int, generator: torch.Generator, size: int | None = None):
        size = size or self.batch_size
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, size):
            yield order[i:i + size]

    def _train_key_model(self, windows: _Windows, epochs: int, desc: str,
                         extra: _Windows | None = None, lr: float | None = None) -> float:
        """Weighted cross-entropy over the unique windows (weight = occurrences), i.e. the loss over
        every window of the data. ``extra`` windows (online update) add a second, unweighted term so
        a handful of reported sequences is learned next to thousands of training windows."""
        x = torch.from_numpy(windows.history).to(self.device)
        y = torch.from_numpy(windows.target).to(self.device)
        w = torch.from_numpy(windows.count).to(self.device)
        if extra is not None:
            ex = torch.from_numpy(extra.history).to(self.device)
            ey = torch.from_numpy(extra.target).to(self.device)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=lr or self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        ce = nn.CrossEntropyLoss(reduction="none")
        self.model.train()
        last = math.nan
        bar = _progress(range(epochs), self.progress, desc=desc, unit="epoch")
        for _ in bar:
            total, weight = 0.0, 0.0
            for batch in self._batches(len(y), generator):
                losses = ce(self.model(x[batch]), y[batch])
                loss = (losses * w[batch]).sum() / w[batch].sum()
                if extra is not None:
                    loss = loss + ce(self.model(ex), ey).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float((losses.detach() * w[batch]).sum())
                weight += float(w[batch].sum())
            last = total / weight
            bar.set_postfix(loss=f"{last:.4f}")
        self.model.eval()
        self.memo.clear()                        # the weights changed
        return last

    def _probabilities(self, history: np.ndarray) -> torch.Tensor:
        """Next-key distributions (on the CPU) for windows of history; identical histories (logs
        repeat themselves a lot) go through the network once, and histories met before come
        from the memo (models.memo: exactly what computing them gives)."""
        if len(history) == 0:
            return torch.zeros((0, len(self.vocabulary)))
        history = np.ascontiguousarray(history, dtype=np.int64)
        raw, width = history.tobytes(), history.shape[1] * 8
        distinct: dict[bytes, int] = {}
        inverse = [distinct.setdefault(raw[i:i + width], len(distinct)) for i in range(0, len(raw), width)]
        keys = list(distinct)
        found, missing = self.memo.lookup(keys)
        if missing:
            rows = np.frombuffer(bytearray(b"".join(keys[i] for i in missing)), dtype=np.int64).reshape(len(missing), -1)
            computed = self._distinct_probabilities(rows).numpy()
            self.memo.store([keys[i] for i in missing], computed)
            for i, row in zip(missing, computed):
                found[i] = row
        return torch.from_numpy(np.stack(found))[torch.as_tensor(inverse)]

    @torch.no_grad()
    def _distinct_probabilities(self, history: np.ndarray) -> torch.Tensor:
        """<start> and <unk> are never the next key: their probability is 0. Every forward pass
        has FIXED_ROWS histories (the last padded), so a history's distribution does not depend
        on the histories computed beside it."""
        out = []
        self.model.eval()
        pad = np.zeros((FIXED_ROWS, self.h), dtype=np.int64)
        for start, stop in fixed_chunks(len(history)):
            chunk = history[start:stop]
            if len(chunk) < FIXED_ROWS:
                chunk = np.concatenate([chunk, pad[:FIXED_ROWS - len(chunk)]])
            logits = self.model(torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device))
            logits[:, START_ID] = -math.inf
            logits[:, UNK_ID] = -math.inf
            out.append(torch.softmax(logits, dim=1).float().cpu()[:stop - start])
        return torch.cat(out) if out else torch.zeros((0, len(self.vocabulary)))

    def _build_workflow(self) -> dict[str, dict[str, float]]:
        """last key -> {next key: mean probability over its contexts}, for the transitions the
        model predicts with probability >= workflow_min_probability in some training context."""
        contexts, inverse = np.unique(self.train_windows.history, axis=0, return_inverse=True)
        weight = np.bincount(inverse.reshape(-1), weights=self.train_windows.count, minlength=len(contexts))
        probs = self._distinct_probabilities(contexts).numpy()
        strong: dict[int, set[int]] = defaultdict(set)
        mass: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(len(self.vocabulary)))
        total: Counter = Counter()
        for context, p, wt in zip(contexts, probs, weight):
            last = int(context[-1])
            strong[last].update(np.flatnonzero(p >= self.workflow_min_probability).tolist())
            mass[last] += p * wt
            total[last] += wt
        workflow = {}
        for last, successors in strong.items():
            mean = mass[last] / total[last]
            edges = sorted(((self.vocabulary[b], round(float(mean[b]), 4)) for b in successors),
                           key=lambda e: -e[1])
            workflow[self.vocabulary[last]] = dict(edges)
        return dict(sorted(workflow.items(), key=lambda kv: (kv[0] != START, _key_order(kv[0]))))

    # ---------------------------------------------------------------------------------------
    # parameter-value models
    @staticmethod
    def _vectors(seq: Sequence) -> list[list[float] | None]:
        """Per event: [seconds since the previous event] + numeric parameters; None when unknown."""
        n = len(seq.keys)
        params = seq.params if seq.params is not None else None
        times = seq.timestamps if seq.timestamps is not None else None
        if params is None and times is None:
            return [None] * n
        out: list[list[float] | None] = []
        for i in range(n):
            vector: list[float] = []
            if times is not None:
                if i == 0 and not seq.start:
                    out.append(None)        # its predecessor is outside the window
                    continue
                vector.append(float(times[i] - times[i - 1]) if i else 0.0)
            if params is not None:
                vector.extend(float(v) for v in params[i])
            out.append(vector)
        return out

    def _param_history(self, seq_keys: list[str], vectors: list, i: int, pk: _ParamKey) -> np.ndarray:
        """The same key's vectors among the h events before i, normalised, left-padded, flagged."""
        rows = [vectors[j] for j in range(max(0, i - self.h), i)
                if seq_keys[j] == seq_keys[i] and vectors[j] is not None and len(vectors[j]) == pk.dims]
        history = np.zeros((self.h, pk.dims + 1), dtype=np.float32)
        if rows:
            values = (np.asarray(rows, dtype=np.float32) - pk.mean.numpy()) / pk.std.numpy()
            history[self.h - len(rows):, :pk.dims] = values
            history[self.h - len(rows):, pk.dims] = 1.0
        return history

    def _param_samples(self, sequences: Seq[Sequence]) -> dict[str, list[tuple[int, int, list[float]]]]:
        """key -> [(sequence index, position, vector)] for every event with a vector."""
        samples: dict[str, list] = defaultdict(list)
        for s, seq in enumerate(sequences):
            for i, vector in enumerate(self._vectors(seq)):
                if vector is not None and seq.keys[i] in self.index:
                    samples[seq.keys[i]].append((s, i, vector))
        return samples

    def _fit_params(self, sequences: Seq[Sequence]) -> dict[str, Any]:
        self.params = {}
        samples = self._param_samples(sequences)
        if not samples:
            return {"trained": 0, "reason": "no sequence carries params or timestamps"}
        rng = np.random.default_rng(self.seed)
        validation = set(np.flatnonzero(rng.random(len(sequences)) < self.param_validation).tolist())
        vectors = {s: self._vectors(seq) for s, seq in enumerate(sequences)
                   if seq.params is not None or seq.timestamps is not None}
        skipped = {}
        z = NormalDist().inv_cdf((1 + self.param_confidence) / 2)
        for key in _progress(sorted(samples, key=_key_order), self.progress, desc="deeplog params", unit="key"):
            dims = Counter(len(v) for _, _, v in samples[key]).most_common(1)[0][0]
            rows = [(s, i, v) for s, i, v in samples[key] if len(v) == dims]
            train = [r for r in rows if r[0] not in validation]
            valid = [r for r in rows if r[0] in validation]
            if dims == 0 or len(train) < self.param_min_events or len(valid) < 10:
                skipped[key] = f"{len(train)} training / {len(valid)} validation events (dims {dims})"
                continue
            values = np.asarray([v for _, _, v in train], dtype=np.float32)
            std = values.std(axis=0)
            pk = _ParamKey(dims=dims, model=_ParamLSTM(dims, self.param_hidden, self.param_layers).to(self.device),
                           mean=torch.from_numpy(values.mean(axis=0)),
                           std=torch.from_numpy(np.where(std > 1e-8, std, 1.0).astype(np.float32)), z=z,
                           train_events=len(train), validation_events=len(valid))

            def tensors(part):
                hist = np.stack([self._param_history(sequences[s].keys, vectors[s], i, pk) for s, i, _ in part])
                target = (np.asarray([v for _, _, v in part], np.float32) - pk.mean.numpy()) / pk.std.numpy()
                return torch.from_numpy(hist).to(self.device), torch.from_numpy(target).to(self.device)

            tx, ty = tensors(train)
            optimiser = torch.optim.Adam(pk.model.parameters(), lr=self.lr)
            generator = torch.Generator().manual_seed(self.seed)
            pk.model.train()
            for _ in range(self.param_epochs):
                for batch in self._batches(len(ty), generator, PARAM_BATCH):
                    loss = ((pk.model(tx[batch]) - ty[batch]) ** 2).mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            pk.model.eval()
            vx, vy = tensors(valid)
            with torch.no_grad():
                errors = ((pk.model(vx) - vy) ** 2).mean(dim=1).cpu().numpy().astype(np.float64)
            # A validation split where every error is the same (e.g. a time delta that is 0 s at
            # 1 s log resolution) gives sigma 0 and would flag any other value; the floor keeps
            # the interval a band (squared error in training-std units: 0.05 ~ a quarter std).
            pk.error_mean, pk.error_std = float(errors.mean()), max(float(errors.std()), MIN_ERROR_STD)
            self.params[key] = pk
        return {"trained": len(self.params), "skipped": skipped}

    # ---------------------------------------------------------------------------------------
    # scoring
    def _judged_windows(self, sequences: Seq[Sequence]) -> tuple[list, np.ndarray, np.ndarray]:
        """Per sequence (judged positions, unjudged count, padding); the (h history ids + the
        observed id) window of every judged position; and the sequence each window belongs to."""
        rows: list[list[int]] = []
        counts: list[int] = []
        plans = []
        h, index = self.h, self.index
        # Only the ids the judged windows need: the stream sends h context events and judges
        # one, tens of thousands of times a second.
        for seq in sequences:
            keys = seq.keys
            pad = h if seq.start else 0
            last = len(keys) + (1 if seq.complete else 0)
            first = max(0, seq.judge_from)
            judged = range(max(first, h - pad), last)          # positions with h events of history
            plans.append((judged, max(0, last - first) - len(judged), pad))
            counts.append(len(judged))
            if not judged:
                continue
            begin = judged.start - h                           # keys index of the first history id
            ids = [START_ID] * -begin if begin < 0 else []
            ids += map(index.get, keys[max(0, begin):last], repeat(UNK_ID))
            if last > len(keys):
                ids.append(END_ID)
            if len(judged) == 1:                               # the stream's case: ids is the window
                rows.append(ids)
            else:
                rows.extend(ids[i:i + h + 1] for i in range(len(judged)))
        windows = np.asarray(rows, dtype=np.int64).reshape(len(rows), h + 1)
        return plans, windows, np.repeat(np.arange(len(plans)), counts)

    def _observe(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-key distributions, the probability of each observed key (0 for <unk>) and its
        rank (how many keys are strictly more probable: ties never count against it)."""
        probs = self._probabilities(np.ascontiguousarray(windows[:, :-1]))
        t = torch.from_numpy(windows[:, -1])
        observed = probs.gather(1, t.unsqueeze(1)).squeeze(1)
        observed[t == UNK_ID] = 0.0
        return probs, observed, (probs > observed.unsqueeze(1)).sum(dim=1)

    def normal_depends_on(self) -> tuple[str, ...] | None:
        # A normal verdict is the keys' next-key probabilities alone (the template texts only
        # name an anomaly); with parameter models the values and times count too.
        return None if self.params else ("keys",)

    def score(self, sequences: Seq[Sequence]) -> list[Verdict]:
        if self.model is None:
            raise RuntimeError("deeplog: score() before fit() or load()")
        plans, windows, owners = self._judged_windows(sequences)
        verdicts = [Verdict(anomalous=False, score=0.0, details={"judged": len(j), "unjudged": u})
                    for j, u, _ in plans]
        if len(windows):
            self._score_keys(sequences, plans, windows, owners, verdicts)
        if self.params:
            self._score_params(sequences, plans, verdicts)
        for verdict in verdicts:
            verdict.anomalies.sort(key=lambda a: (a.position, a.kind != "key"))
            verdict.anomalous = bool(verdict.anomalies)
            if verdict.anomalies:
                verdict.details["first_anomaly"] = verdict.anomalies[0].position
                verdict.details["diagnosis"] = verdict.anomalies[0].details.get("diagnosis")
        return verdicts

    def _score_keys(self, sequences, plans, windows, owner, verdicts) -> None:
        probs, observed, rank = self._observe(windows)
        target = windows[:, -1]
        t = torch.from_numpy(target)
        # Top-g alone is lenient in a small vocabulary (HDFS: 9 of 15 candidates); the floor
        # also flags a key the model gives less probability than any held-out normal session needed.
        floors = torch.where(t == END_ID, self.end_floor, self.floor)
        below = observed < floors
        flagged = (rank >= self.g) | (t == UNK_ID) | below
        surprise = (1.0 - observed).numpy()
        offsets = np.cumsum([0] + [len(j) for j, _, _ in plans])
        scored = np.flatnonzero(offsets[1:] > offsets[:-1])      # sequences with a judged position
        # Empty segments have no length, so the starts of the others bound their segments.
        for n, value in zip(scored.tolist(), np.maximum.reduceat(surprise, offsets[scored]).tolist()):
            verdicts[n].score = value
        rows = torch.nonzero(flagged).squeeze(1).tolist()
        if not rows:
            return
        top_p, top_i = probs[rows].topk(min(self.g, probs.shape[1] - 2), dim=1)
        for row, ps, ids in zip(rows, top_p.tolist(), top_i.tolist()):
            n = int(owner[row])
            seq, (judged, _, _) = sequences[n], plans[n]
            position = judged[row - offsets[n]]
            expected = [(self.vocabulary[i], round(p, 6)) for i, p in zip(ids, ps)]
            at_end = position == len(seq.keys)
            observed_key = END if at_end else seq.keys[position]
            kind = "end" if at_end else "key"
            details = self._context(seq, position, observed_key, expected)
            details.update({"probability": float(observed[row]), "rank": int(rank[row]) + 1,
                            "unknown": bool(target[row] == UNK_ID), "below_floor": bool(below[row]),
                            "floor": float(floors[row])})
            verdicts[n].anomalies.append(Anomaly(position=position, kind=kind, observed=observed_key,
                                                 expected=expected, score=float(surprise[row]), details=details))

    def _context(self, seq: Sequence, position: int, observed: str, expected: list[tuple[str, float]]) -> dict:
        """What came before, what the model expected and the workflow transition that diverged."""
        window = seq.keys[max(0, position - self.h):position]
        previous = seq.keys[position - 1] if position > 0 else (START if seq.start else None)
        edges = self.workflow.get(previous, {}) if previous else {}
        successors = sorted(edges, key=lambda k: (-edges[k], _key_order(k)))   # JSON keeps no order
        if not successors:                       # an unknown previous key: the model's own top picks
            successors = [k for k, p in expected if p >= self.workflow_min_probability] or [expected[0][0]]
        observed_text = self._text(seq, position, observed)
        if previous == START:
            where = "at session start"
        elif previous is None:
            where = "after an unseen event"
        else:
            where = f"after {previous}"
        note = " (never seen in training)" if observed not in self.index else ""
        details = {
            "window": window,
            "expected_templates": {k: self.templates[k] for k, _ in expected if k in self.templates},
            "observed_template": observed_text,
            "transition": {"after": previous, "expected": successors, "observed": observed},
            "diagnosis": f"{where} expected {'|'.join(successors)}, saw {observed}{note}",
        }
        return details

    def _text(self, seq: Sequence, position: int, key: str) -> str | None:
        if position < len(seq.keys) and seq.templates and seq.templates[position]:
            return seq.templates[position]
        return self.templates.get(key)

    @torch.no_grad()
    def _score_params(self, sequences, plans, verdicts) -> None:
        work: dict[str, list[tuple[int, int, list[float]]]] = defaultdict(list)
        histories: dict[str, list[np.ndarray]] = defaultdict(list)
        for n, seq in enumerate(sequences):
            if seq.params is None and seq.timestamps is None:
                continue
            vectors = self._vectors(seq)
            for position in plans[n][0]:
                if position >= len(seq.keys):
                    continue
                key, vector = seq.keys[position], vectors[position]
                pk = self.params.get(key)
                if pk is None or vector is None:
                    continue
                if len(vector) != pk.dims:
                    anomaly = self._param_anomaly(seq, position, pk, vector, None, math.inf,
                                                  f"{key} carries {len(vector)} values, trained with {pk.dims}")
                    verdicts[n].anomalies.append(anomaly)
                    verdicts[n].score = max(verdicts[n].score, anomaly.score)
                    continue
                work[key].append((n, position, vector))
                histories[key].append(self._param_history(seq.keys, vectors, position, pk))
        for key, items in work.items():
            pk = self.params[key]
            x = torch.from_numpy(np.stack(histories[key])).to(self.device)
            predicted = pk.model(x).cpu()
            actual = (torch.tensor([v for _, _, v in items], dtype=torch.float32) - pk.mean) / pk.std
            errors = ((predicted - actual) ** 2).mean(dim=1)
            raw_predicted = (predicted * pk.std + pk.mean).tolist()
            for (n, position, vector), error, guess in zip(items, errors.tolist(), raw_predicted):
                if error > pk.upper:
                    anomaly = self._param_anomaly(sequences[n], position, pk, vector, guess, error, None)
                    verdicts[n].anomalies.append(anomaly)
                    verdicts[n].score = max(verdicts[n].score, anomaly.score)

    def _param_anomaly(self, seq, position, pk: _ParamKey, vector, predicted, error, problem) -> Anomaly:
        key = seq.keys[position]
        lo, hi = pk.interval()
        details = {
            "window": seq.keys[max(0, position - self.h):position],
            "observed_template": self._text(seq, position, key),
            "value": [round(v, 6) for v in vector],
            "predicted": [round(v, 6) for v in predicted] if predicted is not None else None,
            "error": round(error, 6) if math.isfinite(error) else None,
            "interval": [round(lo, 6), round(hi, 6)],
            "diagnosis": problem or (f"{key} parameters {self._fmt(vector)} (expected about "
                                     f"{self._fmt(predicted)}): error {error:.3g} outside [{lo:.3g}, {hi:.3g}]"),
        }
        score = 1.0 if not math.isfinite(error) or pk.error_std == 0 else NormalDist().cdf((error - pk.error_mean) / pk.error_std)
        return Anomaly(position=position, kind="parameter", observed=key, score=score, details=details)

    @staticmethod
    def _fmt(vector) -> str:
        return "[" + ", ".join(f"{v:.3g}" for v in vector) + "]"

    # ---------------------------------------------------------------------------------------
    # online update (false positives reported by operators)
    def update(self, sequences: Seq[Sequence], epochs: int = 10, lr: float | None = None) -> dict:
        """Fine-tune the key model so these normal sequences (reported false positives) are no
        longer flagged: training windows are replayed next to theirs so the rest is not forgotten.
        Template ids they introduce join the vocabulary. Stops early once none is flagged."""
        if self.model is None or self.train_windows is None:
            raise RuntimeError("deeplog: update() before fit() or load()")
        sequences = [s for s in sequences if s.keys]
        if not sequences:
            return {"sequences": 0, "epochs": 0, "still_flagged": 0}
        new = [k for s in sequences for k in s.keys if k not in self.index]
        if new:
            self._grow(sorted(set(new), key=_key_order))
            self._learn_texts(sequences, None)
        reported = self._windows(sequences)
        if not len(reported):          # e.g. a window shorter than h that starts mid-session
            return {"sequences": len(sequences), "epochs": 0, "new_keys": sorted(set(new)),
                    "still_flagged": sum(v.anomalous for v in self.score(sequences))}
        done = 0
        with _deterministic(self.device):
            torch.manual_seed(self.seed)
            for done in range(1, epochs + 1):
                self._train_key_model(self.train_windows, 1, desc="deeplog update", extra=reported,
                                      lr=lr or self.lr / 2)
                if not any(v.anomalous for v in self.score(sequences)):
                    break
        self.train_windows = self._merge(self.train_windows, reported)
        # The floor never flags a window the served model trained on; fine-tuning moves some
        # probabilities, so it comes down to the lowest one where it has to (never up).
        self.floor = min(self.floor, self._lowest_training_probability())
        self.end_floor = max(self.floor, min(self.end_floor, self._lowest_training_probability(END_ID)))
        self.workflow = self._build_workflow()
        still = sum(v.anomalous for v in self.score(sequences))
        self.training.setdefault("updates", []).append(
            {"sequences": len(sequences), "epochs": done, "new_keys": sorted(set(new)),
             "still_flagged": still, "floor": self.floor,
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return {"sequences": len(sequences), "epochs": done, "new_keys": sorted(set(new)), "still_flagged": still}

    def _grow(self, keys: list[str]) -> None:
        old = len(self.vocabulary)
        self.vocabulary += keys
        self.index = {k: i for i, k in enumerate(self.vocabulary)}
        torch.manual_seed(self.seed + old)
        grown = _KeyLSTM(len(self.vocabulary), self.embedding, self.hidden, self.layers).to(self.device)
        with torch.no_grad():
            state = self.model.state_dict()
            for name, tensor in grown.state_dict().items():
                if name in ("embed.weight", "out.weight", "out.bias"):
                    tensor[:old] = state[name]
                else:
                    tensor.copy_(state[name])
        self.model = grown
        self.memo.clear()

    @staticmethod
    def _merge(a: _Windows, b: _Windows) -> _Windows:
        rows = np.concatenate([np.column_stack([a.history, a.target]), np.column_stack([b.history, b.target])])
        counts = np.concatenate([a.count, b.count])
        unique, inverse = np.unique(rows, axis=0, return_inverse=True)
        merged = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(unique)).astype(np.float32)
        return _Windows(np.ascontiguousarray(unique[:, :-1]), np.ascontiguousarray(unique[:, -1]), merged)

    # ---------------------------------------------------------------------------------------
    # artifacts
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.model is None:
            raise RuntimeError("deeplog: save() before fit()")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"key.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors["train.history"] = torch.from_numpy(self.train_windows.history)
        tensors["train.target"] = torch.from_numpy(self.train_windows.target)
        tensors["train.count"] = torch.from_numpy(self.train_windows.count)
        thresholds = {}
        for key, pk in self.params.items():
            slot = self.index[key]
            for k, v in pk.model.state_dict().items():
                tensors[f"param.{slot}.{k}"] = v.detach().cpu().contiguous()
            tensors[f"param.{slot}.mean"] = pk.mean.contiguous()
            tensors[f"param.{slot}.std"] = pk.std.contiguous()
            thresholds[key] = {"slot": slot, "dims": pk.dims, "error_mean": pk.error_mean,
                               "error_std": pk.error_std, "z": pk.z, "interval": pk.interval(),
                               "train_events": pk.train_events, "validation_events": pk.validation_events}
        save_file(tensors, str(directory / WEIGHTS))
        manifest = artifacts.read_manifest(directory) if (directory / artifacts.MANIFEST).exists() else {}
        manifest.update({
            "detector": self.name, "version": manifest.get("version"), "created": self.created,
            "seed": self.seed, "h": self.h, "g": self.g, "weights": WEIGHTS,
            "hyperparameters": self.hyperparameters(),
            "vocabulary": [{"id": k, "template": self.templates.get(k)} for k in self.vocabulary[len(SPECIAL):]],
            "special_keys": list(SPECIAL),
            "thresholds": thresholds, "workflow": self.workflow, "training": self.training,
            "floor": self.floor, "end_floor": self.end_floor,
        })
        artifacts.write_manifest(directory, manifest)

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> "DeepLog":
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest = artifacts.read_manifest(directory)
        if manifest.get("detector") != cls.name:
            raise ValueError(f"{directory}: a {manifest.get('detector')!r} model, not {cls.name!r}")
        hp = dict(manifest["hyperparameters"])
        self = cls(**hp, seed=manifest.get("seed", 1), device=device)
        self.device = pick_device(device)
        self.created = manifest.get("created")
        self.vocabulary = list(SPECIAL) + [v["id"] for v in manifest["vocabulary"]]   # saved order: update() appends
        self.index = {k: i for i, k in enumerate(self.vocabulary)}
        self.templates = {v["id"]: v["template"] for v in manifest["vocabulary"] if v.get("template")}
        self.workflow = manifest.get("workflow", {})
        self.training = manifest.get("training", {})
        self.floor = float(manifest.get("floor", 0.0))        # models saved before the floor: top-g alone
        self.end_floor = float(manifest.get("end_floor", self.floor))   # before the end's own floor: the floor
        self.floor_choice = self.training.get("floor", {})
        tensors = load_file(str(directory / manifest.get("weights", WEIGHTS)))
        self.model = _KeyLSTM(len(self.vocabulary), self.embedding, self.hidden, self.layers)
        self.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("key.")})
        self.model.to(self.device).eval()
        self.train_windows = _Windows(tensors["train.history"].numpy(), tensors["train.target"].numpy(),
                                      tensors["train.count"].numpy())
        self.params = {}
        for key, t in manifest.get("thresholds", {}).items():
            prefix = f"param.{t['slot']}."
            model = _ParamLSTM(t["dims"], self.param_hidden, self.param_layers)
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                   if k.startswith(prefix) and k[len(prefix):] not in ("mean", "std")})
            self.params[key] = _ParamKey(dims=t["dims"], model=model.to(self.device).eval(),
                                         mean=tensors[prefix + "mean"], std=tensors[prefix + "std"],
                                         error_mean=t["error_mean"], error_std=t["error_std"], z=t["z"],
                                         train_events=t["train_events"], validation_events=t["validation_events"])
        return self
