"""Step time of `Trainer.fit` on RetinaNet with and without the per-step host syncs (same run).

"with syncs" is the training step as it was before issue 20, rebuilt in this process: the loss
terms copied to the host and checked every step (`Trainer.check_every_step = True`), the targets
validated image by image (`models.detector.CHECK_TARGETS_PER_IMAGE`, ~3 syncs per image) and the
box loss over `positive.nonzero()` (the pre-issue-20 loss, `_legacy_loss` below). "without" is the
current default: one combined target check per batch, the dense masked box loss, losses copied
once per `log_every` (10) steps. The two alternate, `--repeats` times each, on the same model and
device-resident batches; a run times `--steps` steps after `--warmup`, with a device sync at the
two ends only.

    python bench/bench_host_syncs.py --device cpu --model tiny --size 128 --batch 8
    python bench/bench_host_syncs.py --device cuda --model r50 --size 512 --batch 16 --precision bf16
    python bench/bench_host_syncs.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cxrdistill.models.detector as detector
from _common import add_common_args, machine_line, median, pick_device, sync
from bench_detector_train import MODELS, PRECISION, make_batches, make_fabric
from cxrdistill.config import TrainConfig
from cxrdistill.engine.loop import Trainer
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.models.detector import RetinaNet, _image_weights, _pad_targets
from cxrdistill.models.losses import giou_loss, sigmoid_focal_loss


def _legacy_loss(model: RetinaNet, out, targets) -> dict[str, torch.Tensor]:
    """RetinaNet.loss before issue 20: box loss indexed by ``positive.nonzero()`` (a host sync)."""
    logits, deltas, anchors = out.cls_logits.float(), out.box_deltas.float(), out.anchors.float()
    batch = logits.shape[0]
    boxes, labels, scores = _pad_targets(targets, logits.shape[2], logits.device, logits.dtype)
    matches = model.match(out, targets)
    matched = torch.stack([m.matched_idx for m in matches]).clamp(min=0)
    positive = torch.stack([m.positive for m in matches])
    ignore = torch.stack([m.ignore for m in matches])
    weights = _image_weights(None, batch, logits)
    cls_target = torch.zeros_like(logits)
    pos_labels = labels.gather(1, matched)
    pos_scores = scores.gather(1, matched) * positive
    cls_target.scatter_(2, pos_labels.unsqueeze(-1), pos_scores.unsqueeze(-1))
    focal = sigmoid_focal_loss(logits, cls_target, model.focal_alpha, model.focal_gamma)
    cls_per_image = (focal.sum(-1) * ~ignore).sum(-1)
    normaliser = (positive.sum(dim=1) * (weights > 0)).sum().clamp(min=1).to(logits.dtype)
    pos_b, pos_a = positive.nonzero(as_tuple=True)
    gt_boxes = boxes[pos_b, matched[pos_b, pos_a]]
    if model.box_loss_kind == "giou":
        box_each = giou_loss(model.box_coder.decode_single(deltas[pos_b, pos_a], anchors[pos_a]), gt_boxes)
    else:
        encoded = model.box_coder.encode_single(gt_boxes, anchors[pos_a])
        box_each = F.smooth_l1_loss(deltas[pos_b, pos_a], encoded, beta=model.smooth_l1_beta, reduction="none").sum(-1)
    box_weight = weights[pos_b] * pos_scores[pos_b, pos_a]
    return {"cls": (cls_per_image * weights).sum() / normaliser, "box": (box_each * box_weight).sum() / normaliser}


def fit_seconds(model: RetinaNet, optimizer, fabric, batches, warmup: int, steps: int, out: Path, stage: str,
                precision: str, legacy: bool) -> float:
    cfg = TrainConfig(max_steps=warmup + steps, lr=1e-4, schedule="constant", log_every=10,
                      checkpoint_every=10**9, progress=False, tensorboard=False, resume=False, precision=precision)
    trainer = Trainer(cfg, RunDirectory(out, min_free_bytes=0), stage, fabric=fabric)
    trainer.check_every_step = legacy
    detector.CHECK_TARGETS_PER_IMAGE = legacy
    marks: dict[int, float] = {}

    def on_step_end(step: int) -> None:
        if step in (warmup, warmup + steps):
            sync(fabric.device)
            marks[step] = time.perf_counter()

    def step_fn(batch, step):
        out = model(batch["image"])
        targets = [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]
        return _legacy_loss(model, out, targets) if legacy else model.loss(out, targets)

    stream = (batches[i % len(batches)] for i in range(10**9))
    try:
        trainer.fit(step_fn, {"model": model}, optimizer, stream, warmup + steps, on_step_end=on_step_end)
    finally:
        detector.CHECK_TARGETS_PER_IMAGE = False
    return marks[warmup + steps] - marks[warmup]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=sorted(PRECISION), default="fp32")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.batch, args.steps, args.warmup, args.repeats = "tiny", 64, 2, 2, 1, 1
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = PRECISION[args.precision]
    torch.manual_seed(0)
    model = RetinaNet(num_classes=2, **MODELS[args.model]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fabric = make_fabric(device, precision)
    batches = make_batches(4, args.batch, args.size, device)
    times: dict[str, list[float]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for which in (("with", "without") if r % 2 == 0 else ("without", "with")):
                times[which].append(fit_seconds(model, optimizer, fabric, batches, args.warmup, args.steps,
                                                Path(tmp), f"{which}_{r}", precision, which == "with"))
    ms = {k: 1000 * median(v) / args.steps for k, v in times.items()}
    ratio = median([w / o for w, o in zip(times["with"], times["without"])])
    print(f"RetinaNet-{args.model} at {args.size}x{args.size}, batch {args.batch}, {args.precision}, Trainer.fit, "
          f"{args.steps} timed steps after {args.warmup}, median of {args.repeats} interleaved repeats\n"
          f"{machine_line(device, args.threads if device.type == 'cpu' else None)}\n")
    print("| training step | ms/step | step-time ratio (with / without) |")
    print("| --- | ---: | ---: |")
    print(f"| with the per-step host syncs (before) | {ms['with']:.1f} | {ratio:.3f} |")
    print(f"| without (now) | {ms['without']:.1f} | 1.000 |")


if __name__ == "__main__":
    main()
