"""An offline pseudo-labeling pass: resumable after a crash, split across ranks without gaps."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.data.study import StudyData, synthetic_world
from cxrdistill.pseudo.generate import generate_pseudo_labels
from cxrdistill.pseudo.store import PseudoLabelStore


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    manifest = synthetic_world({"n_images": 40, "image_size": 32, "seed": 1}, root)
    return StudyData.open(manifest, image_size=16, cache_dir=root / "cache").dataset("train")


def _predict(calls):
    def predict(batch):
        calls.extend(batch["image_id"].tolist())
        return [{"scores": img.mean().reshape(1), "labels": torch.zeros(1, dtype=torch.long)}
                for img in batch["image"]]
    return predict


def test_crash_mid_pass_resumes_without_recomputing(dataset, tmp_path):
    store = PseudoLabelStore(tmp_path, generation=1)
    calls: list[int] = []

    def crashing(batch):
        if len(calls) >= 12:
            raise RuntimeError("killed")
        return _predict(calls)(batch)

    with pytest.raises(RuntimeError):
        generate_pseudo_labels(crashing, dataset, store, batch_size=4, chunk_size=4)
    assert not store.is_complete() and len(store.done_ids()) == 12
    resumed: list[int] = []
    generate_pseudo_labels(_predict(resumed), dataset, store, batch_size=4, chunk_size=4)
    assert store.is_complete()
    assert set(resumed).isdisjoint(calls) and len(resumed) == len(dataset) - 12
    records = store.read()
    assert sorted(records) == sorted(im.id for im in dataset.images)
    first = dataset[0]
    assert records[first["image_id"]]["scores"].item() == pytest.approx(first["image"].mean().item())
    # a second call on a complete store computes nothing
    again: list[int] = []
    generate_pseudo_labels(_predict(again), dataset, store)
    assert again == []


def test_ranks_split_the_work_without_duplicates_or_gaps(dataset, tmp_path):
    store = PseudoLabelStore(tmp_path, generation=0)
    seen = {0: [], 1: []}
    generate_pseudo_labels(_predict(seen[1]), dataset, store, rank=1, world_size=2, batch_size=3)
    assert not store.is_complete()
    generate_pseudo_labels(_predict(seen[0]), dataset, store, rank=0, world_size=2, batch_size=3)
    assert store.is_complete()
    assert set(seen[0]).isdisjoint(seen[1]) and len(seen[0]) + len(seen[1]) == len(dataset)
