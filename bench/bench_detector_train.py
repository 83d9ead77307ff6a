"""RetinaNet training throughput: `Trainer.fit` vs. a plain PyTorch loop on the same model.

Each variant (precision, channels_last, fused AdamW, torch.compile) builds one model and runs the
plain loop and `Trainer.fit` alternately, `--repeats` times each, on the same device-resident
batches (random images, 1-3 random boxes each). A run times `--steps` optimizer steps after
`--warmup` steps, with a device sync only at the two ends, so host syncs inside a step show up as
lost throughput. The Trainer does what it does in a real run (NaN checks, metrics.csv every 10
steps); its end-of-stage checkpoint falls outside the timed window.

    python bench/bench_detector_train.py --model tiny --size 128 --batch 8           # CPU rows
    python bench/bench_detector_train.py --model r18 --size 256 --batch 4 --steps 4 --warmup 1
    python bench/bench_detector_train.py --model r50 --size 512 --batch 16 \\
        --variants fp32,bf16,bf16+cl,bf16+cl+fused,bf16+cl+fused+compile               # GPU rows
    python bench/bench_detector_train.py --smoke

Columns: images/s (median over repeats) of each loop, their ratio (Trainer / plain; 1.0 = no
framework tax), and the peak memory of each loop (CUDA max allocated, or sampled peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lightning_fabric import Fabric

from _common import PeakMemory, add_common_args, autocast, machine_line, median, pick_device, sync
from cxrdistill.config import TrainConfig
from cxrdistill.engine.loop import Trainer
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.models.detector import RetinaNet

MODELS = {
    "tiny": dict(depth=18, base_width=8, fpn_channels=32, fpn_levels=(2, 3, 4),
                 anchor_sizes=((12,), (24,), (48,)), aspect_ratios=(1.0,), head_convs=2),
    "r18": dict(depth=18),
    "r50": dict(depth=50),
    # the real-data detector of configs/real/tbx11k_lite0.yaml (random weights: speed only)
    "lite0": dict(backbone="efficientnet_lite0", base_width=32, freeze_bn=True, fpn_channels=64, head_convs=2,
                  fpn_levels=(3, 4, 5), anchor_sizes=((24, 32), (44, 60), (80, 110))),
}
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def parse_variant(text: str) -> dict:
    """``bf16+cl+fused+compile`` -> options; the first part names the precision."""
    parts = text.split("+")
    if parts[0] not in PRECISION or not set(parts[1:]) <= {"cl", "fused", "compile"}:
        raise SystemExit(f"bad variant {text!r}: <fp32|bf16|fp16>[+cl][+fused][+compile]")
    return {"name": text, "precision": PRECISION[parts[0]], "channels_last": "cl" in parts,
            "fused": "fused" in parts, "compile": "compile" in parts}


def make_batches(n: int, batch: int, size: int, device: torch.device, seed: int = 0) -> list[dict]:
    """``n`` batches of noise images with 1-3 random boxes each (2 classes), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        boxes, labels = [], []
        for _ in range(batch):
            k = int(torch.randint(1, 4, (1,), generator=g))
            wh = torch.empty(k, 2).uniform_(size / 16, size / 3, generator=g)
            xy = torch.rand(k, 2, generator=g) * (size - wh)
            boxes.append(torch.cat([xy, xy + wh], 1).to(device))
            labels.append(torch.randint(0, 2, (k,), generator=g).to(device))
        out.append({"image": torch.rand(batch, 1, size, size, generator=g).to(device),
                    "boxes": boxes, "labels": labels})
    return out


class Setup:
    """One model + optimizer + forward (maybe compiled) for a variant."""

    def __init__(self, model_name: str, variant: dict, device: torch.device, lr: float = 1e-4) -> None:
        torch.manual_seed(0)
        self.variant, self.device = variant, device
        self.model = RetinaNet(num_classes=2, **MODELS[model_name]).to(device)
        self.memory_format = torch.channels_last if variant["channels_last"] else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.forward = torch.compile(self.model) if variant["compile"] else self.model
        extra = {"fused": True} if variant["fused"] else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4, **extra)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"].contiguous(memory_format=self.memory_format)
        out = self.forward(images)
        targets = [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]
        return self.model.loss(out, targets)


def plain_run(s: Setup, batches: list[dict], warmup: int, steps: int) -> float:
    """Seconds for ``steps`` steps after ``warmup`` steps of a textbook loop."""
    s.model.train()
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.variant["precision"] == "16-mixed")
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(s.device)
            start = time.perf_counter()
        s.optimizer.zero_grad(set_to_none=True)
        with autocast(s.device, s.variant["precision"]):
            losses = s.losses(batches[i % len(batches)])
        scaler.scale(sum(losses.values())).backward()
        scaler.step(s.optimizer)
        scaler.update()
    sync(s.device)
    return time.perf_counter() - start


def fit_run(s: Setup, fabric: Fabric, batches: list[dict], warmup: int, steps: int, out: Path, stage: str) -> float:
    """Seconds for ``steps`` steps after ``warmup`` steps of ``Trainer.fit`` (the end checkpoint excluded)."""
    s.model.train()
    cfg = TrainConfig(max_steps=warmup + steps, lr=1e-4, schedule="constant", log_every=10,
                      checkpoint_every=10**9, progress=False, tensorboard=False, resume=False,
                      precision=s.variant["precision"])
    trainer = Trainer(cfg, RunDirectory(out, min_free_bytes=0), stage, fabric=fabric)
    marks: dict[int, float] = {}

    def on_step_end(step: int) -> None:
        if step in (warmup, warmup + steps):
            sync(s.device)
            marks[step] = time.perf_counter()

    stream = (batches[i % len(batches)] for i in range(10**9))
    trainer.fit(lambda batch, step: s.losses(batch), {"model": s.model}, s.optimizer, stream,
                warmup + steps, on_step_end=on_step_end)
    if warmup == 0:
        raise SystemExit("--warmup must be >= 1 (the first step starts the clock)")
    return marks[warmup + steps] - marks[warmup]


def make_fabric(device: torch.device, precision: str) -> Fabric:
    devices = [device.index or 0] if device.type == "cuda" else 1
    fabric = Fabric(accelerator=device.type, devices=devices, precision=precision)
    fabric.launch()
    return fabric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop (interleaved); medians reported")
    parser.add_argument("--variants", default="fp32", help="comma list of <fp32|bf16|fp16>[+cl][+fused][+compile]")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.batch, args.steps, args.warmup, args.repeats = "tiny", 64, 2, 2, 1, 1
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    variants = [parse_variant(v) for v in args.variants.split(",")]
    batches = make_batches(4, args.batch, args.size, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            s = Setup(args.model, variant, device)
            fabric = make_fabric(device, variant["precision"])
            rates: dict[str, list[float]] = {"plain": [], "fit": []}
            peaks: dict[str, float] = {"plain": 0.0, "fit": 0.0}
            for r in range(args.repeats):
                order = ("plain", "fit") if r % 2 == 0 else ("fit", "plain")
                for which in order:
                    with PeakMemory(device) as mem:
                        if which == "plain":
                            seconds = plain_run(s, batches, args.warmup, args.steps)
                        else:
                            seconds = fit_run(s, fabric, batches, args.warmup, args.steps, Path(tmp),
                                              f"{variant['name'].replace('+', '_')}_{r}")
                    rates[which].append(args.steps * args.batch / seconds)
                    peaks[which] = max(peaks[which], mem.peak_mb)
            rows.append((variant["name"], median(rates["plain"]), median(rates["fit"]),
                         median([f / p for f, p in zip(rates["fit"], rates["plain"])]), peaks["plain"],
                         peaks["fit"], mem.kind))
            del s
    print(f"RetinaNet-{args.model} at {args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, median of {args.repeats} interleaved repeats; AdamW\n"
          f"{machine_line(device, args.threads if device.type == 'cpu' else None)}\n")
    print("| variant | plain images/s | Trainer.fit images/s | fit / plain | plain peak MiB | fit peak MiB | memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, plain, fit, ratio, p_mem, f_mem, kind in rows:
        print(f"| {name} | {plain:.2f} | {fit:.2f} | {ratio:.3f} | {p_mem:,.0f} | {f_mem:,.0f} | {kind} |")


if __name__ == "__main__":
    main()
