"""Datasets over the synthetic world: supervision is honoured, boxes follow the cache resolution."""

from __future__ import annotations

import numpy as np
import torch

from cxrdistill.data.dataset import collate
from cxrdistill.data.study import StudyData, synthetic_world


def test_study_data_masks_supervision_and_scales_boxes(tmp_path):
    manifest = synthetic_world({"n_images": 24, "image_size": 64, "seed": 3}, tmp_path)
    assert synthetic_world({"n_images": 24, "image_size": 64, "seed": 3}, tmp_path) == manifest  # reused
    data = StudyData.open(manifest, image_size=32, cache_dir=tmp_path / "cache",
                          boxed_fraction=0.3, weak_fraction=0.3, split_seed=0)
    kinds = {im.supervision for im in data.manifest.select(split="train")}
    assert kinds == {"box", "image", "none"}

    boxed = data.dataset("train", supervision="box", with_truth=True)
    sample = next(s for s in boxed if len(s["truth_boxes"]))
    rec = data.manifest.image(sample["image_id"])
    orig, _ = data.manifest.boxes_xyxy(rec.id)
    np.testing.assert_allclose(sample["boxes"].numpy(), orig * 32 / 64, rtol=1e-6)
    assert sample["image"].shape == (1, 32, 32) and 0 <= sample["image"].min() <= sample["image"].max() <= 1

    unlabeled = data.dataset("train", supervision="none", with_truth=True)
    for s in unlabeled:
        assert s["boxes"].shape == (0, 4) and s["image_labels"].sum() == 0 and not s["has_image_labels"]
    weak = data.dataset("train", supervision="image")
    assert all(s["boxes"].shape == (0, 4) and s["has_image_labels"] for s in weak)

    batch = collate([boxed[i] for i in range(min(3, len(boxed)))])
    assert batch["image"].shape[1:] == (1, 32, 32)
    assert batch["image_labels"].shape[1] == data.num_classes
    assert isinstance(batch["boxes"], list) and batch["image_id"].dtype == torch.int64
