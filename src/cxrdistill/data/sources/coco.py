"""Generic COCO JSON + image folder.

`load(root, annotations=["train.json", "val.json"], ...)` reads one or more COCO files; the split
of each file is taken from its name (`train`, `val`/`valid`/`validation`, `test`) unless `splits`
gives it. Categories are merged by name across files, image ids renumbered (files may reuse them).
`file_name`s are resolved against `images_dir` (default: the root) and written relative to root.
Bad records (missing file, unknown category, malformed or out-of-image box) are named as
`file: image #i (id N)` / `file: annotation #i (id N)`: JSON has no useful line numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrdistill.data.sources.common import Problems, RawManifest, box_outside, parse_box
from cxrdistill.errors import ManifestError

_SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "validate": "val", "test": "test", "testing": "test"}


def split_from_name(name: str) -> str | None:
    """The split a file name speaks of (`TBX11K_val.json` -> `"val"`), or None."""
    for word in re.split(r"[^a-z]+", Path(name).stem.lower()):
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def load(root: Path, *, on_error: str = "strict", annotations: str | Sequence[str] | None = None,
         splits: Sequence[str | None] | None = None, images_dir: str | None = None,
         supervision: str = "box", check_files: bool = True, source: str = "coco") -> dict[str, Any]:
    """Raw manifest from COCO file(s) under `root` (default: every `*.json` directly in root)."""
    root = Path(root)
    problems = Problems(source, on_error)
    files = _annotation_files(root, annotations, problems)
    if splits is not None and len(splits) != len(files):
        raise problems.fatal(f"{len(files)} annotation file(s) but {len(splits)} split(s) given")
    out = RawManifest(source)
    image_base = root / images_dir if images_dir else root
    for k, path in enumerate(files):
        split = splits[k] if splits is not None else split_from_name(path.name)
        add_coco_file(out, path, root, image_base, split, supervision, check_files, problems)
    if splits is not None or any(split_from_name(p.name) for p in files):
        out.info["explicit_fields"] = ["split"]
    return problems.finish(out.to_dict())


def _annotation_files(root: Path, annotations: str | Sequence[str] | None, problems: Problems) -> list[Path]:
    if annotations is None:
        files = sorted(p for p in root.glob("*.json") if p.is_file())
        if not files:
            raise problems.fatal(f"no COCO *.json file in {root}; pass annotations=...")
        return files
    names = [annotations] if isinstance(annotations, str) else list(annotations)
    files = [root / n for n in names]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise problems.fatal(f"annotation file(s) not found: {missing}")
    return files


def add_coco_file(out: RawManifest, path: Path, root: Path, image_base: Path, split: str | None,
                  supervision: str, check_files: bool, problems: Problems) -> None:
    """Append the images and boxes of one COCO file to `out`, recording every bad record."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not a valid JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{path}: not a COCO file (needs an 'images' list)")
    name = path.name
    cat_names: dict[Any, str] = {}
    for pos, cat in enumerate(data.get("categories", [])):
        if isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str) and cat["name"].strip():
            cat_names[cat["id"]] = cat["name"].strip()
            out.category_id(cat_names[cat["id"]])
        else:
            problems.add(f"{name}: category #{pos}", f"needs an 'id' and a non-empty 'name', got {cat!r}")
    new_id: dict[Any, int] = {}
    sizes: dict[Any, tuple[int, int]] = {}
    for pos, im in enumerate(data["images"]):
        where = f"{name}: image #{pos}" + (f" (id {im.get('id')})" if isinstance(im, dict) else "")
        if not isinstance(im, dict) or any(k not in im for k in ("id", "file_name", "width", "height")):
            problems.add(where, "needs 'id', 'file_name', 'width' and 'height'")
            continue
        if im["id"] in new_id:
            problems.add(where, "duplicate image id")
            continue
        w, h = im["width"], im["height"]
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            problems.add(where, f"width/height must be positive integers, got {w!r} x {h!r}")
            continue
        full = image_base / str(im["file_name"])
        if check_files and not full.is_file():
            problems.add(where, f"image file not found: {full}")
            continue
        rel = _relative(full, root)
        fields = {k: v for k, v in im.items() if k not in ("id", "file_name", "width", "height")}
        fields.setdefault("supervision", supervision)
        if split is not None:
            fields["split"] = split
        new_id[im["id"]] = out.add_image(rel, w, h, **fields)
        sizes[im["id"]] = (w, h)
    for pos, ann in enumerate(data.get("annotations", [])):
        where = f"{name}: annotation #{pos}" + (f" (id {ann.get('id')})" if isinstance(ann, dict) else "")
        if not isinstance(ann, dict) or any(k not in ann for k in ("image_id", "category_id", "bbox")):
            problems.add(where, "needs 'image_id', 'category_id' and 'bbox'")
            continue
        if ann["image_id"] not in new_id:
            problems.add(where, f"image {ann['image_id']!r} is not in the file or was skipped")
            continue
        if ann["category_id"] not in cat_names:
            problems.add(where, f"unknown category_id {ann['category_id']!r}; known: {sorted(cat_names)} "
                                f"(image {ann['image_id']} skipped)")
            out.reject(new_id[ann["image_id"]])
            continue
        bbox = ann["bbox"]
        try:
            box = parse_box([str(v) for v in bbox] if isinstance(bbox, list) else [], "xywh")
            outside = box_outside(box, *sizes[ann["image_id"]])
            if outside:
                raise ValueError(outside)
        except ValueError as exc:
            problems.add(where, f"malformed bbox {bbox!r}: {exc} (image {ann['image_id']} skipped)")
            out.reject(new_id[ann["image_id"]])
            continue
        out.add_box(new_id[ann["image_id"]], cat_names[ann["category_id"]], box)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
