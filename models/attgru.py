"""ATT-GRU (Fang et al. 2023): supervised window classifier over template vectors.

Pipeline for one window of at most ``window`` events:

    template text --words--> word2vec word vectors --mean, centred--> template vector x_n
    alpha = softmax_n(v^T tanh(W x_n + U q)),  q = mean of the window's real x_n
    y_n = alpha_n * n_real * x_n  -->  2-layer bidirectional GRU (hidden 64)
    --> last states of both directions --> ReLU layer --> 2 logits (normal, abnormal)

Choices, and why:

* **Template vectors come from the words of the template**, not from its id, so a template the
  model never saw (a changed log statement) still lands next to the template it was changed from.
  Word2vec is fitted on the template texts' words; a template's vector is the **plain mean** of
  its words' unit vectors minus the vocabulary's mean vector (see ``TemplateEmbedder`` for why
  mean and not TF-IDF: measured, not assumed).
* **The attention query q is the window's own summary** (mean of its real vectors). A single
  learned q would make ``U q`` a constant bias, so a line's weight could not depend on the lines
  around it. Padding gets a score of -inf before the softmax, so its weight is exactly 0 and the
  weights over real positions sum to 1. Weighted vectors are multiplied by the number of real
  positions so that uniform attention feeds the GRU the unweighted vectors (the no-attention
  ablation is then the same network with alpha = 1/n).
* **Windows are the ones the stream judges.** The window ending at every event (left-truncated to
  ``window`` events, so a session's first events give shorter, padded windows), and for a closed
  session one more window ending at an ``<end>`` marker. The stream judges an open session by the
  window ending at its newest event and cannot know the session will stop; a closed session's
  ``<end>`` window can say "this block stopped too early". Without the marker every short open
  session would look like the short (mostly abnormal) closed HDFS sessions.
* **Training windows are labelled from the session labels**: a window is abnormal when it occurs
  in abnormal sessions and in no normal session (see ``_labelled_windows``); the loss is the
  paper's cross-entropy over windows, each distinct window computed once per batch and weighted
  by how often it occurs. A session is abnormal when any of its judged windows is.
"""
from __future__ import annotations

import logging
import math
import random
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence as Seq

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from models.artifacts import MANIFEST, read_manifest, write_manifest
from models.base import UNKNOWN, Anomaly, Detector, Sequence, Verdict, pick_device
from models.memo import DEFAULT_SIZE, FIXED_ROWS, RowMemo, fixed_chunks

WEIGHTS = "weights.safetensors"
END = "<end>"
EXTRA_TEXTS = 100_000     # unseen template texts given a feature row while scoring, at most
EMBEDDINGS = ("word2vec", "onehot")
WEIGHTINGS = ("mean", "tfidf")

_WILDCARD = re.compile(r"<\*>")
_WORD = re.compile(r"[A-Za-z]+|\d+")
_LETTERS = re.compile(r"[A-Za-z]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def template_tokens(text: str) -> list[str]:
    """Lower-case words of a template: wildcards dropped, camelCase and dotted names split
    (``addStoredBlock`` -> add stored block), so renamed identifiers still share words."""
    words: list[str] = []
    for chunk in _WORD.findall(_WILDCARD.sub(" ", text)):
        words.extend(part.lower() for part in _CAMEL.findall(chunk))
    return words


def edit_template(text: str, rng: random.Random, words: Seq[str]) -> str:
    """One word of a template changed, as when a log statement is edited: drop one word, or
    insert one of ``words`` before a word (or at the end). Wildcards and punctuation stay."""
    spans = [m.span() for m in _LETTERS.finditer(text)]
    if len(spans) > 1 and rng.random() < 0.5:
        start, end = rng.choice(spans)
        return (text[:start] + text[end:]).replace("  ", " ")
    at = rng.choice([start for start, _ in spans] + [len(text)])
    return f"{text[:at]}{rng.choice(words)} {text[at:]}"


def _stable_hash(text: str) -> int:
    # gensim seeds vectors with hash(word) by default, which Python randomises per process.
    return zlib.crc32(text.encode())


class TemplateEmbedder:
    """Word2vec token vectors -> one unit-length vector per template text.

    A template's vector is the mean of its known words' unit vectors (``weighting="mean"``) or
    their TF-IDF weighted mean (``"tfidf"``, IDF over the vocabulary's templates), minus the
    vocabulary's mean vector (``center``), scaled to unit length. Mean is the default:
    ``python -m bench.attgru_eval`` reports both (``template_vectors``): once the shared
    direction is removed, IDF weights separate HDFS templates no better and leave a one-word
    edit of a template nearest to its original slightly less often; and a plain mean does not
    move when the vocabulary (hence every IDF) grows."""

    def __init__(self, tokens: list[str], token_vectors: np.ndarray, idf: np.ndarray,
                 center: np.ndarray | None = None, weighting: str = "mean"):
        if len(tokens) != len(token_vectors) or len(tokens) != len(idf):
            raise ValueError("tokens, token vectors and idf weights differ in length")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.token_vectors = np.asarray(token_vectors, dtype=np.float32)
        self.idf = np.asarray(idf, dtype=np.float32)
        self.weighting = weighting
        self.center = (np.zeros(self.size, dtype=np.float32) if center is None
                       else np.asarray(center, dtype=np.float32))

    @property
    def size(self) -> int:
        return int(self.token_vectors.shape[1])

    @classmethod
    def fit(cls, texts: Iterable[str], vector_size: int = 32, seed: int = 1, epochs: int = 50,
            weighting: str = "mean") -> "TemplateEmbedder":
        """Train word2vec on the tokens of the template texts (each text one sentence).

        A vocabulary is a few dozen short sentences: trained long, word2vec pulls the words of
        a sentence together until templates that share a word or two collapse onto each other
        (``template_vectors`` in the bench compares 50 and 300 epochs)."""
        from gensim.models import Word2Vec

        sentences = [toks for toks in (template_tokens(t) for t in texts) if toks]
        if not sentences:
            raise ValueError("no words in the template texts: ATT-GRU needs template texts")
        # One worker and a stable hash: the same texts and seed give the same vectors.
        gensim_log = logging.getLogger("gensim")
        level = gensim_log.level
        gensim_log.setLevel(logging.WARNING)       # gensim logs every epoch at INFO
        try:
            model = Word2Vec(sentences=sentences, vector_size=vector_size, window=5, min_count=1,
                             sg=1, negative=5, workers=1, seed=seed, epochs=epochs,
                             hashfxn=_stable_hash)
        finally:
            gensim_log.setLevel(level)
        tokens = sorted(model.wv.key_to_index)
        vectors = np.stack([model.wv[t] for t in tokens])
        document_frequency = Counter(t for s in sentences for t in set(s))
        n = len(sentences)
        idf = np.array([math.log((1 + n) / (1 + document_frequency[t])) + 1.0 for t in tokens])
        embedder = cls(tokens, vectors, idf, weighting=weighting)
        embedder.center = np.mean([embedder._weighted_mean(s) for s in sentences], axis=0)
        return embedder

    def vector(self, text: str | None) -> np.ndarray | None:
        """Unit vector of a template text; None when none of its words is known."""
        if not text:
            return None
        mean = self._weighted_mean(template_tokens(text))
        if mean is None:
            return None
        centered = mean - self.center
        return (centered / max(float(np.linalg.norm(centered)), 1e-12)).astype(np.float32)

    def _weighted_mean(self, words: list[str]) -> np.ndarray | None:
        counts = Counter(t for t in words if t in self.index)
        if not counts:
            return None
        rows = np.array([self.index[t] for t in counts])
        weights = np.array([counts[t] for t in counts], dtype=np.float32)
        if self.weighting == "tfidf":
            weights = weights * self.idf[rows]
        unit = self.token_vectors[rows] / np.maximum(
            np.linalg.norm(self.token_vectors[rows], axis=1, keepdims=True), 1e-12)
        return ((weights[:, None] * unit).sum(0) / weights.sum()).astype(np.float32)


class AttGRUNet(nn.Module):
    """Pre-attention over the window, 2-layer BiGRU, ReLU layer, 2 logits."""

    def __init__(self, input_size: int, hidden: int = 64, layers: int = 2, attention: bool = True,
                 attention_size: int = 64, dense: int = 64):
        super().__init__()
        self.use_attention = attention
        self.att_w = nn.Linear(input_size, attention_size, bias=False)
        self.att_u = nn.Linear(input_size, attention_size)
        self.att_v = nn.Linear(attention_size, 1, bias=False)
        self.gru = nn.GRU(input_size, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden, dense), nn.ReLU(), nn.Linear(dense, 2))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, window, F) with real positions first; lengths: (B,) >= 1.
        Returns logits (B, 2) and attention weights (B, window), exactly 0 on padding."""
        width = x.shape[1]
        real = torch.arange(width, device=x.device)[None, :] < lengths[:, None]
        n_real = lengths.to(x.dtype)[:, None]
        if self.use_attention:
            query = (x * real[..., None]).sum(1) / n_real
            scores = self.att_v(torch.tanh(self.att_w(x) + self.att_u(query)[:, None, :])).squeeze(-1)
            alpha = torch.softmax(scores.masked_fill(~real, float("-inf")), dim=1)
            x = x * (alpha * n_real)[..., None]
        else:
            alpha = real.to(x.dtype) / n_real
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed)                     # (layers * 2, B, hidden)
        return self.head(torch.cat([last[-2], last[-1]], dim=1)), alpha


@dataclass
class _Windows:
    """Windows as rows of token ids (-1 = padding) into a feature table."""
    tokens: torch.Tensor          # (N, window) long
    lengths: torch.Tensor         # (N,) long


class AttGRU(Detector):
    name = "attgru"

    def __init__(self, window: int = 10, hidden: int = 64, layers: int = 2, vector_size: int = 32,
                 embedding: str = "word2vec", weighting: str = "mean", attention: bool = True,
                 threshold: float = 0.5,
                 epochs: int = 5, batch_size: int = 512, lr: float = 1e-3, seed: int = 1,
                 edit_rate: float = 0.2, device: str = "auto", memo_size: int = DEFAULT_SIZE):
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, not {embedding!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window, self.hidden, self.layers = window, hidden, layers
        self.vector_size, self.embedding, self.attention = vector_size, embedding, attention
        self.weighting = weighting
        self.threshold, self.epochs, self.batch_size = threshold, epochs, batch_size
        self.lr, self.seed, self.edit_rate = lr, seed, edit_rate
        self.device = pick_device(device)
        self.vocabulary: dict[str, str | None] = {}    # template id -> text, training order
        self.embedder: TemplateEmbedder | None = None
        self.net: AttGRUNet | None = None
        self.stats: dict[str, Any] = {}
        self.created: str | None = None
        self._base_features: torch.Tensor | None = None  # vocabulary + <end> + unknown rows
        self._text_vectors: dict[str, np.ndarray | None] = {}
        # Scoring: rows for unseen template texts keep their ids from call to call, so a window
        # is the same tuple of rows every time and its memoised output (probability, attention
        # weights) can be reused; both are dropped together when the net or vocabulary changes.
        self.memo = RowMemo(memo_size)
        self._extra_row: dict[str, int] = {}
        self._extra: list[np.ndarray] = []
        self._table: torch.Tensor | None = None          # on the device, with the padding row last

    # ---- features ------------------------------------------------------------------------
    @property
    def _vector_width(self) -> int:
        return len(self.vocabulary) if self.embedding == "onehot" else self.vector_size

    @property
    def _vector_scale(self) -> float:
        # unit-length template vectors have components ~ 1/sqrt(d); scale them to ~1 like the
        # one-hot entries and the flags, so the GRU's default initialisation fits both.
        return math.sqrt(self.vector_size)

    @property
    def _input_size(self) -> int:
        return self._vector_width + 2             # + <end> flag + unknown flag

    def _build_features(self) -> None:
        """Feature rows of the vocabulary, then <end>, then unknown (no usable text)."""
        width = self._vector_width
        rows = np.zeros((len(self.vocabulary) + 2, width + 2), dtype=np.float32)
        for i, (key, text) in enumerate(self.vocabulary.items()):
            if self.embedding == "onehot":
                rows[i, i] = 1.0
            else:
                vector = self.embedder.vector(text)
                if vector is None:
                    rows[i, width + 1] = 1.0
                else:
                    rows[i, :width] = vector * self._vector_scale
        rows[len(self.vocabulary), width] = 1.0
        rows[len(self.vocabulary) + 1, width + 1] = 1.0
        self._base_features = torch.from_numpy(rows)
        self._key_row = {key: i for i, key in enumerate(self.vocabulary)}
        self._end_row, self._unknown_row = len(self.vocabulary), len(self.vocabulary) + 1
        self._text_vectors = {}
        self._forget_scoring_state()

    def _forget_scoring_state(self) -> None:
        self.memo.clear()
        self._extra_row, self._extra, self._table = {}, [], None

    def template_vector(self, text: str) -> np.ndarray | None:
        """The vector a template text gets (seen or not); None when none of its words is known."""
        if self.embedder is None:
            raise RuntimeError("ATT-GRU with one-hot embeddings has no text vectors")
        if text not in self._text_vectors:
            if len(self._text_vectors) > 100_000:          # new templates churn: bound the cache
                self._text_vectors.clear()
            self._text_vectors[text] = self.embedder.vector(text)
        return self._text_vectors[text]

    def _rows(self, sequences: Seq[Sequence], extra: list[np.ndarray],
              extra_row: dict[str, int] | None = None) -> list[list[int]]:
        """Feature-row ids per position of each sequence (plus <end> for closed sessions).
        Vectors of templates outside the vocabulary are appended to ``extra``; ``extra_row``
        (text -> row id) says which texts already have a row there."""
        extra_row = {} if extra_row is None else extra_row
        first_extra = len(self.vocabulary) + 2
        out = []
        for seq in sequences:
            texts = seq.templates or [None] * len(seq.keys)
            if len(texts) != len(seq.keys):
                raise ValueError(f"sequence has {len(seq.keys)} keys but {len(texts)} template texts")
            ids = []
            for key, text in zip(seq.keys, texts):
                row = self._key_row.get(key)
                if row is None:
                    row = self._unknown_row
                    if self.embedding == "word2vec" and text and key != UNKNOWN:
                        if text not in extra_row:
                            vector = self.template_vector(text)
                            if vector is not None:
                                extra_row[text] = first_extra + len(extra)
                                extra.append(vector)
                        row = extra_row.get(text, self._unknown_row)
                ids.append(row)
            if seq.complete:
                ids.append(self._end_row)
            out.append(ids)
        return out

    def _feature_table(self, extra: list[np.ndarray]) -> torch.Tensor:
        if not extra:
            return self._base_features
        width = self._vector_width
        rows = np.zeros((len(extra), width + 2), dtype=np.float32)
        rows[:, :width] = np.stack(extra) * self._vector_scale
        return torch.cat([self._base_features, torch.from_numpy(rows)])

    def _judged_ends(self, seq: Sequence, n_rows: int) -> range:
        """Positions (in the row list, <end> included) whose window is judged."""
        first = seq.judge_from
        if not seq.start:
            # Without the session's first events a short window would be mistaken for a short
            # session start; judge only full windows (or the last one when there is no full one).
            first = max(first, min(self.window - 1, n_rows - 1))
        return range(max(first, 0), n_rows)

    def _window(self, rows: list[int], end: int) -> tuple[int, ...]:
        return tuple(rows[max(0, end - self.window + 1):end + 1])

    def _pad(self, windows: list[tuple[int, ...]]) -> _Windows:
        tokens = torch.full((len(windows), self.window), -1, dtype=torch.long)
        for i, w in enumerate(windows):
            tokens[i, :len(w)] = torch.tensor(w, dtype=torch.long)
        return _Windows(tokens, torch.tensor([len(w) for w in windows], dtype=torch.long))

    def _forward(self, windows: _Windows, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``table`` on the device with the padding row (token -1) last."""
        return self.net(table[windows.tokens.to(self.device)], windows.lengths.to(self.device))

    def _scoring_table(self) -> torch.Tensor:
        """The feature table of the vocabulary and every unseen text met so far (+ padding)."""
        rows = len(self._base_features) + len(self._extra) + 1
        if self._table is None or len(self._table) != rows:
            table = self._feature_table(self._extra)
            self._table = torch.cat([table, torch.zeros(1, table.shape[1])]).to(self.device)
        return self._table

    def _window_outputs(self, windows: list[tuple[int, ...]]) -> np.ndarray:
        """Per window: [probability abnormal, attention weight of each position (0 on padding)].

        Windows of one length go through the net together in passes of exactly FIXED_ROWS (the
        last padded with copies), so every pass has one shape and a window's output does not
        depend on the windows beside it (models.memo)."""
        table = self._scoring_table()
        out = np.zeros((len(windows), 1 + self.window), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            by_length.setdefault(len(w), []).append(i)
        for members in by_length.values():
            for start, stop in fixed_chunks(len(members)):
                chunk = [windows[i] for i in members[start:stop]]
                chunk += [chunk[0]] * (FIXED_ROWS - len(chunk))
                logits, alpha = self._forward(self._pad(chunk), table)
                rows = members[start:stop]
                out[rows, 0] = torch.softmax(logits, 1)[:stop - start, 1].cpu().numpy()
                out[rows, 1:] = alpha[:stop - start].cpu().numpy()
        return out

    # ---- training ------------------------------------------------------------------------
    def fit(self, sequences: Seq[Sequence], labels: Seq[int] | None = None, *,
            templates: Mapping[str, str] | None = None, epochs: int | None = None,
            seed: int | None = None, h: int | None = None, device: str | None = None,
            progress: bool = False, **unknown) -> dict:
        """Train on labelled closed sessions (1 = abnormal). ``templates`` maps template id ->
        text for the vocabulary; without it the texts carried by the sequences are used.
        ``h`` is the window length; options of other detectors (e.g. ``g``) are refused."""
        unknown = {k: v for k, v in unknown.items() if v is not None}
        if unknown:
            raise ValueError(f"attgru has no option {', '.join(sorted(unknown))}")
        if labels is None or len(labels) != len(sequences):
            raise ValueError("attgru is supervised: give labelled normal and abnormal sessions "
                             "(--normal FILE --abnormal FILE)")
        labels = [int(y) for y in labels]
        if set(labels) - {0, 1}:
            raise ValueError("labels must be 0 (normal) or 1 (abnormal)")
        if len(set(labels)) < 2:
            raise ValueError("attgru needs both normal and abnormal sessions to train")
        if not any(seq.keys for seq in sequences):
            raise ValueError("no events in the training sessions")
        started = time.perf_counter()
        self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.epochs = epochs or self.epochs
        self.window = h or self.window
        self.seed = self.seed if seed is None else seed
        if device is not None:
            self.device = pick_device(device)
        torch.manual_seed(self.seed)

        self.vocabulary = self._collect_vocabulary(sequences, templates)
        if self.embedding == "word2vec":
            texts = [t for t in self.vocabulary.values() if t]
            if not texts:
                raise ValueError("ATT-GRU (word2vec) needs template texts: pass --templates CSV")
            self.embedder = TemplateEmbedder.fit(texts, self.vector_size, self.seed, weighting=self.weighting)
        self._build_features()
        torch.manual_seed(self.seed)
        self.net = AttGRUNet(self._input_size, self.hidden, self.layers, self.attention).to(self.device)
        self._forget_scoring_state()

        extra: list[np.ndarray] = []
        rows = self._rows([Sequence(keys=s.keys, templates=s.templates) for s in sequences], extra)
        table = torch.cat([self._feature_table(extra), torch.zeros(1, self._input_size)])
        table = table.to(self.device)                       # last row: padding (token id -1)
        windows, targets, counts = self._labelled_windows(rows, labels)
        padded = self._pad(windows)
        tokens, lengths = padded.tokens.to(self.device), padded.lengths.to(self.device)
        targets = targets.to(self.device)

        edits = self._template_edits() if self.embedding == "word2vec" and self.edit_rate > 0 else None
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        steps, history = 0, []
        iterator = range(self.epochs)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="attgru", unit="epoch", file=sys.stderr)
        self.net.train()
        # Batches are drawn from every window occurrence, as plain SGD over the data would; a
        # window repeated in a batch is computed once and weighted by its copies.
        copies = torch.repeat_interleave(torch.arange(len(windows)), counts)
        for _ in iterator:
            epoch_loss = 0.0
            for draw in copies[torch.randperm(len(copies), generator=generator)].split(self.batch_size):
                batch, multiplicity = torch.unique(draw, return_counts=True)
                batch, multiplicity = batch.to(self.device), multiplicity.to(self.device, torch.float32)
                step_table = table if edits is None else self._edited_table(table, edits, generator)
                logits, _ = self.net(step_table[tokens[batch]], lengths[batch])
                loss = (nn.functional.cross_entropy(logits, targets[batch], reduction="none")
                        * multiplicity).sum() / multiplicity.sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_loss += float(loss.detach()) * len(draw) / len(copies)
                steps += 1
            history.append(epoch_loss)
            if progress:
                iterator.set_postfix(loss=f"{epoch_loss:.4f}")
        self.net.eval()
        self.stats = {"sessions": len(labels), "abnormal_sessions": sum(labels),
                      "windows": len(copies), "distinct_windows": len(windows),
                      "abnormal_windows": int(counts[targets.cpu() == 1].sum()),
                      "epochs": self.epochs, "steps": steps,
                      "final_loss": round(history[-1], 6) if history else None, "seed": self.seed,
                      "device": self.device, "seconds": round(time.perf_counter() - started, 2)}
        return dict(self.stats)

    def _template_edits(self, per_template: int = 16) -> torch.Tensor:
        """Vectors of ``per_template`` one-word edits of every vocabulary template (NaN where a
        template has no text or an edit leaves no known word)."""
        rng = random.Random(self.seed)
        words = self.embedder.tokens
        out = torch.full((len(self.vocabulary), per_template, self._vector_width), float("nan"))
        for i, text in enumerate(self.vocabulary.values()):
            for j in range(per_template if text else 0):
                vector = self.embedder.vector(edit_template(text, rng, words))
                if vector is not None:
                    out[i, j] = torch.from_numpy(vector * self._vector_scale)
        return out

    def _edited_table(self, table: torch.Tensor, edits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The feature table with ``edit_rate`` of the vocabulary's templates replaced by an edit.

        Log statements change between releases; trained only on the exact vectors, the net may
        hang a decision on a direction that a one-word change moves: an inserted word that a
        rarer, abnormal template uses can make a template every block logs a false alarm for
        every block. Seeing edited versions in training makes that rarer, not impossible
        (``perturbed`` in ``python -m bench.attgru_eval``, ``attgru`` vs ``attgru_no_edit_training``)."""
        count, per_template = edits.shape[:2]
        chosen = torch.rand(count, generator=generator) < self.edit_rate
        pick = edits[torch.arange(count), torch.randint(per_template, (count,), generator=generator)]
        chosen &= ~torch.isnan(pick).any(1)
        if not chosen.any():
            return table
        table = table.clone()
        rows = chosen.nonzero().squeeze(1)
        table[rows.to(table.device), :self._vector_width] = pick[rows].to(table.device)
        return table

    def _labelled_windows(self, rows: list[list[int]], labels: list[int]
                          ) -> tuple[list[tuple[int, ...]], torch.Tensor, torch.Tensor]:
        """Distinct training windows, their labels and how often each occurs.

        A window is abnormal when it occurs in abnormal sessions and in no normal session. The
        labels are per session, and an abnormal block usually opens like any other: its first
        windows also occur in normal blocks, so they cannot be what made it abnormal, and calling
        them abnormal would teach the net to flag every block's opening. What is left is what
        only abnormal blocks contain (an exception template, an <end> after too few events ...).
        An abnormal session all of whose windows also occur in normal ones adds no abnormal
        window: nothing in its events tells it apart (HDFS blocks labelled for what happened
        after the log was cut)."""
        in_normal: Counter = Counter()
        in_abnormal: Counter = Counter()
        for session, label in zip(rows, labels):
            for end in range(len(session)):
                (in_abnormal if label else in_normal)[self._window(session, end)] += 1
        windows = list(in_normal | in_abnormal)
        targets = torch.tensor([int(w not in in_normal) for w in windows], dtype=torch.long)
        counts = torch.tensor([in_normal[w] + in_abnormal[w] for w in windows], dtype=torch.long)
        return windows, targets, counts

    @staticmethod
    def _collect_vocabulary(sequences: Seq[Sequence], templates: Mapping[str, str] | None
                            ) -> dict[str, str | None]:
        vocabulary: dict[str, str | None] = {}
        if templates:
            vocabulary.update((str(k), str(v)) for k, v in templates.items())
        for seq in sequences:
            texts = seq.templates or [None] * len(seq.keys)
            for key, text in zip(seq.keys, texts):
                if key == UNKNOWN:
                    continue
                if vocabulary.get(key) is None:
                    vocabulary[key] = text
        return vocabulary

    # ---- scoring -------------------------------------------------------------------------
    def normal_depends_on(self) -> tuple[str, ...] | None:
        # the keys, and the texts that stand in for keys outside the vocabulary
        return ("keys", "templates")

    def calibrate(self, sequences: Seq[Sequence], labels: Seq[int], anomaly_share: float | None = None) -> dict:
        """Choose the session threshold on labelled sessions the model was not trained on.

        A session is flagged when its highest window probability reaches the threshold (as in
        score()), and with many windows per session the fixed 0.5 flags normal sessions that
        one window made uncertain. This picks, among the midpoints between the held-out
        sessions' distinct scores, the threshold with the best F1 when normal and anomalous
        sessions come at ``anomaly_share`` (the deployment's mix, e.g. HDFS's 16,838 of 575,061
        blocks; default: the labels' own), ties going to the one nearest the current threshold.
        Returns what it saw and chose (also kept in the model's training record)."""
        labels = [int(y) for y in labels]
        if len(labels) != len(sequences) or set(labels) - {0, 1} or len(set(labels)) < 2:
            raise ValueError("calibrate needs labelled normal and abnormal sessions (0 / 1), one label each")
        share = sum(labels) / len(labels) if anomaly_share is None else float(anomaly_share)
        if not 0 < share < 1:
            raise ValueError(f"anomaly_share must be in (0, 1), got {anomaly_share!r}")
        scores = np.array([v.score for v in self.score(sequences)])
        y = np.array(labels, dtype=bool)
        distinct = np.unique(scores)
        candidates = np.concatenate([[distinct[0] - 1e-6], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + 1e-6]])
        candidates = candidates[candidates > 0]    # a session with no judged window scores 0, never flagged

        def f1(t: float) -> float:
            flagged = scores >= t
            recall = (flagged & y).sum() / y.sum()
            false_rate = (flagged & ~y).sum() / (~y).sum()
            tp, fp, fn = share * recall, (1 - share) * false_rate, share * (1 - recall)
            return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

        before = self.threshold
        best = max(candidates, key=lambda t: (round(f1(t), 12), -abs(t - before)))
        self.threshold = float(best)
        record = {"sessions": len(labels), "anomalous": int(y.sum()), "anomaly_share": share,
                  "threshold_before": before, "threshold": self.threshold,
                  "f1_before": round(float(f1(before)), 4), "f1": round(float(f1(self.threshold)), 4)}
        self.stats["calibration"] = record
        return record

    @torch.no_grad()
    def score(self, sequences: Seq[Sequence], batch_size: int = 4096) -> list[Verdict]:
        """One verdict per sequence. Closed sessions: every window incl. the <end> one; open ones
        (``complete=False``): the windows ending at events from ``judge_from`` on (the detect stage
        sets it to the newest event). Windows shared between sequences are scored once, windows
        met before come from the memo (``batch_size`` is kept for callers; the net always sees
        FIXED_ROWS windows per pass, see ``_window_outputs``)."""
        if self.net is None:
            raise RuntimeError("ATT-GRU is not trained: call fit() or load()")
        self.net.eval()
        if len(self._extra) > EXTRA_TEXTS:               # new templates churn: start afresh
            self._forget_scoring_state()
        rows = self._rows(sequences, self._extra, self._extra_row)
        index: dict[tuple[int, ...], int] = {}
        judged: list[list[tuple[int, int]]] = []       # per sequence: (end position, window id)
        for seq, seq_rows in zip(sequences, rows):
            judged.append([(end, index.setdefault(self._window(seq_rows, end), len(index)))
                           for end in self._judged_ends(seq, len(seq_rows))])
        windows = list(index)
        found, missing = self.memo.lookup(windows)
        if missing:
            computed = self._window_outputs([windows[i] for i in missing])
            self.memo.store([windows[i] for i in missing], computed)
            for i, row in zip(missing, computed):
                found[i] = row
        outputs = torch.from_numpy(np.stack(found)) if found else torch.zeros((0, 1 + self.window))
        probability, attention = outputs[:, 0], outputs[:, 1:]
        return [self._verdict(seq, pairs, probability, attention, windows)
                for seq, pairs in zip(sequences, judged)]

    def _verdict(self, seq: Sequence, pairs: list[tuple[int, int]], probability: torch.Tensor,
                 attention: torch.Tensor, windows: list[tuple[int, ...]]) -> Verdict:
        if not pairs:
            return Verdict(anomalous=False, score=0.0, details={"windows_judged": 0})
        probs = [float(probability[w]) for _, w in pairs]
        worst = int(np.argmax(probs))
        end, w = pairs[worst]
        details = {"windows_judged": len(pairs), **self._describe(seq, end, attention[w], len(windows[w]))}
        anomalies = []
        first = next((i for i, p in enumerate(probs) if p >= self.threshold), None)
        if first is not None:
            end_first, w_first = pairs[first]
            at_end = end_first == len(seq.keys)               # the <end> window of a closed session
            anomalies.append(Anomaly(
                position=end_first, kind="end" if at_end else "window",
                observed=END if at_end else seq.keys[end_first], score=probs[first],
                details=self._describe(seq, end_first, attention[w_first], len(windows[w_first]))))
        return Verdict(anomalous=first is not None, score=probs[worst], anomalies=anomalies,
                       details=details)

    def _describe(self, seq: Sequence, end: int, alpha: torch.Tensor, length: int) -> dict[str, Any]:
        """Which window (positions [start, end] in seq.keys, end == len(keys) is <end>) and the
        attention weight of each of its events."""
        start = end - length + 1
        keys = [seq.keys[i] if i < len(seq.keys) else END for i in range(start, end + 1)]
        return {"window": [start, end], "window_keys": keys,
                "attention": [round(float(a), 6) for a in alpha[:length]]}

    # ---- persistence ---------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"window": self.window, "hidden": self.hidden, "layers": self.layers,
                "vector_size": self.vector_size, "embedding": self.embedding, "weighting": self.weighting,
                "attention": self.attention, "threshold": self.threshold, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "edit_rate": self.edit_rate}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.net is None:
            raise RuntimeError("nothing to save: ATT-GRU is not trained")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        if self.embedder is not None:
            tensors["word2vec.vectors"] = torch.from_numpy(self.embedder.token_vectors)
            tensors["word2vec.idf"] = torch.from_numpy(self.embedder.idf)
            tensors["word2vec.center"] = torch.from_numpy(self.embedder.center)
        save_file(tensors, str(directory / WEIGHTS))
        manifest = read_manifest(directory) if (directory / MANIFEST).exists() else {}
        manifest.update({
            "detector": self.name, "created": self.created, "weights": WEIGHTS, **self._config(),
            "h": self.window, "g": None,
            "vocabulary": [{"key": k, "template": t} for k, t in self.vocabulary.items()],
            "word2vec_tokens": self.embedder.tokens if self.embedder else None,
            "training": {**manifest.get("training", {}), **self.stats},
        })
        write_manifest(directory, manifest)

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> "AttGRU":
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest.get("detector") != cls.name:
            raise ValueError(f"{directory} holds a {manifest.get('detector')!r} model, not attgru")
        config = {k: manifest[k] for k in ("window", "hidden", "layers", "vector_size", "embedding", "weighting",
                                           "attention", "threshold", "epochs", "batch_size",
                                           "lr", "seed", "edit_rate")}
        detector = cls(**config, device=device)
        detector.vocabulary = {e["key"]: e["template"] for e in manifest["vocabulary"]}
        tensors = load_file(str(directory / manifest.get("weights", WEIGHTS)))
        if detector.embedding == "word2vec":
            detector.embedder = TemplateEmbedder(manifest["word2vec_tokens"],
                                                 tensors["word2vec.vectors"].numpy(),
                                                 tensors["word2vec.idf"].numpy(),
                                                 tensors["word2vec.center"].numpy(), detector.weighting)
        detector._build_features()
        detector.net = AttGRUNet(detector._input_size, detector.hidden, detector.layers,
                                 detector.attention)
        detector.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        detector.net.to(detector.device).eval()
        detector.stats = dict(manifest.get("training", {}))
        detector.created = manifest.get("created")
        return detector
