"""Decode-once cache: every image decoded a single time, resized, and kept in memory-mapped files.

Layout of ``cache_dir`` for a given ``size`` (format 2)::

    index_v2_{size}.json            the commit point: one entry per cached file, the union of
                                    every build at this size, and the data files they live in
    images_v2_{size}_{token}.u16    uint16 (rows, size, size), value = round(pixel * 65535); one
                                    per build that decoded something, holding only what it decoded
    index_v2_{size}.lock            serialises the builders of this size (``filelock``)

Each entry is keyed by the file's absolute path, byte size and ``mtime_ns``. A build whose every
path is cached under its current key reads the index and nothing else (no lock, no write). Any
other build takes the lock, re-reads the index (another process may have just built what it
needs), decodes only new or changed files (and files that failed before: the failure may have been
transient) into a new data file, and commits the union: the previous entries whose files are
unchanged on disk plus the new ones. So data sets at one size never evict each other and no row is
ever copied. A data file is deleted only once no index entry refers to it (all its files changed
or vanished), under the lock, after the new index is in place.

A reader that finds its data file gone (a DataLoader worker reopening a pickled cache after the
index was rebuilt from scratch, e.g. because it was unreadable) looks its files up by key in the
current index; only a file that changed on disk since is an error.

Every file is written to a temporary name and moved into place with ``os.replace``; the index is
replaced last, so a crash leaves the previous cache (or none) readable, never a half-written one.
uint16 keeps 1/65535 precision, finer than float16 near 1 (about 1/2048).

Format 1 (``index_{size}.json`` + ``images_{size}_*.u16``: one data file holding only the last
build's files) is not read: a format-2 build ignores those files and leaves them in place, since a
process still running the old code may be reading them (delete them by hand).

Images are resized to ``(size, size)`` without keeping the aspect ratio (anti-aliased bilinear);
``original_sizes`` keeps ``(height, width)`` so boxes can be scaled back per axis.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from cxrdistill.data.io import DEFAULT_MAX_PIXELS, read_image
from cxrdistill.errors import CxrDistillError, ImageReadError

_FORMAT_VERSION = 2  # format 1 (one data file per build, last build only) is treated as absent, never read
_SCALE = 65535.0
_REOPEN_ATTEMPTS = 5  # a reader racing a stream of builds re-reads the index this often
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
        return cls.at(str(path.resolve()))

    @classmethod
    def at(cls, resolved: str) -> _FileKey:
        """Key of the already resolved path ``resolved`` now."""
        try:
            stat = os.stat(resolved)
        except OSError:
            return cls(resolved, -1, -1)
        return cls(resolved, stat.st_size, stat.st_mtime_ns)

    @classmethod
    def of_entry(cls, entry: dict) -> _FileKey:
        return cls(entry["path"], entry["file_size"], entry["mtime_ns"])


def _index_file(cache_dir: Path, size: int) -> Path:
    return cache_dir / f"index_v{_FORMAT_VERSION}_{size}.json"


def _lock_file(cache_dir: Path, size: int) -> Path:
    return cache_dir / f"index_v{_FORMAT_VERSION}_{size}.lock"


def _data_prefix(size: int) -> str:
    return f"images_v{_FORMAT_VERSION}_{size}_"


def _row_bytes(size: int) -> int:
    return size * size * np.dtype(np.uint16).itemsize


def _map_rows(path: Path, size: int) -> np.ndarray:
    """Read-only ``uint16 (rows, size, size)`` view of a data file (FileNotFoundError when gone)."""
    return np.memmap(path, dtype=np.uint16, mode="r").reshape(-1, size, size)


class ImageCache:
    """Resized images as rows of memory-mapped arrays; ``cache[i]`` is ``float32 (size, size)``."""

    def __init__(self, cache_dir: Path, size: int, entries: list[dict],
                 decoded: tuple[int, ...] = ()) -> None:
        self.cache_dir = Path(cache_dir)
        self.size = size
        self.paths = [Path(entry["path"]) for entry in entries]
        self._entries = entries
        self._maps: dict[str, np.ndarray] = {}  # data file name → its rows (views of memmaps)
        self._reopen()  # map now: the maps stay valid even if a later build deletes a file
        #: Indices decoded by the build that produced this object (the rest were reused).
        self.decoded = decoded

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> np.ndarray:
        entry = self._entries[index]
        if entry.get("error") is not None:
            raise ImageReadError(entry["path"], f"failed when the cache was built: {entry['error']}")
        if not self._maps:  # unpickled (a DataLoader worker): map the data files again
            self._reopen()
            entry = self._entries[index]
        row = self._maps[entry["data_file"]][entry["row"]]
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

    def _reopen(self) -> None:
        """Map every data file this cache reads; rows whose file is gone are found by key anew."""
        for _ in range(_REOPEN_ATTEMPTS):
            names = {e["data_file"] for e in self._entries if e.get("error") is None}
            try:
                self._maps = {name: _map_rows(self.cache_dir / name, self.size) for name in names}
                return
            except FileNotFoundError:
                self._maps = {}
                self._relocate()
        raise CxrDistillError(f"{self.cache_dir}: the image cache of size {self.size} keeps being "
                              f"rebuilt while it is read; retry once the other builds are done")

    def _relocate(self) -> None:
        """Point entries whose data file is gone at the rows of the same file in the current index."""
        index = _load_index(self.cache_dir, self.size)
        current = {} if index is None else {_FileKey.of_entry(e): e for e in index["entries"]}
        entries = list(self._entries)
        for i, entry in enumerate(entries):
            if entry.get("error") is not None or (self.cache_dir / entry["data_file"]).exists():
                continue
            found = current.get(_FileKey.of_entry(entry))
            if found is None:
                raise CxrDistillError(
                    f"{self.cache_dir / entry['data_file']}: cache data file was replaced by a newer "
                    f"build and {entry['path']} is no longer cached (it changed on disk since, or the "
                    f"index was rebuilt without it); build the cache again with ImageCache.build"
                )
            entries[i] = {**entry, "data_file": found["data_file"], "row": found["row"]}
        self._entries = entries

    def __getstate__(self) -> dict:
        """Pickle without the memmaps (DataLoader workers reopen them instead of copying rows)."""
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    # -- opening and building -----------------------------------------------------------------

    @staticmethod
    def index_path(cache_dir: Path, size: int) -> Path:
        return _index_file(Path(cache_dir), size)

    @classmethod
    def open(cls, cache_dir: Path, size: int) -> ImageCache:
        """Every image cached at ``size`` (in the order first cached); CxrDistillError if none."""
        index = _load_index(Path(cache_dir), size)
        if index is None or not index["entries"]:
            raise CxrDistillError(f"{cache_dir}: no complete image cache of size {size}")
        return cls(cache_dir, size, index["entries"])

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
        decoders and torch release the GIL). ``progress(done, total)`` is called per decoded image.
        Builders of one ``(cache_dir, size)`` in any process run one at a time.
        """
        if on_error not in ("strict", "lenient"):
            raise ValueError(f"on_error must be 'strict' or 'lenient', not {on_error!r}")
        if size < 1:
            raise ValueError(f"size must be positive, not {size}")
        cache_dir = Path(cache_dir)
        decoded: tuple[int, ...] = ()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            entries = _cached([_FileKey.of(Path(p)) for p in paths], _load_index(cache_dir, size))
            if entries is None:
                with FileLock(_lock_file(cache_dir, size)):
                    keys = [_FileKey.of(Path(p)) for p in paths]  # a file may have changed meanwhile
                    previous = _load_index(cache_dir, size)  # another builder may have just built them
                    entries = _cached(keys, previous)
                    if entries is None:
                        builder = _Builder(cache_dir, size, keys, previous, on_error, max_pixels)
                        entries, decoded = builder.run(workers, progress)
        except OSError as err:  # decoding errors are ImageReadErrors: an OSError here is the cache's own
            raise CxrDistillError(
                f"{cache_dir}: cannot write the image cache ({err.strerror or err}); free disk space or "
                f"set data.cache_dir to a writable folder"
            ) from err
        return cls(cache_dir, size, entries, decoded=decoded)


def _load_index(cache_dir: Path, size: int) -> dict | None:
    """The committed index, or None when missing, unreadable or of another format (format 1 too).

    Entries whose data file is missing or of the wrong length are left out (they are decoded again).
    """
    try:
        index = json.loads(_index_file(cache_dir, size).read_text())
        if index.get("version") != _FORMAT_VERSION or index.get("size") != size:
            return None
        present = {}
        for name, rows in index["data_files"].items():
            try:
                if (cache_dir / name).stat().st_size == rows * _row_bytes(size):
                    present[name] = rows
            except FileNotFoundError:
                pass
        entries = [e for e in index["entries"] if e["data_file"] in present]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {**index, "data_files": present, "entries": entries}


def _cached(keys: list[_FileKey], index: dict | None) -> list[dict] | None:
    """The index entries of ``keys`` in order, or None unless every one is cached."""
    if index is None:
        return None
    by_key = {_FileKey.of_entry(e): e for e in index["entries"]}
    entries = [by_key.get(key) for key in keys]
    return None if any(e is None for e in entries) else entries  # type: ignore[return-value]


class _Builder:
    """One build, under the lock: decode what the index lacks into a new data file, commit the union."""

    def __init__(self, cache_dir: Path, size: int, keys: list[_FileKey], previous: dict | None,
                 on_error: OnError, max_pixels: int) -> None:
        self.cache_dir, self.size, self.keys = cache_dir, size, keys
        self.on_error, self.max_pixels = on_error, max_pixels
        self.data_file = f"{_data_prefix(size)}{secrets.token_hex(6)}.u16"
        self.tmp_data = cache_dir / f".{self.data_file}.tmp"
        self.previous = previous or {"data_files": {}, "entries": []}
        self.cached = {_FileKey.of_entry(e): e for e in self.previous["entries"]}

    def run(self, workers: int,
            progress: Callable[[int, int], None] | None) -> tuple[list[dict], tuple[int, ...]]:
        """Decode, commit; return the entries of ``keys`` in order and the indices decoded."""
        try:
            new, failures = self._decode(workers, progress)
            if new:
                self._commit(new)
        except BaseException:
            self.tmp_data.unlink(missing_ok=True)
            raise
        entries = [{**asdict(key), "error": failures[key]} if key in failures
                   else new.get(key) or self.cached[key] for key in self.keys]
        decoded = tuple(i for i, key in enumerate(self.keys) if key in new or key in failures)
        return entries, decoded

    def _decode(self, workers: int, progress: Callable[[int, int], None] | None
                ) -> tuple[dict[_FileKey, dict], dict[_FileKey, str]]:
        """Decode the uncached files into the temporary data file: new entries, failure reasons."""
        unique = list(dict.fromkeys(self.keys))  # duplicate paths share one row
        todo = [key for key in unique if key not in self.cached]
        new: dict[_FileKey, dict] = {}
        failures: dict[_FileKey, str] = {}
        out = np.memmap(self.tmp_data, dtype=np.uint16, mode="w+",
                        shape=(len(todo), self.size, self.size))
        try:
            for key, result in self._decode_all(todo, workers, progress, len(unique)):
                if isinstance(result, str):
                    failures[key] = result
                    continue
                pixels, (height, width) = result
                out[len(new)] = pixels
                new[key] = {**asdict(key), "data_file": self.data_file, "row": len(new),
                            "height": int(height), "width": int(width)}
            out.flush()
        finally:
            del out
        if not new:
            self.tmp_data.unlink()
        elif len(new) < len(todo):  # failures leave no row behind
            os.truncate(self.tmp_data, len(new) * _row_bytes(self.size))
        return new, failures

    def _decode_all(self, keys: list[_FileKey], workers: int,
                    progress: Callable[[int, int], None] | None, total: int) -> Iterator:
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

    def _union(self, new: dict[_FileKey, dict]) -> list[dict]:
        """Previous entries (new ones in place of their path's, files changed on disk since dropped), then the rest."""
        requested = set(self.keys)
        by_path = {key.path: entry for key, entry in new.items()}
        union = []
        for entry in self.previous["entries"]:
            key = _FileKey.of_entry(entry)
            if entry["path"] in by_path:
                union.append(by_path.pop(entry["path"]))
            elif key in requested or _FileKey.at(key.path) == key:
                union.append(entry)
        return union + list(by_path.values())

    def _commit(self, new: dict[_FileKey, dict]) -> None:
        """Move the data file into place, then the union index (the commit point); drop stale files."""
        os.replace(self.tmp_data, self.cache_dir / self.data_file)
        entries = self._union(new)
        rows = {**self.previous["data_files"], self.data_file: len(new)}
        data_files = {name: rows[name] for name in dict.fromkeys(e["data_file"] for e in entries)}
        index = {"version": _FORMAT_VERSION, "size": self.size, "data_files": data_files,
                 "entries": entries}
        index_file = _index_file(self.cache_dir, self.size)
        tmp_index = index_file.with_name(f".{index_file.name}.{secrets.token_hex(4)}.tmp")
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, index_file)
        # under the lock no other builder of this size runs: any temporary file is a crash's leftover
        prefix = _data_prefix(self.size)
        for stale in chain(self.cache_dir.glob(f"{prefix}*.u16"), self.cache_dir.glob(f".{prefix}*.tmp"),
                           self.cache_dir.glob(f".{index_file.name}.*.tmp")):
            if stale.name not in data_files:
                try:
                    stale.unlink(missing_ok=True)
                except OSError:  # still mapped on a platform that forbids it: next build retries
                    pass


__all__ = ["ImageCache", "resize_image"]
