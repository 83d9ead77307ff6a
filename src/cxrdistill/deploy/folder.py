"""A self-describing model folder: ``config.json`` + ``model.safetensors`` + ``README.md`` (model card).

The layout follows what ``huggingface_hub``'s ``PyTorchModelHubMixin`` writes, so the folder can
be pushed to a hub as is; it loads offline with :func:`load_model` (``cxrdistill predict -m FOLDER``).
``config.json`` holds the ``model.pt`` metadata (model settings, class names, input size); the
card states the training data, the test metrics with their 95% CIs, the intended use and the
limits, all read from the run directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from cxrdistill.atomic import atomic_write, write_json_atomic, write_text_atomic
from cxrdistill.errors import CheckpointError

FOLDER_FORMAT = "cxrdistill-model-folder"

__all__ = ["FOLDER_FORMAT", "write_model_folder", "load_model", "is_model_folder", "model_card"]


def is_model_folder(path: Path) -> bool:
    """A folder written by :func:`write_model_folder`."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()


def write_model_folder(model: nn.Module, meta: dict[str, Any], out: Path, run_dir: Path | None = None) -> Path:
    """Write the folder of `model` (a `load_exported_model` pair); `run_dir` feeds the model card."""
    from safetensors.torch import save as save_safetensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors(state, metadata={"format": FOLDER_FORMAT})
    atomic_write(out / "model.safetensors", lambda f: f.write(blob))
    config = {"format": FOLDER_FORMAT, "version": 1, **{k: meta[k] for k in ("model", "class_names", "image_size")},
              "extra": meta.get("extra", {})}
    write_json_atomic(out / "config.json", config, indent=2)
    write_text_atomic(out / "README.md", model_card(meta, run_dir))
    return out


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A run directory, its ``model.pt``, or a model folder -> (model in eval mode, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cxrdistill.config import ModelConfig
    from cxrdistill.models.factory import build_model, load_exported_model

    path = Path(path)
    if path.is_dir() and is_model_folder(path):
        config = json.loads((path / "config.json").read_text())
        if config.get("format") != FOLDER_FORMAT:
            raise CheckpointError(f"{path}/config.json: not a cxrdistill model folder")
        model = build_model(ModelConfig(**config["model"]), len(config["class_names"]))
        try:
            model.load_state_dict(load_file(str(path / "model.safetensors")))
        except (RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"{path}/model.safetensors: weights do not fit config.json: {err}") from None
        model.eval()
        return model, {k: config[k] for k in ("model", "class_names", "image_size")} | {"extra": config.get("extra", {})}
    if path.is_dir():
        path = path / "model.pt"
    return load_exported_model(path)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _ci(ci: Any) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "not computed"


def _metric_rows(run_dir: Path) -> list[tuple[str, Any, str]]:
    """(metric, value, 95% CI) of ``eval/metrics.json``, with mAP / FROC CIs bootstrapped here."""
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return []
    metrics = json.loads(path.read_text())
    cis: dict[str, Any] = {}
    preds = run_dir / "eval" / "predictions.json"
    manifest = _run_manifest(run_dir)
    if "detection" in metrics and preds.is_file() and manifest is not None:
        from cxrdistill.eval.ci import detection_cis
        from cxrdistill.eval.predictions import load_ground_truth, load_predictions

        gt = load_ground_truth(manifest, split=metrics.get("split", "test"))
        rows = load_predictions(preds, gt).rows
        cis = detection_cis(gt, rows, metrics["detection"].get("iou_thresholds", (0.25, 0.5, 0.75)), n_boot=200)
    rows_out: list[tuple[str, Any, str]] = []
    det = metrics.get("detection", {})
    for key, value in det.items():
        if key.startswith("mAP"):
            rows_out.append((key, value, _ci(cis.get(key))))
    if "froc" in metrics:
        rows_out.append(("FROC (mean over classes)", metrics["froc"].get("mean_score"), _ci(cis.get("FROC"))))
    cls = metrics.get("classification", {})
    if "macro_AUROC" in cls:
        rows_out.append(("macro AUROC", cls["macro_AUROC"], _ci(cls.get("macro_AUROC_CI95"))))
    return rows_out


def _run_manifest(run_dir: Path) -> Path | None:
    import yaml

    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    raw = ((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("manifest")
    if not raw:
        return None
    p = Path(raw)
    if not p.is_absolute() and (run_dir / p).exists():
        p = run_dir / p
    return p if p.exists() else None


def _data_lines(run_dir: Path) -> list[str]:
    manifest = _run_manifest(run_dir)
    if manifest is None:
        return ["- training data: not recorded (the run's manifest was not found)"]
    import yaml

    from cxrdistill.eval.html_report import split_counts

    raw = json.loads(manifest.read_text())
    data_cfg = ((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data") or {})
    counts, note = split_counts(manifest, raw, data_cfg)
    info = raw.get("info", {}) or {}
    lines = [f"- manifest: `{manifest.name}` (source: {info.get('source', 'not recorded')}), "
             f"{len(raw.get('images', []))} images, {len(raw.get('annotations', []))} boxes"]
    lines += [f"- split `{s}`, supervision `{v}`: {n} images" for (s, v), n in sorted(counts.items())]
    return lines + ([f"- {note}"] if note else [])


def model_card(meta: dict[str, Any], run_dir: Path | None) -> str:
    """The model card (Markdown) of a model and, when given, its run directory."""
    model = meta["model"]
    lines = ["---", "library_name: cxrdistill", "tags: [chest-x-ray, detection, research-only]", "---", "",
             f"# cxrdistill {model['kind']} ({', '.join(meta['class_names'])})", "",
             "## Model", "",
             f"- kind: {model['kind']}, ResNet-{model.get('depth')} backbone (base width {model.get('base_width')})",
             f"- input: one grey channel in [0, 1], resized to {meta['image_size']} x {meta['image_size']} px",
             f"- classes: {', '.join(meta['class_names'])}", ""]
    lines += ["## Training data", ""]
    lines += _data_lines(run_dir) if run_dir is not None else ["- not recorded (exported from a bare model.pt)"]
    lines += ["", "## Test metrics", ""]
    rows = _metric_rows(run_dir) if run_dir is not None else []
    if rows:
        lines += ["| metric | value | 95% CI |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(value)} | {ci} |" for name, value, ci in rows]
        lines += ["", "CIs: percentile bootstrap over test images (mAP and FROC: 200 replicates, seed 0)."]
    else:
        lines.append("No evaluation was found beside the model (eval/metrics.json).")
    lines += ["", "## Intended use", "",
              "Research on chest X-ray lesion detection and distillation from weak supervision; a second reader "
              "in studies run under an ethics approval. Not a medical device: it has not been cleared or "
              "validated for diagnosis, and its outputs must not drive clinical decisions.", "",
              "## Limits", "",
              "- Trained and tested on the data above only; performance on other hospitals, scanners, "
              "populations, projections (lateral, AP bedside) or paediatric images is unknown.",
              "- Metrics come from a single test split; the CIs cover image sampling, not site shift.",
              f"- Images are resized to {meta['image_size']} px squared without keeping the aspect ratio; "
              "small lesions may be lost.",
              "- Scores are not calibrated probabilities; choose an operating threshold on local data.", ""]
    return "\n".join(lines)
