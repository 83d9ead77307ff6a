"""The TBX11K-800 manifest of ``configs/real/``: train.json for training (a validation split carved
from it, for model selection), val.json as the test set (never used to select anything).

    python scripts/prepare_tbx11k_real.py --root ../shared/data/tbx11k-800 -o runs/real/tbx11k.json

Also prints the box sizes at the training resolution (what the anchors of
``configs/real/tbx11k_lite0.yaml`` are matched to).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from cxrdistill.data.manifest import manifest_from_dict
from cxrdistill.data.sources import get_source
from cxrdistill.data.splits import make_splits


def build(root: Path, out: Path, val_fraction: float, seed: int) -> Path:
    manifest = manifest_from_dict(get_source("tbx11k")(root), root=root)
    train = manifest.with_images(manifest.select(split="train"))
    carved = make_splits(train, val_fraction=val_fraction, test_fraction=0.0, seed=seed, overwrite=True)
    split_of = {im.id: im.split for im in carved.images}
    images = [replace(im, split=split_of[im.id]) if im.split == "train" else replace(im, split="test")
              for im in manifest.images]
    final = manifest.replace_images(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    return final.save(out)


def box_sizes(manifest_path: Path, image_size: int) -> None:
    from cxrdistill.data.manifest import load_manifest

    m = load_manifest(manifest_path)
    by_id = {im.id: im for im in m.images}
    sides = []
    for a in m.annotations:
        im = by_id[a.image_id]
        if im.split != "train":
            continue
        scale = image_size / max(im.width, im.height)
        _, _, w, h = a.bbox  # COCO xywh
        sides.append(np.sqrt(max(w, 1e-3) * max(h, 1e-3)) * scale)
    q = np.percentile(sides, [5, 25, 50, 75, 95])
    print(f"{len(sides)} training boxes at {image_size} px: sqrt(area) percentiles 5/25/50/75/95 = "
          + " / ".join(f"{v:.0f}" for v in q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("../shared/data/tbx11k-800"))
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/real/tbx11k.json"))
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    path = build(args.root.resolve(), args.out, args.val_fraction, args.seed)
    print(f"wrote {path}")
    box_sizes(path, args.image_size)


if __name__ == "__main__":
    main()
