"""Everything a recipe needs from the data side, built once: manifest, cache, datasets.

    data = StudyData.open(manifest_path, image_size=128, cache_dir=run_dir / "cache")
    labeled = data.dataset("train", supervision="box")
    unlabeled = data.dataset("train", supervision=("image", "none"))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrdistill.data.cache import ImageCache
from cxrdistill.data.dataset import CXRDataset, build_manifest_cache
from cxrdistill.data.manifest import Manifest, load_manifest
from cxrdistill.data.splits import WeakFraction, make_semi_split


def default_cache_root() -> Path:
    """`$CXRDISTILL_CACHE`, else `~/.cache/cxrdistill`: synthetic worlds and image caches live here."""
    env = os.environ.get("CXRDISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cxrdistill"


def cache_root_checked(root: Path | None = None) -> Path:
    """`root` (default: :func:`default_cache_root`) created and writable, else a `CxrDistillError`
    naming it and `CXRDISTILL_CACHE` (a file, a read-only folder, a missing parent...)."""
    import tempfile

    from cxrdistill.errors import CxrDistillError

    root = Path(root) if root is not None else default_cache_root()
    where = f"{root} (CXRDISTILL_CACHE)" if os.environ.get("CXRDISTILL_CACHE") else str(root)
    if root.exists() and not root.is_dir():
        raise CxrDistillError(f"cache folder {where} is not a directory; set CXRDISTILL_CACHE to a writable folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CxrDistillError(f"cache folder {where} is not writable ({err.strerror or err}); set "
                              "CXRDISTILL_CACHE to a writable folder") from None
    return root


def synthetic_world(options: dict[str, Any], cache_root: Path) -> Path:
    """Build (once) the synthetic world for `options` (kwargs of `make_world`); return its manifest.

    Worlds are keyed by their options, so every run with the same options shares one copy.
    """
    from cxrdistill.data.synthetic import make_world

    key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out_dir = cache_root / "synthetic" / key
    manifest = out_dir / "manifest.json"
    if not manifest.is_file():  # the manifest is written last, so its presence means complete
        manifest = make_world(out_dir, **options)
    return manifest


def resolve_data_config(data_cfg: Any, cache_root: Path | None = None) -> Any:
    """Fill `data_cfg.manifest` (and `cache_dir`) in place: the synthetic world when no manifest is set.

    After this the resolved config names every file the run reads, so `config.yaml` reproduces it.
    """
    if data_cfg.cache_dir is None:
        data_cfg.cache_dir = cache_root_checked(cache_root).resolve()
    if data_cfg.manifest is None:
        data_cfg.manifest = synthetic_world(dict(data_cfg.synthetic), Path(data_cfg.cache_dir))
    return data_cfg


@dataclass
class StudyData:
    manifest: Manifest
    cache: ImageCache
    row_of: dict[int, int]

    @classmethod
    def open(cls, manifest_path: Path, *, image_size: int, cache_dir: Path, on_error: str = "strict",
             boxed_fraction: float | None = None, weak_fraction: WeakFraction = 0.0, split_seed: int = 0,
             workers: int = 0) -> StudyData:
        """Load and validate the manifest, optionally re-split supervision, build the cache."""
        from cxrdistill.data.skipped import report_skipped

        manifest = load_manifest(manifest_path, on_error=on_error)  # type: ignore[arg-type]
        report_skipped("manifest", manifest.skipped)
        if boxed_fraction is not None:
            manifest = make_semi_split(manifest, boxed_fraction=boxed_fraction,
                                       weak_fraction=weak_fraction, seed=split_seed)
        before = len(manifest.skipped)
        cache, row_of = build_manifest_cache(manifest, image_size, cache_dir, on_error=on_error,
                                             workers=workers)
        report_skipped("cache build", manifest.skipped[before:])  # lenient: undecodable images, each listed
        return cls(manifest, cache, row_of)

    @classmethod
    def from_config(cls, data_cfg: Any, cache_root: Path | None = None) -> StudyData:
        """Open the data a run config's `data` section describes (synthetic world when no manifest)."""
        resolve_data_config(data_cfg, cache_root)
        return cls.open(Path(data_cfg.manifest), image_size=data_cfg.image_size,
                        cache_dir=Path(data_cfg.cache_dir) / "images",
                        on_error=data_cfg.on_error,
                        boxed_fraction=getattr(data_cfg, "boxed_fraction", None),
                        weak_fraction=getattr(data_cfg, "weak_fraction", 0.0),
                        split_seed=getattr(data_cfg, "split_seed", 0),
                        workers=data_cfg.num_workers)

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def dataset(self, split: str | Iterable[str], supervision: str | Iterable[str] | None = None, *,
                with_truth: bool = False) -> CXRDataset:
        images = self.manifest.select(split=split, supervision=supervision)
        return CXRDataset(self.manifest, images, self.cache, self.row_of, with_truth=with_truth)

    def counts(self) -> dict[str, Any]:
        """Images per split and supervision, for logs and run summaries."""
        out: dict[str, Any] = {}
        for im in self.manifest.images:
            out.setdefault(im.split, {}).setdefault(im.supervision, 0)
            out[im.split][im.supervision] += 1
        return out
