"""The data path at training time: cache -> dataset -> collate -> device -> weak/strong views.

Generated 16-bit PNG radiographs (with 1-3 boxes each) are decoded once into the memory-mapped
cache; then each `--workers` setting runs `--epochs` shuffled epochs of a DataLoader over
`CXRDataset` and reports images/s twice: batches moved to the device, and additionally turned into
a weak and a strong (Martins & Silva) view with projected boxes by `random_view` on the device,
as a recipe's step does. The augmentation runs where the batch is (the main process), so loader
workers can only speed up the first column.

    python bench/bench_data.py --workers 0,1,2,3,4                          # CPU box
    python bench/bench_data.py --workers 0,2,4,8,16 --size 512 --batch 32   # GPU box
    python bench/bench_data.py --smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from _common import add_common_args, machine_line, median, pick_device, sync
from bench_cache import make_pngs
from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import ViewConfig, random_view


def write_manifest(folder: Path, count: int, side: int) -> Path:
    """``count`` PNGs of ``side`` px and a COCO manifest with 1-3 random boxes per image."""
    paths = make_pngs(folder, count, side)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, path in enumerate(paths):
        images.append({"id": i + 1, "file_name": path.name, "width": side, "height": side,
                       "split": "train", "supervision": "box", "patient_id": f"p{i}"})
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(side / 16, side / 4, 2)
            x, y = rng.uniform(0, side - w), rng.uniform(0, side - h)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 3)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return manifest


def epoch_rate(dataset: CXRDataset, workers: int, batch: int, device: torch.device, epochs: int,
               augment: bool) -> float:
    """Median images/s over ``epochs`` epochs (worker start-up excluded: persistent workers, one warm-up batch)."""
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda", generator=g)
    weak, strong = ViewConfig.weak(), ViewConfig.martins_silva()
    next(iter(loader))  # start the workers
    rates = []
    for _ in range(epochs):
        sync(device)
        start, seen = time.perf_counter(), 0
        for b in loader:
            images = b["image"].to(device, non_blocking=True)
            if augment:
                boxes = [x.to(device, non_blocking=True) for x in b["boxes"]]
                random_view(images, weak, g, boxes), random_view(images, strong, g, boxes)
            seen += images.shape[0]
        sync(device)
        rates.append(seen / (time.perf_counter() - start))
    return median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=int, default=512, help="generated PNG side (px)")
    parser.add_argument("--size", type=int, default=256, help="cache / training image side (px)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2,3,4")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.side, args.size, args.batch, args.epochs, args.workers = 16, 64, 32, 4, 1, "0,1"
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest(Path(tmp), args.images, args.side)
        data = StudyData.open(manifest, image_size=args.size, cache_dir=Path(tmp) / "cache")
        dataset = CXRDataset(data.manifest, data.manifest.images, data.cache, data.row_of)
        for w in (int(x) for x in args.workers.split(",")):
            rows.append((w, epoch_rate(dataset, w, args.batch, device, args.epochs, False),
                         epoch_rate(dataset, w, args.batch, device, args.epochs, True)))
    print(f"{args.images} cached images of {args.size}x{args.size} (from 16-bit {args.side} px PNGs), batch "
          f"{args.batch}, median of {args.epochs} epochs; augment = weak (flip) + strong (Martins & Silva) "
          f"views with boxes, in the main process\n{machine_line(device, args.threads)}\n")
    print("| loader workers | cache -> collate -> device images/s | + weak/strong views images/s |")
    print("| ---: | ---: | ---: |")
    for w, plain, aug in rows:
        print(f"| {w} | {plain:,.0f} | {aug:,.1f} |")


if __name__ == "__main__":
    main()
