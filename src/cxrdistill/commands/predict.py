"""`cxrdistill predict`: run a trained model over a manifest split or a folder of PNG/JPEG/DICOM files.

Writes, in `--out`: `predictions.json` (COCO results, original pixels), `image_scores.json`, and
with `--heatmaps` one PNG per image and class (`heatmaps/<image_id>_<category_id>.png`) for
heat-map models. A folder input also gets `images_manifest.json`, so `cxrdistill evaluate` and
`cxrdistill report` can read the predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from rich.console import Console

from cxrdistill.console import error as print_error
from cxrdistill.console import say
from cxrdistill.errors import CxrDistillError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def folder_manifest(folder: Path, class_names: list[str], out: Path, on_error: str = "strict") -> tuple[Path, list[str]]:
    """A manifest of every image under `folder` (supervision "none", split "test"), written to `out`.

    Returns the manifest path and the files left out (lenient), each as ``<path>: <reason>``. A
    symlink leading outside `folder` is refused (strict: an error naming it; lenient: left out).
    """
    from cxrdistill.data.io import read_image_size
    from cxrdistill.data.manifest import manifest_from_dict
    from cxrdistill.errors import ImageReadError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CxrDistillError(f"{folder}: no PNG/JPEG/DICOM files found")
    images, problems = [], []
    inside = folder.resolve()
    for path in files:
        if not path.resolve().is_relative_to(inside):
            problems.append(f"{path}: a symlink to {path.resolve()}, outside the --images folder; refused "
                            "(copy the file into the folder to predict it)")
            continue
        try:
            h, w = read_image_size(path)
        except ImageReadError as err:
            problems.append(str(err))
            continue
        images.append({"id": len(images) + 1, "file_name": str(path.relative_to(folder)), "width": w,
                       "height": h, "split": "test", "supervision": "none"})
    if problems and on_error == "strict":
        raise CxrDistillError(f"{len(problems)} unreadable or refused image(s) (use --lenient to skip them):\n  "
                              + "\n  ".join(problems[:20]))
    if not images:
        raise CxrDistillError(f"{folder}: none of the {len(files)} image file(s) can be read")
    raw = {"info": {"source": "folder"}, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
           "images": images, "annotations": []}
    manifest_from_dict(raw, root=folder, on_error="strict").save(out)
    return out, problems


def _write_heatmaps(folder: Path, image_id: int, probs: torch.Tensor, category_ids: list[int]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for c, cid in enumerate(category_ids):
        arr = np.rint(probs[c].clamp(0, 1).numpy() * 65535).astype(np.uint16)
        Image.fromarray(arr).save(folder / f"{image_id}_{cid}.png")


def _write_dicom_objects(manifest, records, rows: list[dict], maps_of: dict[int, np.ndarray],
                         sr_dir: Path | None, seg_dir: Path | None, console: Console) -> None:
    """One SR (and/or SEG) per DICOM input, named after the source's SOP instance UID; other inputs
    are listed, not skipped silently."""
    from cxrdistill.atomic import atomic_write
    from cxrdistill.data.io import _is_dicom
    from cxrdistill.interop.dicom_out import boxes_to_sr, maps_to_seg, read_source

    by_image: dict[int, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    written, not_dicom = 0, []
    for rec in records:
        path = manifest.image_path(rec)
        if not _is_dicom(path):
            not_dicom.append(rec.file_name)
            continue
        source = read_source(path)
        targets = []
        if sr_dir is not None:
            targets.append((sr_dir, boxes_to_sr(source, by_image.get(rec.id, []), manifest.class_names,
                                                manifest.category_ids)))
        if seg_dir is not None and rec.id in maps_of:
            targets.append((seg_dir, maps_to_seg(source, maps_of[rec.id], manifest.class_names)))
        for folder, obj in targets:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"{source.SOPInstanceUID}.dcm", lambda f, o=obj: o.save_as(f, enforce_file_format=True))
            written += 1
    console.print(f"wrote {written} DICOM object(s)" + (f"; {len(not_dicom)} input(s) are not DICOM and got none "
                  f"(e.g. {not_dicom[0]})" if not_dicom else ""), highlight=False, soft_wrap=True, markup=False)


def predict_to_folder(model_path: Path, out: Path, *, manifest: Path | None = None, images: Path | None = None,
                      split: str | None = "test", heatmaps: bool = False, batch_size: int = 16,
                      score_thresh: float = 0.05, box_threshold: float = 0.5, on_error: str = "strict",
                      console: Console | None = None, dicom_sr: Path | None = None,
                      dicom_seg: Path | None = None) -> dict[str, int]:
    """Predict and write the files; returns counts (images, boxes). `dicom_sr` / `dicom_seg`: folders
    for one DICOM SR (boxes) / fractional SEG (heat maps) per input DICOM (`interop.dicom_out`)."""
    from cxrdistill.data.manifest import Issue, write_json_atomic
    from cxrdistill.data.skipped import report_skipped, skip_sink
    from cxrdistill.data.study import StudyData, cache_root_checked
    from cxrdistill.deploy.folder import load_model
    from cxrdistill.eval.runs import batches, detections_to_rows, image_score_rows, predict_detections

    console = console or Console()
    model, meta = load_model(model_path)  # run dir, model.pt or model folder
    if (manifest is None) == (images is None):
        raise CxrDistillError("give exactly one of --manifest or --images")
    out.mkdir(parents=True, exist_ok=True)
    (out / "skipped.json").unlink(missing_ok=True)
    with skip_sink(out / "skipped.json", console):  # every image left out: console + <out>/skipped.json
        if images is not None:
            manifest, problems = folder_manifest(images, meta["class_names"], out / "images_manifest.json", on_error)
            report_skipped("predict", [Issue(p.split(": ", 1)[0], p.split(": ", 1)[-1]) for p in problems])
            split = None
        data = StudyData.open(manifest, image_size=meta["image_size"],
                              cache_dir=cache_root_checked() / "images", on_error=on_error)
    n_classes = len(data.class_names)
    if meta["class_names"][:n_classes] != data.class_names:
        raise CxrDistillError(f"the manifest's classes {data.class_names} differ from the model's {meta['class_names']}")
    # a classifier may have extra outputs (e.g. "(no finding)"): only the manifest's classes are written
    dataset = data.dataset(split) if split else data.dataset(("train", "val", "test"))
    kind = meta["model"]["kind"]
    cat_ids = data.manifest.category_ids
    if dicom_seg is not None and kind != "heatmap":
        raise CxrDistillError(f"--dicom-seg needs a heat-map model; this one is a {kind}")
    rows: list[dict] = []
    ids: list[int] = []
    scores: list[np.ndarray] = []
    maps_of: dict[int, np.ndarray] = {}  # heat maps kept for --dicom-seg
    with torch.no_grad():
        if kind == "detector":
            dets = predict_detections(model, dataset, batch_size=batch_size, score_thresh=score_thresh)
            rows = detections_to_rows(dets, dataset)
            for rec in dataset.images:
                s = np.zeros(len(cat_ids))
                det = dets[rec.id]
                for label, score in zip(det["labels"].tolist(), det["scores"].tolist()):
                    s[label] = max(s[label], score)
                ids.append(rec.id)
                scores.append(s)
        else:
            from cxrdistill.models.heatmap import maps_to_detections

            for batch in batches(dataset, batch_size):
                logits = model(batch["image"])
                if kind == "classifier":
                    scores += list(torch.sigmoid(logits)[:, :n_classes].numpy())
                else:
                    maps = torch.sigmoid(logits)
                    scores += list(maps.flatten(2).amax(2).numpy())
                    dets = maps_to_detections(maps, box_threshold, model.output_stride)
                    rows += detections_to_rows(dict(zip(batch["image_id"].tolist(), dets)), dataset)
                    if heatmaps:
                        for image_id, m in zip(batch["image_id"].tolist(), maps):
                            _write_heatmaps(out / "heatmaps", image_id, m, cat_ids)
                    if dicom_seg is not None:
                        maps_of.update(zip(batch["image_id"].tolist(), maps.numpy()))
                ids += batch["image_id"].tolist()
    write_json_atomic(out / "predictions.json", rows)
    write_json_atomic(out / "image_scores.json", image_score_rows(ids, np.asarray(scores), cat_ids))
    if dicom_sr is not None or dicom_seg is not None:
        _write_dicom_objects(data.manifest, dataset.images, rows, maps_of, dicom_sr, dicom_seg, console)
    say(console, "", f"wrote {out / 'predictions.json'} ({len(rows)} boxes) and image_scores.json "
                     f"({len(ids)} images)")
    return {"images": len(ids), "boxes": len(rows)}


def register(app: typer.Typer) -> None:
    @app.command()
    def predict(
        model: Path = typer.Option(..., "--model", "-m", help="A run directory, its model.pt, or a model folder "
                                   "(cxrdistill export --format folder)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.json and image_scores.json."),
        manifest: Optional[Path] = typer.Option(None, "--manifest", help="Predict the images of a manifest."),
        images: Optional[Path] = typer.Option(None, "--images", help="Predict every PNG/JPEG/DICOM in a folder."),
        split: str = typer.Option("test", "--split", help="Manifest split ('all' for every image)."),
        heatmaps: bool = typer.Option(False, "--heatmaps", help="Heat-map models: also write probability maps as PNG."),
        score_thresh: float = typer.Option(0.05, "--score-thresh", help="Detectors: keep boxes above this score."),
        batch_size: int = typer.Option(16, "--batch-size"),
        lenient: bool = typer.Option(False, "--lenient/--strict", help="Skip unreadable images (listed)."),
        dicom_sr: Optional[Path] = typer.Option(None, "--dicom-sr", help="Folder for one DICOM SR (TID 1500) of "
                                                "boxes per input DICOM (extra 'dicom')."),
        dicom_seg: Optional[Path] = typer.Option(None, "--dicom-seg", help="Heat-map models: folder for one "
                                                 "fractional DICOM SEG per input DICOM (extra 'dicom')."),
    ) -> None:
        """Write COCO results (+ image scores, + heat maps) of a trained model."""
        console = Console()
        try:
            predict_to_folder(model, out, manifest=manifest, images=images,
                              split=None if split == "all" else split, heatmaps=heatmaps,
                              batch_size=batch_size, score_thresh=score_thresh,
                              on_error="lenient" if lenient else "strict", console=console,
                              dicom_sr=dicom_sr, dicom_seg=dicom_seg)
        except CxrDistillError as err:
            print_error(console, err)
            raise typer.Exit(code=2) from None
