"""CheXpert (Irvin et al., AAAI 2019).

`train.csv` / `valid.csv`: `Path, Sex, Age, Frontal/Lateral, AP/PA`, then 14 observations with
`1.0` (positive), `0.0` (negative), `-1.0` (uncertain) or blank (not mentioned). `Path` starts
with the release folder (`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`); it is
resolved against the root, or against the root's parent when the root *is* that folder.

Uncertainty policy (`uncertain=`), as in the CheXpert paper:
- `"u_ones"`: uncertain counts as positive; `"u_zeros"`: as negative;
- `"ignore"`: the class is unknown for that image: it is left out of `labels` and listed in the
  image's `uncertain_labels` (an extra key), so a loss can mask it.
"No Finding" is not a class (it is the empty label list). Splits: `train.csv` gives train plus a
patient-hashed `val_fraction` of patients as val; `valid.csv` (radiologist-labelled) gives test.
Width/height are read from each JPEG's header. Every image is `supervision="image"`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cxrdistill.data.sources.common import Problems, RawManifest, hashed_split, read_csv_dicts, size_or_problem

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")
CLASSES = tuple(o for o in OBSERVATIONS if o != "No Finding")
POLICIES = ("u_ones", "u_zeros", "ignore")
_PATIENT = re.compile(r"(patient\d+)")


def load(root: Path, *, on_error: str = "strict", uncertain: str = "ignore",
         val_fraction: float = 0.1, frontal_only: bool = False, source: str = "chexpert") -> dict[str, Any]:
    """Raw manifest of a CheXpert folder (see the module docstring)."""
    if uncertain not in POLICIES:
        raise ValueError(f"uncertain must be one of {POLICIES}, not {uncertain!r}")
    root = Path(root)
    problems = Problems(source, on_error)
    files = [(root / "train.csv", None), (root / "valid.csv", "test")]
    if not any(p.is_file() for p, _ in files):
        raise problems.fatal(f"neither train.csv nor valid.csv under {root}")
    out = RawManifest(source, list(CLASSES), fixed_classes=True)
    out.info.update(explicit_fields=["split"], uncertainty_policy=uncertain)
    for path, split in files:
        if path.is_file():
            _read_file(out, root, path, split, uncertain, val_fraction, frontal_only, problems)
    return problems.finish(out.to_dict())


def _read_file(out: RawManifest, root: Path, path: Path, split: str | None, uncertain: str,
               val_fraction: float, frontal_only: bool, problems: Problems) -> None:
    for line, row in read_csv_dicts(path, ["Path", *CLASSES]):
        where = f"{path.name}:{line}"
        if frontal_only and row.get("Frontal/Lateral", "Frontal") != "Frontal":
            out.info["excluded_non_frontal"] = out.info.get("excluded_non_frontal", 0) + 1
            continue
        rel = _resolve(root, row["Path"])
        if rel is None:
            problems.add(where, f"image file not found: {row['Path']}")
            continue
        labels, unsure, bad = [], [], []
        for name in CLASSES:
            value = row[name]
            if value in ("1.0", "1"):
                labels.append(name)
            elif value in ("-1.0", "-1"):
                if uncertain == "u_ones":
                    labels.append(name)
                elif uncertain == "ignore":
                    unsure.append(name)
            elif value not in ("0.0", "0", ""):
                bad.append(f"{name}={value!r}")
        if bad:
            problems.add(where, f"unknown label value(s) {bad}; expected 1.0, 0.0, -1.0 or blank")
            continue
        size = size_or_problem(root, rel, where, problems)
        if size is None:
            continue
        match = _PATIENT.search(row["Path"])
        patient = match.group(1) if match else None
        out.add_image(rel, *size, split=split or hashed_split(patient or rel, val_fraction),
                      supervision="image", labels=labels, patient_id=patient,
                      uncertain_labels=unsure or None, sex=row.get("Sex") or None,
                      view=row.get("AP/PA") or row.get("Frontal/Lateral") or None)


def _resolve(root: Path, path: str) -> str | None:
    """`path` relative to root, trying it as given and without its first folder."""
    parts = Path(path).parts
    for cand in (Path(path), Path(*parts[1:]) if len(parts) > 1 else None):
        if cand is not None and (root / cand).is_file():
            return cand.as_posix()
    return None
