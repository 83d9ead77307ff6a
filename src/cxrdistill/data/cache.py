"""Decode-once cache: every image decoded a single time, resized, and kept in one memory-mapped file.

Layout of ``cache_dir`` for a given ``size``::

    index_{size}.json          the commit point: entries + name of the data file it belongs to
    images_{size}_{token}.u16  uint16 (N, size, size), value = round(pixel * 65535)

Each entry is keyed by the file's absolute path, byte size and ``mtime_ns``. A new build reuses the
rows of unchanged files from the previous build and decodes only new or changed files (and files
that failed before: the failure may have been transient). Every file is written to a temporary
name and moved into place with ``os.replace``; the index is replaced last, so a crash leaves the
previous cache (or none) readable, never a half-written one. uint16 keeps 1/65535 precision,
finer than float16 near 1 (about 1/2048).

Images are resized to ``(size, size)`` without keeping the aspect ratio (anti-aliased bilinear);
``original_sizes`` keeps ``(height, width)`` so boxes can be scaled back per axis.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cxrdistill.data.io import DEFAULT_MAX_PIXELS, read_image
from cxrdistill.errors import CxrDistillError, ImageReadError

_FORMAT_VERSION = 1
_SCALE = 65535.0
OnError = Literal["strict", "lenient"]


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased bilinear resize of ``float32 (H, W)`` to ``float32 (size, size)``."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized[0, 0].clamp_(0.0, 1.0).numpy()


@dataclass(frozen=True)
class _FileKey:
    path: str
    file_size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileKey:
        """Key of ``path`` now; a missing file gets size -1 (it will fail to decode)."""
        resolved = path.resolve()
        try:
            stat = resolved.stat()
        except OSError:
            return cls(str(resolved), -1, -1)
        return cls(str(resolved), stat.st_size, stat.st_mtime_ns)


class ImageCache:
    """Resized images as rows of a memory-mapped array; ``cache[i]`` is ``float32 (size, size)``."""

    def __init__(self, cache_dir: Path, size: int, entries: list[dict], data_file: str,
                 rows: int, decoded: tuple[int, ...] = ()) -> None:
        self.cache_dir = Path(cache_dir)
        self.size = size
        self.paths = [Path(entry["path"]) for entry in entries]
        self._entries = entries
        self._data_path = self.cache_dir / data_file
        self._row_count = rows
        self._rows: np.memmap | None = None
        self._memmap()  # map now: a later build may delete this data file (the map stays valid)
        #: Indices decoded by the build that produced this object (the rest were reused).
        self.decoded = decoded

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> np.ndarray:
        entry = self._entries[index]
        if entry.get("error") is not None:
            raise ImageReadError(entry["path"], f"failed when the cache was built: {entry['error']}")
        row = self._memmap()[entry["row"]]
        return row.astype(np.float32) / np.float32(_SCALE)

    @property
    def original_sizes(self) -> list[tuple[int, int] | None]:
        """``(height, width)`` of each source image before resizing; None where decoding failed."""
        return [None if e.get("error") is not None else (e["height"], e["width"])
                for e in self._entries]

    @property
    def failed(self) -> dict[int, str]:
        """Index → reason for every image that could not be decoded (lenient builds only)."""
        return {i: e["error"] for i, e in enumerate(self._entries) if e.get("error") is not None}

    def _memmap(self) -> np.memmap:
        if self._rows is None:
            if not self._data_path.exists():
                raise CxrDistillError(
                    f"{self._data_path}: cache data file was replaced by a newer build; "
                    f"reopen it with ImageCache.open({str(self.cache_dir)!r}, {self.size})"
                )
            shape = (self._row_count, self.size, self.size)
            self._rows = np.memmap(self._data_path, dtype=np.uint16, mode="r", shape=shape)
        return self._rows

    def __getstate__(self) -> dict:
        """Pickle without the memmap (DataLoader workers reopen it instead of copying rows)."""
        state = self.__dict__.copy()
        state["_rows"] = None
        return state

    # -- opening and building -----------------------------------------------------------------

    @staticmethod
    def index_path(cache_dir: Path, size: int) -> Path:
        return Path(cache_dir) / f"index_{size}.json"

    @classmethod
    def open(cls, cache_dir: Path, size: int) -> ImageCache:
        """Open a complete cache; raise CxrDistillError when there is none for ``size``."""
        index = _load_index(cls.index_path(cache_dir, size), size)
        if index is None:
            raise CxrDistillError(f"{cache_dir}: no complete image cache of size {size}")
        return cls(cache_dir, size, index["entries"], index["data_file"], index["rows"])

    @classmethod
    def build(
        cls,
        paths: Sequence[str | Path],
        size: int,
        cache_dir: Path,
        on_error: OnError = "strict",
        workers: int = 0,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        progress: Callable[[int, int], None] | None = None,
    ) -> ImageCache:
        """Decode and resize every image not already cached; return the cache in ``paths`` order.

        ``on_error="strict"`` raises the first ImageReadError; ``"lenient"`` records it in
        ``cache.failed``. ``workers > 0`` decodes in that many threads (Pillow, zlib, pydicom's
        decoders and torch release the GIL). ``progress(done, total)`` is called per image.
        """
        if on_error not in ("strict", "lenient"):
            raise ValueError(f"on_error must be 'strict' or 'lenient', not {on_error!r}")
        if size < 1:
            raise ValueError(f"size must be positive, not {size}")
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            index_file = cls.index_path(cache_dir, size)
            previous = _load_index(index_file, size)
            keys = [_FileKey.of(Path(p)) for p in paths]
            builder = _Builder(cache_dir, size, keys, previous, on_error, max_pixels)
            try:
                entries, decoded = builder.run(workers, progress)
            except BaseException:
                builder.discard()
                raise
            data_file = builder.commit(entries, index_file)
        except OSError as err:  # decoding errors are ImageReadErrors: an OSError here is the cache's own
            raise CxrDistillError(
                f"{cache_dir}: cannot write the image cache ({err.strerror or err}); free disk space or "
                f"set data.cache_dir to a writable folder"
            ) from err
        return cls(cache_dir, size, entries, data_file, builder.row_count, decoded=tuple(decoded))


def _load_index(index_file: Path, size: int) -> dict | None:
    """The committed index for ``size``, or None when missing, unreadable or from another format."""
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return None
    if index.get("version") != _FORMAT_VERSION or index.get("size") != size:
        return None
    if not (index_file.parent / index["data_file"]).exists():
        return None
    return index


class _Builder:
    """One build: decide which rows to reuse, decode the rest into a temporary data file."""

    def __init__(self, cache_dir: Path, size: int, keys: list[_FileKey], previous: dict | None,
                 on_error: OnError, max_pixels: int) -> None:
        self.cache_dir, self.size, self.keys = cache_dir, size, keys
        self.on_error, self.max_pixels = on_error, max_pixels
        self.data_file = f"images_{size}_{secrets.token_hex(6)}.u16"
        self.tmp_data = cache_dir / f".{self.data_file}.tmp"
        self.previous = previous
        self.row_count = 1
        self.old_rows: dict[_FileKey, dict] = {}
        if previous is not None:
            for entry in previous["entries"]:
                if entry.get("error") is None:
                    key = _FileKey(entry["path"], entry["file_size"], entry["mtime_ns"])
                    self.old_rows[key] = entry

    def run(self, workers: int,
            progress: Callable[[int, int], None] | None) -> tuple[list[dict], list[int]]:
        """Fill the temporary data file (one row per distinct file); return entries and decoded indices."""
        unique = list(dict.fromkeys(self.keys))  # duplicate paths share one row
        row_of = {key: row for row, key in enumerate(unique)}
        self.row_count = max(len(unique), 1)
        out = np.memmap(self.tmp_data, dtype=np.uint16, mode="w+",
                        shape=(self.row_count, self.size, self.size))
        old = self._old_memmap()
        for key in unique:
            if key in self.old_rows:
                out[row_of[key]] = old[self.old_rows[key]["row"]]
        to_decode = [k for k in unique if k not in self.old_rows]
        results: dict[_FileKey, tuple[int, int] | str] = {}  # original size, or failure reason
        for key, result in self._decode_all(to_decode, workers, progress, len(unique)):
            if isinstance(result, str):
                results[key] = result
            else:
                out[row_of[key]], results[key] = result
        out.flush()
        del out, old
        entries = [self._entry(key, row_of, results) for key in self.keys]
        decoded = [i for i, key in enumerate(self.keys) if key in results]
        return entries, decoded

    def _decode_all(self, keys: list[_FileKey], workers: int,
                    progress: Callable[[int, int], None] | None, total: int):
        """Yield ``(key, result)`` in order; ``workers > 0`` decodes in a thread pool."""
        pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        results = pool.map(self._decode_one, keys) if pool else map(self._decode_one, keys)
        done = total - len(keys)
        try:
            for key, result in zip(keys, results, strict=True):
                done += 1
                if progress is not None:
                    progress(done, total)
                yield key, self._check(key, result)
        finally:
            if pool is not None:  # a strict failure stops the decodes not yet started
                pool.shutdown(wait=True, cancel_futures=True)

    def _decode_one(self, key: _FileKey) -> tuple[np.ndarray, tuple[int, int]] | str:
        """Resized uint16 rows and the original (H, W), or the reason decoding failed."""
        try:
            pixels = read_image(key.path, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            return exc.reason
        quantised = np.rint(resize_image(pixels, self.size) * _SCALE).astype(np.uint16)
        return quantised, pixels.shape

    def _check(self, key: _FileKey, result):
        """Raise a failure in strict mode; pass it on (as its reason) in lenient mode."""
        if isinstance(result, str) and self.on_error == "strict":
            raise ImageReadError(key.path, result)
        return result

    def _old_memmap(self) -> np.memmap | None:
        if self.previous is None or not self.old_rows:
            return None
        path = self.cache_dir / self.previous["data_file"]
        shape = (self.previous["rows"], self.size, self.size)
        return np.memmap(path, dtype=np.uint16, mode="r", shape=shape)

    def _entry(self, key: _FileKey, row_of: dict, results: dict) -> dict:
        entry = {"path": key.path, "file_size": key.file_size, "mtime_ns": key.mtime_ns}
        result = results.get(key)
        if isinstance(result, str):
            return {**entry, "error": result}
        if result is not None:
            height, width = result
        else:
            old = self.old_rows[key]
            height, width = old["height"], old["width"]
        return {**entry, "row": row_of[key], "height": int(height), "width": int(width)}

    def commit(self, entries: list[dict], index_file: Path) -> str:
        """Move the data file into place, then the index (the commit point); drop stale files."""
        os.replace(self.tmp_data, self.cache_dir / self.data_file)
        index = {"version": _FORMAT_VERSION, "size": self.size, "data_file": self.data_file,
                 "rows": self.row_count, "entries": entries}
        tmp_index = index_file.with_name(f".{index_file.name}.{secrets.token_hex(4)}.tmp")
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, index_file)
        for stale in self.cache_dir.glob(f"images_{self.size}_*.u16"):
            if stale.name != self.data_file:
                try:
                    stale.unlink(missing_ok=True)
                except OSError:  # still mapped on a platform that forbids it: next build retries
                    pass
        return self.data_file

    def discard(self) -> None:
        self.tmp_data.unlink(missing_ok=True)


__all__ = ["ImageCache", "resize_image"]
