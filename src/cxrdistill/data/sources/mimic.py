"""MIMIC-CXR (Johnson et al., 2019), its JPG release, free-text reports and MS-CXR boxes.

Files (each may be gzipped):
- images `files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg` (MIMIC-CXR-JPG) or `.dcm` (MIMIC-CXR,
  `image_format="dcm"`; MONOCHROME1 images are inverted when decoded by `cxrdistill.data.io`);
- `mimic-cxr-2.0.0-metadata.csv`: `dicom_id, subject_id, study_id, ..., ViewPosition, Rows,
  Columns, ...` (size and view come from here). Without it (DICOM release) the `.dcm` headers
  under `files/` give size and view;
- `mimic-cxr-2.0.0-chexpert.csv` / `-negbio.csv` (`labeler=`): per study, 14 observations with
  1.0 / 0.0 / -1.0 / blank, handled with the CheXpert `uncertain` policy (`u_ones`, `u_zeros`,
  `ignore` -> `uncertain_labels` extra key);
- `mimic-cxr-2.0.0-split.csv`: `dicom_id, study_id, subject_id, split` (train/validate/test);
- reports `files/pXX/pNNN/sNNN.txt` in `reports_dir` (default: `mimic-cxr-reports/` or the
  root): the FINDINGS and IMPRESSION sections are kept (the whole text when neither exists);
- MS-CXR `MS_CXR_Local_Alignment_v1.*.csv` (`dicom_id, category_name, label_text, path, x, y, w,
  h, image_width, image_height`): boxes in original pixels; those images get `supervision="box"`.

`setting="ceird"` reproduces the CEIRD paper's setup: the 8 MS-CXR classes, frontal views (PA/AP)
only, images of studies with a positive label outside the 8 classes excluded unless MS-CXR boxed
them (`ceird_ignore`: observations that do not exclude, by default "No Finding" and "Support
Devices", which is not an abnormality), report-label truth kept as hidden `labels` of
`supervision="none"` images. The counts of excluded images are in `info["excluded"]`.
Otherwise the classes are the 13 CheXpert observations and labelled images are `"image"`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cxrdistill.data.sources.chexpert import CLASSES as CHEXPERT_CLASSES
from cxrdistill.data.sources.common import Problems, RawManifest, box_outside, parse_box, parse_float, read_csv_dicts

MS_CXR_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity",
                  "Pleural Effusion", "Pneumonia", "Pneumothorax")
FRONTAL = ("PA", "AP")
SPLITS = {"train": "train", "validate": "val", "test": "test"}
_SECTION = re.compile(r"^\s*([A-Z][A-Z /&-]+):", re.MULTILINE)


def report_sections(text: str, keep: Sequence[str] = ("FINDINGS", "IMPRESSION")) -> str:
    """The `keep` sections of a MIMIC report joined by a blank line; the whole text if none."""
    heads = list(_SECTION.finditer(text))
    parts = []
    for k, m in enumerate(heads):
        if m.group(1).strip() in keep:
            end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
            parts.append(" ".join(text[m.end():end].split()))
    return "\n\n".join(p for p in parts if p) or " ".join(text.split())


def load(root: Path, *, on_error: str = "strict", setting: str | None = None,
         labeler: str | None = "chexpert", uncertain: str = "ignore", image_format: str = "jpg",
         reports_dir: str | None = None, ms_cxr: str | None = None, frontal_only: bool = False,
         ceird_ignore: Sequence[str] = ("No Finding", "Support Devices"), check_files: bool = True,
         source: str = "mimic") -> dict[str, Any]:
    """Raw manifest of a MIMIC-CXR(-JPG) folder (see the module docstring)."""
    root = Path(root)
    problems = Problems(source, on_error)
    if setting not in (None, "ceird"):
        raise ValueError(f"setting must be None or 'ceird', not {setting!r}")
    if uncertain not in ("u_ones", "u_zeros", "ignore"):
        raise ValueError(f"uncertain must be u_ones, u_zeros or ignore, not {uncertain!r}")
    ceird = setting == "ceird"
    classes = MS_CXR_CLASSES if ceird else CHEXPERT_CLASSES
    frontal_only = frontal_only or ceird
    labels_of = _study_labels(root, labeler, problems) if labeler else {}
    split_of = _splits(root)
    boxes, bad_boxes = _ms_cxr_boxes(root, ms_cxr, problems)
    reports = _reports_root(root, reports_dir)
    out = RawManifest(source, list(classes), fixed_classes=True)
    out.info.update(setting=setting or "all", labeler=labeler, uncertainty_policy=uncertain)
    if split_of:
        out.info["explicit_fields"] = ["split"]
    excluded = {"non_frontal": 0, "labels_outside_classes": 0}
    no_report = 0
    for where, rec in _image_records(root, image_format, problems):
        if frontal_only and rec["view"] not in FRONTAL:
            excluded["non_frontal"] += 1
            continue
        study = labels_of.get((rec["subject_id"], rec["study_id"]), {})
        positives = [n for n, v in study.items() if v == 1 or (v == -1 and uncertain == "u_ones")]
        other = [n for n in positives if n not in classes and n not in ceird_ignore]
        if ceird and other and rec["dicom_id"] not in boxes:  # boxed MS-CXR images are always kept
            excluded["labels_outside_classes"] += 1
            continue
        rel = rec["rel"]
        if check_files and not (root / rel).is_file():
            problems.add(where, f"image file not found: {rel}")
            continue
        image_boxes = boxes.pop(rec["dicom_id"], [])
        if rec["dicom_id"] in bad_boxes:
            continue  # its bad MS-CXR row is reported, naming this image as skipped
        outside = [(w, msg) for _, box, w in image_boxes if (msg := box_outside(box, rec["width"], rec["height"]))]
        for box_where, msg in outside:
            problems.add(box_where, f"{rec['dicom_id']}: {msg} (image skipped)")
        if outside:
            continue
        labels = sorted({n for n in positives if n in classes} | {c for c, _, _ in image_boxes})
        unsure = sorted(n for n, v in study.items() if v == -1 and uncertain == "ignore" and n in classes)
        kind = "box" if image_boxes else ("none" if ceird or not study else "image")
        report = _report(reports, rec["subject_id"], rec["study_id"])
        no_report += reports is not None and report is None  # kept, and counted
        image_id = out.add_image(
            rel, rec["width"], rec["height"], split=split_of.get(rec["dicom_id"]), supervision=kind,
            labels=labels if study or image_boxes else None, patient_id=rec["subject_id"],
            report=report, view_position=rec["view"] or None,
            study_id=rec["study_id"], uncertain_labels=unsure or None)
        for class_name, box, _ in image_boxes:
            out.add_box(image_id, class_name, box)
    for dicom_id, leftover in boxes.items():
        for _, _, box_where in leftover if dicom_id not in bad_boxes else ():
            problems.add(box_where, f"box of dicom_id {dicom_id}, which is not a kept image")
    out.info.update(excluded=excluded, images_without_report=no_report)
    return problems.finish(out.to_dict())


# ---------------------------------------------------------------------------------------------


def _image_records(root: Path, image_format: str, problems: Problems) -> Iterator[tuple[str, dict]]:
    """`("file:line", {dicom_id, subject_id, study_id, view, width, height, rel})` per image."""
    if image_format not in ("jpg", "dcm"):
        raise ValueError(f"image_format must be 'jpg' or 'dcm', not {image_format!r}")
    meta = next((p for n in ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
                 if (p := root / n).is_file()), None)
    if meta is None:
        if image_format == "jpg":
            raise problems.fatal(f"mimic-cxr-2.0.0-metadata.csv(.gz) not found under {root}")
        yield from _dicom_records(root, problems)
        return
    for line, row in read_csv_dicts(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition",
                                           "Rows", "Columns"]):
        where = f"{meta.name}:{line}"
        try:
            height, width = int(float(row["Rows"])), int(float(row["Columns"]))
        except ValueError:
            problems.add(where, f"Rows/Columns are not integers: {row['Rows']!r} x {row['Columns']!r}")
            continue
        subject, study = row["subject_id"], row["study_id"]
        rel = f"files/p{subject[:2]}/p{subject}/s{study}/{row['dicom_id']}.{image_format}"
        yield where, dict(dicom_id=row["dicom_id"], subject_id=subject, study_id=study,
                          view=row["ViewPosition"], width=width, height=height, rel=rel)


def _dicom_records(root: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """Records from the `.dcm` headers of the DICOM release (no metadata CSV there)."""
    import pydicom

    for path in sorted((root / "files").rglob("*.dcm")):
        rel = path.relative_to(root).as_posix()
        parts = path.relative_to(root / "files").parts
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception as exc:  # noqa: BLE001 - any header failure is a bad record
            problems.add(rel, f"unreadable DICOM header: {type(exc).__name__}")
            continue
        yield rel, dict(dicom_id=path.stem, subject_id=parts[1][1:], study_id=parts[2][1:],
                        view=str(ds.get("ViewPosition", "")), width=cols, height=rows, rel=rel)


def _study_labels(root: Path, labeler: str, problems: Problems) -> dict[tuple[str, str], dict[str, int]]:
    """`{(subject_id, study_id): {observation: 1 | 0 | -1}}` (blank cells left out)."""
    if labeler not in ("chexpert", "negbio"):
        raise ValueError(f"labeler must be 'chexpert', 'negbio' or None, not {labeler!r}")
    path = next((p for n in (f"mimic-cxr-2.0.0-{labeler}.csv", f"mimic-cxr-2.0.0-{labeler}.csv.gz")
                 if (p := root / n).is_file()), None)
    if path is None:
        raise problems.fatal(f"mimic-cxr-2.0.0-{labeler}.csv(.gz) not found under {root} "
                             "(pass labeler=None to read images without labels)")
    observations = ("No Finding",) + CHEXPERT_CLASSES
    out: dict[tuple[str, str], dict[str, int]] = {}
    for line, row in read_csv_dicts(path, ["subject_id", "study_id", *observations]):
        values, bad = {}, []
        for name in observations:
            cell = row[name]
            if cell in ("1.0", "1", "0.0", "0", "-1.0", "-1"):
                values[name] = int(float(cell))
            elif cell:
                bad.append(f"{name}={cell!r}")
        if bad:
            problems.add(f"{path.name}:{line}", f"unknown label value(s) {bad}; expected 1.0, 0.0, "
                                                 "-1.0 or blank")
            continue
        out[(row["subject_id"], row["study_id"])] = values
    return out


def _splits(root: Path) -> dict[str, str]:
    path = next((p for n in ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")
                 if (p := root / n).is_file()), None)
    if path is None:
        return {}
    return {row["dicom_id"]: SPLITS.get(row["split"], row["split"])
            for _, row in read_csv_dicts(path, ["dicom_id", "split"])}


def _ms_cxr_boxes(root: Path, name: str | None, problems: Problems
                  ) -> tuple[dict[str, list[tuple[str, tuple, str]]], set[str]]:
    """`{dicom_id: [(class, xywh, "file:line"), ...]}` of the MS-CXR CSV (if there is one), and the
    dicom_ids with a bad row (left out whole)."""
    if name is not None:
        path = root / name
        if not path.is_file():
            raise problems.fatal(f"MS-CXR file not found: {path}")
    else:
        found = sorted(root.glob("MS_CXR_Local_Alignment_v*.csv")) + sorted(root.glob("*/MS_CXR_Local_Alignment_v*.csv"))
        if not found:
            return {}, set()
        path = found[-1]
    out: dict[str, list[tuple[str, tuple, str]]] = {}
    bad: set[str] = set()
    for line, row in read_csv_dicts(path, ["dicom_id", "category_name", "x", "y", "w", "h"]):
        where = f"{path.name}:{line}"
        try:
            if row["category_name"] not in MS_CXR_CLASSES:
                raise ValueError(f"unknown category_name {row['category_name']!r}; known: {list(MS_CXR_CLASSES)}")
            box = parse_box([row["x"], row["y"], row["w"], row["h"]], "xywh")
            for key in ("image_width", "image_height"):
                if row.get(key):
                    parse_float(row[key], key)
        except ValueError as exc:
            problems.add(where, f"{row['dicom_id']}: {exc} (image skipped)")
            bad.add(row["dicom_id"])
            continue
        out.setdefault(row["dicom_id"], []).append((row["category_name"], box, where))
    return out, bad


def _reports_root(root: Path, reports_dir: str | None) -> Path | None:
    if reports_dir is not None:
        return root / reports_dir
    for cand in (root / "mimic-cxr-reports", root):
        if (cand / "files").is_dir():
            return cand
    return None


def _report(reports: Path | None, subject: str, study: str) -> str | None:
    if reports is None:
        return None
    path = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
    if not path.is_file():
        return None
    return report_sections(path.read_text(encoding="utf-8", errors="replace")) or None
