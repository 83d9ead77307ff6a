"""Read ground truth and prediction files for evaluation, and check that they fit together.

Formats (see docs/architecture.md):

- **manifest** — a COCO ground-truth JSON with extra keys. Images may carry ``"split"``,
  ``"supervision"`` (``box | image | none``) and ``"labels"`` (image-level class names).
- **predictions.json** — COCO results: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.
- **image_scores.json** — ``[{"image_id", "category_id", "score"}]``, one row per image and class.
  When it is absent, the image score of a class is its maximum box score (0 with no box).

Until ``cxrdistill.data.manifest.load_manifest`` exists this module reads the JSON itself
(:func:`load_ground_truth`). Bad records raise :class:`~cxrdistill.errors.ManifestError` naming the
record; predictions for images of *other* splits are dropped and counted (never silently).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrdistill.errors import CxrDistillError, ManifestError

__all__ = [
    "GroundTruth",
    "Predictions",
    "load_ground_truth",
    "ground_truth_from_coco",
    "load_predictions",
    "load_image_scores",
    "image_scores_from_boxes",
    "image_labels",
]


@dataclass
class GroundTruth:
    """COCO ground truth restricted to one split.

    ``coco`` is a plain COCO dict (``images``, ``annotations``, ``categories``) that pycocotools
    accepts; every annotation has ``area`` (``w*h`` when missing or ≤ 0), ``iscrowd`` and ``id``.
    """

    coco: dict[str, Any]
    path: Path | None = None
    split: str | None = None
    other_split_image_ids: frozenset[int] = frozenset()

    @property
    def image_ids(self) -> list[int]:
        """Image ids, sorted (the order pycocotools uses)."""
        return sorted(int(im["id"]) for im in self.coco["images"])

    @property
    def category_ids(self) -> list[int]:
        """Category ids, sorted; position = class index."""
        return sorted(int(c["id"]) for c in self.coco["categories"])

    @property
    def class_names(self) -> list[str]:
        """Category names in class-index order."""
        by_id = {int(c["id"]): str(c["name"]) for c in self.coco["categories"]}
        return [by_id[i] for i in self.category_ids]

    @property
    def images_by_id(self) -> dict[int, dict[str, Any]]:
        return {int(im["id"]): im for im in self.coco["images"]}


@dataclass
class Predictions:
    """Box predictions (COCO results rows) checked against a :class:`GroundTruth`."""

    rows: list[dict[str, Any]]
    dropped_other_split: int = 0
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CxrDistillError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as err:
        raise CxrDistillError(f"{path}: not valid JSON ({err})") from None


def _int_id(value: Any) -> int | None:
    """An id as int: an int (not a bool) or an integral float; None for anything else (4.9, [1], "1")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def ground_truth_from_coco(coco: dict[str, Any], split: str | None = None, path: Path | None = None) -> GroundTruth:
    """Validate a COCO(-manifest) dict and keep the images of ``split`` (all when ``None``).

    Raises :class:`ManifestError` listing every malformed record.
    """
    src = str(path) if path else "manifest"
    problems: list[str] = []
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise ManifestError(f"{src}: missing list {key!r}")
    cats = []
    for c in coco["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            problems.append(f"category {c!r}: needs 'id' and 'name'")
        elif _int_id(c["id"]) is None:
            problems.append(f"category {c.get('name')!r}: id must be an integer, got {c['id']!r}")
        else:
            cats.append({"id": _int_id(c["id"]), "name": str(c["name"])})
    cat_ids = {c["id"] for c in cats}
    images = []
    seen: set[int] = set()
    for n, im in enumerate(coco["images"]):
        if not isinstance(im, dict) or "id" not in im:
            problems.append(f"image #{n} {im!r}: no 'id'")
            continue
        iid = _int_id(im["id"])
        if iid is None:
            problems.append(f"image #{n} ({im.get('file_name', '?')}): id must be an integer, got {im['id']!r}")
            continue
        if iid in seen:
            problems.append(f"image {iid}: duplicate id")
        seen.add(iid)
        if split is None or im.get("split") == split:
            images.append(dict(im, id=iid))
    keep = {im["id"] for im in images}
    anns = []
    for n, a in enumerate(coco.get("annotations", []) or []):
        if not isinstance(a, dict):
            problems.append(f"annotation #{n}: is not a JSON object")
            continue
        aid = a.get("id", n + 1)
        bbox = a.get("bbox")
        if _int_id(aid) is None or _int_id(a.get("image_id")) is None or _int_id(a.get("category_id")) is None:
            problems.append(f"annotation #{n}: id, image_id and category_id must be integers, got "
                            f"{aid!r}, {a.get('image_id')!r} and {a.get('category_id')!r}")
            continue
        if a.get("image_id") not in seen:
            problems.append(f"annotation {aid}: image_id {a.get('image_id')!r} is not an image of the manifest")
            continue
        if a.get("category_id") not in cat_ids:
            problems.append(f"annotation {aid}: unknown category_id {a.get('category_id')!r}")
            continue
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
                or bbox[2] < 0 or bbox[3] < 0):
            problems.append(f"annotation {aid}: bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {bbox!r}")
            continue
        if int(a["image_id"]) not in keep:
            continue
        area = a.get("area")
        if not isinstance(area, (int, float)) or area <= 0:
            area = float(bbox[2]) * float(bbox[3])
        anns.append({"id": int(aid), "image_id": int(a["image_id"]), "category_id": int(a["category_id"]),
                     "bbox": [float(v) for v in bbox], "area": float(area), "iscrowd": int(a.get("iscrowd", 0) or 0)})
    if problems:
        raise ManifestError(f"{src}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:50]))
    if split is not None and not images:
        raise ManifestError(f"{src}: no image has split {split!r}")
    return GroundTruth(coco={"images": images, "annotations": anns, "categories": cats}, path=path, split=split,
                       other_split_image_ids=frozenset(seen - keep))


def load_ground_truth(path: str | Path, split: str | None = "test") -> GroundTruth:
    """Read a manifest / COCO GT JSON and keep the images of ``split`` (``None``: all images)."""
    path = Path(path)
    coco = _read_json(path, "manifest")
    if not isinstance(coco, dict):
        raise ManifestError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    if split is not None and not any("split" in im for im in coco.get("images", [])):
        split = None  # a plain COCO file: every image is the test set
    return ground_truth_from_coco(coco, split=split, path=path)


def _check_rows(rows: Any, path: str, gt: GroundTruth, need_bbox: bool) -> tuple[list[dict[str, Any]], int]:
    if not isinstance(rows, list):
        raise CxrDistillError(f"{path}: expected a JSON list of prediction rows")
    split_ids = set(gt.image_ids)
    cat_ids = set(gt.category_ids)
    all_ids = split_ids | gt.other_split_image_ids
    problems: list[str] = []
    out, dropped = [], 0
    for n, r in enumerate(rows):
        where = f"row {n}"
        try:
            iid, cid = _int_id(r["image_id"]), _int_id(r["category_id"])
            if iid is None or cid is None or isinstance(r["score"], (bool, str)):
                raise TypeError
            score = float(r["score"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: needs integer 'image_id', 'category_id' and a numeric 'score': {r!r}")
            continue
        if not math.isfinite(score):
            problems.append(f"{where} (image {iid}): score is not finite")
            continue
        if cid not in cat_ids:
            problems.append(f"{where} (image {iid}): unknown category_id {cid}")
            continue
        row = {"image_id": iid, "category_id": cid, "score": score}
        if need_bbox:
            b = r.get("bbox")
            if (not isinstance(b, (list, tuple)) or len(b) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b) or b[2] < 0 or b[3] < 0):
                problems.append(f"{where} (image {iid}): bbox must be [x, y, w, h] with w, h >= 0, got {b!r}")
                continue
            row["bbox"] = [float(v) for v in b]
        if iid not in split_ids:
            if iid in all_ids:
                dropped += 1
                continue
            problems.append(f"{where}: image_id {iid} is not an image of the manifest")
            continue
        out.append(row)
    if problems:
        raise CxrDistillError(f"{path}: {len(problems)} bad prediction row(s):\n  " + "\n  ".join(problems[:50]))
    return out, dropped


def load_predictions(path: str | Path, gt: GroundTruth) -> Predictions:
    """Read ``predictions.json`` (COCO results) and keep the rows of ``gt``'s images.

    Rows for images of another split are dropped and counted in ``dropped_other_split``; rows for
    unknown images or categories, or with a malformed box, raise :class:`CxrDistillError`.
    """
    rows, dropped = _check_rows(_read_json(Path(path), "predictions"), str(path), gt, need_bbox=True)
    notes = [f"{dropped} prediction(s) for images outside split {gt.split!r} were not evaluated"] if dropped else []
    outside = sum(1 for r in rows if not 0.0 <= r["score"] <= 1.0)
    if outside:
        notes.append(f"{outside} prediction score(s) lie outside [0, 1] (e.g. logits): AP and FROC use only their "
                     "order, but score thresholds and AUROC from box scores assume probabilities")
    unique: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        unique.setdefault((r["image_id"], r["category_id"], r["score"], tuple(r["bbox"])), r)
    if len(unique) < len(rows):
        notes.append(f"{len(rows) - len(unique)} fully duplicated prediction row(s) (same image, category, box and "
                     "score) were counted once")
        rows = list(unique.values())
    return Predictions(rows=rows, dropped_other_split=dropped, notes=notes)


def load_image_scores(path: str | Path, gt: GroundTruth) -> np.ndarray:
    """Read ``image_scores.json`` into a ``float (N_images, C)`` array in ``gt.image_ids`` order.

    Every (image, class) pair of the split must have a row; missing pairs raise an error naming them.
    """
    rows, _ = _check_rows(_read_json(Path(path), "image scores"), str(path), gt, need_bbox=False)
    img_index = {iid: i for i, iid in enumerate(gt.image_ids)}
    cat_index = {cid: k for k, cid in enumerate(gt.category_ids)}
    scores = np.full((len(img_index), len(cat_index)), np.nan)
    for r in rows:
        scores[img_index[r["image_id"]], cat_index[r["category_id"]]] = r["score"]
    missing = np.argwhere(np.isnan(scores))
    if len(missing):
        ex = ", ".join(f"(image {gt.image_ids[i]}, category {gt.category_ids[k]})" for i, k in missing[:5])
        raise CxrDistillError(f"{path}: {len(missing)} (image, class) pair(s) have no score, e.g. {ex}")
    return scores


def image_scores_from_boxes(rows: list[dict[str, Any]], gt: GroundTruth) -> np.ndarray:
    """Image score of each class = its maximum box score, 0 with no box (AALS). ``(N_images, C)``."""
    img_index = {iid: i for i, iid in enumerate(gt.image_ids)}
    cat_index = {cid: k for k, cid in enumerate(gt.category_ids)}
    scores = np.zeros((len(img_index), len(cat_index)))
    for r in rows:
        i, k = img_index[r["image_id"]], cat_index[r["category_id"]]
        scores[i, k] = max(scores[i, k], r["score"])
    return scores


def image_labels(gt: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """Image-level truth ``(N_images, C)`` in {0, 1} and a mask ``(N_images,)`` of images that have one.

    A class is present when the image has a box of it or names it in ``"labels"``. Images with
    ``supervision == "none"`` have no image-level truth and are masked out.
    """
    img_index = {iid: i for i, iid in enumerate(gt.image_ids)}
    cat_index = {cid: k for k, cid in enumerate(gt.category_ids)}
    name_index = {name: k for k, name in enumerate(gt.class_names)}
    y = np.zeros((len(img_index), len(cat_index)))
    mask = np.ones(len(img_index), dtype=bool)
    for a in gt.coco["annotations"]:
        y[img_index[a["image_id"]], cat_index[a["category_id"]]] = 1
    for im in gt.coco["images"]:
        i = img_index[int(im["id"])]
        for name in im.get("labels", []) or []:
            if name not in name_index:
                raise ManifestError(f"image {im['id']}: label {name!r} is not a category name")
            y[i, name_index[name]] = 1
        if im.get("supervision") == "none":
            mask[i] = False
    return y, mask
