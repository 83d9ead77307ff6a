"""Rule-based labeler vs trained report classifier on the same held-out IU X-ray reports.

    .venv/bin/python scripts/compare_labeler_classifier_iu.py [--csv ../shared/data/iu-reports/reports.csv]
        [--train-fraction 0.7] [--seed 0]

Reports with findings or impression text are split (seeded) into a training part, on which the
TF-IDF + logistic-regression classifier (`models.report.TfidfReportClassifier`) learns the mapped
`Problems` tags, and a test part, on which both are scored: precision / recall / F1 of the
labeler (uncertain mentions counted as negative) and of the classifier at probability 0.5, and the
classifier's AUROC. The labeler needs no training data; the classifier needs the tags.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cxrdistill.labeling import label_report, load_vocab  # noqa: E402
from cxrdistill.models.report import TfidfReportClassifier  # noqa: E402
from eval_labeler_iu import DEFAULT_CSV, TRUTH_TAGS, prf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--train-fraction", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-support", type=int, default=10, help="Classes with fewer test positives are left out.")
    args = ap.parse_args()
    with args.csv.open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if (r["findings"] or r["impression"]).strip()]
    classes = list(TRUTH_TAGS)
    texts = [" ".join(x for x in (r["findings"], r["impression"]) if x) for r in rows]
    tags = [{t.strip() for t in r["Problems"].split(";")} for r in rows]
    y = np.array([[bool(t & set(TRUTH_TAGS[c])) for c in classes] for t in tags], dtype=np.float64)
    order = np.random.default_rng(args.seed).permutation(len(rows))
    n_train = int(round(args.train_fraction * len(rows)))
    train, test = order[:n_train], order[n_train:]

    clf = TfidfReportClassifier(num_classes=len(classes))
    clf.fit([texts[i] for i in train], y[train])
    probs = clf.predict_proba([texts[i] for i in test])
    vocab = load_vocab(None)
    lab = np.array([[label_report(texts[i], vocab).get(c, "absent") == "positive" for c in classes] for i in test])

    print(f"IU X-ray reports: {len(train)} train / {len(test)} test (seed {args.seed}); "
          "labeler: uncertain = negative; classifier: TF-IDF + LR at p >= 0.5\n")
    print("| class | test positives | labeler P | labeler R | labeler F1 | classifier P | classifier R | "
          "classifier F1 | classifier AUROC |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    f1s = {"labeler": [], "classifier": []}
    for k, c in enumerate(classes):
        truth = y[test, k].astype(bool)
        if truth.sum() < args.min_support:
            continue
        pred_c = probs[:, k] >= 0.5
        lp = prf(int((lab[:, k] & truth).sum()), int((lab[:, k] & ~truth).sum()), int((~lab[:, k] & truth).sum()))
        cp = prf(int((pred_c & truth).sum()), int((pred_c & ~truth).sum()), int((~pred_c & truth).sum()))
        auc = roc_auc_score(truth, probs[:, k])
        f1s["labeler"].append(lp[2])
        f1s["classifier"].append(cp[2])
        print(f"| {c} | {int(truth.sum())} | {lp[0]:.3f} | {lp[1]:.3f} | {lp[2]:.3f} | {cp[0]:.3f} | {cp[1]:.3f} | "
              f"{cp[2]:.3f} | {auc:.3f} |")
    print(f"| macro F1 | | | | {np.mean(f1s['labeler']):.3f} | | | {np.mean(f1s['classifier']):.3f} | |")


if __name__ == "__main__":
    main()
