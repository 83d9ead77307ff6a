"""RSNA Pneumonia Detection Challenge (2018).

Files: `stage_2_train_labels.csv` (`patientId, x, y, width, height, Target`; one row per box, a
single row with empty coordinates and `Target=0` when there is none), optionally
`stage_2_detailed_class_info.csv` (`patientId, class`: "Lung Opacity", "Normal", "No Lung
Opacity / Not Normal", kept as the image's `detailed_class`), and DICOM images
`stage_2_train_images/<patientId>.dcm` (width/height from the header). One class,
"Lung Opacity". Every image is `supervision="box"`; `patientId` is in fact one study per image
and is used as the patient id. There is no official split (`prepare` makes one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrdistill.data.sources.common import (
    Problems,
    RawManifest,
    box_outside,
    find_file,
    parse_box,
    read_csv_dicts,
    size_or_problem,
)

CLASS = "Lung Opacity"


def load(root: Path, *, on_error: str = "strict", images_dir: str = "stage_2_train_images",
         source: str = "rsna") -> dict[str, Any]:
    """Raw manifest of an RSNA Pneumonia folder (see the module docstring)."""
    root = Path(root)
    problems = Problems(source, on_error)
    labels_file = find_file(root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"],
                            "the label file stage_2_train_labels.csv", problems)
    detail = _detailed(root)
    boxes: dict[str, list[tuple[tuple, str]]] = {}
    target: dict[str, tuple[str, str]] = {}
    bad: set[str] = set()  # images with a bad row are left out whole
    for line, row in read_csv_dicts(labels_file, ["patientId", "x", "y", "width", "height", "Target"]):
        where = f"{labels_file.name}:{line}"
        pid, flag = row["patientId"], row["Target"]
        if flag not in ("0", "1"):
            problems.add(where, f"{pid}: Target must be 0 or 1, got {flag!r}")
            continue
        if pid in target and target[pid][0] != flag:
            problems.add(where, f"{pid}: Target {flag} contradicts {target[pid][0]} at line "
                                f"{target[pid][1]} (image skipped)")
            bad.add(pid)
            continue
        target.setdefault(pid, (flag, str(line)))
        boxes.setdefault(pid, [])
        cells = [row[k] for k in ("x", "y", "width", "height")]
        if flag == "0":
            if any(cells):
                problems.add(where, f"{pid}: Target 0 with box coordinates {cells} (image skipped)")
                bad.add(pid)
            continue
        try:
            boxes[pid].append((parse_box(cells, "xywh"), where))
        except ValueError as exc:
            problems.add(where, f"{pid}: malformed box: {exc} (image skipped)")
            bad.add(pid)
    out = RawManifest(source, [CLASS], fixed_classes=True)
    for pid, image_boxes in boxes.items():
        if pid in bad:
            continue  # reported above
        where = f"{labels_file.name}:{target[pid][1]}"
        rel = f"{images_dir}/{pid}.dcm"
        if not (root / rel).is_file():
            problems.add(where, f"image file not found: {rel}")
            continue
        size = size_or_problem(root, rel, where, problems)
        if size is None:
            continue
        outside = [(w, msg) for box, w in image_boxes if (msg := box_outside(box, *size))]
        for box_where, msg in outside:
            problems.add(box_where, f"{pid}: {msg} (image skipped)")
        if outside:
            continue
        kept = [box for box, _ in image_boxes]
        image_id = out.add_image(rel, *size, supervision="box", labels=[CLASS] if kept else [],
                                 patient_id=pid, detailed_class=detail.get(pid))
        for box in kept:
            out.add_box(image_id, CLASS, box)
    return problems.finish(out.to_dict())


def _detailed(root: Path) -> dict[str, str]:
    path = root / "stage_2_detailed_class_info.csv"
    if not path.is_file():
        return {}
    return {row["patientId"]: row["class"] for _, row in read_csv_dicts(path, ["patientId", "class"])}
