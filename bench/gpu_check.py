"""The GPU check of docs/benchmarks.md in one process: training, pseudo-labeling, a DDP smoke, MFU.

Run through ``bench/gpu_check.sh`` (which passes its arguments here). On one H100/H200 the full
check takes a few minutes:

1. train: RetinaNet-R50-FPN at 512 px, batch 16, bf16-mixed, channels-last, AdamW; the plain loop
   and `Trainer.fit` alternate (`bench_detector_train.py`'s runs), without and with `torch.compile`;
2. pseudo-labeling: bare teacher forward and the full `generate_pseudo_labels` pass (dataset ->
   loader -> predict -> score filter -> on-disk store) over ``--pseudo-images`` images;
3. DDP smoke: `Trainer.fit` with `train.strategy="ddp"` in one process (the module set up by
   Fabric's DDP, checked to be wrapped), a checkpoint written and loaded back;
4. FLOPs: one training step and one forward counted with `torch.utils.flop_counter`, per image,
   so images/s becomes achieved TFLOP/s and MFU = TFLOP/s / the chip's dense bf16 peak.

The markdown table it writes (``--out``) is the GPU table of docs/benchmarks.md §0, row for row.
``--smoke``: the tiny model on the CPU in seconds (no compile), as CI runs it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import autocast, machine_line, median, pick_device, sync
from _synthetic import SyntheticUnlabeled
from bench_detector_train import MODELS, Setup, fit_run, make_batches, make_fabric, parse_variant, plain_run
from cxrdistill.config import TrainConfig
from cxrdistill.engine.checkpoint import load_checkpoint
from cxrdistill.engine.loop import Trainer
from cxrdistill.engine.loop import make_fabric as make_train_fabric
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.models.detector import RetinaNet
from cxrdistill.pseudo.generate import generate_pseudo_labels
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.thresholds import filter_detections

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0}
# every parameter gets a gradient (levels 3-5 use the whole backbone; MODELS["tiny"] stops at level 4
# and leaves the last ResNet stage unused, which DDP refuses without find_unused_parameters)
DDP_SMOKE_MODEL = {**MODELS["tiny"], "fpn_levels": (3, 4, 5)}
HEADER = ["check", "setting", "images/s", "vs plain loop", "TFLOP/s", "MFU", "target", "result"]


def chip_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_image(model_name: str, size: int, device: torch.device, precision: str, train: bool) -> float:
    """FLOPs of one image through a training step (forward + loss + backward) or a forward alone."""
    torch.manual_seed(0)
    model = RetinaNet(num_classes=2, **MODELS[model_name]).to(device)
    batch = make_batches(1, 2, size, device)[0]
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, precision):
        if train:
            targets = [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]
            sum(model.loss(model(batch["image"]), targets).values()).backward()
        else:
            with torch.no_grad():
                model(batch["image"])
    return counter.get_total_flops() / 2


def train_rows(args, device, peak) -> list[list[str]]:
    variants = [args.variant] + ([] if args.smoke or args.no_compile else [args.variant + "+compile"])
    flops = flops_per_image(args.model, args.size, device, parse_variant(args.variant)["precision"], train=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            variant = parse_variant(name)
            s = Setup(args.model, variant, device)
            fabric = make_fabric(device, variant["precision"])
            batches = make_batches(4, args.batch, args.size, device)
            rates: dict[str, list[float]] = {"plain": [], "fit": []}
            for r in range(args.repeats):
                for which in (("plain", "fit") if r % 2 == 0 else ("fit", "plain")):
                    if which == "plain":
                        seconds = plain_run(s, batches, args.warmup, args.steps)
                    else:
                        seconds = fit_run(s, fabric, batches, args.warmup, args.steps, Path(tmp),
                                          f"{name.replace('+', '_')}_{r}")
                    rates[which].append(args.steps * args.batch / seconds)
            ratio = median([f / p for f, p in zip(rates["fit"], rates["plain"])])
            setting = f"RetinaNet-{args.model} {args.size} px, batch {args.batch}, {name}"
            for which, label in (("plain", "train, plain loop"), ("fit", "train, Trainer.fit")):
                rate = median(rates[which])
                rows.append(_row(label, setting, rate, ratio if which == "fit" else 1.0, flops, peak,
                                 "fit / plain >= 0.95" if which == "fit" else "",
                                 _verdict(ratio >= 0.95) if which == "fit" else ""))
            del s
    return rows


def pseudo_rows(args, device, peak) -> list[list[str]]:
    precision = parse_variant(args.variant)["precision"]
    fmt = torch.channels_last if "cl" in args.variant.split("+") else torch.contiguous_format
    torch.manual_seed(0)
    teacher = RetinaNet(num_classes=2, prior=0.1, **MODELS[args.model]).to(device).eval().to(memory_format=fmt)
    dataset = SyntheticUnlabeled(args.pseudo_images, args.size)
    flops = flops_per_image(args.model, args.size, device, precision, train=False)

    def predict(images: torch.Tensor):
        with autocast(device, precision):
            return teacher.predict(images.to(device, non_blocking=True).contiguous(memory_format=fmt))

    resident = [torch.stack([dataset[j]["image"] for j in range(i, min(i + args.pseudo_batch, len(dataset)))])
                .to(device).contiguous(memory_format=fmt) for i in range(0, min(len(dataset), 4 * args.pseudo_batch),
                                                                          args.pseudo_batch)]
    with torch.no_grad(), autocast(device, precision):
        teacher(resident[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for images in resident:
            teacher(images)
        sync(device)
    bare = sum(len(x) for x in resident) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        store = PseudoLabelStore(Path(tmp), generation=0)
        sync(device)
        start = time.perf_counter()
        generate_pseudo_labels(lambda batch: predict(batch["image"]), dataset, store,
                               refine=lambda batch, dets: filter_detections(dets, 0.05),
                               batch_size=args.pseudo_batch, num_workers=args.workers)
        sync(device)
        full = len(dataset) / (time.perf_counter() - start)
        assert store.is_complete() and len(store.done_ids()) == len(dataset)
    setting = f"RetinaNet-{args.model} {args.size} px, batch {args.pseudo_batch}, {args.variant}, {len(dataset)} images"
    return [_row("pseudo-label, bare forward", setting, bare, None, flops, peak, "", ""),
            _row("pseudo-label, full pass", setting, full, None, flops, peak, ">= 1,000 images/s at 512 px",
                 _verdict(full >= 1000) if args.size >= 512 else "n/a (not 512 px)")]


def ddp_smoke_row(args, device) -> list[str]:
    """`Trainer.fit` with strategy "ddp" in one process: the trained module must be DDP-wrapped."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = TrainConfig(max_steps=3, lr=1e-4, schedule="constant", warmup_steps=0, log_every=1, checkpoint_every=3,
                      progress=False, tensorboard=False, devices=1, strategy="ddp",
                      precision=parse_variant(args.variant)["precision"])
    fabric = make_train_fabric(cfg)
    torch.manual_seed(0)
    model = RetinaNet(num_classes=2, **DDP_SMOKE_MODEL)
    batches = make_batches(2, 2, 64, fabric.device)
    wrapped: list[bool] = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, RunDirectory(tmp, min_free_bytes=0), "ddp_smoke", fabric=fabric)

        def step_fn(batch, step):
            targets = [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]
            return model.loss(model(batch["image"]), targets)

        start = time.perf_counter()
        trainer.fit(step_fn, {"model": model}, torch.optim.AdamW(model.parameters(), lr=1e-4),
                    (batches[i % 2] for i in range(10**6)), 3,
                    on_step_end=lambda s: wrapped.append(isinstance(trainer._wrapped[0]._forward_module,
                                                                    DistributedDataParallel)))
        seconds = time.perf_counter() - start
        state = load_checkpoint(Path(tmp) / "checkpoints" / "ddp_smoke" / "last.pt")
        fresh = RetinaNet(num_classes=2, **DDP_SMOKE_MODEL)
        fresh.load_state_dict(state["modules"]["model"])  # the unwrapped state dict: loads without DDP
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    ok = wrapped == [True] * 3 and fabric.world_size == 1
    return ["DDP smoke (1 process)", "Trainer.fit, strategy ddp, RetinaNet-tiny 64 px, 3 steps", f"{6 / seconds:,.1f}",
            "—", "—", "—", "module DDP-wrapped, checkpoint loads unwrapped", _verdict(ok)]


def _row(check, setting, rate, ratio, flops, peak, target, result) -> list[str]:
    tflops = rate * flops / 1e12
    return [check, setting, f"{rate:,.1f}", "—" if ratio is None else f"{ratio:.3f}", f"{tflops:.2f}",
            f"{100 * tflops / peak:.1f} %" if peak else "n/a (no peak for this chip)", target, result]


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU in seconds (CI)")
    parser.add_argument("--out", default="gpu_check.md", help="markdown file to write")
    parser.add_argument("--model", choices=sorted(MODELS), default="r50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--variant", default="bf16+cl", help="precision[+cl][+fused] (compile is added as a row)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--pseudo-images", type=int, default=8192)
    parser.add_argument("--pseudo-batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak (else a table)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.model, args.size, args.batch, args.steps, args.warmup, args.repeats = "tiny", 64, 2, 2, 1, 1
        args.variant, args.pseudo_images, args.pseudo_batch, args.workers = "fp32", 16, 8, 0
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    peak = chip_peak(device, args.peak_tflops)
    started = time.perf_counter()
    rows = train_rows(args, device, peak) + pseudo_rows(args, device, peak) + [ddp_smoke_row(args, device)]
    lines = [f"GPU check{' (--smoke)' if args.smoke else ''}: {machine_line(device, args.threads if device.type == 'cpu' else None)}; "
             f"peak {peak or 'n/a'} TFLOP/s bf16 dense; {time.perf_counter() - started:.0f} s in all",
             "", "| " + " | ".join(HEADER) + " |", "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
