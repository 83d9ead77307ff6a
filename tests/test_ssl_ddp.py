"""MoCo's queue under DDP (issue 23): every rank enqueues the keys of ALL ranks, in rank order, so
the queues stay identical across ranks — what one process would hold after enqueueing the doubled
batch. Two forked CPU ranks on gloo (a few seconds)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from cxrdistill.ssl.models import MoCo

WORLD, BATCH, DIM, QUEUE = 2, 3, 4, 8


class _Flat(nn.Module):
    """A stand-in backbone: (B, 1, 4, 4) -> C5 map (B, 2, 2, 2)."""

    out_channels = [2]

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(x)]


def _moco() -> MoCo:
    torch.manual_seed(0)  # every rank starts from the same random queue
    return MoCo(_Flat(), dim=DIM, hidden=8, queue_size=QUEUE)


def _keys(rank: int, step: int) -> torch.Tensor:
    return torch.full((BATCH, DIM), float(10 * step + rank + 1))


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    moco = _moco()
    for step in range(2):  # 2 steps x 2 ranks x 3 keys = 12 > 8: the pointer wraps
        moco.enqueue(_keys(rank, step))
    torch.save({"queue": moco.queue.clone(), "ptr": moco.queue_ptr.clone()}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_ranks_share_one_queue_equal_to_one_process_on_the_doubled_batch(tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0], "a DDP rank failed (its traceback is in the test output)"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _moco()  # one process, no process group: the gathered batch is rank 0's keys, then rank 1's
    for step in range(2):
        single.enqueue(torch.cat([_keys(r, step) for r in range(WORLD)]))
    for got in ranks:
        torch.testing.assert_close(got["queue"], single.queue, rtol=0, atol=0)
        assert int(got["ptr"]) == int(single.queue_ptr) == (2 * WORLD * BATCH) % QUEUE
    # step 0 filled slots 0-5 with [1, 1, 1, 2, 2, 2]; step 1 wrote [11, 11, 11, 12, 12, 12] at slots 6, 7, 0, 1, 2, 3
    assert ranks[0]["queue"][0].tolist() == [11.0, 12.0, 12.0, 12.0, 2.0, 2.0, 11.0, 11.0]
