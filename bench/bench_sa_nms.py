"""SA-NMS (CEIRD) over a batch: the project's batched NMS vs MONAI's `batched_nms` (same run).

Each image pools ``--teacher`` teacher pseudo-labels and ``--student`` student boxes (random,
clustered so that many overlap, 3 classes); both implementations get the same inputs, and the
table says whether they kept exactly the same boxes in the same order.

    python bench/bench_sa_nms.py --images 32 --teacher 500 --student 500     # 32 x 1000 boxes
    python bench/bench_sa_nms.py --smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.data.box_utils import batched_nms

from _common import add_common_args, machine_line, median, pick_device, sync
from cxrdistill.pseudo.sa_nms import self_adaptive_nms_batch


def _detections(n: int, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    centres = torch.rand(12, 2, generator=g) * 400 + 50  # 12 clusters: heavy overlap
    xy = centres[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 8
    wh = torch.rand(n, 2, generator=g) * 20 + 40
    return {"boxes": torch.cat([xy, xy + wh], 1).to(device), "scores": torch.rand(n, generator=g).to(device),
            "labels": torch.randint(0, 3, (n,), generator=g).to(device)}


def monai_sa_nms(teacher, student, iou_thresh: float, score_thresh: float) -> list[dict[str, torch.Tensor]]:
    """SA-NMS as it was before issue 20 (MONAI's NMS on the pooled boxes)."""
    out = []
    for t, s in zip(teacher, student):
        mask = s["scores"] >= score_thresh
        boxes = torch.cat([t["boxes"], s["boxes"][mask]])
        scores = torch.cat([t["scores"], s["scores"][mask]])
        labels = torch.cat([t["labels"], s["labels"][mask]])
        keep = batched_nms(boxes - boxes.min(), scores, labels, iou_thresh).long()
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--teacher", type=int, default=500, help="teacher boxes per image")
    parser.add_argument("--student", type=int, default=500, help="student boxes per image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.teacher, args.student, args.repeats = 2, 40, 40, 1
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    teacher = [_detections(args.teacher, g, device) for _ in range(args.images)]
    student = [_detections(args.student, g, device) for _ in range(args.images)]
    times: dict[str, list[float]] = {"ours": [], "monai": []}
    results = {}
    for r in range(args.repeats):
        for which in (("ours", "monai") if r % 2 == 0 else ("monai", "ours")):
            sync(device)
            start = time.perf_counter()
            if which == "ours":
                results[which] = self_adaptive_nms_batch(teacher, student, 0.5, score_thresh=0.0)
            else:
                results[which] = monai_sa_nms(teacher, student, 0.5, score_thresh=0.0)
            sync(device)
            times[which].append(time.perf_counter() - start)
    same = all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(results["ours"], results["monai"]))
    kept = sum(len(d["boxes"]) for d in results["ours"])
    print(f"SA-NMS on {args.images} images x {args.teacher + args.student} pooled boxes (3 classes, IoU 0.5), "
          f"{kept} kept in all; median of {args.repeats} interleaved repeats\n"
          f"{machine_line(device, args.threads if device.type == 'cpu' else None)}\n")
    print("| implementation | seconds per batch | same boxes kept |")
    print("| --- | ---: | --- |")
    print(f"| cxrdistill batched NMS (`batched_nms_sorted`) | {median(times['ours']):.4f} | {'yes' if same else 'NO'} |")
    print(f"| MONAI `batched_nms` (before) | {median(times['monai']):.4f} | — |")


if __name__ == "__main__":
    main()
