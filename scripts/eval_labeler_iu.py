"""Measure the rule-based report labeler on IU X-ray (Open-I) reports with manual tags as truth.

    .venv/bin/python scripts/eval_labeler_iu.py [--csv ../shared/data/iu-reports/reports.csv] [--vocab V.yaml]

Text labelled: `findings` + `impression`. Truth: the `Problems` tags (manual MeSH-based
annotation of the whole report). A labeler class is mapped to the tags that name it (below);
"normal" is predicted when no class of the vocabulary is positive. Two operating points are
printed: uncertain mentions counted as positive (U-ones) and as negative (U-zeros).
Prints a markdown table: per class support, precision, recall, F1, and micro/macro averages.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from cxrdistill.labeling import label_report, load_vocab

#: labeler class -> IU `Problems` tags counted as that class
TRUTH_TAGS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("Cardiomegaly",),
    "Pleural Effusion": ("Pleural Effusion",),
    "Pneumothorax": ("Pneumothorax",),
    "Lung Opacity": ("Opacity", "Density", "Infiltrate", "Airspace Disease"),
    "Nodule": ("Nodule",),
    "Mass": ("Mass",),
    "Atelectasis": ("Pulmonary Atelectasis",),
    "Edema": ("Pulmonary Edema",),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Fracture": ("Fractures, Bone",),
    "Emphysema": ("Emphysema", "Pulmonary Emphysema"),
    "Granuloma": ("Granuloma", "Calcified Granuloma", "Granulomatous Disease"),
    "Hernia": ("Hernia, Hiatal",),
}
NORMAL = "normal"
DEFAULT_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "iu-reports" / "reports.csv"


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(rows: list[dict[str, str]], vocab) -> dict[str, dict[str, dict[str, int]]]:
    """`{policy: {class: {tp, fp, fn, support}}}` for policies "u_ones" and "u_zeros"."""
    classes = list(TRUTH_TAGS) + [NORMAL]
    stats = {pol: {c: {"tp": 0, "fp": 0, "fn": 0, "support": 0} for c in classes}
             for pol in ("u_ones", "u_zeros")}
    for row in rows:
        tags = {t.strip() for t in row["Problems"].split(";")}
        text = " ".join(x for x in (row["findings"], row["impression"]) if x)
        status = label_report(text, vocab)
        truth = {c: bool(tags & set(t)) for c, t in TRUTH_TAGS.items()}
        truth[NORMAL] = NORMAL in tags
        for pol, table in stats.items():
            hits = {"positive", "uncertain"} if pol == "u_ones" else {"positive"}
            pred = {c: status.get(c, "absent") in hits for c in TRUTH_TAGS}
            pred[NORMAL] = not any(s in hits for s in status.values())
            for c in classes:
                cell = table[c]
                cell["support"] += truth[c]
                cell["tp"] += truth[c] and pred[c]
                cell["fp"] += pred[c] and not truth[c]
                cell["fn"] += truth[c] and not pred[c]
    return stats


def markdown(stats: dict[str, dict[str, dict[str, int]]]) -> str:
    lines = ["| class | support | P (U-ones) | R (U-ones) | F1 (U-ones) | P (U-zeros) | R (U-zeros) | F1 (U-zeros) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    classes = list(stats["u_ones"])
    for c in classes:
        cells = []
        for pol in ("u_ones", "u_zeros"):
            s = stats[pol][c]
            cells += [f"{v:.3f}" for v in prf(s["tp"], s["fp"], s["fn"])]
        lines.append(f"| {c} | {stats['u_ones'][c]['support']} | " + " | ".join(cells) + " |")
    for name, agg in (("micro avg (findings)", "micro"), ("macro avg (findings)", "macro")):
        cells = []
        for pol in ("u_ones", "u_zeros"):
            rows = [stats[pol][c] for c in classes if c != NORMAL]
            if agg == "micro":
                cells += [f"{v:.3f}" for v in prf(sum(r["tp"] for r in rows), sum(r["fp"] for r in rows),
                                                   sum(r["fn"] for r in rows))]
            else:
                per = [prf(r["tp"], r["fp"], r["fn"]) for r in rows]
                cells += [f"{sum(p[k] for p in per) / len(per):.3f}" for k in range(3)]
        support = sum(stats["u_ones"][c]["support"] for c in classes if c != NORMAL)
        lines.append(f"| {name} | {support} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--vocab", type=Path, default=None, help="vocabulary YAML (default: built-in)")
    args = parser.parse_args()
    with open(args.csv, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = [r for r in rows if (r["findings"] or r["impression"]).strip()]
    stats = evaluate(rows, load_vocab(args.vocab))
    print(f"IU X-ray reports with findings or impression: {len(rows)}\n")
    print(markdown(stats))


if __name__ == "__main__":
    main()
