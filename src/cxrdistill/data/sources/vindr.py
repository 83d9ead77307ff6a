"""VinDr-CXR (Nguyen et al., Scientific Data 2022).

Files: `annotations/annotations_{train,test}.csv` (or in the root): `image_id, rad_id,
class_name, x_min, y_min, x_max, y_max` (the Kaggle `train.csv` adds `class_id, width?`), one row
per box and reader; a reader who saw nothing writes one `"No finding"` row with empty
coordinates. `annotations/image_labels_{train,test}.csv`: `image_id, rad_id/rad_ID, <class
columns> ...` with 0/1 per reader (the image-level "global" labels). Images are DICOM:
`{train,test}/<image_id>.dicom`; width/height come from each file's header.

Readers are fused per image and class (`fusion=`):
- `"wbf"` (default): boxes of the same class from *different* readers are clustered greedily
  (a box joins the first cluster whose running mean box overlaps it with IoU >= `iou`), and each
  cluster becomes the mean of its boxes: weighted box fusion with equal reader weights;
- `"union"`: every reader's box is kept;
- `"first"`: only the boxes of the first reader (by `rad_id` order) who drew any box on the image.
Image labels are the fused box classes plus the `image_labels` columns that are classes and that
at least half of the image's readers marked 1. Every image is `supervision="box"`; the official
test set (consensus of 5 readers) gives `split="test"`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrdistill.data.sources.common import (
    Problems,
    RawManifest,
    box_outside,
    iou_xywh,
    parse_box,
    read_csv_dicts,
    size_or_problem,
)

NO_FINDING = "No finding"
FUSIONS = ("wbf", "union", "first")
Box = tuple[float, float, float, float]


def fuse_readers(boxes: Sequence[tuple[str, Box]], fusion: str = "wbf", iou: float = 0.5) -> list[Box]:
    """Fuse one image's boxes of one class, given as `(reader, xywh)`, into a list of xywh boxes."""
    if fusion == "union":
        return [b for _, b in boxes]
    if fusion == "first":
        first = min((r for r, _ in boxes), default=None)
        return [b for r, b in boxes if r == first]
    if fusion != "wbf":
        raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")
    clusters: list[tuple[set[str], list[Box]]] = []
    for reader, box in boxes:
        for readers, members in clusters:
            if reader not in readers and iou_xywh(_mean(members), box) >= iou:
                readers.add(reader)
                members.append(box)
                break
        else:
            clusters.append(({reader}, [box]))
    return [_mean(members) for _, members in clusters]


def _mean(boxes: list[Box]) -> Box:
    """Mean box in corner coordinates, returned as xywh."""
    n = len(boxes)
    x0 = sum(b[0] for b in boxes) / n
    y0 = sum(b[1] for b in boxes) / n
    x1 = sum(b[0] + b[2] for b in boxes) / n
    y1 = sum(b[1] + b[3] for b in boxes) / n
    return x0, y0, x1 - x0, y1 - y0


def load(root: Path, *, on_error: str = "strict", fusion: str = "wbf", iou: float = 0.5,
         classes: Sequence[str] | None = None, parts: Sequence[str] = ("train", "test"),
         source: str = "vindr") -> dict[str, Any]:
    """Raw manifest of a VinDr-CXR folder (see the module docstring)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")
    root = Path(root)
    problems = Problems(source, on_error)
    out = RawManifest(source, list(classes or []), fixed_classes=classes is not None)
    out.info.update(fusion=fusion, fusion_iou=iou, explicit_fields=["split"])
    found = False
    for part in parts:
        ann = _find(root, f"annotations_{part}.csv")
        if ann is None:
            continue
        found = True
        _read_part(out, root, part, ann, _find(root, f"image_labels_{part}.csv"), fusion, iou, problems)
    if not found:
        raise problems.fatal(f"no annotations_{{{','.join(parts)}}}.csv under {root} or {root}/annotations")
    return problems.finish(out.to_dict())


def _find(root: Path, name: str) -> Path | None:
    return next((p for p in (root / "annotations" / name, root / name) if p.is_file()), None)


def _read_part(out: RawManifest, root: Path, part: str, ann: Path, labels_file: Path | None,
               fusion: str, iou: float, problems: Problems) -> None:
    per_image: dict[str, list[tuple[str, str, Box, str]]] = defaultdict(list)
    order: list[str] = []
    bad: set[str] = set()  # images with a bad row are left out whole
    for line, row in read_csv_dicts(ann, ["image_id", "class_name", "x_min", "y_min", "x_max",
                                          "y_max"]):
        where = f"{ann.name}:{line}"
        image_id, name = row["image_id"], row["class_name"]
        if image_id not in per_image:
            order.append(image_id)
            per_image[image_id]  # noqa: B018 - keeps images with only "No finding" rows
        cells = [row[k] for k in ("x_min", "y_min", "x_max", "y_max")]
        try:
            if name == NO_FINDING:
                if any(cells):
                    raise ValueError(f"'No finding' row with box coordinates {cells}")
                continue
            if not out.has_class(name):
                raise ValueError(f"unknown class {name!r}; known: {out.class_names}")
            box = parse_box(cells, "xyxy")
        except ValueError as exc:
            problems.add(where, f"{image_id}: {exc} (image skipped)")
            bad.add(image_id)
            continue
        per_image[image_id].append((name, row.get("rad_id") or "consensus", box, where))
    votes = _label_votes(labels_file, problems) if labels_file else {}
    for image_id in order:
        if image_id in bad:
            continue  # reported above
        rel = next((f"{part}/{image_id}{s}" for s in (".dicom", ".dcm", ".png", ".jpg")
                    if (root / part / f"{image_id}{s}").is_file()), None)
        if rel is None:
            problems.add(f"{ann.name}", f"{image_id}: image file not found ({part}/{image_id}.dicom)")
            continue
        size = size_or_problem(root, rel, f"{ann.name}: {image_id}", problems)
        if size is None:
            continue
        fused: list[tuple[str, Box]] = []
        by_class: dict[str, list[tuple[str, Box]]] = defaultdict(list)
        for name, reader, box, _ in per_image[image_id]:
            by_class[name].append((reader, box))
        for name in sorted(by_class):
            fused.extend((name, b) for b in fuse_readers(by_class[name], fusion, iou))
        outside = [(n, msg) for n, box in fused if (msg := box_outside(box, *size))]
        for name, msg in outside:
            problems.add(f"{ann.name}: {image_id}", f"fused {name} {msg} (image skipped)")
        if outside:
            continue
        kept = fused
        labels = {n for n, _ in kept} | {n for n in votes.get(image_id, ()) if out.has_class(n)}
        new_id = out.add_image(rel, *size, split="test" if part == "test" else "train",
                               supervision="box", labels=sorted(labels), patient_id=None,
                               readers=sorted({r for _, r, _, _ in per_image[image_id]}) or None)
        for name, box in kept:
            out.add_box(new_id, name, box)


def _label_votes(path: Path, problems: Problems) -> dict[str, list[str]]:
    """Classes that at least half of an image's readers marked 1 in image_labels_*.csv."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    readers: dict[str, int] = defaultdict(int)
    for line, row in read_csv_dicts(path, ["image_id"]):
        readers[row["image_id"]] += 1
        for col, cell in row.items():
            if col in ("image_id", "rad_id", "rad_ID", NO_FINDING):
                continue
            if cell in ("1", "1.0"):
                counts[row["image_id"]][col] += 1
            elif cell not in ("0", "0.0", ""):
                problems.add(f"{path.name}:{line}", f"{row['image_id']}: {col}={cell!r} is not 0/1")
    return {img: sorted(c for c, k in cls.items() if 2 * k >= readers[img]) for img, cls in counts.items()}
