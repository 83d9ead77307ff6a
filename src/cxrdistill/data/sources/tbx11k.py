"""TBX11K tuberculosis X-rays (Liu et al., CVPR 2020).

Two layouts are read:

- **COCO**: `*.json` files (in the root, or `annotations/json/`) named by split, e.g. the
  800-image mirror's `train.json` / `val.json` or the official `TBX11K_train.json`. Loaded with the
  generic COCO adapter (`file_name`s relative to the root, or to `imgs/` when that is where they are).
- **VOC** (the official release): `imgs/{health,sick,tb,test}/*.png`, one Pascal-VOC XML per
  TB image in `annotations/xml/<stem>.xml` (`<object><name>ActiveTuberculosis</name><bndbox>`),
  and the split lists `lists/TBX11K_{train,val}.txt` (lines `tb/tb0003.png`). A listed image
  without an XML has no TB box: it is a fully box-annotated negative (`supervision="box"`, no box).

Classes: the box names found (ActiveTuberculosis, ObsoletePulmonaryTuberculosis,
PulmonaryTuberculosis in the official XMLs), unless `classes` fixes them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrdistill.data.sources import coco
from cxrdistill.data.sources.common import Problems, RawManifest, box_outside, parse_box, size_or_problem


def load(root: Path, *, on_error: str = "strict", layout: str = "auto",
         classes: Sequence[str] | None = None, lists: Sequence[str] | None = None,
         source: str = "tbx11k") -> dict[str, Any]:
    """Raw manifest of a TBX11K folder; `layout` is `"auto"`, `"coco"` or `"voc"`."""
    root = Path(root)
    if layout == "auto":
        layout = "voc" if (root / "annotations" / "xml").is_dir() else "coco"
    if layout == "coco":
        json_dir = root / "annotations" / "json"
        if not list(root.glob("*.json")) and json_dir.is_dir():
            files = sorted(p.relative_to(root).as_posix() for p in json_dir.glob("*.json"))
            images_dir = "imgs" if (root / "imgs").is_dir() else None
            return coco.load(root, on_error=on_error, annotations=files, images_dir=images_dir,
                             source=source)
        return coco.load(root, on_error=on_error, source=source)
    if layout != "voc":
        raise ValueError(f"layout must be 'auto', 'coco' or 'voc', not {layout!r}")
    return _load_voc(root, on_error, classes, lists, source)


def _load_voc(root: Path, on_error: str, classes: Sequence[str] | None,
              lists: Sequence[str] | None, source: str) -> dict[str, Any]:
    problems = Problems(source, on_error)
    list_files = [root / p for p in lists] if lists else sorted((root / "lists").glob("*.txt"))
    list_files = [p for p in list_files if coco.split_from_name(p.name) is not None]
    if not list_files:
        raise problems.fatal(f"no split lists (lists/TBX11K_train.txt, ...) under {root}")
    out = RawManifest(source, list(classes or []), fixed_classes=classes is not None)
    out.info["explicit_fields"] = ["split"]
    for list_file in list_files:
        split = coco.split_from_name(list_file.name)
        for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
            entry = line.strip()
            if entry:
                _add_voc_image(out, root, entry, split, f"{list_file.name}:{line_no}", problems)
    return problems.finish(out.to_dict())


def _add_voc_image(out: RawManifest, root: Path, entry: str, split: str | None, where: str,
                   problems: Problems) -> None:
    rel = f"imgs/{entry}"
    if not (root / rel).is_file():
        problems.add(where, f"image file not found: {root / rel}")
        return
    xml_path = root / "annotations" / "xml" / f"{Path(entry).stem}.xml"
    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    if xml_path.is_file():
        parsed = _parse_voc(xml_path, problems)
        if parsed is None:
            return
        (width, height), boxes = parsed
    else:
        size = size_or_problem(root, rel, where, problems)
        if size is None:
            return
        width, height = size
    bad = [n for n, _ in boxes if not out.has_class(n)]
    if bad:
        problems.add(f"{xml_path.name}", f"unknown label(s) {bad}; known: {out.class_names} (image skipped)")
        return
    image_id = out.add_image(rel, width, height, split=split, supervision="box",
                             labels=sorted({n for n, _ in boxes}))
    for name, box in boxes:
        out.add_box(image_id, name, box)


def _parse_voc(path: Path, problems: Problems
               ) -> tuple[tuple[int, int], list[tuple[str, tuple[float, float, float, float]]]] | None:
    """`((width, height), [(class, xywh), ...])` of a VOC XML, or None after recording the problem."""
    try:
        tree = ET.parse(path).getroot()
        width = int(float(tree.findtext("size/width", "")))
        height = int(float(tree.findtext("size/height", "")))
    except (ET.ParseError, ValueError) as exc:
        problems.add(path.name, f"unreadable VOC XML or size: {exc}")
        return None
    boxes = []
    for k, obj in enumerate(tree.iter("object")):
        name = (obj.findtext("name") or "").strip()
        cells = [obj.findtext(f"bndbox/{t}", "") for t in ("xmin", "ymin", "xmax", "ymax")]
        try:
            box = parse_box(cells, "xyxy")
            if not name:
                raise ValueError("object without a <name>")
            outside = box_outside(box, width, height)
            if outside:
                raise ValueError(outside)
        except ValueError as exc:
            problems.add(f"{path.name}: object #{k}", f"malformed box: {exc} (image skipped)")
            return None
        boxes.append((name, box))
    return (width, height), boxes
