"""The demo's last table: each recipe next to its own teacher, paired CI, and a plain verdict."""

from __future__ import annotations

from rich.console import Console

from cxrdistill.commands.demo import print_teacher_table, teacher_verdicts
from cxrdistill.study.table import format_markdown


def _entry(a, b, low, high):
    return {"n_seeds": 1, "values": {0: b}, "mean": b, "ci": [None, None],
            "vs_teacher": {"metric": "mAP@0.5", "a": a, "b": b, "diff": b - a, "ci_low": low, "ci_high": high,
                           "p_boot": 0.5, "n_boot": 100, "seed": 0, "seeds": 1}}


TABLE = {"study": "demo", "metric": "mAP@0.5", "baseline": "supervised", "ci": "t", "n_boot": 100,
         "fractions": ["f0.2"], "fraction_key": "data.boxed_fraction", "seeds": [0],
         "rows": [{"recipe": "supervised", "label": "Supervised",
                   "fractions": {"f0.2": {"n_seeds": 1, "values": {0: 0.2}, "mean": 0.2, "ci": [None, None]}}},
                  {"recipe": "tsd", "label": "TSD", "fractions": {"f0.2": _entry(0.20, 0.19, -0.04, 0.02)}},
                  {"recipe": "ceird", "label": "CEIRD", "fractions": {"f0.2": _entry(0.20, 0.26, 0.01, 0.11)}},
                  {"recipe": "stac", "label": "STAC", "fractions": {"f0.2": _entry(0.20, 0.10, -0.15, -0.05)}}]}


def test_verdict_follows_the_ci_of_student_minus_own_teacher():
    verdicts = {v["label"]: v for v in teacher_verdicts(TABLE)}
    assert set(verdicts) == {"TSD", "CEIRD", "STAC"}  # the supervised row has no own teacher
    assert verdicts["TSD"]["verdict"].startswith("distillation did not help")
    assert verdicts["CEIRD"]["verdict"] == "helped"
    assert verdicts["STAC"]["verdict"].startswith("hurt")
    assert verdicts["TSD"]["diff"] == 0.19 - 0.20 and verdicts["TSD"]["teacher"] == 0.20


def test_demo_table_prints_student_teacher_ci_and_says_when_distillation_did_not_help():
    console = Console(record=True, width=200)
    print_teacher_table(TABLE, console)
    text = console.export_text()
    assert "own teacher" in text and "[-0.040, +0.020]" in text and "+0.060" in text
    assert "TSD: distillation did not help" in " ".join(text.split())
    assert "CEIRD: " not in text  # a recipe that helped gets no warning line
    md = format_markdown(TABLE)
    assert "vs own teacher" in md and "Δ -0.010 [-0.040, +0.020]" in md


def test_a_gain_is_claimed_only_when_the_seed_interval_agrees():
    from cxrdistill.study.table import claimed_direction

    images_only = {"diff": 0.05, "ci_low": 0.01, "ci_high": 0.09, "p_boot": 0.01}
    assert claimed_direction(images_only) == 1  # one seed: the test-image CI decides
    assert claimed_direction({**images_only, "seed_ci": [0.02, 0.08]}) == 1
    assert claimed_direction({**images_only, "seed_ci": [-0.06, 0.16]}) == 0  # seeds disagree
    assert claimed_direction({"diff": -0.05, "ci_low": -0.09, "ci_high": -0.01, "seed_ci": [-0.08, -0.02]}) == -1
    assert claimed_direction({"diff": -0.05, "ci_low": -0.09, "ci_high": -0.01, "seed_ci": [0.01, 0.02]}) == 0
    assert claimed_direction({"diff": 0.05, "ci_low": -0.01, "ci_high": 0.09, "seed_ci": [0.02, 0.08]}) == 0
    assert claimed_direction({"diff": 0.05, "p_boot": 0.01}) == 1 and claimed_direction({"diff": 0.05}) == 0
    assert claimed_direction(None) == 0

    entry = _entry(0.20, 0.26, 0.01, 0.11)
    entry["vs_teacher"]["seed_ci"] = [-0.05, 0.17]
    table = {**TABLE, "rows": [TABLE["rows"][0], {"recipe": "ceird", "label": "CEIRD", "fractions": {"f0.2": entry}}]}
    (verdict,) = teacher_verdicts(table)
    assert verdict["verdict"] == "distillation did not help (not consistent over seeds)"
    md = format_markdown(table)
    assert "Δ +0.060 [+0.010, +0.110], p=0.500; seeds [-0.050, +0.170]" in md  # no star
    assert "Δ +0.060* [" in format_markdown(TABLE)  # the same Δ with one seed is claimed


def test_a_recipe_that_did_not_help_says_how_many_pseudo_boxes_its_teacher_gave():
    entry = _entry(0.20, 0.19, -0.04, 0.02)
    entry["pseudo"] = {"source": "offline", "n_runs": 1, "boxes_per_image": 2.1,
                       "per_class": {"active": 1.65, "obsolete": 0.45}, "images_with_box": 0.956}
    table = {**TABLE, "rows": [TABLE["rows"][0], {"recipe": "tsd", "label": "TSD", "fractions": {"f0.2": entry}}]}
    console = Console(record=True, width=250)
    print_teacher_table(table, console)
    text = " ".join(console.export_text().split())
    assert "TSD: distillation did not help" in text
    assert "pseudo-boxes from its teacher: 2.10 per image (active 1.65, obsolete 0.45); 96% of images with one" in text
    md = format_markdown(table)
    assert "Pseudo-boxes the teacher gave the student" in md and "| TSD | 2.10 per image (active 1.65" in md
