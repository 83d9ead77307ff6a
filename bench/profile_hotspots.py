"""Where the time goes: the top ops of one RetinaNet training step, or of a pseudo-labeling pass.

    python bench/profile_hotspots.py --target train --model r18 --size 256 --batch 4    # torch.profiler
    python bench/profile_hotspots.py --target pseudo --model tiny --size 128 --images 256  # cProfile
    python bench/profile_hotspots.py --smoke

`train` profiles one step (forward, loss with matching, backward, AdamW) after a warm-up step
with `torch.profiler` and lists the ops by self time (CPU, plus CUDA on a GPU). `pseudo` runs
`generate_pseudo_labels` under cProfile and lists Python functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from _common import add_common_args, machine_line, pick_device
from _synthetic import SyntheticUnlabeled
from bench_detector_train import MODELS, make_batches
from cxrdistill.models.detector import RetinaNet
from cxrdistill.pseudo.generate import generate_pseudo_labels
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.thresholds import filter_detections


def profile_train(args, device: torch.device) -> list[tuple[str, float, float, int]]:
    torch.manual_seed(0)
    model = RetinaNet(num_classes=2, **MODELS[args.model]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batches(1, args.batch, args.size, device)[0]
    targets = [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = model.loss(model(batch["image"]), targets)
        sum(losses.values()).backward()
        optimizer.step()

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    gpu = device.type == "cuda"
    key = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    rows = sorted(events, key=key, reverse=True)[: args.top]
    return [(e.key, key(e) / 1000, 100 * key(e) / (sum(key(x) for x in events) or total), e.count) for e in rows]


def profile_pseudo(args, device: torch.device) -> list[tuple[str, float, float, int]]:
    torch.manual_seed(0)
    teacher = RetinaNet(num_classes=2, prior=0.1, **MODELS[args.model]).to(device).eval()
    dataset = SyntheticUnlabeled(args.images, args.size)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        store = PseudoLabelStore(tmp, generation=1)
        profiler.enable()
        generate_pseudo_labels(lambda b: teacher.predict(b["image"].to(device)), dataset, store,
                               refine=lambda b, d: filter_detections(d, 0.05), batch_size=args.batch)
        profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt or 1.0
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]
    return [(f"{fn[2]} ({fn[0].split('/')[-1]}:{fn[1]})", v[2] * 1000, 100 * v[2] / total, v[1])
            for fn, v in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--target", choices=("train", "pseudo"), default="train")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=256, help="pseudo: images in the pass")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.batch, args.images, args.top = "tiny", 32, 2, 8, 5
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = profile_train(args, device) if args.target == "train" else profile_pseudo(args, device)
    what = ("torch.profiler, one training step (forward + loss + backward + AdamW), self time"
            if args.target == "train" else f"cProfile, generate_pseudo_labels over {args.images} images, own time")
    print(f"RetinaNet-{args.model} at {args.size}x{args.size}, batch {args.batch}; {what}\n"
          f"{machine_line(device, args.threads)}\n")
    print("| op / function | ms | % of total | calls |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms, share, calls in rows:
        print(f"| `{name.replace('|', '/')}` | {ms:,.1f} | {share:.1f} | {calls} |")


if __name__ == "__main__":
    main()
