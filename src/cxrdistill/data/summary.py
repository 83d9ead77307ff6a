"""Counts a user checks before training: images, boxes and labels per class, split and supervision."""

from __future__ import annotations

from collections import Counter

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


def summary_table(manifest: Manifest, title: str = "Manifest summary") -> Table:
    """A Rich table: one row per split/supervision, columns images, reports, then boxes / labels per class."""
    counts = summary_counts(manifest)
    table = Table(title=title)
    table.add_column("split/supervision")
    table.add_column("images", justify="right")
    table.add_column("reports", justify="right")
    for name in manifest.class_names:
        table.add_column(f"{escape(name)}\nboxes / labels", justify="right")
    for key, row in counts.items():
        cells = [escape(key), str(row.get("images", 0)), str(row.get("reports", 0))]
        cells += [f"{row.get(f'boxes:{n}', 0)} / {row.get(f'labels:{n}', 0)}" for n in manifest.class_names]
        table.add_row(*cells)
    if manifest.skipped:
        table.caption = f"{len(manifest.skipped)} record(s) skipped — see the list above"
    return table
