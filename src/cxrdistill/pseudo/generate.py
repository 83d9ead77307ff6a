"""One offline pseudo-labeling pass: a fixed teacher over a dataset, streamed into the store.

    store = PseudoLabelStore(run_dir / "pseudo", generation=1)
    labels = stored_pseudo_labels(lambda batch: teacher.predict(batch["image"].to(device)),
                                  train_set, store, indices=unlabeled_rows, fresh=teacher_retrained)
    # {image_id: {"boxes", "scores", "labels"}} in cache pixels

The pass is resumable (images already in the store are skipped, so a killed pass continues where
it stopped and nothing is computed twice), streams (only one chunk is held in memory), and splits
the work across DDP ranks by position (`rank::world_size`, no duplicates, no gaps). The store is
marked complete only when every image has a record; its metadata records the settings, and a
complete store made with other settings is refused rather than silently reused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from cxrdistill.atomic import json_text
from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.errors import ConfigError
from cxrdistill.pseudo.store import ImageId, PseudoLabelStore, Record

if TYPE_CHECKING:
    from lightning_fabric import Fabric
    from typing_extensions import Unpack

Batch = dict[str, Any]
"""A batch of `data.dataset.collate` (``"image"`` (B, 1, S, S), ``"image_id"`` (B,), ...)."""
PredictFn = Callable[[Batch], Iterable[Record]]
"""batch -> one record per image, in batch order (detections dicts, or a (B, C) tensor's rows)."""
RefineFn = Callable[[Batch, Iterable[Record]], Iterable[Record]]


class PassOptions(TypedDict, total=False):
    """Keyword options of :func:`generate_pseudo_labels` that :func:`stored_pseudo_labels` passes on."""

    indices: Sequence[int] | None
    refine: RefineFn | None
    batch_size: int
    chunk_size: int
    rank: int
    world_size: int
    num_workers: int


def _cpu(record: Record) -> Record:
    """The record with its tensors on the CPU (stored as they are)."""
    if isinstance(record, torch.Tensor):
        return record.detach().cpu()
    if isinstance(record, Mapping):
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
    return record


@torch.no_grad()
def generate_pseudo_labels(predict: PredictFn, dataset: CXRDataset, store: PseudoLabelStore, *,
                           indices: Sequence[int] | None = None, refine: RefineFn | None = None,
                           batch_size: int = 32, chunk_size: int = 512, rank: int = 0, world_size: int = 1,
                           num_workers: int = 0, metadata: dict[str, Any] | None = None) -> PseudoLabelStore:
    """Run `predict(batch) -> per-image records` (then `refine(batch, records)`) over the rows
    `indices` of `dataset` (all rows by default) and stream the records into `store`.

    Records are whatever the recipe stores: detections dicts, `(C,)` probabilities, maps. On rank 0
    the store is marked complete once all ranks' records are present (call again after a barrier
    under DDP if another rank finished later).
    """
    if store.is_complete():
        return store
    rows = list(range(len(dataset))) if indices is None else list(indices)
    done = store.done_ids()
    mine = [i for i in rows[rank::world_size] if dataset.images[i].id not in done]
    if mine:
        loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, collate_fn=collate,
                            num_workers=num_workers)
        with store.writer(chunk_size=chunk_size, rank=rank) as writer:
            for batch in loader:
                records = predict(batch)
                if refine is not None:
                    records = refine(batch, records)
                for image_id, record in zip(batch["image_id"].tolist(), records):
                    writer.add(image_id, _cpu(record))
    expected = [dataset.images[i].id for i in rows]
    if rank == 0 and store.done_ids() >= set(expected):
        store.mark_complete(expected_ids=expected, metadata=metadata)
    return store


def stored_pseudo_labels(predict: PredictFn, dataset: CXRDataset, store: PseudoLabelStore, *,
                         fresh: bool, fabric: Fabric | None = None, metadata: dict[str, Any] | None = None,
                         **kwargs: Unpack[PassOptions]) -> dict[ImageId, Tensor | dict[str, Tensor]]:
    """The records of one generation, computed at most once and read back from the store.

    `fresh`: the teacher was (re)trained in this run, so whatever an earlier teacher stored for this
    generation is stale and is removed first. The pass runs on rank 0 (other ranks wait at the
    `fabric` barrier); `kwargs` go to `generate_pseudo_labels`. A complete store written with other
    `metadata` raises `ConfigError` instead of being reused.
    """
    if fabric is None or fabric.is_global_zero:
        if fresh and store.path.exists():
            shutil.rmtree(store.path)
        generate_pseudo_labels(predict, dataset, store, metadata=metadata, **kwargs)
    if fabric is not None:
        fabric.barrier()
    if metadata is not None:
        saved = json.loads((store.path / "COMPLETE.json").read_text(encoding="utf-8")).get("metadata", {})
        changed = {k: (saved.get(k), v) for k, v in json.loads(json_text(metadata)).items() if saved.get(k) != v}
        if changed:
            raise ConfigError(f"{store.path}: stored with other settings {changed} (stored, now); use a new "
                              "output_dir or delete this generation to predict again")
    return store.read()
