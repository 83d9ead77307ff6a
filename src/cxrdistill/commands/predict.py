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


def predict_to_folder(model_path: Path, out: Path, *, manifest: Path | None = None, images: Path | None = None,
                      split: str | None = "test", heatmaps: bool = False, batch_size: int = 16,
                      score_thresh: float = 0.05, box_threshold: float = 0.5, on_error: str = "strict",
                      console: Console | None = None) -> dict[str, int]:
    """Predict and write the files; returns counts (images, boxes)."""
    from cxrdistill.data.manifest import write_json_atomic
    from cxrdistill.data.manifest import Issue
    from cxrdistill.data.skipped import report_skipped, skip_sink
    from cxrdistill.data.study import StudyData, cache_root_checked
    from cxrdistill.eval.runs import batches, detections_to_rows, image_score_rows, predict_detections
    from cxrdistill.models.factory import load_exported_model

    console = console or Console()
    if model_path.is_dir():
        model_path = model_path / "model.pt"
    model, meta = load_exported_model(model_path)
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
    rows: list[dict] = []
    ids: list[int] = []
    scores: list[np.ndarray] = []
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
                ids += batch["image_id"].tolist()
    write_json_atomic(out / "predictions.json", rows)
    write_json_atomic(out / "image_scores.json", image_score_rows(ids, np.asarray(scores), cat_ids))
    say(console, "", f"wrote {out / 'predictions.json'} ({len(rows)} boxes) and image_scores.json "
                     f"({len(ids)} images)")
    return {"images": len(ids), "boxes": len(rows)}


def register(app: typer.Typer) -> None:
    @app.command()
    def predict(
        model: Path = typer.Option(..., "--model", "-m", help="A run directory or its model.pt."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.json and image_scores.json."),
        manifest: Optional[Path] = typer.Option(None, "--manifest", help="Predict the images of a manifest."),
        images: Optional[Path] = typer.Option(None, "--images", help="Predict every PNG/JPEG/DICOM in a folder."),
        split: str = typer.Option("test", "--split", help="Manifest split ('all' for every image)."),
        heatmaps: bool = typer.Option(False, "--heatmaps", help="Heat-map models: also write probability maps as PNG."),
        score_thresh: float = typer.Option(0.05, "--score-thresh", help="Detectors: keep boxes above this score."),
        batch_size: int = typer.Option(16, "--batch-size"),
        lenient: bool = typer.Option(False, "--lenient/--strict", help="Skip unreadable images (listed)."),
    ) -> None:
        """Write COCO results (+ image scores, + heat maps) of a trained model."""
        console = Console()
        try:
            predict_to_folder(model, out, manifest=manifest, images=images,
                              split=None if split == "all" else split, heatmaps=heatmaps,
                              batch_size=batch_size, score_thresh=score_thresh,
                              on_error="lenient" if lenient else "strict", console=console)
        except CxrDistillError as err:
            print_error(console, err)
            raise typer.Exit(code=2) from None
