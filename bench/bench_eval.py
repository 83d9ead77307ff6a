"""COCO bbox evaluation: our numpy evaluator vs. pycocotools, on the same random predictions.

    .venv/bin/python bench/bench_eval.py            # 10,000 images, 10 GT boxes and 10 detections each
    .venv/bin/python bench/bench_eval.py --smoke    # 200 images

Both run in the same process on the same data, with the COCO parameters (IoU 0.5:0.95, 3 max-dets,
4 area ranges); the table also says whether the precision arrays are bit-identical.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from cxrdistill.eval.detection import CocoParams, coco_evaluate, pycocotools_evaluate
from cxrdistill.eval.predictions import ground_truth_from_coco


def make_world(n_images: int, boxes: int, classes: int, seed: int = 0):
    """``boxes`` GT boxes per image and as many detections (jittered GT or random, random scores)."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": 1024, "height": 1024} for i in range(n_images)]
    xy = rng.uniform(0, 900, (n_images, boxes, 2))
    wh = rng.uniform(8, 300, (n_images, boxes, 2))
    cls = rng.integers(1, classes + 1, (n_images, boxes))
    anns, rows = [], []
    for i in range(n_images):
        for j in range(boxes):
            b = [*xy[i, j], *wh[i, j]]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls[i, j]),
                         "bbox": [float(v) for v in b], "area": float(b[2] * b[3]), "iscrowd": 0})
            if rng.random() < 0.7:
                d = np.array(b) + rng.normal(0, 10, 4)
                d[2:] = np.abs(d[2:]) + 1
                c = int(cls[i, j])
            else:
                d = np.r_[rng.uniform(0, 900, 2), rng.uniform(8, 300, 2)]
                c = int(rng.integers(1, classes + 1))
            rows.append({"image_id": i + 1, "category_id": c, "bbox": [float(v) for v in d], "score": float(rng.random())})
    coco = {"images": images, "annotations": anns, "categories": [{"id": k, "name": f"c{k}"} for k in range(1, classes + 1)]}
    return ground_truth_from_coco(coco), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="200 images (seconds)")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--boxes", type=int, default=10)
    ap.add_argument("--classes", type=int, default=5)
    args = ap.parse_args()
    n = 200 if args.smoke else args.images
    gt, rows = make_world(n, args.boxes, args.classes)
    params = CocoParams()
    t0 = time.perf_counter()
    ours = coco_evaluate(gt, rows, params)
    t1 = time.perf_counter()
    ref = pycocotools_evaluate(gt, rows, params)
    t2 = time.perf_counter()
    same = np.array_equal(ours.precision, ref.precision) and np.array_equal(ours.recall, ref.recall)
    print(f"{n} images, {len(gt.coco['annotations'])} GT boxes, {len(rows)} detections, {args.classes} classes; "
          f"{platform.processor() or platform.machine()}, 1 process\n")
    print("| evaluator | seconds | mAP@0.5:0.95 | identical to pycocotools |")
    print("| --- | ---: | ---: | --- |")
    print(f"| cxrdistill (numpy) | {t1 - t0:.2f} | {ours.ap():.4f} | {'yes' if same else 'NO'} |")
    print(f"| pycocotools | {t2 - t1:.2f} | {ref.ap():.4f} | — |")
    print(f"\nspeed-up: {(t2 - t1) / (t1 - t0):.1f}x")


if __name__ == "__main__":
    main()
