"""Shared parts of the dataset adapters: CSV reading with line numbers, problem collection,
box parsing and checks, an image index, sizes, patient-hashed splits, and a raw-manifest builder.

An image with a bad box is left out whole (`RawManifest.reject`), never kept with fewer boxes.

Every adapter returns the raw manifest dict that `cxrdistill.data.manifest.manifest_from_dict`
validates: `categories`, `images` (file_names relative to the data root), `annotations`, `info`,
and, in lenient mode, `skipped`: the list of `"file:line: problem"` strings of the rows left out.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrdistill.errors import ImageReadError, ManifestError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff")
MAX_LISTED = 50


# ---------------------------------------------------------------------------------------------
# problems


class Problems:
    """Collects `"file:line: problem"` strings; `finish` raises (strict) or attaches them (lenient)."""

    def __init__(self, source: str, on_error: str) -> None:
        if on_error not in ("strict", "lenient"):
            raise ValueError(f"on_error must be 'strict' or 'lenient', not {on_error!r}")
        self.source = source
        self.on_error = on_error
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{where}: {problem}")

    def fatal(self, message: str) -> ManifestError:
        """An error that stops the adapter whatever `on_error` says (e.g. a missing label file)."""
        return ManifestError(f"{self.source}: {message}")

    def finish(self, raw: dict[str, Any]) -> dict[str, Any]:
        if self.items and self.on_error == "strict":
            shown = "\n".join(f"  - {p}" for p in self.items[:MAX_LISTED])
            more = len(self.items) - MAX_LISTED
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise ManifestError(
                f"{self.source}: {len(self.items)} problem(s) in the source files; fix them or use "
                f"on_error='lenient' (--lenient) to skip the bad rows:\n{shown}{tail}")
        raw["skipped"] = list(self.items)
        return raw


# ---------------------------------------------------------------------------------------------
# CSV


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping `*.gz`; a UTF-8 BOM is dropped."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def find_file(root: Path, names: Sequence[str], what: str, problems: Problems) -> Path:
    """First of `names` (relative to root, `.gz` variants allowed) that exists, or a fatal error."""
    for name in names:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise problems.fatal(f"{what} not found under {root}; looked for {list(names)} (or .gz)")


def _check_utf8(path: Path) -> None:
    """Raise `ManifestError` naming the line of the first byte sequence that is not UTF-8 (streams)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for line_number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ManifestError(f"{path}:{line_number}: not UTF-8 text (byte 0x{line[err.start]:02x} at "
                                    f"column {err.start + 1}); re-save the file as UTF-8") from None


def read_csv(path: Path, required: Sequence[str] = (), problems: Problems | None = None,
             ) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header and `(line_number, cells)` rows of a CSV; the header must hold `required` columns.

    Line numbers are 1-based physical lines of the file where the row starts (the header is line 1),
    so they stay right when quoted cells span several lines.
    """
    _check_utf8(path)
    fh = open_text(path)
    reader = csv.reader(fh, strict=True)  # strict: an unterminated quote is an error, not one huge cell
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        fh.close()
        raise ManifestError(f"{path}: empty file (no header line)") from None
    except csv.Error as err:
        fh.close()
        raise _csv_error(path, 1, err) from None
    missing = [c for c in required if c not in header]
    if missing:
        fh.close()
        raise ManifestError(f"{path}:1: missing column(s) {missing}; the header has {header}")

    def rows() -> Iterator[tuple[int, list[str]]]:
        with fh:
            start = reader.line_num + 1
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    raise _csv_error(path, start, err) from None
                if any(c.strip() for c in cells):
                    yield start, cells
                start = reader.line_num + 1

    return header, rows()


def _csv_error(path: Path, line: int, err: csv.Error) -> ManifestError:
    """A malformed CSV row as a ManifestError naming the line where the row starts."""
    hint = ("a quote opened on this line is never closed (the rest of the file would become one cell)"
            if "end of data" in str(err) else "malformed quoting")
    return ManifestError(f"{path}:{line}: {hint} (csv: {err})")


def read_csv_dicts(path: Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """`(line_number, {column: stripped cell})` per data row (see `read_csv`)."""
    header, rows = read_csv(path, required)
    for line, cells in rows:
        yield line, {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)}


# ---------------------------------------------------------------------------------------------
# numbers and boxes


def parse_float(text: str, what: str) -> float:
    """A finite float, or ValueError naming `what` and the bad text."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} is not finite: {text!r}")
    return value


def parse_box(cells: Sequence[str], fmt: str = "xywh") -> tuple[float, float, float, float]:
    """Four cells as a COCO `xywh` box; `fmt` is `"xywh"` or `"xyxy"`. ValueError when malformed."""
    if len(cells) != 4:
        raise ValueError(f"box needs 4 numbers, got {list(cells)!r}")
    a, b, c, d = (parse_float(v, n) for v, n in zip(cells, ("x", "y", "w" if fmt == "xywh" else "x_max",
                                                         "h" if fmt == "xywh" else "y_max")))
    if fmt == "xyxy":
        c, d = c - a, d - b
    elif fmt != "xywh":
        raise ValueError(f"unknown box format {fmt!r}")
    if c <= 0 or d <= 0:
        raise ValueError(f"box has non-positive size (w={c:g}, h={d:g})")
    return a, b, c, d


def box_outside(box: Sequence[float], width: int, height: int, tol: float = 1.0) -> str | None:
    """A problem string when the xywh `box` leaves the image by more than `tol` pixels."""
    x, y, w, h = box
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return f"box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] lies outside the {width} x {height} image"
    return None


def iou_xywh(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two COCO `xywh` boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# images


def index_images(root: Path, folders: Sequence[str] = (), suffixes: Sequence[str] = IMAGE_SUFFIXES,
                 ) -> dict[str, str]:
    """Map each image file's base name to its path relative to `root`.

    Searches `folders` (glob patterns relative to root, e.g. `"images*"`) recursively, or the
    whole root when none is given. The first path found for a name wins (sorted order).
    """
    bases = [p for pat in folders for p in sorted(root.glob(pat)) if p.is_dir()] if folders else [root]
    found: dict[str, str] = {}
    wanted = {s.lower() for s in suffixes}
    for base in bases:
        for path in sorted(base.rglob("*")):
            if path.suffix.lower() in wanted and path.is_file():
                found.setdefault(path.name, path.relative_to(root).as_posix())
    return found


def image_size(path: Path) -> tuple[int, int]:
    """`(width, height)` from the file's header (PNG/JPEG/DICOM). ImageReadError when unreadable."""
    from cxrdistill.data.io import read_image_size

    height, width = read_image_size(path)
    return width, height


def size_or_problem(root: Path, rel: str, where: str, problems: Problems) -> tuple[int, int] | None:
    """`(width, height)` of `root/rel`, or None after recording why it cannot be read."""
    try:
        return image_size(root / rel)
    except ImageReadError as exc:
        problems.add(where, f"image {rel}: {exc.reason}")
        return None


def hashed_split(key: str, val_fraction: float, salt: str = "cxrdistill") -> str:
    """`"val"` for a stable pseudo-random `val_fraction` of keys (patients), else `"train"`."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def split_label_text(text: str, sep: str, none_tokens: Sequence[str] = ()) -> list[str]:
    """Labels of a `sep`-joined cell; empty parts and `none_tokens` (e.g. "No Finding") dropped."""
    nones = {t.lower() for t in none_tokens}
    return [p.strip() for p in text.split(sep) if p.strip() and p.strip().lower() not in nones]


# ---------------------------------------------------------------------------------------------
# raw manifest


@dataclass
class RawManifest:
    """Builds the raw manifest dict: categories by name, images, boxes, info."""

    source: str
    class_names: list[str] = field(default_factory=list)
    fixed_classes: bool = False
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    rejected: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._ids = {name: i + 1 for i, name in enumerate(self.class_names)}

    def reject(self, image_id: int) -> None:
        """Leave an image (and its boxes) out: one of its boxes was bad, and a partial box set
        would teach the detector false negatives. The caller records the problem."""
        self.rejected.add(image_id)

    def has_class(self, name: str) -> bool:
        return name in self._ids or not self.fixed_classes

    def category_id(self, name: str) -> int:
        if name not in self._ids:
            if self.fixed_classes:
                raise KeyError(name)
            self.class_names.append(name)
            self._ids[name] = len(self.class_names)
        return self._ids[name]

    def add_image(self, file_name: str, width: int, height: int, **fields: Any) -> int:
        """Append an image record; `None` values are left out. Returns the new image id."""
        image_id = len(self.images) + 1
        record = {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)}
        record.update({k: v for k, v in fields.items() if v is not None})
        if "labels" in record:
            for name in record["labels"]:
                self.category_id(name)
        self.images.append(record)
        return image_id

    def add_box(self, image_id: int, class_name: str, box: Sequence[float], **extra: Any) -> None:
        x, y, w, h = (float(v) for v in box)
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                 "category_id": self.category_id(class_name), "bbox": [x, y, w, h],
                                 "area": w * h, "iscrowd": 0, **extra})

    def to_dict(self) -> dict[str, Any]:
        info = {"source": self.source, **self.info}
        return {"info": info,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)],
                "images": [im for im in self.images if im["id"] not in self.rejected],
                "annotations": [a for a in self.annotations if a["image_id"] not in self.rejected]}
