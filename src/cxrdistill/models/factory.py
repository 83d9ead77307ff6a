"""Build the network a run config names, and save / load a trained one for `cxrdistill predict`.

`build_model(cfg.model, num_classes, expect="detector")` is the one place a `ModelConfig` turns
into a module; `export_model` writes `model.pt` (weights plus everything needed to rebuild it:
kind, constructor settings, class names, input size) and `load_exported_model` reads it back
with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cxrdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from cxrdistill.errors import CheckpointError, ConfigError

MODEL_KINDS = ("detector", "heatmap", "classifier")
EXPORT_VERSION = 1


def build_model(model_cfg: Any, num_classes: int, expect: str | None = None) -> nn.Module:
    """The network of `model_cfg` (a `config.ModelConfig`) with `num_classes` outputs.

    `backbone` (or `resnet{depth}`) and `base_width` choose the backbone; `options` go to the
    model's constructor; `pretrained` loads weights into the backbone (`models.pretrained`:
    `imagenet`, a local file / HF directory, or a URL). `expect` names the kind a recipe trains:
    another kind is a `ConfigError` that says so.
    """
    from cxrdistill.models.backbones import backbone_name

    kind = model_cfg.kind
    if expect is not None and kind != expect:
        raise ConfigError(f"model.kind: this recipe trains a {expect}; set model.kind={expect} (got {kind!r})")
    options = dict(model_cfg.options)
    explicit = getattr(model_cfg, "backbone", None)
    try:
        if kind == "detector":
            from cxrdistill.models.detector import RetinaNet

            model: nn.Module = RetinaNet(num_classes, depth=model_cfg.depth, base_width=model_cfg.base_width,
                                         backbone=explicit, **options)
        elif kind == "heatmap":
            from cxrdistill.models.heatmap import HeatmapFPN

            model = HeatmapFPN(num_classes, depth=model_cfg.depth, base_width=model_cfg.base_width,
                               backbone=explicit, **options)
        elif kind == "classifier":
            from cxrdistill.models.classifier import ImageClassifier

            if explicit is not None:  # the new spelling: model.backbone + model.base_width
                options.setdefault("arch", explicit)
                options.setdefault("base_width", model_cfg.base_width)
            options.setdefault("arch", backbone_name(model_cfg))
            return ImageClassifier(num_classes=num_classes, pretrained=model_cfg.pretrained, **options)
        else:
            raise ConfigError(f"model.kind: {kind!r} is not an image model; choose one of {list(MODEL_KINDS)}")
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.options: {err}") from None
    if model_cfg.pretrained is not None:
        from cxrdistill.models.pretrained import load_pretrained

        model.pretrained_report = load_pretrained(model.backbone, model_cfg.pretrained)
    return model


def export_model(path: Path, model: nn.Module, model_cfg: Any, class_names: list[str], image_size: int,
                 **extra: Any) -> Path:
    """Write `model.pt`: state dict + the settings `load_exported_model` needs (atomic)."""
    settings = model_cfg.model_dump(mode="json") if hasattr(model_cfg, "model_dump") else dict(model_cfg)
    settings["pretrained"] = None  # the weights are in the file
    state = {"format": "cxrdistill-model", "version": EXPORT_VERSION, "model": settings,
             "class_names": list(class_names), "image_size": int(image_size), "extra": extra,
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_checkpoint(Path(path), state)
    return Path(path)


def load_exported_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model written by `export_model`, in eval mode, and its metadata (class names, image size)."""
    from cxrdistill.config import ModelConfig

    state = load_checkpoint(Path(path))
    if state.get("format") != "cxrdistill-model":
        raise CheckpointError(f"{path}: not a cxrdistill model export (expected the run's model.pt)")
    model = build_model(ModelConfig(**state["model"]), len(state["class_names"]))
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model they describe: {err}") from None
    model.eval()
    meta = {k: state[k] for k in ("model", "class_names", "image_size", "extra")}
    return model, meta
