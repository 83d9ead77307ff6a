"""OXnet study: RetinaNet vs Mean Teacher vs OXnet and its ablations (Table 1), and annotation
granularity (Table 2), on the synthetic world or TBX11K-800, through ``cxrdistill train``'s code path.

Each seed trains the base RetinaNet on D_F once (``base_only``), then every Table 1 row fine-tunes
from that checkpoint with one set of ``method.params`` switches. Table 2 re-splits the training
images with ``data.boxed_fraction`` / ``data.weak_fraction`` (its own base per D_F size)::

    nice -n 10 .venv/bin/python scripts/study_oxnet.py --world synthetic --out runs/oxnet_study_syn --seeds 0,1
    nice -n 10 .venv/bin/python scripts/study_oxnet.py --world tbx11k --out runs/oxnet_study_tbx \\
        --tbx-root /work/shared/data/tbx11k-800 --image-size 128

Finished stages are not retrained (the engine skips them), so an interrupted study resumes.
Prints Markdown tables (student metrics; mean over seeds with a t 95 % CI, else the image
bootstrap CI of the single run) and writes ``results.json`` and ``tables.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import stats

from cxrdistill.data.manifest import manifest_from_dict
from cxrdistill.run import run_training

REPO = Path(__file__).resolve().parents[1]

OFF = {"global_head": "none", "gpa": False, "distill": "none"}
#: Table 1: label -> method.params on top of the shared base detector
TABLE1: dict[str, dict] = {
    "RetinaNet, fine-tuned on D_F only": OFF,
    "Mean Teacher": {**OFF, "distill": "mse"},
    "Mean Teacher + MT": {"global_head": "gap", "gpa": False, "distill": "mse"},
    "SFL": {**OFF, "distill": "sfl"},
    "DAA": {"global_head": "daa", "gpa": False, "distill": "none"},
    "DAA + GPA": {"global_head": "daa", "gpa": True, "distill": "none"},
    "OXnet (SFL + DAA + GPA)": {},
}
#: Table 2: (boxed, weak) fractions of the training patients; the rest is unlabeled
TABLE2: list[tuple[float, float]] = [(0.1, 0.9), (0.3, 0.7), (0.3, 0.35), (0.3, 0.0)]
COLUMNS = [("mAP", "mAP"), ("AP40", "mAP@0.4"), ("AP75", "mAP@0.75"), ("AP-S", "AP_small"),
           ("AP-M", "AP_medium"), ("AP-L", "AP_large")]


def synthetic_manifest(out: Path, n_images: int, image_size: int, seed: int) -> Path:
    from cxrdistill.data.synthetic import make_world

    manifest = out / "world" / "manifest.json"
    if not manifest.is_file():
        manifest = make_world(out / "world", n_images=n_images, image_size=image_size, seed=seed, normal_fraction=0.3)
    return manifest


def tbx_manifest(out: Path, root: Path) -> Path:
    """TBX11K-800 (train.json as the training split, val.json as ``val``), images copied beside it."""
    from cxrdistill.data.sources import get_source

    folder = out / "tbx"
    if not (folder / "images").is_dir():  # a manifest may not point outside its folder
        shutil.copytree(root / "images", folder / "images")
    manifest = manifest_from_dict(get_source("tbx11k")(root), root=root)
    manifest.root = folder
    return manifest.save(folder / "manifest.json")


def base_config(out: Path, manifest: Path, args: argparse.Namespace, eval_split: str) -> Path:
    s = args.image_size / 64
    anchors = [[round(4 * s), round(6 * s)], [round(10 * s), round(14 * s)], [round(20 * s), round(28 * s)]]
    cfg = {
        "data": {"manifest": str(manifest), "image_size": args.image_size, "cache_dir": str(out / "cache"),
                 "boxed_fraction": args.boxed, "weak_fraction": round(1 - args.boxed, 6), "split_seed": 0},
        "model": {"kind": "detector", "depth": 18, "base_width": args.base_width,
                  "options": {"fpn_channels": 32, "head_convs": 2, "fpn_levels": [2, 3, 4], "anchor_sizes": anchors}},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "unlabeled_batch_size": args.batch_size,
                  "lr": args.lr, "optimizer": "adam", "weight_decay": 0.0, "schedule": "constant",
                  "progress": False, "tensorboard": False, "checkpoint_every": 100, "log_every": 20},
        "method": {"name": "oxnet", "params": {"eval_split": eval_split, "n_boot": args.n_boot,
                                               "base_steps": args.base_steps, "steps": args.steps}},
    }
    path = out / "base.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_row(base: Path, out: Path, overrides: list[str]) -> dict[str, float]:
    started = time.time()
    metrics = run_training(base, overrides, output_dir=out)
    print(f"  {out.name}: {time.time() - started:.0f} s  {' '.join(overrides)}", flush=True)
    return metrics


def params_overrides(params: dict) -> list[str]:
    return [f"method.params.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]


def cell(runs: list[dict[str, float]], prefix: str, key: str, with_ci: bool) -> str:
    values = np.array([r.get(f"{prefix}/{key}", math.nan) for r in runs], dtype=float)
    values = values[~np.isnan(values)]
    if not values.size:
        return "n/a"
    mean = 100 * values.mean()
    if not with_ci:
        return f"{mean:.1f}"
    if values.size > 1:
        half = 100 * stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
        return f"{mean:.1f} ± {half:.1f}"
    low, high = runs[0].get(f"{prefix}/mAP_lo", math.nan), runs[0].get(f"{prefix}/mAP_hi", math.nan)
    return f"{mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]" if not math.isnan(low) else f"{mean:.1f}"


def table(title: str, rows: list[tuple[str, str, list[dict[str, float]], str]]) -> str:
    """rows: (label, D_F/D_W/D_U counts, runs over seeds, metric prefix)."""
    header = "| method | D_F / D_W / D_U | " + " | ".join(c for c, _ in COLUMNS) + " | teacher mAP |"
    lines = [f"**{title}**", "", header, "|" + " --- |" * (len(COLUMNS) + 3)]
    for label, counts, runs, prefix in rows:
        cells = [cell(runs, prefix, key, with_ci=(name == "mAP")) for name, key in COLUMNS]
        teacher = cell(runs, "teacher", "mAP", False) if "teacher/mAP" in runs[0] else "–"
        lines.append(f"| {label} | {counts} | " + " | ".join(cells) + f" | {teacher} |")
    return "\n".join(lines) + "\n"


def counts_of(m: dict[str, float], params: dict | None = None) -> str:
    """``D_F / D_W / D_U`` images a row learns from; D_W images count as unlabeled where only distillation uses them."""
    full = {"global_head": "daa", "distill": "sfl", **(params or {})}
    boxed, weak, none = int(m["n_box"]), int(m["n_image"]), int(m["n_none"])
    if full.get("base_only"):
        return f"{boxed} / 0 / 0"
    as_weak = weak if full["global_head"] != "none" else 0
    as_none = (none + weak - as_weak) if full["distill"] != "none" else 0
    return f"{boxed} / {as_weak} / {as_none}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("synthetic", "tbx11k"), default="synthetic")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "oxnet_study")
    parser.add_argument("--tbx-root", type=Path, default=Path("/work/shared/data/tbx11k-800"))
    parser.add_argument("--n-images", type=int, default=400, help="synthetic world size")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--boxed", type=float, default=0.15, help="Table 1: fraction of training patients in D_F")
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the OXnet stage")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-boot", type=int, default=300)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rows", default="table1", help="comma list of table1,table2")
    parser.add_argument("--table1", default="all", help="Table 1 rows to run: 'all' or comma list of indices 0-6")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.world == "synthetic":
        manifest, eval_split = synthetic_manifest(out, args.n_images, args.image_size, 0), "test"
    else:
        manifest, eval_split = tbx_manifest(out, args.tbx_root.resolve()), "val"
    base = base_config(out, manifest, args, eval_split)
    print(f"study config: {base}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = set(args.rows.split(","))
    results: dict[str, dict[str, dict[str, float]]] = {}
    report = []
    if "table1" in wanted:
        for seed in seeds:
            seed_dir = out / f"seed{seed}"
            results.setdefault("RetinaNet", {})[str(seed)] = run_row(
                base, seed_dir / "retinanet", [f"train.seed={seed}", "method.params.base_only=true"])
            checkpoint = seed_dir / "retinanet" / "checkpoints" / "base" / "last.pt"
            for i, (label, params) in enumerate(TABLE1.items()):
                if args.table1 != "all" and str(i) not in args.table1.split(","):
                    continue
                overrides = [f"train.seed={seed}", f"method.params.base_checkpoint={checkpoint}",
                             *params_overrides(params)]
                results.setdefault(label, {})[str(seed)] = run_row(base, seed_dir / f"t1_{i}", overrides)
        rows = [("RetinaNet (base)", counts_of(results["RetinaNet"][str(seeds[0])], {"base_only": True}),
                 list(results["RetinaNet"].values()), "base")]
        for label, params in TABLE1.items():
            if label not in results:
                continue
            runs = list(results[label].values())
            rows.append((label, counts_of(runs[0], params), runs, "student"))
        report.append(table(f"Table 1 — student detectors, mean over seeds {seeds} (mAP: ± t 95% CI over seeds, "
                            f"or [image-bootstrap 95% CI] for one seed)", rows))
    if "table2" in wanted:
        rows = []
        for boxed, weak in TABLE2:
            tag = f"F{boxed}_W{weak}"
            split = [f"data.boxed_fraction={boxed}", f"data.weak_fraction={weak}"]
            for seed in seeds:
                seed_dir = out / f"seed{seed}"
                base_dir = seed_dir / f"t2_base_F{boxed}"  # D_F depends on boxed_fraction only
                results.setdefault(f"RetinaNet F{boxed}", {})[str(seed)] = run_row(
                    base, base_dir, [f"train.seed={seed}", "method.params.base_only=true",
                                     f"data.boxed_fraction={boxed}", f"data.weak_fraction={round(1 - boxed, 6)}"])
                checkpoint = base_dir / "checkpoints" / "base" / "last.pt"
                results.setdefault(f"OXnet {tag}", {})[str(seed)] = run_row(
                    base, seed_dir / f"t2_oxnet_{tag}",
                    [f"train.seed={seed}", f"method.params.base_checkpoint={checkpoint}", *split])
            if not any(row[0] == f"RetinaNet (D_F {boxed})" for row in rows):
                runs = list(results[f"RetinaNet F{boxed}"].values())
                rows.append((f"RetinaNet (D_F {boxed})", counts_of(runs[0], {"base_only": True}), runs, "base"))
            runs = list(results[f"OXnet {tag}"].values())
            rows.append(("OXnet", counts_of(runs[0]), runs, "student"))
        report.append(table("Table 2 — annotation granularity (student detectors)", rows))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = "\n".join(report)
    (out / "tables.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
