"""Torch datasets over a manifest and its decode-once cache.

A sample is a dict (see `CXRDataset.__getitem__`); `collate` batches samples, keeping per-image
boxes as lists. Supervision is honoured here, once: boxes reach a sample only when the image's
supervision is "box", image-level labels only when it is "box" or "image".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cxrdistill.data.cache import ImageCache
from cxrdistill.data.manifest import ImageRecord, Issue, Manifest


def build_manifest_cache(manifest: Manifest, size: int, cache_dir: Path, *,
                         on_error: str = "strict", workers: int = 0) -> tuple[ImageCache, dict[int, int]]:
    """Decode every manifest image once into a `size`×`size` cache.

    Returns the cache and `row_of[image_id]`. In lenient mode images that fail to decode are
    recorded in `manifest.skipped` and left out of `row_of`.
    """
    paths = [manifest.image_path(im) for im in manifest.images]
    cache = ImageCache.build(paths, size=size, cache_dir=cache_dir, on_error=on_error, workers=workers)
    failed = cache.failed
    for row, reason in failed.items():
        im = manifest.images[row]
        manifest.skipped.append(Issue(f"image {im.id} ({im.file_name})", f"unreadable image: {reason}"))
    row_of = {im.id: row for row, im in enumerate(manifest.images) if row not in failed}
    return cache, row_of


class CXRDataset(Dataset):
    """Images of one manifest subset at the cache resolution.

    Sample keys:
      image           float32 (1, S, S) in [0, 1]
      boxes           float32 (N, 4) xyxy in S-pixel coordinates (N = 0 unless supervision "box")
      labels          int64   (N,)   class indices
      image_labels    float32 (C,)   multi-hot (zeros when unknown)
      has_boxes       bool           supervision == "box"
      has_image_labels bool          supervision in {"box", "image"}
      image_id        int
      report          str            ("" when the image has no report)
      truth_boxes / truth_labels     the hidden truth (only with `with_truth=True`, for analysis)
    """

    def __init__(self, manifest: Manifest, images: Sequence[ImageRecord], cache: ImageCache,
                 row_of: dict[int, int], *, with_truth: bool = False) -> None:
        self.manifest = manifest
        self.images = [im for im in images if im.id in row_of]
        self.cache = cache
        self.row_of = row_of
        self.with_truth = with_truth
        self.size = cache.size

    def __len__(self) -> int:
        return len(self.images)

    def scale_of(self, record: ImageRecord) -> tuple[float, float]:
        """(sx, sy): multiply original-pixel x/y by these to get cache-pixel coordinates."""
        return self.size / record.width, self.size / record.height

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.images[index]
        pixels = np.asarray(self.cache[self.row_of[rec.id]], dtype=np.float32)
        boxes, labels = self.manifest.boxes_xyxy(rec.id)
        sx, sy = self.scale_of(rec)
        boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        has_boxes = rec.supervision == "box"
        has_image_labels = rec.supervision in ("box", "image")
        sample: dict[str, Any] = {
            "image": torch.from_numpy(pixels).unsqueeze(0),
            "boxes": torch.from_numpy(boxes if has_boxes else np.zeros((0, 4), np.float32)),
            "labels": torch.from_numpy(labels if has_boxes else np.zeros((0,), np.int64)),
            "image_labels": torch.from_numpy(
                self.manifest.image_labels(rec.id) if has_image_labels
                else np.zeros(self.manifest.num_classes, np.float32)),
            "has_boxes": has_boxes,
            "has_image_labels": has_image_labels,
            "image_id": rec.id,
            "report": rec.report or "",
        }
        if self.with_truth:
            sample["truth_boxes"] = torch.from_numpy(boxes)
            sample["truth_labels"] = torch.from_numpy(labels)
            sample["truth_image_labels"] = torch.from_numpy(self.manifest.image_labels(rec.id))
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and per-image vectors; keep boxes/labels as per-image lists.

    Output: image (B,1,S,S), image_labels (B,C), has_boxes (B,) bool, has_image_labels (B,) bool,
    image_id (B,) int64, boxes list[(N_i,4)], labels list[(N_i,)], report list[str]; and, when the
    samples have them, truth_* and a task's target (B,K) / mask (B,K) (`data.target_dataset`).
    """
    out: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "image_labels": torch.stack([s["image_labels"] for s in samples]),
        "has_boxes": torch.tensor([s["has_boxes"] for s in samples]),
        "has_image_labels": torch.tensor([s["has_image_labels"] for s in samples]),
        "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "boxes": [s["boxes"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "report": [s["report"] for s in samples],
    }
    for key in ("truth_boxes", "truth_labels"):
        if key in samples[0]:
            out[key] = [s[key] for s in samples]
    for key in ("truth_image_labels", "target", "mask"):  # target / mask: `data.target_dataset`
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    return out


def targets_of(batch: dict[str, Any], device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """Detector targets (docs/architecture.md) from a collated batch."""
    return [{"boxes": b.to(device) if device else b, "labels": l.to(device) if device else l}
            for b, l in zip(batch["boxes"], batch["labels"])]
