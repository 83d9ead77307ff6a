"""Generic CSV + image folder, with configurable columns.

One row per image, or one row per box when box columns are given (rows of the same image are
merged: its labels are the union; its report and patient come from its first row; an image
with a bad box row is left out whole). Without box columns, one image on two rows with different
labels is a problem naming both rows (lenient: the image is left out). Columns:

- `image_col` (required): path of the image relative to `images_dir` (default: the root);
- `labels_col`: class names joined by `label_sep` (default `|`); `none_labels` (e.g. "No Finding")
  mean "no finding" and give an empty label list;
- `report_col`, `patient_col`, `split_col` (values train/val/valid/validation/test);
- `box_cols`: four columns of a box in `box_format` `"xywh"` (default) or `"xyxy"`, with the box
  class in `box_label_col`; an empty box (all four cells blank) is a row without a box;
- `width_col` / `height_col`: image size; when absent it is read from each file's header.

Supervision: `"box"` with box columns, `"image"` with a labels column, else `"none"`
(`supervision=` overrides). `classes` fixes the class list (a label outside it is a bad row);
otherwise classes are collected from the file in order of appearance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrdistill.data.sources.coco import _SPLIT_WORDS
from cxrdistill.data.sources.common import (
    Problems,
    RawManifest,
    box_outside,
    image_size,
    parse_box,
    read_csv_dicts,
    split_label_text,
)
from cxrdistill.errors import ImageReadError


def load(root: Path, *, on_error: str = "strict", csv_path: str = "labels.csv",
         image_col: str = "image", labels_col: str | None = None, label_sep: str = "|",
         none_labels: Sequence[str] = ("No Finding", "normal"), report_col: str | None = None,
         patient_col: str | None = None, split_col: str | None = None,
         box_cols: Sequence[str] | None = None, box_label_col: str | None = None,
         box_format: str = "xywh", width_col: str | None = None, height_col: str | None = None,
         images_dir: str | None = None, classes: Sequence[str] | None = None,
         supervision: str | None = None, source: str = "csv") -> dict[str, Any]:
    """Raw manifest from one CSV under `root` (see the module docstring for the columns)."""
    root = Path(root)
    problems = Problems(source, on_error)
    path = root / csv_path
    if not path.is_file():
        raise problems.fatal(f"CSV file not found: {path}")
    if box_cols is not None and (len(box_cols) != 4 or box_label_col is None):
        raise problems.fatal("box_cols needs 4 column names and box_label_col the box class column")
    required = [c for c in (image_col, labels_col, report_col, patient_col, split_col, box_label_col,
                            width_col, height_col) if c] + list(box_cols or [])
    kind = supervision or ("box" if box_cols else "image" if labels_col else "none")
    out = RawManifest(source, list(classes or []), fixed_classes=classes is not None)
    base = root / images_dir if images_dir else root
    by_file: dict[str, int] = {}
    name = path.name
    bad_files: set[str] = set()  # box mode: an image with a bad row is left out whole
    first_row: dict[str, tuple[str, list[str]]] = {}  # image mode: where and which labels it came first
    for line, row in read_csv_dicts(path, required):
        where = f"{name}:{line}"
        rel_in = row[image_col]
        if not rel_in:
            problems.add(where, f"empty {image_col!r} cell")
            continue
        rel = (Path(images_dir) / rel_in).as_posix() if images_dir else rel_in
        problem = None
        labels = split_label_text(row[labels_col], label_sep, none_labels) if labels_col else []
        unknown = [lab for lab in labels if not out.has_class(lab)]
        box = None
        if box_cols and any(row[c] for c in box_cols):
            try:
                box = parse_box([row[c] for c in box_cols], box_format)
            except ValueError as exc:
                problem = f"malformed box: {exc}"
            if not row[box_label_col]:
                problem = problem or f"box without a class in column {box_label_col!r}"
            elif not out.has_class(row[box_label_col]):
                unknown.append(row[box_label_col])
        if unknown:
            problem = problem or f"unknown label(s) {unknown}; known: {out.class_names}"
        split = _SPLIT_WORDS.get(row[split_col].lower()) if split_col else None
        if split_col and split is None:
            problem = problem or f"unknown split {row[split_col]!r}; expected train/val/test"
        if problem is None and rel not in by_file:
            if not (base / rel_in).is_file():
                problem = f"image file not found: {base / rel_in}"
            else:
                size = _size(row, width_col, height_col, base / rel_in, where, problems)
                if size is None:
                    continue
                by_file[rel] = out.add_image(
                    rel, *size, split=split, supervision=kind, labels=labels if labels_col else None,
                    report=(row[report_col] or None) if report_col else None,
                    patient_id=(row[patient_col] or None) if patient_col else None)
        if problem is None and box is not None:
            record = out.images[by_file[rel] - 1]
            problem = box_outside(box, record["width"], record["height"])
        if problem is not None:
            problems.add(where, problem + (f" ({rel} skipped)" if box_cols else ""))
            if box_cols:
                bad_files.add(rel)
            continue
        record = out.images[by_file[rel] - 1]
        if labels_col and not box_cols:
            seen = first_row.setdefault(rel, (where, labels))
            if seen[0] != where and set(seen[1]) != set(labels):
                problems.add(where, f"image {rel} has labels {labels} here but {seen[1]} on {seen[0]}: "
                                    "two rows for one image must agree (image left out)")
                bad_files.add(rel)
                continue
        if labels_col:
            record["labels"] = list(dict.fromkeys(record["labels"] + labels))
        if box is not None:
            out.add_box(by_file[rel], row[box_label_col], box)
            if "labels" in record and row[box_label_col] not in record["labels"]:
                record["labels"].append(row[box_label_col])
    for rel in bad_files & set(by_file):
        out.reject(by_file[rel])
    if split_col:
        out.info["explicit_fields"] = ["split"]
    return problems.finish(out.to_dict())


def _size(row: dict[str, str], width_col: str | None, height_col: str | None, path: Path,
          where: str, problems: Problems) -> tuple[int, int] | None:
    if width_col and height_col:
        try:
            w, h = int(row[width_col]), int(row[height_col])
            if w <= 0 or h <= 0:
                raise ValueError
            return w, h
        except ValueError:
            problems.add(where, f"width/height must be positive integers, got "
                                f"{row[width_col]!r} x {row[height_col]!r}")
            return None
    try:
        return image_size(path)
    except ImageReadError as exc:
        problems.add(where, f"unreadable image {path.name}: {exc.reason}")
        return None
