"""One offline pseudo-labeling pass: a fixed teacher over a dataset, streamed into the store.

    store = PseudoLabelStore(run_dir / "pseudo", generation=1)
    generate_pseudo_labels(lambda batch: teacher.predict(batch["image"].to(device)),
                           unlabeled, store, refine=rpdlr)
    labels = store.read()          # {image_id: {"boxes", "scores", "labels"}} in cache pixels

The pass is resumable (images already in the store are skipped, so a killed pass continues where
it stopped and nothing is computed twice), streams (only one chunk is held in memory), and splits
the work across DDP ranks by position (`rank::world_size`, no duplicates, no gaps). The store is
marked complete only when every image of the dataset has a record.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.pseudo.store import PseudoLabelStore

PredictFn = Callable[[dict[str, Any]], Sequence[Any]]
RefineFn = Callable[[dict[str, Any], Sequence[Any]], Sequence[Any]]


@torch.no_grad()
def generate_pseudo_labels(predict: PredictFn, dataset: CXRDataset, store: PseudoLabelStore, *,
                           refine: RefineFn | None = None, batch_size: int = 32, chunk_size: int = 512,
                           rank: int = 0, world_size: int = 1, num_workers: int = 0,
                           metadata: dict[str, Any] | None = None) -> PseudoLabelStore:
    """Run `predict(batch) -> per-image records` (then `refine(batch, records)`) over `dataset`.

    Records are whatever the recipe stores: detections dicts, `(C,)` probabilities, maps. On rank 0
    the store is marked complete once all ranks' records are present (call again after a barrier
    under DDP if another rank finished later).
    """
    if store.is_complete():
        return store
    done = store.done_ids()
    mine = [i for i in range(rank, len(dataset), world_size) if dataset.images[i].id not in done]
    if mine:
        loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, collate_fn=collate,
                            num_workers=num_workers)
        with store.writer(chunk_size=chunk_size, rank=rank) as writer:
            for batch in loader:
                records = predict(batch)
                if refine is not None:
                    records = refine(batch, records)
                for image_id, record in zip(batch["image_id"].tolist(), records):
                    writer.add(image_id, record)
    expected = [im.id for im in dataset.images]
    if rank == 0 and store.done_ids() >= set(expected):
        store.mark_complete(expected_ids=expected, metadata=metadata)
    return store
