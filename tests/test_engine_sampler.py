"""RatioBatchSampler: ratio, tiny pools, epochs, determinism, resume, empty pools, ranks."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cxrdistill.engine.sampler import RatioBatchSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ratio_and_pools_with_three_labeled_images():
    labeled, unlabeled = [0, 1, 2], list(range(10, 20))
    batches = take(RatioBatchSampler(labeled, unlabeled, 2, 5, seed=0), 6)
    assert all(len(b) == 7 for b in batches)
    assert all(set(b[:2]) <= set(labeled) and set(b[2:]) <= set(unlabeled) for b in batches)
    stream = [i for b in batches for i in b[:2]]  # 12 labeled draws = 4 epochs of 3
    for epoch in range(4):
        assert sorted(stream[3 * epoch: 3 * epoch + 3]) == labeled
    unl = [i for b in batches for i in b[2:]]  # 30 draws = 3 epochs of 10
    assert Counter(unl) == {i: 3 for i in unlabeled}
    assert stream[:3] != stream[3:6] or stream[3:6] != stream[6:9]  # reshuffled epochs


def test_deterministic_and_seed_dependent():
    a = take(RatioBatchSampler(range(5), range(5, 30), 2, 3, seed=1), 20)
    b = take(RatioBatchSampler(range(5), range(5, 30), 2, 3, seed=1), 20)
    c = take(RatioBatchSampler(range(5), range(5, 30), 2, 3, seed=2), 20)
    assert a == b and a != c


def test_state_dict_resume_continues_with_the_same_batches():
    full = take(RatioBatchSampler(range(4), range(4, 11), 1, 2, seed=3), 15)
    first = RatioBatchSampler(range(4), range(4, 11), 1, 2, seed=3)
    head = take(first, 6)
    state = first.state_dict()
    second = RatioBatchSampler(range(4), range(4, 11), 1, 2, seed=3)
    second.load_state_dict(state)
    assert head + take(second, 9) == full


def test_state_from_other_data_is_refused():
    state = RatioBatchSampler(range(4), range(4, 11), 1, 2, seed=3).state_dict()
    with pytest.raises(ValueError, match="labeled_size was 4, now 5"):
        RatioBatchSampler(range(5), range(5, 12), 1, 2, seed=3).load_state_dict(state)


def test_empty_pool_is_ignored_and_both_empty_is_an_error():
    only_labeled = take(RatioBatchSampler([7, 8], [], 2, 4, seed=0), 3)
    assert all(sorted(b) == [7, 8] for b in only_labeled)
    only_unlabeled = take(RatioBatchSampler([], [1, 2, 3], 2, 2, seed=0), 3)
    assert all(len(b) == 2 for b in only_unlabeled)
    with pytest.raises(ValueError, match="empty batches"):
        RatioBatchSampler([], [], 2, 2, seed=0)


def test_ranks_split_the_global_stream():
    single = take(RatioBatchSampler(range(8), range(8, 24), 2, 2, seed=0), 6)
    r0 = take(RatioBatchSampler(range(8), range(8, 24), 2, 2, seed=0, rank=0, world_size=2), 3)
    r1 = take(RatioBatchSampler(range(8), range(8, 24), 2, 2, seed=0, rank=1, world_size=2), 3)
    assert r0 == single[0::2] and r1 == single[1::2]


def test_works_as_a_dataloader_batch_sampler():
    data = TensorDataset(torch.arange(10).float())
    sampler = RatioBatchSampler(range(3), range(3, 10), 2, 2, seed=0)
    loader = DataLoader(data, batch_sampler=sampler)
    batch = next(iter(loader))[0]
    assert batch.shape == (4,) and set(batch[:2].tolist()) <= {0.0, 1.0, 2.0}


def test_ranks_resume_exactly_and_a_state_moves_between_world_sizes():
    """Two ranks resume their own streams from one (rank 0's) state; the same state resumes one
    process where the global stream stopped, and a one-process state resumes two ranks."""
    one = RatioBatchSampler(range(5), range(5, 17), 2, 2, seed=4)  # one process, the reference stream
    ref = take(one, 7)
    ranks = [RatioBatchSampler(range(5), range(5, 17), 1, 1, seed=4, rank=r, world_size=2) for r in (0, 1)]
    first = [take(s, 3) for s in ranks]
    for k in range(3):  # rank batches k together = global batch k of twice the size (labeled first)
        assert sorted(first[0][k] + first[1][k]) == sorted(ref[k])
    state = ranks[0].state_dict()
    resumed = [RatioBatchSampler(range(5), range(5, 17), 1, 1, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for s, orig in zip(resumed, ranks):
        s.load_state_dict(state)
        assert take(s, 2) == take(orig, 2)
    # 2 ranks x 3 batches of 2 = 3 global batches of 4; one process with 4 per batch goes on at batch 3
    single = RatioBatchSampler(range(5), range(5, 17), 2, 2, seed=4)
    single.load_state_dict(state)
    assert take(single, 2) == ref[3:5]
    # and back: the one-process state (5 global batches) resumes two ranks at global batch 5
    back = [RatioBatchSampler(range(5), range(5, 17), 1, 1, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for s in back:
        s.load_state_dict(single.state_dict())
    got = [take(s, 1)[0] for s in back]
    assert sorted(got[0] + got[1]) == sorted(ref[5])
