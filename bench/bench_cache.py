"""Decode every epoch vs. the decode-once cache, on generated 16-bit PNG radiographs.

    .venv/bin/python bench/bench_cache.py            # 32 images of 1024x1024, 3 epochs, size 256
    .venv/bin/python bench/bench_cache.py --smoke    # 4 images of 256x256, 2 epochs, size 64

Prints one markdown table: images/s of one epoch each way (same run, same files), their ratio,
and the one-off cost of building the cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrdistill.data.cache import ImageCache, resize_image
from cxrdistill.data.io import read_image


def make_pngs(folder: Path, count: int, side: int, seed: int = 0) -> list[Path]:
    """Smooth 16-bit 'radiographs' (gradient + blobs + noise) that compress like real ones."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    paths = []
    for i in range(count):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        body = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.08)
        pixels = 20000 + 30000 * body + 5000 * y + rng.normal(0, 300, (side, side))
        path = folder / f"cxr_{i:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 65535).astype(np.uint16)).save(path)
        paths.append(path)
    return paths


def epoch_decoding(paths: list[Path], size: int) -> float:
    """Seconds for one epoch that decodes and resizes every file."""
    start = time.perf_counter()
    for path in paths:
        resize_image(read_image(path), size)
    return time.perf_counter() - start


def epoch_cached(cache: ImageCache) -> float:
    """Seconds for one epoch that reads every row from the cache."""
    start = time.perf_counter()
    for i in range(len(cache)):
        cache[i]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny and fast")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--side", type=int, default=None, help="generated PNG side (px)")
    parser.add_argument("--size", type=int, default=None, help="cache image side (px)")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = args.images or (4 if args.smoke else 32)
    side = args.side or (256 if args.smoke else 1024)
    size = args.size or (64 if args.smoke else 256)
    epochs = args.epochs or (2 if args.smoke else 3)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_pngs(Path(tmp), images, side)
        start = time.perf_counter()
        cache = ImageCache.build(paths, size, Path(tmp) / "cache")
        build_s = time.perf_counter() - start
        decode_s = min(epoch_decoding(paths, size) for _ in range(epochs))
        cached_s = min(epoch_cached(cache) for _ in range(epochs))

    decode_rate, cached_rate = images / decode_s, images / cached_s
    print(f"{images} PNGs, 16-bit {side}x{side} -> cache {size}x{size}, best of {epochs} epochs, "
          f"1 torch thread\n")
    print("| path | images/s | epoch (s) |")
    print("| --- | ---: | ---: |")
    print(f"| decode + resize every epoch | {decode_rate:,.1f} | {decode_s:.3f} |")
    print(f"| decode-once cache (memmap rows) | {cached_rate:,.0f} | {cached_s:.4f} |")
    print(f"| cache build, once | {images / build_s:,.1f} | {build_s:.3f} |")
    print(f"\nspeed-up per epoch: {cached_rate / decode_rate:,.0f}x")


if __name__ == "__main__":
    main()
