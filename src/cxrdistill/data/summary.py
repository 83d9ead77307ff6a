"""Counts a user checks before training: images, boxes and labels per class, split and supervision."""

from __future__ import annotations

from collections import Counter

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from cxrdistill.data.manifest import Manifest


def summary_counts(manifest: Manifest) -> dict[str, dict[str, int]]:
    """`{split/supervision: {"images": n, "boxes:<class>": n, "labels:<class>": n}}`."""
    out: dict[str, Counter[str]] = {}
    names = manifest.class_names
    for im in manifest.images:
        row = out.setdefault(f"{im.split}/{im.supervision}", Counter())
        row["images"] += 1
        boxes, labels = manifest.boxes_xyxy(im.id)
        for idx in labels:
            row[f"boxes:{names[idx]}"] += 1
        for idx, present in enumerate(manifest.image_labels(im.id)):
            if present:
                row[f"labels:{names[idx]}"] += 1
        if im.report:
            row["reports"] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def summary_table(manifest: Manifest, title: str = "Manifest summary") -> Group:
    """Two Rich tables that stay readable at 80 columns with any number of classes: images and
    reports per split/supervision, then one row per class with ``boxes / labels`` per split."""
    counts = summary_counts(manifest)
    groups = Table(title=title)
    groups.add_column("split/supervision")
    for col in ("images", "reports", "boxes", "labels"):
        groups.add_column(col, justify="right")
    for key, row in counts.items():
        boxes = sum(v for k, v in row.items() if k.startswith("boxes:"))
        labels = sum(v for k, v in row.items() if k.startswith("labels:"))
        groups.add_row(escape(key), str(row.get("images", 0)), str(row.get("reports", 0)), str(boxes), str(labels))
    splits = list(dict.fromkeys(key.split("/", 1)[0] for key in counts))
    classes = Table(title="per class: boxes / image labels")
    classes.add_column("class", overflow="fold")
    for split in splits:
        classes.add_column(split, justify="right")
    for name in manifest.class_names:
        cells = []
        for split in splits:
            rows = [row for key, row in counts.items() if key.split("/", 1)[0] == split]
            cells.append(f"{sum(r.get(f'boxes:{name}', 0) for r in rows)} / "
                         f"{sum(r.get(f'labels:{name}', 0) for r in rows)}")
        classes.add_row(escape(name), *cells)
    if manifest.skipped:
        classes.caption = f"{len(manifest.skipped)} record(s) skipped — see the list above"
    return Group(groups, classes)
