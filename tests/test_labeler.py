"""The rule-based report labeler, its vocabulary and the `label-reports` command."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.data.manifest import load_manifest, manifest_from_dict
from cxrdistill.errors import ConfigError
from cxrdistill.labeling import DEFAULT_VOCAB, find_mentions, label_manifest, label_report, load_vocab
from cxrdistill.labeling.labeler import class_mapping


def positives(text: str) -> dict[str, str]:
    return {k: v for k, v in label_report(text).items() if v != "absent"}


@pytest.mark.parametrize("text, expected", [
    ("Mild cardiomegaly.", {"Cardiomegaly": "positive"}),
    ("No pneumothorax or large pleural effusion.", {"Pneumothorax": "negative", "Pleural Effusion": "negative"}),
    ("The lungs are free of consolidation.", {"Consolidation": "negative"}),
    ("Pneumothorax is not seen.", {"Pneumothorax": "negative"}),
    ("The left effusion has resolved.", {"Pleural Effusion": "negative"}),
    ("Possible small left effusion.", {"Pleural Effusion": "uncertain"}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": "uncertain"}),
    ("Cannot exclude a small pneumothorax.", {"Pneumothorax": "uncertain"}),
    ("There is no focal opacity to suggest pneumonia.", {"Lung Opacity": "negative", "Pneumonia": "negative"}),
    ("No effusion but there is a right pneumothorax.", {"Pleural Effusion": "negative", "Pneumothorax": "positive"}),
    ("No acute disease is seen, the heart is enlarged.", {"Cardiomegaly": "positive"}),
    ("No change in the cardiomegaly.", {"Cardiomegaly": "positive"}),
    ("Heart size is normal.", {"Cardiomegaly": "negative"}),
    ("Small pericardial effusion.", {}),
    ("Left basilar opacity, which may represent atelectasis.", {"Lung Opacity": "positive", "Atelectasis": "uncertain"}),
    ("Effusion measures 1.5 cm. No pneumothorax.", {"Pleural Effusion": "positive", "Pneumothorax": "negative"}),
])
def test_label_report_statuses(text, expected):
    assert positives(text) == expected


def test_aggregation_and_absent_classes():
    result = label_report("No right effusion. Small left pleural effusion.")
    assert result["Pleural Effusion"] == "positive"
    assert set(result) == set(DEFAULT_VOCAB.class_names)
    assert result["Fracture"] == "absent"
    assert set(label_report("").values()) == {"absent"} and set(label_report(None).values()) == {"absent"}


def test_mentions_name_their_cue():
    (m,) = [m for m in find_mentions("No evidence of pneumothorax.") if m.label == "Pneumothorax"]
    assert (m.text, m.status, m.cue) == ("pneumothorax", "negative", "no evidence of")


def test_templated_reports_with_known_truth_are_labeled_exactly():
    """Reports written from random truth with synonyms, negations and hedges: every label recovered."""
    synonyms = {"Cardiomegaly": ["cardiomegaly", "an enlarged cardiac silhouette"],
                "Pleural Effusion": ["pleural effusion", "effusion", "pleural fluid"],
                "Pneumothorax": ["pneumothorax"], "Nodule": ["nodule", "nodules"],
                "Consolidation": ["consolidation", "airspace consolidation"]}
    pos = ["There is {}.", "{} is present.", "Findings show {}."]
    neg = ["No {}.", "There is no {}.", "Negative for {}.", "Without evidence of {}.", "{} is not seen."]
    unc = ["Possible {}.", "{} cannot be excluded.", "Findings may represent {}.", "Suspicious for {}."]
    rng = random.Random(0)
    for _ in range(200):
        truth, sentences = {}, []
        for cls, words in synonyms.items():
            state = rng.choice(["positive", "negative", "uncertain", "absent"])
            truth[cls] = state
            if state != "absent":
                template = rng.choice({"positive": pos, "negative": neg, "uncertain": unc}[state])
                sentences.append(template.format(rng.choice(words)).capitalize())
        rng.shuffle(sentences)
        report = " ".join(sentences)
        got = label_report(report)
        assert {c: got[c] for c in synonyms} == truth, report


# ---------------------------------------------------------------------------------------------
# vocabulary


def test_vocab_yaml_extends_default_and_maps_class_names(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("extends: default\nclasses:\n  Tuberculosis:\n    names: [ActiveTuberculosis]\n"
                    "    mentions: [tuberculosis, tb]\n    exclude: ['tb\\s+test']\n", encoding="utf-8")
    vocab = load_vocab(path)
    assert "Cardiomegaly" in vocab.class_names and "Tuberculosis" in vocab.class_names
    assert label_report("Findings of active TB. No effusion.", vocab)["Tuberculosis"] == "positive"
    assert label_report("Negative TB test.", vocab)["Tuberculosis"] == "absent"
    mapping = class_mapping(["nodule", "pleural effusion", "consolidation", "cardiomegaly", "pneumothorax",
                             "Pleural_Thickening", "Effusion", "ActiveTuberculosis"], vocab)
    assert mapping["Effusion"] == "Pleural Effusion" and mapping["Pleural_Thickening"] == "Pleural Thickening"
    assert mapping["ActiveTuberculosis"] == "Tuberculosis"
    with pytest.raises(ConfigError, match=r"no vocabulary entry for manifest class\(es\) \['Zebra'\]"):
        class_mapping(["nodule", "Zebra"], vocab)


@pytest.mark.parametrize("text, match", [
    ("classes:\n  X:\n    mentions: [x]\n    patterns: ['(']\n", "bad regex"),
    ("classes:\n  X: {}\n", "no mentions"),
    ("clases: {}\n", "unknown key"),
    ("classes:\n  X:\n    synonyms: [x]\n", "must map keys"),
])
def test_bad_vocab_files_raise_config_error(tmp_path, text, match):
    path = tmp_path / "v.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_vocab(path)
    with pytest.raises(ConfigError, match="not found"):
        load_vocab(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# manifests and the command


def _manifest_dict() -> dict:
    return {
        "categories": [{"id": 1, "name": "pleural effusion"}, {"id": 2, "name": "nodule"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 32, "height": 32, "supervision": "none",
             "report": "Small right pleural effusion. Possible nodule in the left upper lobe."},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 32, "supervision": "none",
             "report": "No effusion. No nodule."},
            {"id": 3, "file_name": "c.png", "width": 32, "height": 32, "supervision": "none"},
            {"id": 4, "file_name": "d.png", "width": 32, "height": 32, "supervision": "box",
             "labels": ["nodule"], "report": "Normal chest."},
        ],
        "annotations": [{"id": 1, "image_id": 4, "category_id": 2, "bbox": [1, 1, 5, 5]}],
    }


@pytest.mark.parametrize("policy, labels_a, unsure", [
    ("ignore", ("pleural effusion",), ["nodule"]),
    ("positive", ("pleural effusion", "nodule"), None),
    ("negative", ("pleural effusion",), None)])
def test_label_manifest_policies(tmp_path, policy, labels_a, unsure):
    m = manifest_from_dict(_manifest_dict(), root=tmp_path, check_files=False)
    out, result = label_manifest(m, uncertain=policy)
    a, b, c, d = out.images
    assert a.labels == labels_a and a.extra.get("uncertain_labels") == unsure
    assert a.extra["report_labels"] == {"pleural effusion": "positive", "nodule": "uncertain"}
    assert b.labels == () and b.extra["report_labels"] == {"pleural effusion": "negative", "nodule": "negative"}
    assert a.supervision == "none" and c.labels == () and d.labels == ("nodule",) and "report_labels" not in d.extra
    assert (result.labeled, result.without_report, result.upgraded) == (2, 1, 0)
    assert result.counts["nodule"]["uncertain"] == 1


def test_label_manifest_keeps_box_classes_when_relabeling_box_images(tmp_path):
    m = manifest_from_dict(_manifest_dict(), root=tmp_path, check_files=False)
    out, _ = label_manifest(m, supervision=("box", "none"), upgrade=True)
    assert out.images[3].labels == ("nodule",)  # its box stays in its labels though the report is normal
    assert [im.supervision for im in out.images] == ["image", "image", "none", "box"]


def test_label_reports_command(tmp_path):
    src = tmp_path / "m.json"
    src.write_text(json.dumps(_manifest_dict()), encoding="utf-8")
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / name).write_bytes(b"")
    dst = tmp_path / "labeled.json"
    res = CliRunner().invoke(app, ["label-reports", "--manifest", str(src), "--out", str(dst), "--upgrade"])
    assert res.exit_code == 0, res.output
    assert "labeled 2 image(s)" in res.output and "nodule: positive 0, uncertain 1" in res.output
    m = load_manifest(dst, check_files=False)
    assert m.images[0].labels == ("pleural effusion",) and m.images[0].supervision == "image"

    bad = tmp_path / "bad.json"
    raw = _manifest_dict()
    raw["categories"].append({"id": 3, "name": "zebra"})
    bad.write_text(json.dumps(raw), encoding="utf-8")
    res = CliRunner().invoke(app, ["label-reports", "-m", str(bad), "-o", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "no vocabulary entry" in res.output and "zebra" in res.output
    assert not (tmp_path / "x.json").exists()


def test_print_vocab_round_trips(tmp_path):
    res = CliRunner().invoke(app, ["label-reports", "-m", "x", "-o", "y", "--print-vocab"])
    assert res.exit_code == 0
    path = tmp_path / "v.yaml"
    path.write_text(res.output, encoding="utf-8")
    vocab = load_vocab(path)
    assert vocab.class_names == DEFAULT_VOCAB.class_names
    text = "No pneumothorax. Possible left basilar atelectasis. Heart size is normal."
    assert label_report(text, vocab) == label_report(text)
