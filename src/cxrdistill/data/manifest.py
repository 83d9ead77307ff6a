"""The dataset manifest: an extended COCO JSON, loaded and validated as a whole.

A manifest holds categories, images and boxes in COCO form, and per image the supervision a
study may use (`"box" | "image" | "none"`), image-level `labels`, the paired `report` and a
`patient_id`. Loading validates every record and reports every problem with the record it
belongs to. `on_error="strict"` raises one `ManifestError` listing them all; `"lenient"` skips the
bad records and keeps the list in `Manifest.skipped` (nothing is dropped silently).

Annotations of images whose supervision is not `"box"` are kept as hidden truth (to measure
pseudo-label quality); datasets never hand them to a loss.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cxrdistill.atomic import write_json_atomic  # noqa: F401  (re-exported for callers)
from cxrdistill.errors import ManifestError

OnError = Literal["strict", "lenient"]
SUPERVISION_KINDS = ("box", "image", "none")
SPLITS = ("train", "val", "test")
BOX_TOLERANCE_PX = 1.0
#: Longest report accepted, in characters. Radiology reports run to a few thousand characters;
#: far longer text is a concatenation or extraction error (and would only be truncated by a
#: text model), so it is reported instead of being kept.
MAX_REPORT_CHARS = 100_000


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int
    split: str = "train"
    supervision: str = "box"
    labels: tuple[str, ...] = ()
    report: str | None = None
    patient_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            id=self.id, file_name=self.file_name, width=self.width, height=self.height,
            split=self.split, supervision=self.supervision, labels=list(self.labels),
        )
        if self.report is not None:
            out["report"] = self.report
        if self.patient_id is not None:
            out["patient_id"] = self.patient_id
        return out


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # COCO xywh, original pixels

    def to_dict(self) -> dict[str, Any]:
        x, y, w, h = self.bbox
        return {"id": self.id, "image_id": self.image_id, "category_id": self.category_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}


@dataclass(frozen=True)
class Issue:
    """One problem found in a manifest: which record, what is wrong, what was done."""

    record: str
    problem: str
    action: str = "skipped"

    def __str__(self) -> str:
        return f"{self.record}: {self.problem} ({self.action})"


@dataclass
class Manifest:
    """A validated dataset. Class indices are 0-based positions in `class_names`."""

    categories: list[Category]
    images: list[ImageRecord]
    annotations: list[Annotation]
    root: Path
    skipped: list[Issue] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.categories = sorted(self.categories, key=lambda c: c.id)
        self._index_by_category_id = {c.id: i for i, c in enumerate(self.categories)}
        self._image_by_id = {im.id: im for im in self.images}
        self._annotations_by_image: dict[int, list[Annotation]] = defaultdict(list)
        for ann in self.annotations:
            self._annotations_by_image[ann.image_id].append(ann)

    # ---- classes -------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def category_ids(self) -> list[int]:
        """`category_ids[class_index]` is the COCO category id."""
        return [c.id for c in self.categories]

    def class_index(self, category_id: int) -> int:
        return self._index_by_category_id[category_id]

    # ---- images --------------------------------------------------------------------------
    def image(self, image_id: int) -> ImageRecord:
        return self._image_by_id[image_id]

    def image_path(self, record: ImageRecord | int) -> Path:
        rec = self.image(record) if isinstance(record, int) else record
        return (self.root / rec.file_name).resolve() if not os.path.isabs(rec.file_name) else Path(rec.file_name)

    def annotations_of(self, image_id: int) -> list[Annotation]:
        return list(self._annotations_by_image.get(image_id, ()))

    def boxes_xyxy(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of one image: `(N, 4)` float32 xyxy in original pixels, `(N,)` int64 class index."""
        anns = self._annotations_by_image.get(image_id, ())
        boxes = np.array([[a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.array([self.class_index(a.category_id) for a in anns], dtype=np.int64)
        return boxes, labels

    def image_labels(self, image_id: int) -> np.ndarray:
        """`(C,)` float32 multi-hot of the classes present: the image's `labels` and its boxes."""
        rec = self.image(image_id)
        vec = np.zeros(self.num_classes, dtype=np.float32)
        names = {n: i for i, n in enumerate(self.class_names)}
        for name in rec.labels:
            vec[names[name]] = 1.0
        for ann in self._annotations_by_image.get(image_id, ()):
            vec[self.class_index(ann.category_id)] = 1.0
        return vec

    def select(self, *, split: str | Iterable[str] | None = None,
               supervision: str | Iterable[str] | None = None) -> list[ImageRecord]:
        """Images filtered by split and supervision, in manifest order."""
        splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
        kinds = ({supervision} if isinstance(supervision, str)
                 else (set(supervision) if supervision is not None else None))
        return [im for im in self.images
                if (splits is None or im.split in splits)
                and (kinds is None or im.supervision in kinds)]

    def with_images(self, images: list[ImageRecord]) -> Manifest:
        """A manifest over `images` (same categories); annotations of other images dropped."""
        keep = {im.id for im in images}
        return Manifest(self.categories, list(images),
                        [a for a in self.annotations if a.image_id in keep], self.root,
                        list(self.skipped), dict(self.info))

    def replace_images(self, images: list[ImageRecord]) -> Manifest:
        """Same image set with updated records (e.g. a new split or supervision)."""
        return replace(self, images=list(images))

    # ---- output --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.info:
            out["info"] = self.info
        out["categories"] = [{"id": c.id, "name": c.name} for c in self.categories]
        out["images"] = [im.to_dict() for im in self.images]
        out["annotations"] = [a.to_dict() for a in self.annotations]
        return out

    def to_coco_dict(self, split: str | None = None) -> dict[str, Any]:
        """A COCO ground-truth dict (pycocotools-ready), optionally restricted to one split."""
        images = self.images if split is None else self.select(split=split)
        keep = {im.id for im in images}
        return {"info": {}, "categories": [{"id": c.id, "name": c.name} for c in self.categories],
                "images": [{"id": im.id, "file_name": im.file_name, "width": im.width,
                            "height": im.height, "split": im.split, "supervision": im.supervision,
                            "labels": list(im.labels)} for im in images],
                "annotations": [a.to_dict() for a in self.annotations if a.image_id in keep]}

    def save(self, path: str | Path) -> Path:
        """Write the manifest atomically. `file_name`s stay relative to `root`; when the file goes
        elsewhere, `info.image_root` records where `root` is (relative to the file)."""
        path = Path(path)
        payload = self.to_dict()
        info = dict(payload.get("info", {}))
        info.pop("image_root", None)
        here, root = path.parent.resolve(), self.root.resolve()
        if here != root:
            info["image_root"] = os.path.relpath(root, here)
        if info:
            payload = {"info": info, **{k: v for k, v in payload.items() if k != "info"}}
        write_json_atomic(path, payload)
        return path


# ------------------------------------------------------------------------------------------
def load_manifest(path: str | Path, *, root: str | Path | None = None, on_error: OnError = "strict",
                  check_files: bool = True, check_images: bool | str = False,
                  allow_outside_root: bool = False, hash_files: bool = False,
                  decode_workers: int = 0) -> Manifest:
    """Read and validate a manifest file.

    `root` defaults to `info.image_root` when the manifest declares one (absolute or relative to
    the manifest), else the manifest's directory; `file_name`s are relative to it.
    `check_files` checks every image exists; `check_images` also reads each header and checks
    width/height (``"decode"``: and decodes every image fully, in `decode_workers` threads).
    Two records naming one file (by path; by sha256 of the content with `hash_files`) are a problem.
    A `file_name` that escapes `root` is refused unless `allow_outside_root`.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if root is None:
        root = _declared_root(raw, path)
    return manifest_from_dict(raw, root=Path(root),
                              on_error=on_error, check_files=check_files, check_images=check_images,
                              allow_outside_root=allow_outside_root, source=str(path),
                              hash_files=hash_files, decode_workers=decode_workers)


def _declared_root(raw: Any, path: Path) -> Path:
    """The image root: `info.image_root` (absolute, or relative to the manifest), else its folder."""
    info = raw.get("info") if isinstance(raw, dict) else None
    declared = info.get("image_root") if isinstance(info, dict) else None
    if declared is None:
        return path.parent
    if not isinstance(declared, str) or not declared:
        raise ManifestError(f"{path}: info.image_root must be a folder path, got {declared!r}")
    return (path.parent / declared) if not os.path.isabs(declared) else Path(declared)


def manifest_from_dict(raw: Any, *, root: str | Path, on_error: OnError = "strict",
                       check_files: bool = True, check_images: bool | str = False,
                       allow_outside_root: bool = False, source: str = "manifest",
                       hash_files: bool = False, decode_workers: int = 0) -> Manifest:
    """Validate a manifest given as a dict (see `load_manifest`)."""
    if on_error not in ("strict", "lenient"):
        raise ValueError(f"on_error must be 'strict' or 'lenient', not {on_error!r}")
    validator = _Validator(Path(root), check_files, check_images, allow_outside_root, source,
                           hash_files, decode_workers)
    manifest = validator.run(raw)
    if validator.issues and on_error == "strict":
        shown = "\n".join(f"  - {issue.record}: {issue.problem}" for issue in validator.issues[:50])
        more = len(validator.issues) - 50
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ManifestError(
            f"{source}: {len(validator.issues)} problem(s) found; fix them or load with "
            f"on_error='lenient' (--lenient) to skip the bad records:\n{shown}{tail}")
    return manifest


class _Validator:
    """Checks every record of a raw manifest dict; collects issues instead of stopping."""

    def __init__(self, root: Path, check_files: bool, check_images: bool | str,
                 allow_outside_root: bool, source: str, hash_files: bool = False, decode_workers: int = 0) -> None:
        self.root = root
        self.check_files = check_files
        self.check_images = check_images
        self.hash_files = hash_files
        self.decode_workers = decode_workers
        self.allow_outside_root = allow_outside_root
        self.source = source
        self.issues: list[Issue] = []

    def problem(self, record: str, message: str, action: str = "skipped") -> None:
        self.issues.append(Issue(record, message, action))

    # -- top level ----------------------------------------------------------------------------
    def run(self, raw: Any) -> Manifest:
        if not isinstance(raw, dict):
            raise ManifestError(f"{self.source}: top level must be a JSON object with 'categories', "
                                f"'images' and 'annotations', not {type(raw).__name__}")
        missing = [k for k in ("categories", "images") if k not in raw]
        if missing:
            raise ManifestError(f"{self.source}: missing required key(s) {missing}; a manifest needs "
                                "'categories', 'images' and (optionally empty) 'annotations'")
        for key in ("categories", "images", "annotations"):
            if not isinstance(raw.get(key, []), list):
                raise ManifestError(f"{self.source}: '{key}' must be a list")
        categories = self.categories(raw["categories"])
        if not categories:
            raise ManifestError(f"{self.source}: no valid categories")
        images = self.images(raw["images"], {c.name for c in categories})
        if self.check_images == "decode":
            images = self.decoded(images)
        images = self.shared_files(images)
        annotations = self.annotations(raw.get("annotations", []), images, {c.id for c in categories})
        images = self.patient_leaks(images)
        images = self.labels_vs_boxes(images, annotations, {c.id: c.name for c in categories})
        kept_ids = {im.id for im in images}
        dropped = [a for a in annotations if a.image_id not in kept_ids]
        for ann in dropped:
            self.problem(f"annotation {ann.id}", f"its image {ann.image_id} was skipped")
        annotations = [a for a in annotations if a.image_id in kept_ids]
        info = raw.get("info") if isinstance(raw.get("info"), dict) else {}
        return Manifest(categories, images, annotations, self.root, list(self.issues), info)

    # -- records ------------------------------------------------------------------------------
    def categories(self, rows: list[Any]) -> list[Category]:
        out: list[Category] = []
        seen_ids: set[int] = set()
        seen_names: set[str] = set()
        for pos, row in enumerate(rows):
            rec = f"category #{pos}"
            if not isinstance(row, dict) or "id" not in row or "name" not in row:
                self.problem(rec, "needs 'id' and 'name'")
                continue
            cid, name = row["id"], row["name"]
            if not _is_int(cid) or not isinstance(name, str) or not name.strip():
                self.problem(rec, f"id must be an integer and name a non-empty string (got {cid!r}, {name!r})")
            elif cid in seen_ids:
                self.problem(f"category {cid}", "duplicate category id")
            elif name in seen_names:
                self.problem(f"category {cid}", f"duplicate category name {name!r}")
            else:
                seen_ids.add(cid)
                seen_names.add(name)
                out.append(Category(int(cid), name))
        return out

    def images(self, rows: list[Any], class_names: set[str]) -> list[ImageRecord]:
        out: list[ImageRecord] = []
        seen: set[int] = set()
        known = {"id", "file_name", "width", "height", "split", "supervision", "labels", "report",
                 "patient_id"}
        for pos, row in enumerate(rows):
            if not isinstance(row, dict):
                self.problem(f"image #{pos}", "is not a JSON object")
                continue
            iid = row.get("id")
            rec = f"image {iid} ({row.get('file_name', '?')})" if _is_int(iid) else f"image #{pos}"
            missing = [k for k in ("id", "file_name", "width", "height") if k not in row]
            if missing:
                self.problem(rec, f"missing required key(s) {missing}")
                continue
            if not _is_int(iid):
                self.problem(rec, f"id must be an integer, got {iid!r}")
                continue
            if iid in seen:
                self.problem(rec, "duplicate image id (every occurrence after the first is skipped)")
                continue
            width, height = row["width"], row["height"]
            if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
                self.problem(rec, f"width/height must be positive integers, got {width!r} x {height!r}")
                continue
            split = row.get("split", "train")
            if split not in SPLITS:
                self.problem(rec, f"unknown split {split!r}; expected one of {list(SPLITS)}")
                continue
            supervision = row.get("supervision", "box")
            if supervision not in SUPERVISION_KINDS:
                self.problem(rec, f"unknown supervision {supervision!r}; expected one of {list(SUPERVISION_KINDS)}")
                continue
            labels = row.get("labels", [])
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                self.problem(rec, f"'labels' must be a list of class names, got {labels!r}")
                continue
            unknown = sorted(set(labels) - class_names)
            if unknown:
                self.problem(rec, f"unknown class name(s) in labels: {unknown}; known: {sorted(class_names)}")
                continue
            report = row.get("report")
            if report is not None and not isinstance(report, str):
                self.problem(rec, f"'report' must be text, got {type(report).__name__}")
                continue
            report = self.report_ok(rec, report)
            patient = row.get("patient_id")
            if patient is not None and not isinstance(patient, (str, int)):
                self.problem(rec, f"'patient_id' must be text, got {type(patient).__name__}")
                continue
            file_name = row["file_name"]
            if not isinstance(file_name, str) or not file_name:
                self.problem(rec, "file_name must be a non-empty string")
                continue
            if not self.file_ok(rec, file_name, int(width), int(height)):
                continue
            seen.add(int(iid))
            extra = {k: v for k, v in row.items() if k not in known}
            out.append(ImageRecord(int(iid), file_name, int(width), int(height), split, supervision,
                                   tuple(labels), report, None if patient is None else str(patient), extra))
        return out

    def report_ok(self, rec: str, report: str | None) -> str | None:
        """The report, or None (with an issue) when it is empty, not valid Unicode or too long."""
        if report is None:
            return None
        problem = None
        if not report.strip():
            problem = "empty report"
        elif len(report) > MAX_REPORT_CHARS:
            problem = (f"report is {len(report):,} characters long, above MAX_REPORT_CHARS="
                       f"{MAX_REPORT_CHARS:,} (a concatenation or extraction error?)")
        else:
            try:
                report.encode("utf-8")
            except UnicodeEncodeError as exc:
                problem = f"report is not valid Unicode text (lone surrogate at character {exc.start})"
        if problem is None:
            return report
        self.problem(rec, problem, action="report treated as missing")
        return None

    def file_ok(self, rec: str, file_name: str, width: int, height: int) -> bool:
        if "\x00" in file_name:
            self.problem(rec, "file_name contains a NUL character")
            return False
        try:
            return self._file_ok(rec, file_name, width, height)
        except OSError as exc:  # e.g. a name too long for the file system
            self.problem(rec, f"file_name cannot be used as a path ({exc.strerror or exc})")
            return False

    def _file_ok(self, rec: str, file_name: str, width: int, height: int) -> bool:
        path = Path(file_name)
        if not self.allow_outside_root:
            if path.is_absolute():
                self.problem(rec, "absolute file_name refused (it must be relative to the data root; "
                                  "pass allow_outside_root / --allow-outside-root to permit it)")
                return False
            resolved = (self.root / path).resolve()
            if not resolved.is_relative_to(self.root.resolve()):
                self.problem(rec, f"file_name {file_name!r} escapes the data root {str(self.root)!r}; "
                                  "refused (pass allow_outside_root / --allow-outside-root to permit it)")
                return False
        full = path if path.is_absolute() else self.root / path
        if self.check_files and not full.is_file():
            self.problem(rec, f"image file not found: {full}")
            return False
        if self.check_images:
            from cxrdistill.data.io import read_image_size  # lazy: keeps manifest import light
            from cxrdistill.errors import ImageReadError
            try:
                h, w = read_image_size(full)
            except ImageReadError as exc:
                self.problem(rec, f"unreadable image: {exc.reason}")
                return False
            if (h, w) != (height, width):
                self.problem(rec, f"width x height in the manifest ({width} x {height}) differ from "
                                  f"the file ({w} x {h})")
                return False
        return True

    def decoded(self, images: list[ImageRecord]) -> list[ImageRecord]:
        """Decode every image fully (threads; headers alone miss truncated pixel data)."""
        from concurrent.futures import ThreadPoolExecutor

        from cxrdistill.data.io import read_image
        from cxrdistill.errors import ImageReadError

        def problem_of(im: ImageRecord) -> str | None:
            try:
                read_image(self.root / im.file_name)
            except ImageReadError as exc:
                return exc.reason
            return None

        workers = self.decode_workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(problem_of, images))
        for im, reason in zip(images, problems):
            if reason is not None:
                self.problem(f"image {im.id} ({im.file_name})", f"unreadable image (full decode): {reason}")
        return [im for im, reason in zip(images, problems) if reason is None]

    def shared_files(self, images: list[ImageRecord]) -> list[ImageRecord]:
        """One file, one record: later records naming the same file (by path, and by content with
        ``hash_files``) are listed; a file in two splits would leak test images into training."""
        first: dict[Any, ImageRecord] = {}
        out = []
        for im in images:
            keys: list[Any] = [("path", os.path.normpath(str(self.root / im.file_name)))]
            if self.hash_files:
                digest = _content_hash(self.root / im.file_name)
                if digest is not None:
                    keys.append(("sha256", digest))
            earlier = next((first[k] for k in keys if k in first), None)
            if earlier is None:
                for k in keys:
                    first[k] = im
                out.append(im)
                continue
            how = "the same file as" if os.path.normpath(str(self.root / im.file_name)) == \
                os.path.normpath(str(self.root / earlier.file_name)) else "a file with the same content as"
            splits = f" (splits {earlier.split!r} and {im.split!r}: test images would leak into training)" \
                if earlier.split != im.split else ""
            self.problem(f"image {im.id} ({im.file_name})",
                         f"uses {how} image {earlier.id} ({earlier.file_name}){splits}; one file may back one "
                         "record only")
        return out

    def annotations(self, rows: list[Any], images: list[ImageRecord], category_ids: set[int]) -> list[Annotation]:
        by_id = {im.id: im for im in images}
        out: list[Annotation] = []
        seen: set[int] = set()
        for pos, row in enumerate(rows):
            if not isinstance(row, dict):
                self.problem(f"annotation #{pos}", "is not a JSON object")
                continue
            aid = row.get("id", pos)
            rec = f"annotation {aid} (image {row.get('image_id', '?')})"
            missing = [k for k in ("image_id", "category_id", "bbox") if k not in row]
            if missing:
                self.problem(rec, f"missing required key(s) {missing}")
                continue
            if not _is_int(aid) or aid in seen:
                self.problem(rec, "annotation id must be a unique integer")
                continue
            if not _is_int(row["image_id"]) or not _is_int(row["category_id"]):
                self.problem(rec, f"image_id and category_id must be integers, got "
                                  f"{row['image_id']!r} and {row['category_id']!r}")
                continue
            if row["category_id"] not in category_ids:
                self.problem(rec, f"unknown category_id {row['category_id']!r}; known: {sorted(category_ids)}")
                continue
            image = by_id.get(row["image_id"])
            if image is None:
                self.problem(rec, f"refers to image {row['image_id']!r}, which is not in the manifest "
                                  "or was skipped")
                continue
            bbox = row["bbox"]
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                self.problem(rec, f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
                continue
            try:
                x, y, w, h = (float(v) for v in bbox)
            except OverflowError:
                x = y = w = h = math.inf
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                self.problem(rec, f"bbox has NaN or infinite values: {bbox!r}")
                continue
            if w <= 0 or h <= 0:
                self.problem(rec, f"bbox has non-positive size (w={w:g}, h={h:g})")
                continue
            tol = BOX_TOLERANCE_PX
            if x < -tol or y < -tol or x + w > image.width + tol or y + h > image.height + tol:
                self.problem(rec, f"bbox [x={x:g}, y={y:g}, w={w:g}, h={h:g}] lies outside the "
                                  f"{image.width} x {image.height} image")
                continue
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(image.width)), min(y + h, float(image.height))
            seen.add(int(aid))
            out.append(Annotation(int(aid), image.id, int(row["category_id"]), (x0, y0, x1 - x0, y1 - y0)))
        return out

    # -- cross-record checks --------------------------------------------------------------------
    def patient_leaks(self, images: list[ImageRecord]) -> list[ImageRecord]:
        splits_of: dict[str, set[str]] = defaultdict(set)
        for im in images:
            if im.patient_id is not None:
                splits_of[im.patient_id].add(im.split)
        leaking = {p for p, s in splits_of.items() if len(s) > 1}
        for im in images:
            if im.patient_id in leaking:
                self.problem(f"image {im.id} ({im.file_name})",
                             f"patient {im.patient_id!r} appears in several splits "
                             f"{sorted(splits_of[im.patient_id])}; a patient must stay in one split")
        return [im for im in images if im.patient_id not in leaking]

    def labels_vs_boxes(self, images: list[ImageRecord], annotations: list[Annotation],
                        names: dict[int, str]) -> list[ImageRecord]:
        boxed: dict[int, set[str]] = defaultdict(set)
        for ann in annotations:
            boxed[ann.image_id].add(names[ann.category_id])
        out = []
        for im in images:
            missing = boxed.get(im.id, set()) - set(im.labels)
            if im.labels and missing:
                self.problem(f"image {im.id} ({im.file_name})",
                             f"labels {list(im.labels)} contradict its boxes, which show {sorted(missing)}")
                continue
            out.append(im)
        return out


def manifest_records_sha256(path: str | Path) -> str:
    """SHA-256 of what a manifest says about the data: its JSON with ``info.image_root`` left out and
    keys sorted. ``image_root`` only says where the images are from the file (it changes when the
    checkout or the data moves, `Manifest.save`), so the same records hash the same anywhere; a file
    that is not a JSON object hashes by its bytes."""
    import hashlib

    data = Path(path).read_bytes()
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return hashlib.sha256(data).hexdigest()
    if not isinstance(raw, dict):
        return hashlib.sha256(data).hexdigest()
    if isinstance(raw.get("info"), dict):
        raw = {**raw, "info": {k: v for k, v in raw["info"].items() if k != "image_root"}}
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _content_hash(path: Path) -> str | None:
    import hashlib

    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
