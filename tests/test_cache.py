"""Decode-once cache: values, reuse of unchanged files, atomic commits, lenient failures."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxrdistill.data.cache as cache_module
from cxrdistill.data.cache import ImageCache, resize_image
from cxrdistill.errors import CxrDistillError, ImageReadError


def _write_pngs(folder: Path, count: int, shape: tuple[int, int] = (48, 64)) -> list[Path]:
    """16-bit PNGs whose mean intensity grows with their index."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 2000, shape) + 6000 * i
        path = folder / f"img{i}.png"
        Image.fromarray(pixels.astype(np.uint16)).save(path)
        paths.append(path)
    return paths


def _data_files(cache_dir: Path, size: int) -> list[Path]:
    return sorted(cache_dir.glob(f"images_v*_{size}_*.u16"))


def _touch_newer(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_rows_match_decode_and_resize(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path, 3)
    cache = ImageCache.build(paths, 32, tmp_path / "cache")
    assert len(cache) == 3 and cache.failed == {}
    for i, path in enumerate(paths):
        pixels = np.asarray(Image.open(path)).astype(np.float32) / 65535.0
        row = cache[i]
        assert row.dtype == np.float32 and row.shape == (32, 32)
        np.testing.assert_allclose(row, resize_image(pixels, 32), atol=1 / 65535)
        assert cache.original_sizes[i] == (48, 64)
    assert cache[0].mean() < cache[1].mean() < cache[2].mean()  # order kept


def test_resize_is_anti_aliased() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)  # finest possible pattern
    small = resize_image(checker, 16)
    np.testing.assert_allclose(small, 0.5, atol=0.02)  # averaged, not aliased to 0 or 1


def test_rebuild_decodes_only_changed_file(tmp_path: Path, monkeypatch) -> None:
    paths = _write_pngs(tmp_path, 4)
    first = ImageCache.build(paths, 16, tmp_path / "cache")
    assert first.decoded == (0, 1, 2, 3)

    calls: list[str] = []
    real_read = cache_module.read_image
    monkeypatch.setattr(cache_module, "read_image",
                        lambda path, **kw: calls.append(str(path)) or real_read(path, **kw))
    Image.fromarray(np.full((48, 64), 60000, np.uint16) - np.eye(48, 64, dtype=np.uint16)).save(paths[2])
    _touch_newer(paths[2])
    second = ImageCache.build(paths, 16, tmp_path / "cache")
    assert calls == [str(paths[2].resolve())]
    assert second.decoded == (2,)
    assert second[2].mean() > 0.9  # the new content
    np.testing.assert_array_equal(second[0], first[0])

    calls.clear()
    third = ImageCache.build(paths, 16, tmp_path / "cache")
    assert calls == [] and third.decoded == ()
    # a new size is a separate cache: everything is decoded again, the old one stays
    fourth = ImageCache.build(paths, 8, tmp_path / "cache")
    assert len(calls) == 4 and fourth[0].shape == (8, 8)
    assert ImageCache.open(tmp_path / "cache", 16)[3].shape == (16, 16)


def test_open_reads_committed_cache_and_old_data_files_are_removed(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path, 2)
    built = ImageCache.build(paths, 16, tmp_path / "cache")
    _touch_newer(paths[0])
    ImageCache.build(paths, 16, tmp_path / "cache")  # path 1's row stays in the first data file
    assert len(_data_files(tmp_path / "cache", 16)) == 2
    for path in paths:
        _touch_newer(path)
    ImageCache.build(paths, 16, tmp_path / "cache")  # no entry refers to the first two any more
    assert len(_data_files(tmp_path / "cache", 16)) == 1
    opened = ImageCache.open(tmp_path / "cache", 16)
    np.testing.assert_array_equal(opened[1], built[1])
    with pytest.raises(CxrDistillError, match="no complete image cache of size 32"):
        ImageCache.open(tmp_path / "cache", 32)


def test_crash_mid_build_leaves_previous_cache(tmp_path: Path, monkeypatch) -> None:
    paths = _write_pngs(tmp_path, 3)
    before = ImageCache.build(paths, 16, tmp_path / "cache")
    index_file = ImageCache.index_path(tmp_path / "cache", 16)
    index_before = index_file.read_text()

    def explode(path, **kw):
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C during decoding

    monkeypatch.setattr(cache_module, "read_image", explode)
    for path in paths:
        _touch_newer(path)
    with pytest.raises(KeyboardInterrupt):
        ImageCache.build(paths, 16, tmp_path / "cache")
    assert index_file.read_text() == index_before
    assert not list((tmp_path / "cache").glob(".*tmp"))
    np.testing.assert_array_equal(ImageCache.open(tmp_path / "cache", 16)[2], before[2])


def test_index_without_data_file_is_not_complete(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path, 1)
    ImageCache.build(paths, 16, tmp_path / "cache")
    index = json.loads(ImageCache.index_path(tmp_path / "cache", 16).read_text())
    for name in index["data_files"]:
        (tmp_path / "cache" / name).unlink()
    with pytest.raises(CxrDistillError):
        ImageCache.open(tmp_path / "cache", 16)


def test_strict_raises_naming_the_file(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path, 2)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        ImageCache.build([paths[0], bad, paths[1]], 16, tmp_path / "cache")
    assert info.value.path == str(bad.resolve()) and "empty" in info.value.reason
    assert not ImageCache.index_path(tmp_path / "cache", 16).exists()


def test_lenient_lists_failures_and_refuses_to_serve_them(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path, 2)
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    missing = tmp_path / "missing.png"
    cache = ImageCache.build([paths[0], bad, missing, paths[1]], 16, tmp_path / "cache",
                             on_error="lenient", workers=2)
    assert sorted(cache.failed) == [1, 2]
    assert "not a recognised image" in cache.failed[1] and "not found" in cache.failed[2]
    assert cache.original_sizes[1] is None and cache.original_sizes[3] == (48, 64)
    with pytest.raises(ImageReadError, match="failed when the cache was built"):
        cache[1]
    assert cache[3].mean() > cache[0].mean()
    # a fixed file is picked up on the next build
    Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)).save(missing)
    rebuilt = ImageCache.build([paths[0], bad, missing, paths[1]], 16, tmp_path / "cache",
                               on_error="lenient")
    assert sorted(rebuilt.failed) == [1] and rebuilt.decoded == (1, 2)


def test_duplicates_workers_and_pickling(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path, 3)
    cache = ImageCache.build([paths[0], paths[1], paths[0], paths[2]], 16, tmp_path / "cache",
                             workers=2)
    np.testing.assert_array_equal(cache[0], cache[2])
    copy = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 16 * 16 * 2 * 3  # rows are not copied into the pickle
    np.testing.assert_array_equal(copy[3], cache[3])
