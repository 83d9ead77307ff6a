"""NIH ChestX-ray14 (Wang et al., CVPR 2017).

Files, as released:
- `Data_Entry_2017.csv` (or `Data_Entry_2017_v2020.csv`): `Image Index, Finding Labels
  ("A|B" or "No Finding"), Follow-up #, Patient ID, Patient Age, Patient Gender, View Position,
  OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y]`. The bracketed headers contain
  commas, so the size and spacing take two CSV columns each; they are read by position.
- `BBox_List_2017.csv`: `Image Index, Finding Label, Bbox [x, y, w, h]` (the box spans four
  columns, the header has blank trailing columns), boxes in the pixels of the 1024-px PNGs.
  Its "Infiltrate" is the "Infiltration" of the labels.
- `train_val_list.txt` / `test_list.txt`: the official patient-wise split. Train/val images go to
  `train`, except a patient-hashed `val_fraction` of patients that go to `val`.
- images under `images*/` folders (`images/` or the Kaggle `images_001/images/` ...).

Supervision: images with a box row are `"box"` (their labels are the image's finding labels,
which include the boxed classes), the others `"image"`. Width/height are read from each PNG's
header (the released PNGs are 1024 x 1024; the original size goes to `extra["original_size"]`)
unless `read_sizes=False`, which trusts 1024 x 1024.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrdistill.data.sources.common import (
    Problems,
    RawManifest,
    box_outside,
    find_file,
    hashed_split,
    index_images,
    parse_box,
    read_csv,
    size_or_problem,
    split_label_text,
)

CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
           "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
           "Pneumonia", "Pneumothorax")
BOX_ALIASES = {"Infiltrate": "Infiltration"}
NO_FINDING = "No Finding"
RELEASED_SIZE = 1024


def load(root: Path, *, on_error: str = "strict", val_fraction: float = 0.1,
         read_sizes: bool = True, frontal_only: bool = False, source: str = "nih") -> dict[str, Any]:
    """Raw manifest of a ChestX-ray14 folder (see the module docstring)."""
    root = Path(root)
    problems = Problems(source, on_error)
    entry_file = find_file(root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"],
                           "the label file Data_Entry_2017*.csv", problems)
    test_names = _read_list(root / "test_list.txt")
    train_names = _read_list(root / "train_val_list.txt")
    boxes, bad_boxes = _read_boxes(root, problems)
    files = index_images(root, ["images*"], (".png",)) or index_images(root, (), (".png",))
    out = RawManifest(source, list(CLASSES), fixed_classes=True)
    if test_names is not None or train_names is not None:
        out.info["explicit_fields"] = ["split"]
    header, rows = read_csv(entry_file, ["Image Index", "Finding Labels", "Patient ID"])
    col = {h: i for i, h in enumerate(header)}
    width_at = next((i for i, h in enumerate(header) if h.startswith("OriginalImage[")), None)
    seen: set[str] = set()
    for line, cells in rows:
        where = f"{entry_file.name}:{line}"
        def cell(name: str, cells: list[str] = cells) -> str:
            return cells[col[name]].strip() if col[name] < len(cells) else ""

        name = cell("Image Index")
        if name in seen:
            problems.add(where, f"duplicate image {name}")
            continue
        seen.add(name)
        view = cell("View Position") if "View Position" in col else ""
        if frontal_only and view not in ("PA", "AP"):
            out.info["excluded_non_frontal"] = out.info.get("excluded_non_frontal", 0) + 1
            continue
        labels = split_label_text(cell("Finding Labels"), "|", (NO_FINDING,))
        unknown = [lab for lab in labels if lab not in CLASSES]
        if unknown:
            problems.add(where, f"{name}: unknown label(s) {unknown}; known: {list(CLASSES)}")
            continue
        rel = files.get(name)
        if rel is None:
            problems.add(where, f"image file not found: {name} (searched images*/ under {root})")
            continue
        size = (size_or_problem(root, rel, where, problems) if read_sizes
                else (RELEASED_SIZE, RELEASED_SIZE))
        if size is None:
            continue
        split = ("test" if test_names is not None and name in test_names
                 else hashed_split(cell("Patient ID"), val_fraction) if train_names is None or name in train_names
                 else None)
        if split is None:
            problems.add(where, f"{name} is in neither train_val_list.txt nor test_list.txt")
            continue
        image_boxes = boxes.pop(name, [])
        if name in bad_boxes:
            continue  # its bad box row is already reported, naming this image as skipped
        missing = sorted({c for c, _, _ in image_boxes} - set(labels))
        if missing:
            problems.add(where, f"{name}: boxes of {missing} but Finding Labels {labels}")
            continue
        outside = [(w, msg) for _, box, w in image_boxes if (msg := box_outside(box, *size))]
        if outside:
            for box_where, msg in outside:
                problems.add(box_where, f"{name}: {msg} (image skipped)")
            continue
        extra: dict[str, Any] = {"view_position": view or None}
        if width_at is not None and width_at + 1 < len(cells):
            try:
                extra["original_size"] = [int(float(cells[width_at])), int(float(cells[width_at + 1]))]
            except ValueError:
                problems.add(where, f"{name}: OriginalImage[Width,Height] is not two numbers: "
                                    f"{cells[width_at:width_at + 2]} (kept without it)")
        image_id = out.add_image(rel, *size, split=split, supervision="box" if image_boxes else "image",
                                 labels=labels, patient_id=cell("Patient ID"), **extra)
        for class_name, box, _ in image_boxes:
            out.add_box(image_id, class_name, box)
    for name, leftover in boxes.items():
        for _, _, box_where in leftover if name not in bad_boxes else ():
            problems.add(box_where, f"box of {name}, which is not a kept image of {entry_file.name}")
    return problems.finish(out.to_dict())


def _read_list(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    return {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()}


def _read_boxes(root: Path, problems: Problems) -> tuple[dict[str, list[tuple[str, tuple, str]]], set[str]]:
    """`{image name: [(class, xywh, "file:line"), ...]}` from BBox_List_2017.csv (if present), and
    the names of images with a bad box row (left out whole)."""
    path = root / "BBox_List_2017.csv"
    boxes: dict[str, list[tuple[str, tuple, str]]] = {}
    bad: set[str] = set()
    if not path.is_file():
        return boxes, bad
    header, rows = read_csv(path, ["Image Index", "Finding Label"])
    at = next((i for i, h in enumerate(header) if h.startswith("Bbox")), None)
    if at is None:
        raise problems.fatal(f"{path.name}:1: no 'Bbox [x,y,w,h]' column in {header}")
    for line, cells in rows:
        where = f"{path.name}:{line}"
        name, label = cells[0].strip(), cells[1].strip()
        label = BOX_ALIASES.get(label, label)
        try:
            if label not in CLASSES:
                raise ValueError(f"unknown box label {cells[1].strip()!r}; known: {list(CLASSES)}")
            box = parse_box([c.strip() for c in cells[at:at + 4]], "xywh")
        except ValueError as exc:
            problems.add(where, f"{name}: {exc} (image skipped)")
            bad.add(name)
            continue
        boxes.setdefault(name, []).append((label, box, where))
    return boxes, bad
