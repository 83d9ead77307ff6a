"""Infinite labeled:unlabeled batches with a fixed ratio, resumable batch for batch.

Each pool is read as an endless stream of epochs; every epoch is a fresh permutation of the pool
drawn from `(seed, pool, epoch)`. Batch `k` takes the next `labeled_per_batch` items of the
labeled stream and the next `unlabeled_per_batch` of the unlabeled stream, so the two pools
advance independently: 3 labeled images with 2 per batch simply wrap into the next epoch.
Because batch `k` is a pure function of `(seed, k)`, `state_dict()` is just the position, and a
resumed run continues with exactly the batches an uninterrupted one would have drawn.

Use it as a DataLoader's `batch_sampler`. In each batch the labeled indices come first::

    sampler = RatioBatchSampler(labeled_ids, unlabeled_ids, 2, 4, seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=...)
    trainer.fit(step_fn, modules, optimizer, loader, max_steps, sampler=sampler)

With several processes (DDP), pass `rank` and `world_size`: rank `r` takes global batches
`r, r + W, r + 2W, ...`, so ranks never see the same batch, and the union of the ranks' batches
number `k` is the global batch of one process with `W` times the batch size. Every rank resumes
exactly from the same state (rank 0's checkpoint: all ranks are at the same position). A state
written with another world size continues both pools' *global* item streams where they stopped
(a DDP checkpoint resumes on one process and vice versa; the per-rank batch size may differ then,
e.g. 2 ranks x 8 -> 1 x 16).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


class RatioBatchSampler:
    """Yields lists of dataset indices: `labeled_per_batch` labeled, then `unlabeled_per_batch` unlabeled."""

    def __init__(
        self,
        labeled: Sequence[int],
        unlabeled: Sequence[int],
        labeled_per_batch: int,
        unlabeled_per_batch: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if labeled_per_batch < 0 or unlabeled_per_batch < 0:
            raise ValueError("labeled_per_batch and unlabeled_per_batch must be >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.labeled = [int(i) for i in labeled]
        self.unlabeled = [int(i) for i in unlabeled]
        # An empty pool contributes nothing: the ratio ignores it.
        self.labeled_per_batch = labeled_per_batch if self.labeled else 0
        self.unlabeled_per_batch = unlabeled_per_batch if self.unlabeled else 0
        if self.labeled_per_batch + self.unlabeled_per_batch == 0:
            raise ValueError(
                f"RatioBatchSampler would yield empty batches: {len(self.labeled)} labeled items "
                f"({labeled_per_batch} per batch), {len(self.unlabeled)} unlabeled ({unlabeled_per_batch} per batch)"
            )
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.position = 0
        """Batches this rank has yielded so far (the next batch is number `position`)."""
        self.offset = (0, 0)
        """(labeled, unlabeled) items of the global streams drawn under an earlier world size."""
        self._perm_cache: dict[int, tuple[int, list[int]]] = {}

    def batch(self, k: int) -> list[int]:
        """This rank's batch number `k` (labeled indices first)."""
        g = k * self.world_size + self.rank
        out = self._take(0, self.labeled, self.offset[0] + g * self.labeled_per_batch, self.labeled_per_batch)
        out += self._take(1, self.unlabeled, self.offset[1] + g * self.unlabeled_per_batch, self.unlabeled_per_batch)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            k = self.position
            self.position += 1
            yield self.batch(k)

    def state_dict(self) -> dict[str, Any]:
        """Position plus what identifies the stream (seed, pool sizes, per-batch counts)."""
        return {
            "position": self.position,
            "offset": list(self.offset),
            "world_size": self.world_size,
            "seed": self.seed,
            "labeled_size": len(self.labeled),
            "unlabeled_size": len(self.unlabeled),
            "labeled_per_batch": self.labeled_per_batch,
            "unlabeled_per_batch": self.unlabeled_per_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state["position"]` (re-based on another world size); refuse a state from a
        different seed or data."""
        mine = self.state_dict()
        saved_world = int(state.get("world_size", self.world_size))
        keys = ("seed", "labeled_size", "unlabeled_size") + (
            ("labeled_per_batch", "unlabeled_per_batch") if saved_world == self.world_size else ())
        for key in keys:
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"sampler state does not match this run: {key} was {state[key]}, now {mine[key]} "
                    f"(the data or the config changed since the checkpoint)"
                )
        labeled, unlabeled = (int(v) for v in state.get("offset", (0, 0)))
        position = int(state["position"])
        if saved_world != self.world_size:  # re-base: continue the global item streams
            drawn = position * saved_world
            labeled += drawn * int(state["labeled_per_batch"])
            unlabeled += drawn * int(state["unlabeled_per_batch"])
            position = 0
        self.offset, self.position = (labeled, unlabeled), position

    def _take(self, pool_id: int, pool: list[int], start: int, count: int) -> list[int]:
        n = len(pool)
        out: list[int] = []
        for j in range(start, start + count):
            epoch, offset = divmod(j, n)
            out.append(pool[self._permutation(pool_id, epoch, n)[offset]])
        return out

    def _permutation(self, pool_id: int, epoch: int, n: int) -> list[int]:
        cached = self._perm_cache.get(pool_id)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(_mix(self.seed, pool_id, epoch))
            cached = (epoch, torch.randperm(n, generator=generator).tolist())
            self._perm_cache[pool_id] = cached
        return cached[1]


def _mix(seed: int, pool_id: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, pool, epoch), the same in every process and Python."""
    value = (seed * 6364136223846793005 + pool_id * 1442695040888963407 + epoch * 2862933555777941757)
    return value % (2**63 - 1)
