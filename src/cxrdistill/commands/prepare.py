"""`cxrdistill prepare`: build a validated manifest and the semi-supervised split a study needs.

    cxrdistill prepare --coco boxes.json --images DIR -o manifest.json --boxed-fraction 0.1
    cxrdistill prepare --csv labels.csv --images DIR --option labels_col=Finding -o manifest.json
    cxrdistill prepare --source nih --root /data/nih -o nih.json --weak-fraction 0.5
    cxrdistill prepare --manifest manifest.json -o split10.json --boxed-fraction 0.1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console

from cxrdistill.console import error as print_error
from cxrdistill.console import escape, say
from cxrdistill.errors import CxrDistillError


def skipped_path(out: Path) -> Path:
    """``<out>.skipped.json`` next to the manifest: the records `prepare` left out (lenient)."""
    return Path(out).with_name(Path(out).name + ".skipped.json")


def _parse_options(options: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CxrDistillError(f"--option {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def merge_boxes(raw: dict[str, Any], coco_path: Path) -> list[str]:
    """Add the boxes of a COCO file to the images of `raw` (a manifest dict) with the same
    `file_name`; those images become supervision "box". Categories are matched by name (new names
    are added). Returns the problems (annotations whose image or category is unknown), which the
    caller reports like every other skipped record."""
    import json

    try:
        coco = json.loads(Path(coco_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CxrDistillError(f"{coco_path}: cannot read COCO boxes ({err})") from None
    raw.setdefault("annotations", [])
    names = {c["name"]: c["id"] for c in raw.setdefault("categories", [])}
    for cat in coco.get("categories", []):
        if cat.get("name") not in names:
            names[cat["name"]] = max(names.values(), default=0) + 1
            raw["categories"].append({"id": names[cat["name"]], "name": cat["name"]})
    cat_name = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_file = {im["file_name"]: im for im in raw["images"]}
    image_file = {im["id"]: im.get("file_name") for im in coco.get("images", [])}
    problems: list[str] = []
    next_id = max((a["id"] for a in raw["annotations"]), default=0) + 1
    for ann in coco.get("annotations", []):
        where = f"{Path(coco_path).name}: annotation {ann.get('id', '?')}"
        target = by_file.get(image_file.get(ann.get("image_id")))
        if target is None:
            problems.append(f"{where}: its image {image_file.get(ann.get('image_id'))!r} is not in the manifest")
            continue
        if ann.get("category_id") not in cat_name:
            problems.append(f"{where}: unknown category_id {ann.get('category_id')!r}")
            continue
        raw["annotations"].append({"id": next_id, "image_id": target["id"],
                                   "category_id": names[cat_name[ann["category_id"]]], "bbox": ann.get("bbox")})
        next_id += 1
        target["supervision"] = "box"
        target["labels"] = []  # re-derived from the boxes
    return problems


def prepare_manifest(*, out: Path, source: str | None = None, root: Path | None = None,
                     coco: Path | None = None, csv: Path | None = None, images: Path | None = None,
                     manifest: Path | None = None, options: dict[str, Any] | None = None,
                     boxes: Path | None = None,
                     val_fraction: float = 0.15, test_fraction: float = 0.15,
                     boxed_fraction: float | None = None, weak_fraction: float | str = 0.0, seed: int = 0,
                     on_error: str = "strict", check_images: bool | str = False,
                     allow_outside_root: bool = False, hash_files: bool = False, workers: int = 0,
                     console: Console | None = None):
    """Build, validate, split and save a manifest; returns it. Problems are printed, never dropped."""
    from cxrdistill.data.manifest import Issue, load_manifest, manifest_from_dict
    from cxrdistill.data.skipped import report_skipped, skip_sink
    from cxrdistill.data.sources import get_source
    from cxrdistill.data.splits import make_semi_split, make_splits
    from cxrdistill.data.summary import summary_table

    console = console or Console()
    options = dict(options or {})
    chosen = [name for name, v in (("--source", source), ("--coco", coco), ("--csv", csv),
                                   ("--manifest", manifest)) if v is not None]
    if len(chosen) != 1:
        raise CxrDistillError(f"give exactly one of --source, --coco, --csv, --manifest (got {chosen or 'none'})")
    if manifest is not None:
        if boxes is not None:
            raise CxrDistillError("--boxes merges into a --csv / --coco / --source input, not --manifest")
        m = load_manifest(manifest, on_error=on_error, check_images=check_images,  # type: ignore[arg-type]
                          allow_outside_root=allow_outside_root, hash_files=hash_files, decode_workers=workers)
    else:
        if coco is not None:
            source, root = "coco", Path(images or coco.parent)
            options.setdefault("annotations", str(coco.resolve()))
        elif csv is not None:
            source, root = "csv", Path(images or csv.parent)
            options.setdefault("csv_path", str(csv.resolve()))
        if root is None:
            raise CxrDistillError("--source needs --root (the dataset folder)")
        try:
            loader = get_source(str(source))
        except ValueError as err:
            raise CxrDistillError(str(err)) from None
        try:
            raw = loader(root, on_error=on_error, **options)
        except TypeError as err:
            raise CxrDistillError(f"source {source!r}: {err} (see its module docstring for the options)") from None
        source_skipped = raw.pop("skipped", [])
        if boxes is not None:
            merge_problems = merge_boxes(raw, boxes)
            if merge_problems and on_error == "strict":
                raise CxrDistillError(f"{len(merge_problems)} problem(s) merging {boxes} (use --lenient to skip "
                                      "them):\n  " + "\n  ".join(merge_problems[:30]))
            source_skipped += merge_problems
        m = manifest_from_dict(raw, root=root, on_error=on_error,  # type: ignore[arg-type]
                               check_images=check_images, allow_outside_root=allow_outside_root,
                               source=f"{source} source", hash_files=hash_files, decode_workers=workers)
        m.skipped[:0] = [Issue(str(s).split(": ", 1)[0], str(s).split(": ", 1)[-1]) for s in source_skipped]
    m = make_splits(m, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if boxed_fraction is not None:
        m = make_semi_split(m, boxed_fraction=boxed_fraction, weak_fraction=weak_fraction, seed=seed)
    listed = skipped_path(out)
    listed.unlink(missing_ok=True)
    with skip_sink(listed, console):
        report_skipped("prepare", m.skipped)
    m.save(out)
    console.print(summary_table(m, title=escape(str(out))))
    say(console, "", f"wrote {out} ({len(m.images)} images, {len(m.annotations)} boxes, "
                     f"{len(m.skipped)} record(s) skipped" + (f", listed in {listed}" if m.skipped else "") + ")")
    return m


def register(app: typer.Typer) -> None:
    @app.command()
    def prepare(
        out: Path = typer.Option(..., "--out", "-o", help="Manifest JSON to write."),
        source: Optional[str] = typer.Option(None, "--source", help="Dataset adapter: nih, mimic, vindr, chexpert, rsna, tbx11k, coco, csv."),
        root: Optional[Path] = typer.Option(None, "--root", help="Dataset folder for --source."),
        coco: Optional[Path] = typer.Option(None, "--coco", help="A COCO JSON of boxes (with --images)."),
        csv: Optional[Path] = typer.Option(None, "--csv", help="A CSV of images with labels and/or reports (with --images)."),
        images: Optional[Path] = typer.Option(None, "--images", help="Image folder for --coco / --csv."),
        manifest: Optional[Path] = typer.Option(None, "--manifest", help="Re-split an existing manifest."),
        boxes: Optional[Path] = typer.Option(None, "--boxes", help="A COCO JSON of boxes to merge into the images with the same file_name."),
        option: Optional[list[str]] = typer.Option(None, "--option", help="Adapter option key=value (repeatable), e.g. labels_col=Finding."),
        val_fraction: float = typer.Option(0.15, help="Patients for validation when the source has no split."),
        test_fraction: float = typer.Option(0.15, help="Patients for test when the source has no split."),
        boxed_fraction: Optional[float] = typer.Option(None, help="Training patients that keep their boxes."),
        weak_fraction: str = typer.Option("0", help="Training patients that keep image-level labels only "
                                          "(a fraction, or 'rest': every patient without boxes)."),
        seed: int = typer.Option(0, help="Seed of the splits."),
        lenient: bool = typer.Option(False, "--lenient/--strict", help="Skip bad records (listed) instead of stopping."),
        check_images: bool = typer.Option(False, "--check-images", help="Decode every image fully, in parallel (slower; finds truncated pixel data that headers hide)."),
        hash_files: bool = typer.Option(False, "--hash-files", help="Also find one file under two names (sha256 of every image; slower)."),
        workers: int = typer.Option(0, "--workers", help="Threads for --check-images (0: up to 8)."),
        allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Permit file names outside the data root."),
    ) -> None:
        """Build a validated manifest from a dataset, with patient-level stratified splits."""
        console = Console()
        try:
            weak: float | str = weak_fraction if weak_fraction == "rest" else float(weak_fraction)
        except ValueError:
            raise typer.BadParameter(f"{weak_fraction!r}: give a fraction or 'rest'", param_hint="--weak-fraction") from None
        try:
            prepare_manifest(out=out, source=source, root=root, coco=coco, csv=csv, images=images,
                             manifest=manifest, options=_parse_options(option or []), boxes=boxes,
                             val_fraction=val_fraction, test_fraction=test_fraction,
                             boxed_fraction=boxed_fraction, weak_fraction=weak, seed=seed,
                             on_error="lenient" if lenient else "strict",
                             check_images="decode" if check_images else False,
                             allow_outside_root=allow_outside_root, hash_files=hash_files, workers=workers,
                             console=console)
        except CxrDistillError as err:
            print_error(console, err)
            raise typer.Exit(code=2) from None
