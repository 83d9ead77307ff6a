"""Sweep the labeled fraction λ and print the paper's Table I (teacher / intermediate / student AUROC).

    # synthetic world (built once, cached), 64 px, tiny ResNet-18, CPU
    nice -n 10 python scripts/study_teacher_student.py --out runs/ts_study --fractions 0.02 0.05 0.1 0.2
    # real data: TBX11K subset, active vs obsolete TB (multi-label over the 2 classes)
    nice -n 10 python scripts/study_teacher_student.py --source tbx11k --root /work/shared/data/tbx11k-800 \
        --eval-split val --image-size 128 --task multi_label --fractions 0.1 --out runs/ts_tbx

Each fraction is one `teacher_student_cls` run in `<out>/lambda_<λ>/` (resumable: finished stages
are skipped). The supervision split is `make_semi_split(boxed_fraction=λ)` of the training split,
per patient and class-stratified. Every value is macro AUROC with its 95% bootstrap CI; Δ is the
student minus the teacher with its paired-bootstrap CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def open_data(args: argparse.Namespace, fraction: float):
    """`StudyData` for one labeled fraction: the synthetic world or a source adapter's folder."""
    from cxrdistill.data.dataset import build_manifest_cache
    from cxrdistill.data.manifest import load_manifest, manifest_from_dict
    from cxrdistill.data.sources import get_source
    from cxrdistill.data.splits import make_semi_split
    from cxrdistill.data.study import StudyData, default_cache_root, synthetic_world

    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
    if args.source == "synthetic":
        options = {"n_images": args.n_images, "image_size": args.world_size, "seed": args.world_seed}
        if args.world_splits:
            options["splits"] = list(args.world_splits)
        if args.classes:
            options["classes"] = list(args.classes)
        manifest = load_manifest(synthetic_world(options, cache_root))
    else:
        root = Path(args.root)
        manifest = manifest_from_dict(get_source(args.source)(root, on_error="strict"), root=root,
                                      source=f"{args.source}:{root}")
    manifest = make_semi_split(manifest, boxed_fraction=fraction, seed=args.split_seed)
    cache, row_of = build_manifest_cache(manifest, args.image_size, cache_root / "images")
    return StudyData(manifest, cache, row_of)


def run_fraction(args: argparse.Namespace, fraction: float) -> dict:
    """One recipe run at labeled fraction `fraction`; returns its Table I dict."""
    from lightning_fabric.utilities.seed import seed_everything

    from cxrdistill.config import validate_config
    from cxrdistill.engine.context import RunContext
    from cxrdistill.engine.run_dir import RunDirectory
    from cxrdistill.methods.registry import validate_method_params
    from cxrdistill.methods.teacher_student_cls import run_on_data

    out = Path(args.out) / f"lambda_{fraction:g}"
    data = open_data(args, fraction)
    manifest = data.manifest.save(out / "manifest.json")  # the teacher's stage key hashes this split
    cfg = validate_config({
        "data": {"image_size": args.image_size, "manifest": str(manifest)},
        "model": {"kind": "classifier", "options": {"arch": args.arch, "tiny": args.tiny}},
        "train": {"batch_size": args.batch_size, "optimizer": "adam", "lr": args.lr, "weight_decay": 0.0,
                  "seed": args.seed, "progress": False, "tensorboard": False, "checkpoint_every": 100},
        "method": {"name": "teacher_student_cls", "params": {
            "task": args.task, "kappa": args.kappa, "generations": args.generations,
            "teacher_epochs": args.teacher_epochs, "pseudo_epochs": args.pseudo_epochs,
            "finetune_epochs": args.finetune_epochs, "eval_split": args.eval_split,
            "eval_tta": not args.no_tta, "n_boot": args.n_boot, "augment": args.augment}},
        "output_dir": str(out),
    })
    params = validate_method_params("teacher_student_cls", cfg.method.params)
    run_dir = RunDirectory(out)
    ctx = RunContext.create(cfg, run_dir)
    run_dir.write_config(cfg)
    seed_everything(cfg.train.seed, verbose=False)
    run_on_data(cfg, params, ctx, data)
    return json.loads((run_dir.eval / "table.json").read_text())


def format_study(tables: dict[float, dict]) -> str:
    """Markdown Table I: one row per λ, AUROC [CI] of teacher / intermediate / student and Δ."""
    lines = ["| labeled λ | teacher | intermediate | student | Δ student − teacher |", "|---|---|---|---|---|"]
    for fraction, table in tables.items():
        rows = {r["row"]: r for r in table["rows"]}
        last = max((int(k[len("student"):]) for k in rows if k.startswith("student")), default=1)
        cells = []
        for key in ("teacher", f"intermediate{last}", f"student{last}"):
            r = rows[key]
            cells.append(f"{r['macro_AUROC']:.3f} [{r['CI95'][0]:.3f}, {r['CI95'][1]:.3f}]")
        s = rows[f"student{last}"]
        lo, hi = s["minus_teacher_CI95"]
        cells.append(f"{s['minus_teacher']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--source", default="synthetic", help="synthetic, or a source adapter name (tbx11k, ...)")
    p.add_argument("--root", help="dataset folder for --source")
    p.add_argument("--n-images", type=int, default=600)
    p.add_argument("--world-size", type=int, default=64, help="synthetic image size on disk")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--classes", nargs="+", help="synthetic classes (default: all five)")
    p.add_argument("--world-splits", type=float, nargs=3, help="synthetic train/val/test fractions")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--task", default="any_finding", choices=["any_finding", "single_label", "multi_label"])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kappa", type=float, default=0.75)
    p.add_argument("--augment", default="martins_silva", choices=["martins_silva", "flip", "none"])
    p.add_argument("--generations", type=int, default=1)
    p.add_argument("--teacher-epochs", type=float, default=25)
    p.add_argument("--pseudo-epochs", type=float, default=10)
    p.add_argument("--finetune-epochs", type=float, default=15)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-split", default="test")
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tables = {f: run_fraction(args, f) for f in args.fractions}
    text = format_study(tables)
    print(text)
    (Path(args.out) / "study.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
