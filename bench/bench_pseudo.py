"""Offline pseudo-labeling throughput: `generate_pseudo_labels` vs. bare teacher inference.

One RetinaNet teacher, the same images, the same device, in one process; each repeat runs, in
turn (order rotated between repeats):

* bare forward: ``teacher(images)`` on device-resident batches (the ceiling);
* predict: forward + decode (top-k, box decoding, batched per-class NMS), device-resident batches;
* full pass: `generate_pseudo_labels` = dataset -> DataLoader/collate -> host-to-device -> predict
  -> refine (score filter) -> the chunked on-disk `PseudoLabelStore` (npz, fsync, atomic rename).

The head's prior is 0.1, so every one of the top-k candidates clears the 0.05 score threshold:
the NMS works on full candidate lists, the worst case of a trained teacher.

    python bench/bench_pseudo.py --model tiny --size 128 --images 512                  # CPU
    python bench/bench_pseudo.py --model r50 --size 512 --images 8192 --batch 64 \\
        --precision bf16 --channels-last --workers 8                                     # GPU
    python bench/bench_pseudo.py --smoke
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from _common import add_common_args, autocast, machine_line, median, pick_device, sync
from _synthetic import SyntheticUnlabeled
from bench_detector_train import MODELS
from cxrdistill.models.detector import RetinaNet
from cxrdistill.pseudo.generate import generate_pseudo_labels
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.thresholds import filter_detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=512, help="images per pass")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=512, help="records per store chunk")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the full pass")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.images, args.batch, args.repeats = "tiny", 32, 64, 16, 1
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.precision]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    teacher = RetinaNet(num_classes=2, prior=0.1, **MODELS[args.model]).to(device).eval()
    teacher.to(memory_format=fmt)
    dataset = SyntheticUnlabeled(args.images, args.size)
    resident = [torch.stack([dataset[j]["image"] for j in range(i, min(i + args.batch, args.images))])
                .to(device).contiguous(memory_format=fmt) for i in range(0, args.images, args.batch)]

    def predict_images(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        with autocast(device, precision):
            return teacher.predict(images.to(device, non_blocking=True).contiguous(memory_format=fmt))

    @torch.no_grad()
    def bare() -> None:
        with autocast(device, precision):
            for images in resident:
                teacher(images)

    def predict_only() -> None:
        for images in resident:
            predict_images(images)

    counter = itertools.count()

    def full_pass(root: Path) -> None:
        store = PseudoLabelStore(root, generation=next(counter))
        generate_pseudo_labels(lambda batch: predict_images(batch["image"]), dataset, store,
                               refine=lambda batch, dets: filter_detections(dets, 0.05),
                               batch_size=args.batch, chunk_size=args.chunk, num_workers=args.workers)
        assert store.is_complete()

    seconds: dict[str, list[float]] = {"bare forward": [], "predict (forward + decode + NMS)": [],
                                       "generate_pseudo_labels (full pass)": []}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [bare, predict_only, lambda: full_pass(Path(tmp))]
        resident_batches = resident[:1]
        with torch.no_grad(), autocast(device, precision):
            teacher(resident_batches[0])  # warm-up (allocator, cudnn)
        for r in range(args.repeats):
            for k in range(len(jobs)):
                j = (k + r) % len(jobs)
                sync(device)
                start = time.perf_counter()
                jobs[j]()
                sync(device)
                seconds[list(seconds)[j]].append(time.perf_counter() - start)
    base = args.images / median(seconds["bare forward"])
    print(f"RetinaNet-{args.model} teacher at {args.size}x{args.size}, {args.images} images per pass, batch "
          f"{args.batch}, {args.precision}{', channels_last' if args.channels_last else ''}, "
          f"{args.workers} loader workers, chunk {args.chunk}; median of {args.repeats} rotated repeats\n"
          f"{machine_line(device, args.threads if device.type == 'cpu' else None)}\n")
    print("| stage | images/s | seconds per pass | share of bare forward |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in seconds.items():
        rate = args.images / median(values)
        print(f"| {name} | {rate:,.1f} | {median(values):.3f} | {rate / base:.3f} |")


if __name__ == "__main__":
    main()
