"""Versioned on-disk pseudo-label store for offline teachers, one directory per generation.

Layout (``root/generation_003/``)::

    chunk_r00_000000.npz   records of a chunk, written to a ``.chunk_….tmp`` file then renamed (atomic)
    chunk_r00_000001.npz
    COMPLETE.json          written last (atomically) when the pass has covered every image

Records stream to disk in chunks, so a pass never holds all predictions in memory. A killed pass
leaves complete chunks and maybe a ``*.tmp`` file; the tmp file is never read and is removed when
the next writer opens. :meth:`PseudoLabelStore.done_ids` tells a resumed pass which images to
skip. Chunks are plain ``.npz`` (no pickle): for each record key ``k``, ``k`` holds the flattened
values of all records, ``k.offsets`` (n + 1,) their start offsets and ``k.shapes`` (n, ndim) their
shapes; ``image_ids`` holds the ids (int64 or unicode).

A record is either detections/any dict of arrays (``{"boxes": (K, 4), "scores": (K,), ...}``) or
a single array (image-level probabilities (C,), a probability map (C, H, W)). It is read back as
torch tensors with the dtypes and shapes it was written with.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cxrdistill.atomic import atomic_write
from cxrdistill.errors import CxrDistillError

ImageId = int | str
Record = Tensor | np.ndarray | Mapping[str, Tensor | np.ndarray]

_CHUNK = re.compile(r"^chunk_r(\d+)_(\d+)\.npz$")
_VALUE = "value"  # key of a record written as a single array
_KIND = "__kind__"
_MARKER = "COMPLETE.json"


def _chunk_key(path: Path) -> tuple[int, int] | None:
    """``(rank, index)`` of a chunk file's name; None for any other file (e.g. a ``*.tmp``)."""
    match = _CHUNK.match(path.name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _as_numpy(value: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class PseudoLabelStore:
    """Pseudo-labels of one teacher generation under ``root``.

    Args:
        root: directory holding all generations.
        generation: generation number (0 = teacher trained on labeled data only).
    """

    def __init__(self, root: str | os.PathLike[str], generation: int) -> None:
        if generation < 0:
            raise ValueError(f"generation must be >= 0, got {generation}")
        self.root = Path(root)
        self.generation = int(generation)
        self.path = self.root / f"generation_{self.generation:03d}"

    @staticmethod
    def generations(root: str | os.PathLike[str]) -> list[int]:
        """Generation numbers present under ``root``, ascending."""
        found = [re.fullmatch(r"generation_(\d+)", p.name) for p in Path(root).glob("generation_*")]
        return sorted(int(m.group(1)) for m in found if m)

    def chunk_files(self) -> list[Path]:
        """Completely written chunk files, in (rank, index) order; ``*.tmp`` files are not chunks."""
        if not self.path.is_dir():
            return []
        chunks = [(key, p) for p in self.path.iterdir() if (key := _chunk_key(p)) is not None]
        return [p for _, p in sorted(chunks)]

    @staticmethod
    def _read_chunk(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Arrays of one chunk (all, or ``keys``); a truncated or corrupt file raises naming it."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in (npz.files if keys is None else keys)}
        except ValueError as exc:
            if "allow_pickle" not in str(exc):
                raise CxrDistillError(f"{path}: unreadable pseudo-label chunk ({exc})") from exc
            raise CxrDistillError(
                f"{path}: refused to load: the chunk holds pickled Python objects, which could run code "
                f"when loaded (pseudo-label chunks hold plain arrays only)") from None
        except Exception as exc:
            raise CxrDistillError(f"{path}: unreadable pseudo-label chunk ({exc})") from exc

    def done_ids(self) -> set[ImageId]:
        """Image ids already stored in complete chunks (skip these when resuming a pass)."""
        done: set[ImageId] = set()
        for path in self.chunk_files():
            done.update(self._read_chunk(path, ("image_ids",))["image_ids"].tolist())
        return done

    def is_complete(self) -> bool:
        """True once :meth:`mark_complete` has recorded that the pass finished."""
        return (self.path / _MARKER).is_file()

    def writer(self, chunk_size: int = 256, rank: int = 0) -> PseudoLabelWriter:
        """A streaming writer; ``rank`` keeps chunk names apart when several processes write."""
        if self.is_complete():
            raise CxrDistillError(f"{self.path}: generation {self.generation} is complete; start a new generation")
        return PseudoLabelWriter(self, chunk_size, rank)

    def mark_complete(self, expected_ids: Iterable[ImageId] | None = None, metadata: Mapping[str, Any] | None = None) -> None:
        """Record that the pass is finished, after checking for duplicates and (given
        ``expected_ids``) gaps; raises :class:`CxrDistillError` listing them."""
        counts: dict[ImageId, int] = {}
        for path in self.chunk_files():
            for image_id in self._read_chunk(path, ("image_ids",))["image_ids"].tolist():
                counts[image_id] = counts.get(image_id, 0) + 1
        duplicates = sorted((i for i, n in counts.items() if n > 1), key=str)
        if duplicates:
            raise CxrDistillError(f"{self.path}: image ids stored more than once: {duplicates[:20]}")
        if expected_ids is not None:
            missing = sorted(set(expected_ids) - counts.keys(), key=str)
            if missing:
                raise CxrDistillError(f"{self.path}: {len(missing)} images have no pseudo-labels: {missing[:20]}")
        marker = {
            "generation": self.generation,
            "num_images": len(counts),
            "chunks": [p.name for p in self.chunk_files()],
            "metadata": dict(metadata or {}),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / _MARKER, lambda f: f.write(json.dumps(marker, indent=1).encode()))

    def iter_records(self, require_complete: bool = True) -> Iterator[tuple[ImageId, Tensor | dict[str, Tensor]]]:
        """Yield ``(image_id, record)`` chunk by chunk, holding one chunk in memory at a time."""
        if require_complete and not self.is_complete():
            raise CxrDistillError(
                f"{self.path}: generation {self.generation} is incomplete (no {_MARKER}); resume the pass, "
                "or read with require_complete=False"
            )
        for path in self.chunk_files():
            yield from _decode_chunk(self._read_chunk(path), path)

    def read(self, require_complete: bool = True) -> dict[ImageId, Tensor | dict[str, Tensor]]:
        """All records as ``{image_id: record}``; raises on an id stored twice."""
        out: dict[ImageId, Tensor | dict[str, Tensor]] = {}
        for image_id, record in self.iter_records(require_complete):
            if image_id in out:
                raise CxrDistillError(f"{self.path}: image id {image_id!r} stored more than once")
            out[image_id] = record
        return out


def _decode_chunk(chunk: dict[str, np.ndarray], path: Path) -> Iterator[tuple[ImageId, Tensor | dict[str, Tensor]]]:
    ids = chunk["image_ids"].tolist()
    keys = sorted(k for k in chunk if k not in ("image_ids", _KIND) and "." not in k)
    single = str(chunk[_KIND]) == "array"
    for n, image_id in enumerate(ids):
        record: dict[str, Tensor] = {}
        for key in keys:
            start, stop = chunk[f"{key}.offsets"][n : n + 2]
            shape = tuple(chunk[f"{key}.shapes"][n])
            flat = chunk[key][start:stop]
            if flat.size != int(np.prod(shape)):
                raise CxrDistillError(f"{path}: record {image_id!r} key {key!r} does not match its shape {shape}")
            record[key] = torch.from_numpy(flat.reshape(shape).copy())
        yield image_id, (record[_VALUE] if single else record)


class PseudoLabelWriter:
    """Streams records into chunk files of ``chunk_size`` records; use as a context manager.

    ``add`` skips (and returns False for) an id already stored by an earlier, killed pass, and
    raises on an id added twice in this pass. Leaving the ``with`` block flushes the last chunk,
    also on an exception, so the work done is kept for the resumed pass.
    """

    def __init__(self, store: PseudoLabelStore, chunk_size: int, rank: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.store, self.chunk_size, self.rank = store, chunk_size, rank
        store.path.mkdir(parents=True, exist_ok=True)
        for stale in store.path.glob(f".chunk_r{rank:02d}_*.tmp"):
            stale.unlink()  # a chunk a killed pass never finished: its records are not in done_ids
        self._stored = store.done_ids()
        self._seen: set[ImageId] = set()
        self._pending: list[tuple[ImageId, dict[str, np.ndarray]]] = []
        self._kind: str | None = None
        own = [p for p in store.chunk_files() if p.name.startswith(f"chunk_r{rank:02d}_")]
        self._next_index = max((key[1] for p in own if (key := _chunk_key(p)) is not None), default=-1) + 1
        self.skipped = 0
        self.written = 0

    def add(self, image_id: ImageId, record: Record) -> bool:
        """Queue one image's record; returns False (and counts ``skipped``) if it was already stored."""
        if isinstance(image_id, (bool, np.bool_)) or not isinstance(image_id, (int, np.integer, str)):
            raise CxrDistillError(f"image id {image_id!r}: must be an int or a str")
        image_id = int(image_id) if isinstance(image_id, (int, np.integer)) else image_id
        if image_id in self._seen:
            raise CxrDistillError(f"image {image_id!r}: added twice in this pass")
        if image_id in self._stored:
            self.skipped += 1
            return False
        kind = "dict" if isinstance(record, Mapping) else "array"
        if self._kind is None:
            self._kind = kind
        elif kind != self._kind:
            raise CxrDistillError(f"image {image_id!r}: a {kind} record in a pass of {self._kind} records")
        arrays = ({k: _as_numpy(v) for k, v in record.items()} if isinstance(record, Mapping)
                  else {_VALUE: _as_numpy(record)})
        for key in arrays:
            if not isinstance(key, str) or not key or "." in key or key in ("image_ids", _KIND):
                raise CxrDistillError(f"image {image_id!r}: invalid record key {key!r}")
        self._seen.add(image_id)
        self._pending.append((image_id, arrays))
        if len(self._pending) >= self.chunk_size:
            self.flush()
        return True

    def flush(self) -> None:
        """Write the queued records as one chunk (atomically); no-op when none are queued."""
        if not self._pending:
            return
        ids = [i for i, _ in self._pending]
        kinds = {type(i) for i in ids}
        if len(kinds) > 1:
            raise CxrDistillError(f"image ids mix ints and strs in one pass: {ids[:5]}")
        payload: dict[str, np.ndarray] = {
            "image_ids": np.asarray(ids, dtype=np.int64 if kinds == {int} else str),
            _KIND: np.asarray(self._kind),
        }
        keys = list(self._pending[0][1])
        for image_id, arrays in self._pending:
            if list(arrays) != keys:
                raise CxrDistillError(f"image {image_id!r}: record keys {list(arrays)} differ from {keys}")
        for key in keys:
            values = [arrays[key] for _, arrays in self._pending]
            dtypes = {v.dtype for v in values}
            if len(dtypes) > 1 or values[0].dtype == object:
                raise CxrDistillError(f"key {key!r}: records of chunk disagree on dtype or are objects: {dtypes}")
            sizes = [v.size for v in values]
            payload[key] = np.concatenate([v.reshape(-1) for v in values])
            payload[f"{key}.offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            ndims = {v.ndim for v in values}
            if len(ndims) > 1:
                raise CxrDistillError(f"key {key!r}: records of chunk disagree on the number of dimensions: {ndims}")
            payload[f"{key}.shapes"] = np.asarray([v.shape for v in values], dtype=np.int64).reshape(len(values), -1)
        path = self.store.path / f"chunk_r{self.rank:02d}_{self._next_index:06d}.npz"
        atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **payload))  # object arrays were refused above
        self._next_index += 1
        self.written += len(self._pending)
        self._pending = []

    def __enter__(self) -> PseudoLabelWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.flush()
