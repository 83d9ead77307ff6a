"""CEIRD study: the paper's Table 1 / Table 2 layout on the synthetic world, and the report side on
real IU X-ray reports.

    python scripts/study_ceird.py synthetic --seeds 0 1 2 --out runs/study_ceird
    python scripts/study_ceird.py iu --out runs/study_ceird_iu

``synthetic``: per seed, one run per row (TSD baseline, +RPDLR, +CoE+APCLR, +SA-NMS = CEIRD,
semi-oracle) of ``configs/ceird.yaml``; the rows share the seed's generation-0 teacher ("Sup.").
mAP CIs: 95 % bootstrap over test images, the same image resamples for every seed and row, of the
seed-averaged mAP. Writes ``table.md`` and ``table.json``.

``iu``: TF-IDF report classifiers on reports.csv (findings + impression), labels from the
``Problems`` tags for a few common classes; a few labeled reports, the rest unlabeled; teacher
(labeled only) vs student (Eq. 1, labeled + teacher pseudo-labels, 1:1) AUROC per class on held-out reports.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

ROWS = {  # name -> method.params overrides (configs/ceird.yaml is the full method)
    "TSD": {"rpdlr": False, "sa_nms": False, "generations": 1},
    "(a) +RPDLR": {"sa_nms": False, "generations": 1},
    "(b) +CoE+APCLR": {"sa_nms": False},
    "(c) +SA-NMS = CEIRD": {},
    "semi-oracle": {"rpdlr_source": "oracle"},
}
IOUS = (0.25, 0.5, 0.75)


def run_synthetic(seeds: list[int], out: Path, config: Path, extra: list[str], n_boot: int,
                  rows: list[str]) -> None:
    from cxrdistill.run import run_training

    for seed in seeds:  # the rows of a seed share one teacher through the stage store (methods/kit.py)
        for row in rows:
            overrides = ROWS[row]
            run_dir = out / f"seed{seed}" / row.split()[0].strip("()+").replace("=", "").lower()
            args = [f"train.seed={seed}", f"data.split_seed={seed}", "train.progress=false", *extra]
            args += [f"method.params.{k}={json.dumps(v)}" for k, v in overrides.items()]
            print(f"== seed {seed}: {row}", flush=True)
            run_training(config, args, output_dir=run_dir)
    table(seeds, out, n_boot, rows)


def _match(run_dir: Path, eval_dir: str):
    """Per-image matching of a run's predictions in ``eval_dir`` against its test split."""
    import yaml

    from cxrdistill.config import validate_config
    from cxrdistill.data.study import StudyData
    from cxrdistill.eval.detection import CocoParams, match_detections
    from cxrdistill.eval.runs import ground_truth_of

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = StudyData.from_config(validate_config(cfg).data)
    split = cfg["method"]["params"].get("eval_split", "test")
    gt = ground_truth_of(data.dataset(split), split)
    rows = json.loads((run_dir / eval_dir / "predictions.json").read_text())
    return match_detections(gt, rows, CocoParams(iou_thresholds=IOUS))


def table(seeds: list[int], out: Path, n_boot: int, rows: list[str]) -> None:
    from cxrdistill.eval.classification import bootstrap_indices
    from cxrdistill.eval.detection import accumulate

    runs = {"Sup.": ("tsd", "eval_vision_gen0")}
    runs.update({row: (row.split()[0].strip("()+").replace("=", "").lower(), "eval") for row in rows})
    matches = {name: [_match(out / f"seed{s}" / d, e) for s in seeds] for name, (d, e) in runs.items()}
    idx = bootstrap_indices(matches["Sup."][0].n_images, n_boot, seed=0)
    result = {}
    for name, ms in matches.items():
        result[name] = {}
        for t in IOUS:
            values = [accumulate(m, main_only=True).ap(t) for m in ms]
            boot = np.mean([[accumulate(m, i, main_only=True).ap(t) for i in idx] for m in ms], axis=0)
            lo, hi = np.nanpercentile(boot, [2.5, 97.5])
            result[name][f"mAP@{t:g}"] = {"mean": float(np.mean(values)), "per_seed": [float(v) for v in values],
                                          "ci95": [float(lo), float(hi)]}
    reports = {}
    for s in seeds:
        path = out / f"seed{s}" / "c" / "ceird_summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        reports[s] = {g["generation"]: g.get("report", {}).get("AUROC") for g in summary["generations"]}
        reports[s]["vision"] = {g["generation"]: g["vision"] for g in summary["generations"]}
    lines = ["| mAP (%) | " + " | ".join(result) + " |", "|---" * (len(result) + 1) + "|"]
    for t in IOUS:
        key = f"mAP@{t:g}"
        cells = [f"{100 * r[key]['mean']:.1f} [{100 * r[key]['ci95'][0]:.1f}, {100 * r[key]['ci95'][1]:.1f}]"
                 for r in result.values()]
        lines.append(f"| @{t:g} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps({"seeds": seeds, "n_boot": n_boot, "rows": result,
                                                "ceird_per_generation": reports}, indent=1))
    print("\n".join(lines))
    print(json.dumps(reports, indent=1))


# ----------------------------------------------------------------------------------- IU reports

IU_CLASSES = ("Cardiomegaly", "Opacity", "Lung/hypoinflation", "Calcified Granuloma", "Pleural Effusion",
              "Atelectasis", "Thoracic Vertebrae", "Calcinosis")


def run_iu(csv_path: Path, out: Path, n_labeled: int, seed: int, n_boot: int) -> None:
    from cxrdistill.eval.classification import bootstrap_auroc, classification_summary
    from cxrdistill.methods.ceird import report_pseudo_targets
    from cxrdistill.models.report import TfidfReportClassifier

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if (r["findings"] or r["impression"]).strip()]
    texts = [f"{r['findings']} {r['impression']}".strip() for r in rows]
    tags = [{t.strip().lower() for t in (r["Problems"] or "").split(";")} for r in rows]
    counts = {c: sum(c.lower() in t for t in tags) for c in IU_CLASSES}
    classes = [c for c, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= 40][:6]
    y = np.array([[float(c.lower() in t) for c in classes] for t in tags])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_test = len(texts) // 4
    test, train = order[:n_test], order[n_test:]
    labeled, unlabeled = train[:n_labeled], train[n_labeled:]
    pick = lambda ids: [texts[i] for i in ids]  # noqa: E731
    teacher = TfidfReportClassifier(num_classes=len(classes)).fit(pick(labeled), y[labeled])
    pseudo = report_pseudo_targets(torch.from_numpy(teacher.predict_proba(pick(unlabeled))), None, 0.5).numpy()
    n_l, n_u = len(labeled), len(unlabeled)
    weights = np.concatenate([np.full(n_l, 1.0 / n_l), np.full(n_u, 1.0 / n_u)]) * (n_l + n_u) / 2
    student = TfidfReportClassifier(num_classes=len(classes)).fit(
        pick(labeled) + pick(unlabeled), np.concatenate([y[labeled], pseudo]), weights)
    oracle = TfidfReportClassifier(num_classes=len(classes)).fit(pick(train), y[train])
    result = {"classes": classes, "class_counts": {c: counts[c] for c in classes}, "n_reports": len(texts),
              "n_labeled": n_l, "n_unlabeled": n_u, "n_test": n_test, "seed": seed}
    for name, model in (("teacher", teacher), ("student", student), ("all_labeled", oracle)):
        summary = classification_summary(bootstrap_auroc(y[test], model.predict_proba(pick(test)), n_boot=n_boot),
                                         classes)
        result[name] = summary
    out.mkdir(parents=True, exist_ok=True)
    (out / f"iu_seed{seed}.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"IU reports: {n_l} labeled, {n_u} unlabeled, {n_test} test; classes {classes}")
    for name in ("teacher", "student", "all_labeled"):
        per = result[name]["per_class"]
        print(name, f"macro {result[name]['macro_AUROC']:.3f}",
              {c: round(per[c]["AUROC"], 3) if per[c]["AUROC"] is not None else None for c in classes})


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    syn = sub.add_parser("synthetic")
    syn.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    syn.add_argument("--out", type=Path, default=Path("runs/study_ceird"))
    syn.add_argument("--config", type=Path, default=Path("configs/ceird.yaml"))
    syn.add_argument("--n-boot", type=int, default=500)
    syn.add_argument("--table-only", action="store_true")
    syn.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    syn.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    iu = sub.add_parser("iu")
    iu.add_argument("--csv", type=Path, default=Path("/work/shared/data/iu-reports/reports.csv"))
    iu.add_argument("--out", type=Path, default=Path("runs/study_ceird_iu"))
    iu.add_argument("--labeled", type=int, default=100)
    iu.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    iu.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    if args.part == "synthetic":
        if args.table_only:
            table(args.seeds, args.out, args.n_boot, args.rows)
        else:
            run_synthetic(args.seeds, args.out, args.config, args.overrides, args.n_boot, args.rows)
    else:
        for seed in args.seeds:
            run_iu(args.csv, args.out, args.labeled, seed, args.n_boot)


if __name__ == "__main__":
    main()
