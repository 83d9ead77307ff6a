"""Peak memory of a pseudo-labeling pass as the unlabeled set grows (the store streams chunks).

Each size runs in a fresh subprocess (so ``ru_maxrss`` is that pass's own peak): 32 px synthetic
images, a fake teacher that returns 5 detections per image without a network (the memory of a
real teacher does not depend on the set size), `generate_pseudo_labels` into a chunked store,
then the store is read back record by record with `iter_records`.

    python bench/bench_pseudo_memory.py                          # 10,000 and 100,000 images
    python bench/bench_pseudo_memory.py --sizes 1000,10000,100000
    python bench/bench_pseudo_memory.py --smoke                  # 200 and 2,000 images, in-process
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import add_common_args, machine_line, max_rss_mb, pick_device, rss_mb


def fake_teacher(batch: dict) -> list[dict[str, torch.Tensor]]:
    """5 detections per image, derived from the image id (deterministic, no network)."""
    out = []
    for image_id in batch["image_id"].tolist():
        g = torch.Generator().manual_seed(int(image_id))
        xy = torch.rand(5, 2, generator=g) * 24
        out.append({"boxes": torch.cat([xy, xy + 8], 1), "scores": torch.rand(5, generator=g),
                    "labels": torch.randint(0, 2, (5,), generator=g)})
    return out


def one_pass(n: int, chunk: int, batch: int) -> dict:
    """Run a pass over ``n`` images; return RSS before/after, seconds and counts."""
    from _synthetic import SyntheticUnlabeled
    from cxrdistill.pseudo.generate import generate_pseudo_labels
    from cxrdistill.pseudo.store import PseudoLabelStore

    dataset = SyntheticUnlabeled(n, 32)
    before = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        store = PseudoLabelStore(tmp, generation=1)
        start = time.perf_counter()
        generate_pseudo_labels(fake_teacher, dataset, store, batch_size=batch, chunk_size=chunk)
        seconds = time.perf_counter() - start
        read = sum(1 for _ in store.iter_records())
        chunks = len(store.chunk_files())
        disk = sum(p.stat().st_size for p in store.chunk_files()) / 2**20
    return {"n": n, "rss_before": before, "peak": max_rss_mb(), "seconds": seconds, "read": read,
            "chunks": chunks, "disk_mb": disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(one_pass(args.child, args.chunk, args.batch)))
        return
    device = pick_device(args.device)  # the pass is host-side (fake teacher): recorded, not used
    sizes = [200, 2000] if args.smoke else [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        if args.smoke:  # seconds: no fresh interpreter per size (peak is then cumulative)
            rows.append(one_pass(n, args.chunk, args.batch))
            continue
        cmd = [sys.executable, str(Path(__file__)), "--child", str(n), "--chunk", str(args.chunk),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    how = "one process (smoke: peaks are cumulative)" if args.smoke else "a fresh subprocess per size"
    print(f"pseudo-label pass, 32 px synthetic images, fake 5-box teacher, batch {args.batch}, chunk {args.chunk}; "
          f"{how}\n{machine_line(device, args.threads)}\n")
    print("| images | RSS before pass MiB | peak RSS MiB | peak - before MiB | seconds | images/s | chunks | store MiB | records read back |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n']:,} | {r['rss_before']:,.0f} | {r['peak']:,.0f} | {r['peak'] - r['rss_before']:,.0f} | "
              f"{r['seconds']:.1f} | {r['n'] / r['seconds']:,.0f} | {r['chunks']} | {r['disk_mb']:.1f} | {r['read']:,} |")


if __name__ == "__main__":
    main()
