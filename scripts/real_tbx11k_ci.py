"""mAP@0.5 of the ``configs/real`` TBX11K-800 runs on the test split (val.json) with bootstrap CIs.

    python scripts/real_tbx11k_ci.py --manifest runs/real/tbx11k.json runs/real/lite0_b100 runs/real/r18w8_b100 ...

Prints each run's mAP@0.5 (and mAP@[.40:.75]) with a 95 % percentile bootstrap CI over test images
(1000 replicates, the same resampled image sets for every run), then each run minus the first with
the paired bootstrap CI of the difference (``cxrdistill.eval.compare``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cxrdistill.eval.classification import bootstrap_indices
from cxrdistill.eval.compare import paired_stats
from cxrdistill.eval.detection import CocoParams, accumulate, match_detections
from cxrdistill.eval.predictions import load_ground_truth, load_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--manifest", type=Path, default=Path("runs/real/tbx11k.json"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gt = load_ground_truth(args.manifest, split=args.split)
    grids = {"mAP@0.5": (CocoParams(iou_thresholds=(0.5,)), 0.5),
             "mAP@[.40:.75]": (CocoParams(iou_thresholds=tuple(np.round(np.arange(0.40, 0.751, 0.05), 2))), None)}
    first: dict[str, tuple[float, np.ndarray]] = {}
    for run in args.runs:
        rows = load_predictions(run / "eval" / "predictions.json", gt).rows
        cells = []
        for name, (params, iou) in grids.items():
            m = match_detections(gt, rows, params)
            value = accumulate(m, main_only=True).ap(iou)
            idx = bootstrap_indices(m.n_images, args.n_boot, args.seed)
            boot = np.array([accumulate(m, i, main_only=True).ap(iou) for i in idx])
            lo, hi = np.nanpercentile(boot, [2.5, 97.5])
            cell = f"{name} {value:.3f} [{lo:.3f}, {hi:.3f}]"
            if run == args.runs[0]:
                first[name] = (value, boot)
            else:
                d = paired_stats(name, first[name][0], value, first[name][1], boot, args.seed)
                cell += f" Δ vs {args.runs[0].name} {d.diff:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"
            cells.append(cell)
        print(f"{run.name}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
