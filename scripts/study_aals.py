"""AALS study: supervised pre-training vs mean teacher vs AALS, plus the t / a0 / |P| sweeps.

Builds the study data (the synthetic world, or TBX11K with a few boxed images as R and the rest as
image-level P), pre-trains once with ``configs/aals.yaml`` (``semi_supervised=false``), then runs
every semi-supervised row from that pre-trained checkpoint through ``cxrdistill train``'s code path
and prints the paper's tables (Table 1, Tables 2–3, Fig. 3) as Markdown::

    nice -n 10 .venv/bin/python scripts/study_aals.py --world synthetic --out runs/aals_study_syn
    nice -n 10 .venv/bin/python scripts/study_aals.py --world tbx11k --out runs/aals_study_tbx \\
        --tbx-root /work/shared/data/tbx11k-800 --image-size 128

A row already finished is not retrained (the engine skips done stages), so an interrupted study
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import yaml

from cxrdistill.data.manifest import load_manifest, manifest_from_dict
from cxrdistill.data.splits import make_semi_split
from cxrdistill.data.synthetic import make_world
from cxrdistill.run import run_training

REPO = Path(__file__).resolve().parents[1]

#: rows of the study: name -> method.params overrides (on top of the pre-trained checkpoint)
TABLE1 = {"mean_teacher": {"a0": 1.0}, "aals": {}}
T_SWEEP = {f"t={t}": {"t": t} for t in (0.2, 0.3, 0.5)}
A0_SWEEP = {f"a0={a0}": {"a0": a0} for a0 in (8.0, 16.0)}
P_SWEEP = {f"P={int(100 * f)}%": {"positive_fraction": f} for f in (0.2, 0.6)}


def synthetic_manifest(out: Path, n_images: int, image_size: int, boxed: float, seed: int) -> Path:
    """The phantom world with ``boxed`` of the training patients as R and the rest image-level."""
    world = make_world(out / "world", n_images=n_images, image_size=image_size, seed=seed, normal_fraction=0.5)
    manifest = make_semi_split(load_manifest(world), boxed_fraction=boxed, weak_fraction=1 - boxed, seed=seed)
    return manifest.save(out / "world" / "study.json")


def tbx_manifest(out: Path, root: Path, boxed: float, seed: int) -> Path:
    """TBX11K-800: train.json as the training split (``boxed`` as R, the rest P), val.json as test.

    Every image is TB-positive, so there is no N: the all-zero masks come only from R images'
    other class, and from P images' absent class (active vs obsolete TB).
    """
    from cxrdistill.data.sources import get_source

    folder = out / "tbx"
    if not (folder / "images").is_dir():  # a manifest may not point outside its folder: copy (95 MB)
        shutil.copytree(root / "images", folder / "images")
    manifest = manifest_from_dict(get_source("tbx11k")(root), root=root)
    manifest = make_semi_split(manifest, boxed_fraction=boxed, weak_fraction=1 - boxed, seed=seed)
    manifest.root = folder
    return manifest.save(folder / "study.json")


def base_config(out: Path, manifest: Path, args: argparse.Namespace, eval_split: str) -> Path:
    cfg = {
        "data": {"manifest": str(manifest), "image_size": args.image_size, "cache_dir": str(out / "cache")},
        "model": {"kind": "heatmap", "depth": 18, "base_width": args.base_width,
                  "options": {"fpn_channels": 2 * args.base_width * 2, "output_stride": 4}},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam",
                  "weight_decay": 1e-4, "schedule": "constant", "seed": args.seed, "progress": False,
                  "tensorboard": False, "checkpoint_every": 100, "log_every": 20},
        "method": {"name": "aals", "params": {"eval_split": eval_split, "n_boot": args.n_boot,
                                              "froc_boot": args.froc_boot, "ema_decay": args.ema_decay,
                                              # TBX11K's val.json is the test set: no split to select on
                                              "select_best": not args.legacy and eval_split != "val",
                                              "augment": not args.legacy}},
    }
    path = out / "base.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_row(base: Path, out: Path, name: str, params: dict) -> dict[str, float]:
    overrides = [f"method.params.{k}={v}" for k, v in params.items()]
    started = time.time()
    metrics = run_training(base, overrides, output_dir=out / name)
    print(f"  {name}: {time.time() - started:.0f} s  " + " ".join(overrides), flush=True)
    return metrics


def cell(m: dict[str, float], model: str, key: str) -> str:
    value, low, high = m[f"{model}/{key}"], m[f"{model}/{key}_lo"], m[f"{model}/{key}_hi"]
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if not math.isnan(low) else f"{value:.3f}"


def table(title: str, header: str, rows: list[tuple[str, dict[str, float]]]) -> str:
    """A Markdown table: per row the student's and the EMA teacher's AUROC and modified FROC
    (the pre-trained model fills both for the pre-training row)."""
    lines = [f"**{title}**", "",
             f"| {header} | student AUROC [95% CI] | student mod. FROC [95% CI] | teacher AUROC [95% CI] | teacher mod. FROC [95% CI] |",
             "| --- | --- | --- | --- | --- |"]
    for label, m in rows:
        student, teacher = ("student", "teacher") if "student/AUROC" in m else ("pretrain", "pretrain")
        lines.append(f"| {label} | {cell(m, student, 'AUROC')} | {cell(m, student, 'mFROC')} | "
                     f"{cell(m, teacher, 'AUROC')} | {cell(m, teacher, 'mFROC')} |")
    return "\n".join(lines) + "\n"


def tables(results: dict[str, dict[str, float]]) -> str:
    """The paper's Table 1, Tables 2–3 and Fig. 3 from the rows present in ``results``."""
    pre, mt, aals = results["pretrain"], results.get("mean_teacher"), results.get("aals")
    report = [table("Table 1 — comparison", "method",
                    [("Supervised pre-training", pre), ("Mean Teacher (a0 = 1)", mt), ("AALS (t = 0.4, a0 = 4)", aals)])]
    sweeps = [("Table 2 — sharpening centre t (a0 = 4)", "t", [("0.2", "t=0.2"), ("0.3", "t=0.3"), ("0.4", "aals"), ("0.5", "t=0.5")]),
              ("Table 3 — sharpening strength a0 (t = 0.4)", "a0",
               [("1", "mean_teacher"), ("4", "aals"), ("8", "a0=8.0"), ("16", "a0=16.0")]),
              ("Fig. 3 — fraction of P used", "P used", [("0%", "pretrain"), ("20%", "P=20%"), ("60%", "P=60%"), ("100%", "aals")])]
    for title, header, rows in sweeps:
        if all(name in results for _, name in rows):
            report.append(table(title, header, [(label, results[name]) for label, name in rows]))
    return "\n".join(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("synthetic", "tbx11k"), default="synthetic")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "aals_study")
    parser.add_argument("--tbx-root", type=Path, default=Path("/work/shared/data/tbx11k-800"))
    parser.add_argument("--n-images", type=int, default=600, help="synthetic world size")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--boxed", type=float, default=0.2, help="fraction of training patients that keep boxes (R)")
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of each semi-supervised row")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="optimizer steps of pre-training")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.99,
                        help="0.999 in the paper (25 epochs of ~6800 images); a few hundred CPU steps need faster")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--froc-boot", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="table1,t,a0,p", help="comma list of table1,t,a0,p")
    parser.add_argument("--legacy", action="store_true",
                        help="the earlier recipe: no augmentation, one view for teacher and student, final weights")
    parser.add_argument("--tables-only", action="store_true", help="print the tables of an earlier study's results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out.resolve()
    if args.tables_only:
        print(tables(json.loads((out / "results.json").read_text(encoding="utf-8"))))
        return
    out.mkdir(parents=True, exist_ok=True)
    if args.world == "synthetic":
        manifest, eval_split = synthetic_manifest(out, args.n_images, args.image_size, args.boxed, args.seed), "test"
    else:
        manifest, eval_split = tbx_manifest(out, args.tbx_root.resolve(), args.boxed, args.seed), "val"
    base = base_config(out, manifest, args, eval_split)
    print(f"study config: {base}", flush=True)
    results: dict[str, dict[str, float]] = {"pretrain": run_row(base, out, "pretrain", {"semi_supervised": False,
                                                                              "pretrain_steps": args.pretrain_steps})}
    stage = out / "pretrain" / "checkpoints" / "supervised"  # the shared heat-map stage (issue 16)
    checkpoint = stage / "best.pt" if (stage / "best.pt").is_file() else stage / "last.pt"  # the selected one
    wanted = set(args.rows.split(","))
    rows = {**TABLE1, **(T_SWEEP if "t" in wanted else {}), **(A0_SWEEP if "a0" in wanted else {}),
            **(P_SWEEP if "p" in wanted else {})}
    for name, params in rows.items():
        results[name] = run_row(base, out, name, {**params, "pretrained_checkpoint": str(checkpoint)})
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")

    text = tables(results)
    (out / "tables.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
