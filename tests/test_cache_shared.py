"""One image cache folder shared by many data sets and processes: fast path, union, lock, relocation."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxrdistill.data.cache as cache_module
from cxrdistill.data.cache import ImageCache, resize_image
from cxrdistill.errors import CxrDistillError

SRC = Path(__file__).resolve().parents[1] / "src"


def _write_pngs(folder: Path, count: int, offset: int = 0, shape: tuple[int, int] = (40, 56)) -> list[Path]:
    """16-bit PNGs of distinct content: image ``i`` has mean intensity about ``2500 * (offset + i)``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(offset)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 1500, shape) + 2500 * (offset + i)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels.astype(np.uint16)).save(path)
        paths.append(path)
    return paths


def _expected(path: Path, size: int) -> np.ndarray:
    return resize_image(np.asarray(Image.open(path)).astype(np.float32) / 65535.0, size)


def _assert_rows(cache: ImageCache, paths: list[Path], size: int) -> None:
    assert len(cache) == len(paths)
    for i, path in enumerate(paths):
        np.testing.assert_allclose(cache[i], _expected(path, size), atol=1 / 65535)


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real_read = cache_module.read_image
    monkeypatch.setattr(cache_module, "read_image",
                        lambda path, **kw: calls.append(str(path)) or real_read(path, **kw))
    return calls


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """name → (inode, mtime_ns) of every file in ``folder``."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.iterdir()}


def test_fully_cached_build_writes_nothing_decodes_nothing_and_takes_no_lock(tmp_path: Path,
                                                                             monkeypatch) -> None:
    paths = _write_pngs(tmp_path / "a", 3)
    cache_dir = tmp_path / "cache"
    first = ImageCache.build(paths, 16, cache_dir)
    before = _snapshot(cache_dir)
    calls = _count_decodes(monkeypatch)

    def no_lock(*args, **kwargs):
        raise AssertionError("the fast path took the builders' lock")

    monkeypatch.setattr(cache_module, "FileLock", no_lock)
    again = ImageCache.build([paths[2], paths[0], paths[2]], 16, cache_dir)
    assert calls == [] and again.decoded == ()
    assert _snapshot(cache_dir) == before  # same files, same inodes, same mtimes
    _assert_rows(again, [paths[2], paths[0], paths[2]], 16)
    np.testing.assert_array_equal(again[1], first[0])
    assert again.original_sizes == [(40, 56)] * 3 and again.failed == {}


def test_a_recorded_failure_is_retried_without_writing_a_data_file(tmp_path: Path, monkeypatch) -> None:
    paths = _write_pngs(tmp_path / "a", 2)
    bad = tmp_path / "a" / "broken.png"
    bad.write_text("not an image")
    cache_dir = tmp_path / "cache"
    ImageCache.build([paths[0], bad, paths[1]], 16, cache_dir, on_error="lenient")
    before = _snapshot(cache_dir)
    calls = _count_decodes(monkeypatch)
    again = ImageCache.build([paths[0], bad, paths[1]], 16, cache_dir, on_error="lenient")
    assert calls == [str(bad.resolve())] and again.decoded == (1,)
    assert sorted(again.failed) == [1] and again.original_sizes[1] is None
    assert _snapshot(cache_dir) == before  # the failure decoded no row: nothing to commit


def test_data_sets_at_one_size_do_not_evict_each_other(tmp_path: Path, monkeypatch) -> None:
    world_a = _write_pngs(tmp_path / "a", 3)
    world_b = _write_pngs(tmp_path / "b", 4, offset=10, shape=(30, 30))
    cache_dir = tmp_path / "cache"
    first_a = ImageCache.build(world_a, 16, cache_dir)
    b = ImageCache.build(world_b, 16, cache_dir)
    assert b.decoded == (0, 1, 2, 3)
    calls = _count_decodes(monkeypatch)
    order = [world_a[2], world_a[0], world_a[1]]
    second_a = ImageCache.build(order, 16, cache_dir)
    assert calls == [] and second_a.decoded == ()
    _assert_rows(second_a, order, 16)
    np.testing.assert_array_equal(second_a[1], first_a[0])
    assert second_a.original_sizes == [(40, 56)] * 3
    _assert_rows(b, world_b, 16)  # the earlier object still reads its rows
    union = ImageCache.open(cache_dir, 16)
    assert sorted(map(str, union.paths)) == sorted(str(p.resolve()) for p in world_a + world_b)
    # a build mixing both decodes only what is new
    extra = _write_pngs(tmp_path / "c", 1, offset=20)
    mixed = ImageCache.build([world_b[0], extra[0], world_a[1]], 16, cache_dir)
    assert mixed.decoded == (1,) and calls == [str(extra[0].resolve())]
    _assert_rows(mixed, [world_b[0], extra[0], world_a[1]], 16)


def test_files_that_changed_or_vanished_leave_the_index(tmp_path: Path) -> None:
    world_a = _write_pngs(tmp_path / "a", 2)
    world_b = _write_pngs(tmp_path / "b", 2, offset=10)
    cache_dir = tmp_path / "cache"
    ImageCache.build(world_a, 16, cache_dir)
    for path in world_a:
        path.unlink()  # e.g. a temporary synthetic world that was cleaned up
    ImageCache.build(world_b, 16, cache_dir)
    union = ImageCache.open(cache_dir, 16)
    assert sorted(map(str, union.paths)) == sorted(str(p.resolve()) for p in world_b)
    assert len(list(cache_dir.glob("images_v2_16_*.u16"))) == 1  # world A's data file is gone


def test_a_reader_whose_data_file_was_replaced_finds_its_rows_in_the_new_index(tmp_path: Path) -> None:
    world_a = _write_pngs(tmp_path / "a", 3)
    world_b = _write_pngs(tmp_path / "b", 2, offset=10)
    cache_dir = tmp_path / "cache"
    reader = ImageCache.build(world_a, 16, cache_dir)
    pickled_before = pickle.dumps(reader)  # a DataLoader worker started before the rebuild
    (old_file,) = cache_dir.glob("images_v2_16_*.u16")
    ImageCache.index_path(cache_dir, 16).write_text("{torn")  # unreadable: the next build starts afresh
    ImageCache.build(world_b + world_a, 16, cache_dir)
    assert not old_file.exists()  # the rebuilt index no longer refers to it
    _assert_rows(reader, world_a, 16)  # the open map stays valid
    _assert_rows(pickle.loads(pickled_before), world_a, 16)
    _assert_rows(pickle.loads(pickle.dumps(reader)), world_a, 16)  # a worker started after it


def test_a_reader_whose_file_changed_since_gets_a_clear_error(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path / "a", 2)
    cache_dir = tmp_path / "cache"
    reader = pickle.dumps(ImageCache.build(paths, 16, cache_dir))
    Image.fromarray(np.full((40, 56), 50000, np.uint16) - np.eye(40, 56, dtype=np.uint16)).save(paths[1])
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    ImageCache.index_path(cache_dir, 16).unlink()
    ImageCache.build(paths, 16, cache_dir)
    with pytest.raises(CxrDistillError, match=r"replaced by a newer build and .*img1\.png is no longer cached"):
        pickle.loads(reader)[0]


def test_format_1_files_are_ignored_and_left_in_place(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path / "a", 1)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    old_index = cache_dir / "index_16.json"
    old_index.write_text(json.dumps({"version": 1, "size": 16, "data_file": "images_16_ab.u16", "rows": 1,
                                     "entries": [{"path": str(paths[0].resolve()), "row": 0}]}))
    (cache_dir / "images_16_ab.u16").write_bytes(bytes(16 * 16 * 2))
    cache = ImageCache.build(paths, 16, cache_dir)
    assert cache.decoded == (0,)
    _assert_rows(cache, paths, 16)
    assert old_index.exists() and (cache_dir / "images_16_ab.u16").exists()  # an old process may use them


_CHILD = textwrap.dedent("""
    import json, pickle, sys, time
    from pathlib import Path
    import numpy as np
    import cxrdistill.data.cache as cache_module
    from cxrdistill.data.cache import ImageCache

    work, me, paths = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    real_read = cache_module.read_image

    def slow_read(path, **kw):  # slow enough for the two builds to overlap
        time.sleep(0.05)
        return real_read(path, **kw)

    def wait_for(*names):
        deadline = time.monotonic() + 60
        while not all((work / n).exists() for n in names):
            assert time.monotonic() < deadline, names
            time.sleep(0.01)

    cache_module.read_image = slow_read
    (work / f"ready_{me}").touch()
    wait_for("ready_0", "ready_1")
    cache = ImageCache.build(paths, 16, work / "cache")
    (work / f"built_{me}").touch()
    wait_for("built_0", "built_1")  # read only after both builds committed
    rows = np.stack([cache[i] for i in range(len(cache))])
    worker = pickle.loads(pickle.dumps(cache))  # as a DataLoader worker reopens it
    rows_worker = np.stack([worker[i] for i in range(len(worker))])
    np.save(work / f"rows_{me}.npy", np.stack([rows, rows_worker]))
    print(json.dumps({"decoded": len(cache.decoded)}))
""")


def test_two_processes_building_at_once_both_finish_and_read_the_right_rows(tmp_path: Path) -> None:
    shared = _write_pngs(tmp_path / "shared", 4)  # e.g. `compare --shard 0/2` and `1/2` on one world
    only_0 = _write_pngs(tmp_path / "only0", 3, offset=10)
    only_1 = _write_pngs(tmp_path / "only1", 3, offset=20)
    sets = [only_0 + shared, shared + only_1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(me),
                                  json.dumps([str(p) for p in paths])],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for me, paths in enumerate(sets)]
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    decoded = [json.loads(out.strip().splitlines()[-1])["decoded"] for out, _ in outputs]
    # serialised builders: the shared files were decoded once, by whichever ran first
    assert sorted(decoded) == [3, 7], decoded  # 7 by the first, only its own 3 by the second
    for me, paths in enumerate(sets):
        rows, rows_worker = np.load(tmp_path / f"rows_{me}.npy")
        expected = np.stack([_expected(p, 16) for p in paths])
        np.testing.assert_allclose(rows, expected, atol=1 / 65535)
        np.testing.assert_array_equal(rows_worker, rows)
    union = ImageCache.open(tmp_path / "cache", 16)
    assert len(union) == len(shared) + len(only_0) + len(only_1)
