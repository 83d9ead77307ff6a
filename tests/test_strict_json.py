"""Every JSON file the toolkit writes is strict JSON: an undefined metric is ``null``, never ``NaN``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cxrdistill.atomic import json_safe, write_json_atomic


def _strict_load(path: Path) -> object:
    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_non_finite_floats_become_null_and_finite_values_are_kept(tmp_path: Path) -> None:
    payload = {"mAP": math.nan, "AP": [0.5, math.inf, -math.inf], "n": np.int64(3),
               "score": np.float32(0.25), "bad": np.float64("nan"), "nested": {"ci": (math.nan, 1.0)},
               "path": tmp_path, "label": "NaN"}
    out = write_json_atomic(tmp_path / "metrics.json", payload)
    loaded = _strict_load(out)
    assert loaded == {"mAP": None, "AP": [0.5, None, None], "n": 3, "score": 0.25, "bad": None,
                      "nested": {"ci": [None, 1.0]}, "path": str(tmp_path), "label": "NaN"}
    assert json_safe([np.float32(np.nan)]) == [None]


def test_a_study_reads_a_null_metric_back_as_nan(tmp_path: Path) -> None:
    from cxrdistill.study.spec import Cell
    from cxrdistill.study.table import read_metric

    cell = Cell("supervised", 0.1, 0, tmp_path / "config.yaml", (), tmp_path)
    write_json_atomic(tmp_path / "final_metrics.json", {"mAP@0.5": math.nan, "mAP": 0.3})
    assert math.isnan(read_metric(cell, "mAP@0.5"))
    assert read_metric(cell, "mAP") == pytest.approx(0.3)
