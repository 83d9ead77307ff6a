"""CEIRD's report side on real IU X-ray reports: TF-IDF report classifiers, teacher (a few labeled
reports) vs student (Eq. 1: labeled + the teacher's hard pseudo-labels of the unlabeled reports,
weighted 1:1) vs all labeled, AUROC per class on held-out reports (docs/results.md §3, "Real reports").

    python scripts/ceird_iu_reports.py --labeled 100 --seeds 0 1 2 --out runs/ceird_iu

Labels: presence of a ``Problems`` tag for the most frequent of a fixed list of common findings.
Not a study of runs (no image model is trained), so it is not a study file: it was the ``iu``
part of the former ``scripts/study_ceird.py``; its ``synthetic`` part is
``cxrdistill compare --study ceird_cpu``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

IU_CLASSES = ("Cardiomegaly", "Opacity", "Lung/hypoinflation", "Calcified Granuloma", "Pleural Effusion",
              "Atelectasis", "Thoracic Vertebrae", "Calcinosis")


def run_iu(csv_path: Path, out: Path, n_labeled: int, seed: int, n_boot: int) -> None:
    from cxrdistill.atomic import write_text_atomic
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
    write_text_atomic(out / f"iu_seed{seed}.json", json.dumps(result, indent=1, default=float))
    print(f"IU reports: {n_l} labeled, {n_u} unlabeled, {n_test} test; classes {classes}")
    for name in ("teacher", "student", "all_labeled"):
        per = result[name]["per_class"]
        print(name, f"macro {result[name]['macro_AUROC']:.3f}",
              {c: round(per[c]["AUROC"], 3) if per[c]["AUROC"] is not None else None for c in classes})


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=Path("/work/shared/data/iu-reports/reports.csv"))
    parser.add_argument("--out", type=Path, default=Path("runs/ceird_iu"))
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    for seed in args.seeds:
        run_iu(args.csv, args.out, args.labeled, seed, args.n_boot)


if __name__ == "__main__":
    main()
