"""Overhead of `Trainer.fit` over a plain PyTorch loop on the same model, in the same process.

A small detector-like conv net (strided conv stem, 3 stages, a dense per-pixel head) on 128 px
single-channel images; both loops run the same number of optimizer steps with the same
optimizer, batch and device (the Trainer's Fabric picks the accelerator; the plain loop uses that
device too). The Trainer does everything it does in a real run: NaN checks, metrics.csv every
`log_every` steps, checkpoints every `checkpoint_every` steps.

    python bench/bench_engine_overhead.py              # 100 steps, batch 8
    python bench/bench_engine_overhead.py --smoke      # 5 steps, seconds
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cxrdistill.config import TrainConfig
from cxrdistill.engine.loop import Trainer, make_fabric
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.run_dir import RunDirectory


def tiny_detector(width: int = 16, num_outputs: int = 6) -> nn.Module:
    """(B, 1, H, W) -> (B, num_outputs, H/8, W/8): a stem, three stages and a dense head."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(
        block(1, width, 2), block(width, width, 1),
        block(width, 2 * width, 2), block(2 * width, 2 * width, 1),
        block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1),
        nn.Conv2d(4 * width, num_outputs, 1),
    )


def make_batches(n: int, batch: int, size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(batch, 1, size, size, generator=g).to(device),
             torch.rand(batch, 6, size // 8, size // 8, generator=g).to(device)) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches, device: torch.device) -> float:
    model.train()
    _sync(device)
    start = time.perf_counter()
    for images, target in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(images), target)
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def trainer_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches, cfg: TrainConfig, fabric, out: Path) -> float:
    model.train()
    trainer = Trainer(cfg, RunDirectory(out, min_free_bytes=0), "bench", fabric=fabric)
    step_fn = lambda batch, step: {"mse": nn.functional.mse_loss(model(batch[0]), batch[1])}  # noqa: E731
    _sync(fabric.device)
    start = time.perf_counter()
    trainer.fit(step_fn, {"model": model}, optimizer, iter(batches), len(batches))
    _sync(fabric.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="5 steps, batch 2, 64 px")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.size = 5, 2, 64
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(max_steps=args.steps, lr=1e-3, warmup_steps=0, schedule="constant", log_every=10,
                      checkpoint_every=args.checkpoint_every, progress=False, tensorboard=False, weight_decay=0.0)
    fabric = make_fabric(cfg)
    device = fabric.device
    batches = make_batches(args.steps, args.batch, args.size, device)

    def fresh():
        torch.manual_seed(0)
        model = tiny_detector().to(device)
        return model, build_optimizer(model.parameters(), cfg)

    # warm-up both paths once (allocator, cudnn autotune, lazy imports)
    plain_loop(*fresh(), batches[:2], device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer_loop(*fresh(), batches[:2], cfg.model_copy(update={"max_steps": 2}), fabric, Path(tmp))
        plain_s = plain_loop(*fresh(), batches, device)
        fit_s = trainer_loop(*fresh(), batches, cfg, fabric, Path(tmp) / "run")
        plain_s2 = plain_loop(*fresh(), batches, device)  # again, to show run-to-run noise
    plain_best = min(plain_s, plain_s2)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {args.threads} thread)"
    print(f"\n{args.steps} steps, batch {args.batch}, {args.size} px, {dev_name}, "
          f"checkpoint every {args.checkpoint_every}, log every 10\n")
    print("| loop | seconds | ms/step | ratio to plain |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in (("plain PyTorch (run 1)", plain_s), ("plain PyTorch (run 2)", plain_s2), ("Trainer.fit", fit_s)):
        print(f"| {name} | {seconds:.3f} | {1000 * seconds / args.steps:.2f} | {seconds / plain_best:.3f} |")


if __name__ == "__main__":
    main()
