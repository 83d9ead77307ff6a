import json

import numpy as np
import pytest
import torch

from cxrdistill.errors import CxrDistillError
from cxrdistill.pseudo.store import PseudoLabelStore


def _dets(i: int) -> dict[str, torch.Tensor]:
    k = i % 3  # 0, 1 or 2 boxes: ragged records
    return {
        "boxes": torch.arange(4 * k, dtype=torch.float32).reshape(k, 4) + i,
        "scores": torch.full((k,), i / 10),
        "labels": torch.full((k,), i % 2, dtype=torch.long),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_chunks_stream_to_disk_as_records_arrive(tmp_path):
    store = PseudoLabelStore(tmp_path, generation=1)
    writer = store.writer(chunk_size=2)
    for i in range(5):
        writer.add(i, _dets(i))
        assert len(store.chunk_files()) == (i + 1) // 2  # at most one partial chunk in memory
    writer.flush()
    assert len(store.chunk_files()) == 3 and store.done_ids() == set(range(5))
    for path in store.chunk_files():  # plain arrays, readable without pickle
        with np.load(path, allow_pickle=False) as npz:
            assert all(npz[k].dtype != object for k in npz.files)


def test_crash_resume_reads_every_image_exactly_once(tmp_path):
    ids = list(range(100, 110))
    store = PseudoLabelStore(tmp_path, generation=2)
    writer = store.writer(chunk_size=3)
    for i in ids[:7]:  # killed after 7 images: 2 chunks on disk, 1 record only in memory
        writer.add(i, _dets(i))
    (store.path / ".chunk_r00_000002.npz.k1l2.tmp").write_bytes(b"PK\x03\x04 half a chunk")
    del writer

    resumed = PseudoLabelStore(tmp_path, generation=2)
    assert resumed.done_ids() == set(ids[:6])
    assert not resumed.is_complete()
    with pytest.raises(CxrDistillError, match="incomplete"):
        resumed.read()
    assert set(resumed.read(require_complete=False)) == set(ids[:6])

    with resumed.writer(chunk_size=3) as writer:
        todo = [i for i in ids if i not in resumed.done_ids()]
        assert todo == ids[6:]
        for i in todo:
            writer.add(i, _dets(i))
        assert writer.add(ids[0], _dets(ids[0])) is False and writer.skipped == 1  # already stored
    resumed.mark_complete(expected_ids=ids, metadata={"teacher": "gen1.ckpt"})

    assert not list(resumed.path.glob("*.tmp"))
    assert resumed.is_complete()
    seen = [image_id for image_id, _ in resumed.iter_records()]
    assert sorted(seen) == ids  # no duplicates, no gaps
    records = resumed.read()
    for i in ids:
        _assert_same(records[i], _dets(i))
    marker = json.loads((resumed.path / "COMPLETE.json").read_text())
    assert marker["num_images"] == 10 and marker["metadata"] == {"teacher": "gen1.ckpt"}
    with pytest.raises(CxrDistillError, match="is complete"):
        resumed.writer()


def test_gaps_and_duplicates_are_refused(tmp_path):
    store = PseudoLabelStore(tmp_path, generation=0)
    with store.writer(chunk_size=4) as writer:
        writer.add(1, _dets(1))
        with pytest.raises(CxrDistillError, match="added twice"):
            writer.add(1, _dets(1))
    with pytest.raises(CxrDistillError, match=r"1 images have no pseudo-labels: \[2\]"):
        store.mark_complete(expected_ids=[1, 2])
    assert not store.is_complete()


def test_probability_records_and_string_ids(tmp_path):
    store = PseudoLabelStore(tmp_path, generation=3)
    probs = {f"img{i}": torch.rand(4) for i in range(5)}
    maps = torch.rand(2, 8, 8, dtype=torch.float64)
    with store.writer(chunk_size=2) as writer:
        for image_id, p in probs.items():
            writer.add(image_id, p)
        with pytest.raises(CxrDistillError, match="a dict record"):
            writer.add("x", _dets(1))
    store.mark_complete(expected_ids=probs)
    got = store.read()
    assert set(got) == set(probs) and all(torch.equal(got[k], probs[k]) for k in probs)

    other = PseudoLabelStore(tmp_path, generation=4)
    with other.writer() as writer:
        writer.add(7, maps)
    other.mark_complete()
    assert torch.equal(other.read()[7], maps)
    assert PseudoLabelStore.generations(tmp_path) == [3, 4]


def test_corrupt_chunk_is_named(tmp_path):
    store = PseudoLabelStore(tmp_path, generation=0)
    with store.writer() as writer:
        writer.add(1, _dets(1))
    store.mark_complete()
    chunk = store.chunk_files()[0]
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(CxrDistillError, match="chunk_r00_000000.npz: unreadable"):
        store.read()


def test_flipped_byte_inside_a_chunk_is_caught(tmp_path):
    store = PseudoLabelStore(tmp_path, generation=0)
    with store.writer() as writer:
        writer.add(1, {"scores": torch.arange(64, dtype=torch.float32)})
    store.mark_complete()
    chunk = store.chunk_files()[0]
    raw = bytearray(chunk.read_bytes())
    at = raw.index(np.arange(64, dtype=np.float32).tobytes()[8:16])
    raw[at] ^= 0xFF  # zip CRC-32 no longer matches
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CxrDistillError, match="unreadable"):
        store.read()
