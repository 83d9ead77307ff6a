"""Checkpoints: atomic round trip; truncated, corrupt and code-running files are refused."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from cxrdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from cxrdistill.errors import CheckpointError


def test_round_trip_and_no_temp_files(tmp_path):
    state = {"step": 7, "modules": {"m": torch.nn.Linear(3, 2).state_dict()}, "names": ["a", "b"], "lr": 0.1}
    path = save_checkpoint(tmp_path / "ck" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["names"] == ["a", "b"] and loaded["lr"] == 0.1
    assert torch.equal(loaded["modules"]["m"]["weight"], state["modules"]["m"]["weight"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_overwrite_replaces_atomically(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    inode_before = os.stat(path).st_ino
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 2
    assert os.stat(path).st_ino != inode_before  # a new file renamed over the old one, not rewritten


def test_truncated_file_names_path_and_remedy(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint is truncated or corrupt.*Delete it"):
        load_checkpoint(path)


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.target}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    _Exploit.target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _Exploit()}, path)  # a torch zip file whose pickle calls os.system
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load"):
        load_checkpoint(path)
    assert not _Exploit.target.exists()
    # the same with a raw (non-zip) pickle stream
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps({"payload": _Exploit()}))
    with pytest.raises(CheckpointError, match="evil_raw.pt"):
        load_checkpoint(raw)
    assert not _Exploit.target.exists()
    assert zipfile.is_zipfile(path)


def test_non_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def test_a_killed_writers_temp_file_is_removed_by_the_next_save(tmp_path):
    import torch

    from cxrdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "last.pt", {"w": torch.ones(2)})
    assert not stale.exists()
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["w"], torch.ones(2))
