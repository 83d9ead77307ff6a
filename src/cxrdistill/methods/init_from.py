"""``init_from``: start a run from another run's finished stage instead of training that stage again.

One idea for what recipes once did with their own checkpoint parameters (OXnet's
``base_checkpoint``, AALS's ``pretrained_checkpoint``): a study row says ``init_from: <row>`` and
each of its cells gets ``init_from=<that row's cell at the same fraction and seed>`` (a run
directory). `methods.kit.supervised_stage` then loads that run's stage of the same name
(``checkpoints/<stage>/``) instead of training or reading the stage store; a recipe with its own
first stage (AALS's ``pretrain``) can call :func:`init_checkpoint` the same way.

Which file: the stage's ``best.pt`` when the run kept one (a stage with checkpoint selection), else
its ``last.pt`` of a finished stage (``done.json``), else — a stage the source run read from the
stage store rather than trained — the store entry its ``stage_key.json`` names.
"""

from __future__ import annotations

import json
from pathlib import Path

from cxrdistill.atomic import file_sha256
from cxrdistill.errors import ConfigError


def init_checkpoint(run_dir: Path | str, stage: str) -> tuple[Path, str]:
    """The checkpoint of stage ``stage`` that the finished run ``run_dir`` ended with, and the key of
    its weights (the source's stage key when it has one, else the file's sha256 prefix).

    `ConfigError` names the run and the stage when there is no such finished stage.
    """
    stage_dir = Path(run_dir) / "checkpoints" / stage
    marker = stage_dir / "stage_key.json"
    info = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    candidates = [stage_dir / "best.pt"]
    if (stage_dir / "done.json").is_file():
        candidates.append(stage_dir / "last.pt")
    if info.get("store"):
        candidates.append(Path(info["store"]) / "model.pt")
    if info.get("init_from"):  # the source itself started from another run
        candidates.append(Path(info["init_from"]))
    for path in candidates:
        if path.is_file():
            return path, str(info.get("key") or file_sha256(path)[:16])
    raise ConfigError(f"init_from: {run_dir} has no finished stage {stage!r} (looked for "
                      f"{', '.join(str(p) for p in candidates)}); run that cell first")


__all__ = ["init_checkpoint"]
