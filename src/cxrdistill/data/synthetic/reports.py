"""Radiology reports written from the synthetic truth, with a knob for how often they are wrong.

Each present finding gets a sentence from one of several templates (synonyms, laterality,
location, size, sometimes hedged: "possible small nodule"); some absent findings are negated
("No pneumothorax."); a normal study reads "Lungs are clear. No acute cardiopulmonary process."
With probability ``error_rate`` per image one finding is missed (left out, or even negated) or an
absent one hallucinated. ``report_truth`` records what the text says next to what is true.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrdistill.data.synthetic.lesions import Lesion, sample_lesion

_POSITIVE: dict[str, tuple[str, ...]] = {
    "nodule": ("{diameter} mm nodule in the {side} {zone} lung zone.",
               "{Side} {zone} zone pulmonary nodule measuring {diameter} mm.",
               "Rounded nodular opacity in the {side} {zone} zone.",
               "There is a {diameter} mm {side} lung nodule."),
    "pleural effusion": ("{Severity} {side} pleural effusion.",
                         "Blunting of the {side} costophrenic angle, consistent with {severity} effusion.",
                         "{Severity} amount of {side} pleural fluid.",
                         "Layering fluid at the {side} base compatible with a pleural effusion."),
    "consolidation": ("Focal consolidation in the {side} {zone} lung.",
                      "Patchy airspace opacity in the {side} {zone} zone concerning for pneumonia.",
                      "{Side} {zone} zone consolidation with air bronchograms.",
                      "Airspace disease in the {side} {zone} lung, likely infection."),
    "cardiomegaly": ("Cardiomegaly.", "The heart is enlarged.", "Enlarged cardiac silhouette.",
                     "Moderate cardiomegaly."),
    "pneumothorax": ("{Severity} {side} apical pneumothorax.",
                     "{Side} pneumothorax with a visible pleural line.",
                     "There is a {severity} {side} pneumothorax.",
                     "Visceral pleural line at the {side} apex consistent with pneumothorax."),
}
_UNCERTAIN: dict[str, tuple[str, ...]] = {
    "nodule": ("Possible small nodule in the {side} {zone} zone.",
               "Questionable nodular opacity in the {side} lung, may represent a nipple shadow."),
    "pleural effusion": ("Possible small {side} pleural effusion.",
                         "Questionable blunting of the {side} costophrenic angle."),
    "consolidation": ("Subtle opacity in the {side} {zone} zone may represent early pneumonia.",
                      "Possible {side} {zone} consolidation."),
    "cardiomegaly": ("Borderline enlarged cardiac silhouette.", "Possible mild cardiomegaly."),
    "pneumothorax": ("Possible tiny {side} apical pneumothorax.",
                     "Questionable {side} pleural line, possibly a small pneumothorax."),
}
_NEGATIVE: dict[str, tuple[str, ...]] = {
    "nodule": ("No pulmonary nodules.", "No suspicious nodule or mass."),
    "pleural effusion": ("No pleural effusion.", "No effusion.", "Costophrenic angles are sharp."),
    "consolidation": ("No focal consolidation.", "No airspace disease."),
    "cardiomegaly": ("Heart size is normal.", "Normal cardiac silhouette.", "No cardiomegaly."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
}
_CLEAR = ("Lungs are clear.", "The lungs are clear bilaterally.", "Clear lungs.")
_NORMAL_IMPRESSION = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                      "Normal chest radiograph.")
UNCERTAIN_PROBABILITY = 0.15
NEGATION_PROBABILITY = 0.5


def write_report(rng: np.random.Generator, lesions: Sequence[Lesion], classes: Sequence[str],
                 error_rate: float) -> tuple[str, dict[str, Any]]:
    """A report for an image with ``lesions``, mentioning only ``classes``.

    Returns the text and its truth record: ``present`` (classes in the image), ``asserted``
    (classes the text states, hedged or not), ``uncertain`` (hedged ones), ``negated``
    (explicitly denied), ``missed`` / ``hallucinated`` (the error, if any) and ``error``.
    """
    present = [c for c in classes if any(l.kind == c for l in lesions)]
    absent = [c for c in classes if c not in present]
    missed: list[str] = []
    hallucinated: list[str] = []
    if rng.uniform() < error_rate:
        if present and (not absent or rng.uniform() < 0.5):
            missed = [present[int(rng.integers(len(present)))]]
        elif absent:
            hallucinated = [absent[int(rng.integers(len(absent)))]]
    described = {c: _largest(lesions, c) for c in present if c not in missed}
    described.update({c: sample_lesion(rng, c) for c in hallucinated})
    asserted = [c for c in classes if c in described]
    sentences: list[str] = []
    uncertain: list[str] = []
    for c in asserted:
        hedged = rng.uniform() < UNCERTAIN_PROBABILITY
        if hedged:
            uncertain.append(c)
        count = sum(l.kind == c for l in lesions)
        sentences.append(_fill(_pick(rng, (_UNCERTAIN if hedged else _POSITIVE)[c]), described[c], count))
    negated = [c for c in classes if c not in described and rng.uniform() < NEGATION_PROBABILITY]
    lung_findings = [c for c in asserted if c != "cardiomegaly"]
    if not lung_findings and rng.uniform() < 0.7:
        sentences.append(_pick(rng, _CLEAR))
    sentences += [_pick(rng, _NEGATIVE[c]) for c in negated]
    impression = (_pick(rng, _NORMAL_IMPRESSION) if not asserted
                  else " ".join(_fill(_pick(rng, _POSITIVE[c] if c not in uncertain else _UNCERTAIN[c]),
                                      described[c], 1) for c in asserted[:2]))
    text = f"FINDINGS: {' '.join(sentences) if sentences else 'See impression.'} IMPRESSION: {impression}"
    truth = {"present": present, "asserted": asserted, "uncertain": uncertain, "negated": negated,
             "missed": missed, "hallucinated": hallucinated, "error": bool(missed or hallucinated),
             "findings": [_describe(l) for l in lesions]}
    return text, truth


def _largest(lesions: Sequence[Lesion], kind: str) -> Lesion:
    return max((l for l in lesions if l.kind == kind), key=lambda l: l.size)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(template: str, lesion: Lesion, count: int) -> str:
    values = {"side": lesion.side, "zone": lesion.zone, "severity": lesion.severity,
              "diameter": lesion.diameter_mm}
    values.update({k.capitalize(): str(v).capitalize() for k, v in values.items()})
    text = template.format(**values)
    if lesion.kind == "nodule" and count > 1:
        text += f" {count} nodules in total."
    return text


def _describe(lesion: Lesion) -> dict[str, Any]:
    out: dict[str, Any] = {"class": lesion.kind, "severity": lesion.severity}
    if lesion.side:
        out["side"] = lesion.side
    if lesion.kind in ("nodule", "consolidation"):
        out["zone"] = lesion.zone
    if lesion.kind == "nodule":
        out["diameter_mm"] = lesion.diameter_mm
    return out
