"""What a study file can say beyond recipes × fractions × seeds: grids over any config keys,
the `labeled_fraction` axis (old `fractions:` files keep their cells), several metrics, a data
source, and `init_from` (a row's cells start from another row's cell of the same fraction and seed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console

from cxrdistill.errors import ConfigError, CxrDistillError
from cxrdistill.study import load_study, make_study, run_study, study_cells
from cxrdistill.study.runner import job_commands, ready, shard_cells
from cxrdistill.study.table import build_table, format_markdown
from test_report_fixes import TINY  # the same tiny detector settings

ROOT = Path(__file__).resolve().parents[1]
DET = str(ROOT / "configs/supervised_detector.yaml")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _study(out: Path, **extra) -> dict:
    return {"name": "tiny", "output_dir": str(out), "labeled_fraction": [0.3], "seeds": [0], "n_boot": 20,
            "overrides": TINY, **extra}


# ----------------------------------------------------------------------------- rows and cells


def test_a_recipe_grid_is_one_row_per_point_with_its_overrides_and_folder(tmp_path):
    spec = make_study(_study(tmp_path, recipes={
        "sup": {"config": DET},
        "sweep": {"config": DET, "label": "lr {lr}", "overrides": ["train.warmup_steps=1"],
                  "grid": {"train.lr": [0.001, 0.002], "method.params.augment": ["flip", "none"]}},
        "points": {"config": DET, "grid": [{"data.weak_fraction": 0.2, "train.lr": 0.003},
                                           {"data.weak_fraction": 0.5, "train.lr": 0.003}]}}))
    assert list(spec.rows) == ["sup", "sweep.lr=0.001.augment=flip", "sweep.lr=0.001.augment=none",
                               "sweep.lr=0.002.augment=flip", "sweep.lr=0.002.augment=none",
                               "points.weak_fraction=0.2.lr=0.003", "points.weak_fraction=0.5.lr=0.003"]
    assert spec.label("sweep.lr=0.002.augment=none") == "lr 0.002"
    assert spec.label("points.weak_fraction=0.5.lr=0.003") == "points (weak_fraction=0.5, lr=0.003)"
    cells = {c.recipe: c for c in study_cells(spec, tmp_path)}
    cell = cells["sweep.lr=0.002.augment=none"]
    assert cell.run_dir == tmp_path / "sweep.lr=0.002.augment=none" / "f0.3" / "seed0"
    assert cell.overrides[-6:] == ("train.warmup_steps=1", "train.lr=0.002", "method.params.augment=none",
                                   "data.boxed_fraction=0.3", "train.seed=0", "data.split_seed=0")
    from cxrdistill.methods.registry import load_run_config

    for c in cells.values():  # every generated cell is a valid run config with its point's values
        cfg = load_run_config(c.config, list(c.overrides))
        assert cfg.data.boxed_fraction == 0.3
    cfg = load_run_config(cell.config, list(cell.overrides))
    assert cfg.train.lr == 0.002 and cfg.method.params["augment"] == "none"
    assert load_run_config(cells["points.weak_fraction=0.5.lr=0.003"].config,
                           list(cells["points.weak_fraction=0.5.lr=0.003"].overrides)).data.weak_fraction == 0.5


def test_a_study_grid_multiplies_every_recipe(tmp_path):
    spec = make_study(_study(tmp_path, grid={"train.lr": [0.001, 0.002]},
                             recipes={"a": {"config": DET}, "b": {"config": DET, "grid": {"train.warmup_steps": [0, 5]}}}))
    assert list(spec.rows) == ["a.lr=0.001", "a.lr=0.002", "b.warmup_steps=0.lr=0.001", "b.warmup_steps=0.lr=0.002",
                               "b.warmup_steps=5.lr=0.001", "b.warmup_steps=5.lr=0.002"]
    assert len(study_cells(spec, tmp_path)) == 6


@pytest.mark.parametrize("bad, message", [
    ({"grid": {"data.boxed_fraction": [0.1, 0.2]}}, "labeled_fraction"),
    ({"recipes": {"a": {"config": DET, "grid": {"train.lr": []}}}}, "non-empty list"),
    ({"recipes": {"a": {"config": DET, "grid": {"train.lr": [{"x": 1}]}}}}, "plain value"),
    ({"recipes": {"a": {"config": DET, "grid": {"train.seed": [1], "data.seed": [2]}}}}, "same name"),
    ({"recipes": {"a": {"config": DET, "init_from": "nope"}}}, "names no row"),
    ({"recipes": {"a": {"config": DET, "init_from": "b"}, "b": {"config": DET, "init_from": "a"}}}, "cycle"),
    ({"recipes": {"a": {"config": DET}}, "baseline": "a.x=1"}, "baseline"),
    ({"recipes": {"a.b": {"config": DET}}}, "plain folder name"),
    ({"recipes": {"a": {"config": DET}}, "fractions": [0.3]}, "not both"),
])
def test_bad_grids_rows_and_axes_are_refused_with_the_reason(tmp_path, bad, message):
    raw = {**_study(tmp_path, recipes={"a": {"config": DET}}), **bad}
    with pytest.raises(ConfigError, match=message):
        make_study(raw)


def test_labeled_fraction_and_the_old_fractions_give_the_same_cells(tmp_path):
    recipes = {"a": {"config": DET}, "b": {"config": DET, "overrides": ["train.lr=0.002"]}}
    new = make_study({**_study(tmp_path, recipes=recipes), "labeled_fraction": [0.1, 0.2]})
    old = {**_study(tmp_path, recipes=recipes), "fractions": [0.1, 0.2]}
    old.pop("labeled_fraction")
    old = make_study(old)
    assert study_cells(new, tmp_path) == study_cells(old, tmp_path)
    assert new.axis_name == "labeled_fraction" and old.axis_name == "boxed_fraction"


def test_packaged_old_style_study_keeps_its_cells(tmp_path):
    """detection_cpu.yaml (a `fractions:` file) gives the cells the code before grids gave: the same
    folders and the same overrides (the formula of that code, written out here)."""
    spec = load_study(ROOT / "src/cxrdistill/configs/studies/detection_cpu.yaml")
    raw = yaml.safe_load((ROOT / "src/cxrdistill/configs/studies/detection_cpu.yaml").read_text())
    expected = []
    for seed in raw["seeds"]:
        for fraction in raw["fractions"]:
            for recipe, entry in raw["recipes"].items():
                overrides = (*raw["overrides"], *(entry.get("overrides") or []), f"data.boxed_fraction={fraction:g}",
                             f"train.seed={seed}", f"data.split_seed={seed}")
                expected.append((recipe, tmp_path / recipe / f"f{fraction:g}" / f"seed{seed}", overrides))
    assert [(c.recipe, c.run_dir, c.overrides) for c in study_cells(spec, tmp_path)] == expected


# ----------------------------------------------------------------------------- metrics


def test_several_metrics_give_one_table_each_from_the_run_files(tmp_path):
    from typer.testing import CliRunner

    from cxrdistill.cli import app

    raw = _study(tmp_path / "s", metrics=["mAP@0.5", "mAP@0.25", "froc"], baseline="sup",
                 recipes={"sup": {"config": DET}, "sup_lr": {"config": DET, "overrides": ["train.lr=0.01"]}})
    spec = make_study(raw)
    result = run_study(spec, console=Console(quiet=True), keep_going=False, report=True)
    table = json.loads((tmp_path / "s" / "table.json").read_text())
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    (tmp_path / "s" / "table.json").unlink()
    out = CliRunner().invoke(app, ["compare", "--study", str(study_file), "--table-only"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "s" / "table.json").read_text()) == table  # rebuilt from the cells alone
    assert table["metric"] == "mAP@0.5" and list(table["tables"]) == ["mAP@0.5", "mAP@0.25", "froc"]
    for metric, sub in table["tables"].items():
        assert sub["metric"] == metric
        for row in sub["rows"]:
            cell = next(c for c in result.cells if c.recipe == row["recipe"])
            assert row["fractions"]["f0.3"]["mean"] == pytest.approx(
                json.loads((cell.run_dir / "final_metrics.json").read_text())[metric])
    # mAP tables carry the paired comparison; froc (no paired bootstrap for it) only the seed statistics
    assert "vs_baseline" in table["tables"]["mAP@0.25"]["rows"][1]["fractions"]["f0.3"]
    assert "vs_baseline" not in table["tables"]["froc"]["rows"][1]["fractions"]["f0.3"]
    text = (tmp_path / "s" / "table.md").read_text()
    assert text.count("\n## ") + text.startswith("## ") == 3 and "labeled_fraction 0.3" in text
    assert "## froc" in text and "froc on the test split" in text
    for cell in result.cells:  # the header names the split the runs scored (a grid selected on val)
        config = yaml.safe_load((cell.run_dir / "config.yaml").read_text())
        config["method"]["params"]["eval_split"] = "val"
        (cell.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    val_text = format_markdown(build_table(spec, result.cells))
    assert "mAP@0.5 on the val split" in val_text and "paired bootstrap over val images" in val_text
    assert "test split" not in val_text
    assert result.report_path.read_text().count("<caption>") == 3
    # a metric no cell has is a typo: refused with the keys the runs do have
    typo = make_study({**_study(tmp_path / "s", recipes={"sup": {"config": DET}}), "metrics": ["mAP@0.5", "mAp"]})
    with pytest.raises(CxrDistillError, match="has no metric 'mAp'"):
        build_table(typo, study_cells(typo))


def test_a_single_metric_table_is_the_old_layout():
    table = {"study": "x", "metric": "m", "baseline": "a", "ci": "t", "n_boot": 10, "fractions": ["f0.1"],
             "fraction_key": "data.boxed_fraction", "seeds": [0],
             "rows": [{"recipe": "a", "label": "A", "fractions": {"f0.1": {"n_seeds": 1, "values": {0: 0.5},
                                                                         "mean": 0.5, "ci": [None, None]}}}]}
    text = format_markdown(table)
    assert "| recipe | boxed_fraction 0.1 |" in text and "| A | 0.500 (n=1) |" in text and "##" not in text
    assert "| recipe | labeled_fraction 0.1 |" in format_markdown({**table, "axis": "labeled_fraction"})


# ----------------------------------------------------------------------------- init_from


def test_init_from_cells_start_from_the_same_cell_of_the_named_row(tmp_path, monkeypatch):
    """Row `b` trains 0 steps of its own: with `init_from: a` its supervised stage is a's (read from
    a's run folder, the stage store is off), so its metrics are a's; `c` without it differs."""
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")
    spec = make_study(_study(tmp_path / "s", seeds=[0, 1], recipes={
        "b": {"config": DET, "overrides": ["train.max_steps=0"], "init_from": "a"},
        "a": {"config": DET, "overrides": ["train.max_steps=3"]},
        "c": {"config": DET, "overrides": ["train.max_steps=0"]}}))
    cells = study_cells(spec)
    assert [c.recipe for c in cells] == ["a", "b", "c", "a", "b", "c"]  # a row runs after its source
    b0 = cells[1]
    assert b0.after == cells[0].run_dir and b0.overrides[-1] == f"init_from={cells[0].run_dir}"
    assert not ready(b0) and all("init_from=" not in line for line in job_commands(spec))
    for k in range(2):  # a dependent cell is in its source's shard
        mine = shard_cells(cells, (k, 2))
        assert all(c.after is None or c.after in {m.run_dir for m in mine} for c in mine)
    result = run_study(spec, console=Console(quiet=True), keep_going=False, report=False)
    assert not result.failed
    metrics = {(c.recipe, c.seed): json.loads((c.run_dir / "final_metrics.json").read_text()) for c in result.cells}
    for seed in (0, 1):
        assert metrics[("b", seed)]["mAP@0.5"] == metrics[("a", seed)]["mAP@0.5"]
        marker = json.loads((tmp_path / "s/b/f0.3" / f"seed{seed}" / "checkpoints/supervised/stage_key.json").read_text())
        assert marker["source"] == "init_from"
        assert marker["init_from"] == str(tmp_path / "s/a/f0.3" / f"seed{seed}" / "checkpoints/supervised/last.pt")
    a, b, c = (torch.load(tmp_path / f"s/{r}/f0.3/seed0/model.pt", weights_only=True)["state_dict"] for r in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # b exported a's trained weights
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the control (0 steps, no init_from) is another model
    cfg = yaml.safe_load((tmp_path / "s/b/f0.3/seed0/config.yaml").read_text())
    assert cfg["init_from"] == str(tmp_path / "s/a/f0.3/seed0")
    assert "init_from" not in yaml.safe_load((tmp_path / "s/a/f0.3/seed0/config.yaml").read_text())


def test_init_from_a_grid_recipe_picks_the_row_with_the_same_point(tmp_path):
    spec = make_study(_study(tmp_path, recipes={
        "base": {"config": DET, "grid": {"train.lr": [0.001, 0.002]}},
        "ft": {"config": DET, "init_from": "base", "grid": [{"train.lr": 0.002, "data.weak_fraction": 0.5},
                                                             {"train.lr": 0.001, "data.weak_fraction": 0.5}]}}))
    assert spec.rows["ft.lr=0.002.weak_fraction=0.5"].init_from == "base.lr=0.002"
    assert spec.rows["ft.lr=0.001.weak_fraction=0.5"].init_from == "base.lr=0.001"
    from cxrdistill.methods.init_from import init_checkpoint

    with pytest.raises(ConfigError, match="no finished stage 'supervised'"):
        init_checkpoint(tmp_path / "nothing", "supervised")


# ----------------------------------------------------------------------------- data source


def _tbx_folder(root: Path) -> None:
    """A tiny TBX11K folder in the official (VOC) layout: 6 TB images with boxes, 2 healthy."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        sub = "tb" if i < 6 else "health"
        path = root / "imgs" / sub / f"{sub}{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
        lines.append(f"{sub}/{path.name}")
        if sub == "tb":
            xml = root / "annotations" / "xml" / f"{path.stem}.xml"
            xml.parent.mkdir(parents=True, exist_ok=True)
            xml.write_text(f"<annotation><size><width>64</width><height>64</height></size><object><name>"
                           f"ActiveTuberculosis</name><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>{20 + i}</xmax>"
                           "<ymax>30</ymax></bndbox></object></annotation>")
    (root / "lists").mkdir()
    (root / "lists" / "TBX11K_train.txt").write_text("\n".join(lines[:5] + lines[6:7]) + "\n")
    (root / "lists" / "TBX11K_val.txt").write_text("\n".join([lines[5], lines[7]]) + "\n")


def test_a_data_source_is_prepared_once_and_every_cell_reads_it(tmp_path):
    from cxrdistill.data.study import StudyData
    from cxrdistill.methods.registry import load_run_config
    from cxrdistill.study.data import prepare_data

    _tbx_folder(tmp_path / "tbx")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({**_study(tmp_path / "s", recipes={"sup": {"config": DET}}),
                                          "data": {"source": "tbx11k", "root": "tbx"}}))
    spec = load_study(study_file)  # the root is found next to the study file
    path = prepare_data(spec, tmp_path / "s")
    assert path == (tmp_path / "s" / "data" / "tbx11k.json").resolve()
    cell = study_cells(spec, tmp_path / "s")[0]
    assert cell.overrides[0] == f"data.manifest={path}"
    cfg = load_run_config(cell.config, list(cell.overrides))
    data = StudyData.from_config(cfg.data)
    assert len(data.dataset("train")) == 6 and len(data.dataset("val")) == 2  # images read where they are
    assert sum(im.supervision == "box" for im in data.dataset("train").images) < 6  # re-split at 0.3
    stamp = path.stat().st_mtime_ns
    assert prepare_data(spec, tmp_path / "s") == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    changed = make_study({**_study(tmp_path / "s", recipes={"sup": {"config": DET}}),
                          "data": {"source": "tbx11k", "root": str(tmp_path / "tbx"), "options": {"layout": "voc"}}})
    with pytest.raises(ConfigError, match="delete the file"):
        prepare_data(changed, tmp_path / "s")
    missing = make_study({**_study(tmp_path / "t", recipes={"sup": {"config": DET}}),
                          "data": {"source": "tbx11k", "root": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="is not a folder"):
        prepare_data(missing, tmp_path / "t")


# ----------------------------------------------------------------------------- a shared pretraining


def test_a_pretraining_row_runs_once_per_seed_and_hands_its_backbone_to_every_fraction(tmp_path):
    """`labeled_fraction: [0.3]` + `table: false` on the pretraining, `init_from: ssl` + `init_as: backbone`
    on the detector: the detector's cells at 0.3 and 0.5 both start from the one pretraining cell of
    their seed (``model.pretrained=<that cell>``; lr ~ 0 keeps the backbone where it started)."""
    from safetensors.torch import load_file

    pretrain = str(ROOT / "configs/pretrain_moco.yaml")
    common = [o for o in TINY if not o.startswith(("method.params.", "model.options."))]
    spec = make_study(_study(tmp_path / "s", labeled_fraction=[0.3, 0.5], baseline="sup", overrides=common, recipes={
        "sup": {"config": DET, "init_from": "ssl", "init_as": "backbone",
                "overrides": ["model.base_width=4", "train.lr=1e-12", "train.warmup_steps=0", "train.max_steps=1",
                              *[o for o in TINY if o.startswith(("method.params.", "model.options."))]]},
        "ssl": {"config": pretrain, "labeled_fraction": [0.3], "table": False,
                "overrides": ["model.base_width=4", "train.max_steps=2", "train.batch_size=8",
                              "method.params.queue_size=16", "method.params.dim=8", "method.params.hidden=16"]}}))
    cells = study_cells(spec)
    assert [(c.recipe, c.fraction) for c in cells] == [("ssl", 0.3), ("sup", 0.3), ("sup", 0.5)]
    ssl_dir = cells[0].run_dir
    assert cells[1].after == cells[2].after == ssl_dir
    assert cells[2].overrides[-1] == f"model.pretrained={ssl_dir}" and "init_from=" not in " ".join(cells[2].overrides)
    assert list(spec.table_rows) == ["sup"]
    result = run_study(spec, console=Console(quiet=True), keep_going=False, report=False)
    assert not result.failed, result.failed
    backbone = load_file(ssl_dir / "model.safetensors")
    for cell in cells[1:]:
        state = torch.load(cell.run_dir / "model.pt", weights_only=True)["state_dict"]
        conv1 = next(v for k, v in state.items() if k.endswith("backbone.body.conv1.weight"))
        assert torch.allclose(conv1, backbone["conv1.weight"], atol=1e-6)
    table = json.loads((tmp_path / "s" / "table.json").read_text())
    assert [r["recipe"] for r in table["rows"]] == ["sup"]
    assert table["rows"][0]["fractions"]["f0.5"]["n_seeds"] == 1


@pytest.mark.parametrize("bad, message", [
    ({"a": {"config": DET, "labeled_fraction": [0.9]}}, "not in the study's"),
    ({"a": {"config": DET, "labeled_fraction": [0.3, 0.5]}, "b": {"config": DET, "init_from": "a",
                                                                  "labeled_fraction": [0.3, 0.5, 0.7]}},
     "does not run at fraction 0.7"),
    ({"a": {"config": DET, "table": False}}, "keep at least one row"),
])
def test_bad_fraction_subsets_are_refused(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        make_study(_study(tmp_path, labeled_fraction=[0.3, 0.5, 0.7], recipes=bad))


# ----------------------------------------------------------------------------- renamed metrics

# final_metrics.json of runs written before the metric names were unified (issue 18)
OLD_AALS = {"pretrain/AUROC": 0.61, "pretrain/mFROC": 0.45, "student/AUROC": 0.59, "student/AUROC_lo": 0.55,
            "student/mFROC": 0.48, "teacher/AUROC": 0.58, "teacher/mFROC": 0.46, "teacher/mFROC_lo": 0.42,
            "AUROC": 0.58, "AUROC_lo": 0.54, "AUROC_hi": 0.62, "mFROC": 0.46, "mFROC_lo": 0.42, "mFROC_hi": 0.50,
            "mAP@0.5": 0.0}
OLD_TS_CLS = {"macro_AUROC": 0.81, "teacher/macro_AUROC": 0.7, "delta_teacher/macro_AUROC": 0.11,
              "teacher_auroc": 0.7, "teacher_auroc_ci_low": 0.6, "intermediate1_auroc": 0.75,
              "student1_auroc": 0.81, "student1_minus_teacher": 0.11, "student1_minus_teacher_ci_low": 0.02}
OLD_OXNET = {"mAP": 0.3, "mAP_lo": 0.2, "mAP_hi": 0.4, "n_box": 12.0, "teacher/mAP_lo": 0.1}


@pytest.mark.parametrize(("old", "new"), [
    (OLD_AALS, {"macro_AUROC": "AUROC", "macro_AUROC_ci_low": "AUROC_lo", "modified_froc": "mFROC",
                "modified_froc_ci_high": "mFROC_hi", "student/macro_AUROC": "student/AUROC",
                "student/macro_AUROC_ci_low": "student/AUROC_lo", "teacher/modified_froc_ci_low": "teacher/mFROC_lo",
                "pretrain/modified_froc": "pretrain/mFROC", "mAP@0.5": "mAP@0.5"}),
    (OLD_TS_CLS, {"macro_AUROC": "macro_AUROC", "teacher/macro_AUROC": "teacher/macro_AUROC",
                  "teacher/macro_AUROC_ci_low": "teacher_auroc_ci_low", "intermediate1/macro_AUROC": "intermediate1_auroc",
                  "student1/delta_teacher/macro_AUROC": "student1_minus_teacher",
                  "student1/delta_teacher/macro_AUROC_ci_low": "student1_minus_teacher_ci_low"}),
    (OLD_OXNET, {"mAP_ci_low": "mAP_lo", "mAP_ci_high": "mAP_hi", "data/n_box": "n_box",
                 "teacher/mAP_ci_low": "teacher/mAP_lo"}),
], ids=["aals", "teacher_student_cls", "oxnet"])
def test_an_old_study_folder_builds_its_table_under_the_new_metric_names(tmp_path, old, new):
    """`compare --table-only` on finished cells whose final_metrics.json has the old keys: each new
    metric is read from its old key (`study.table.RENAMED`); a metric neither has is still a typo."""
    from typer.testing import CliRunner

    from cxrdistill.cli import app
    from cxrdistill.study.table import old_names

    raw = _study(tmp_path / "s", seeds=[0, 1], metrics=list(new), recipes={"old": {"config": DET}})
    spec = make_study(raw)
    for cell in study_cells(spec):  # hand-written finished cells, seed 1 a little higher
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "final_metrics.json").write_text(json.dumps({k: v + 0.01 * cell.seed for k, v in old.items()}))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["compare", "--study", str(study_file), "--table-only"])
    assert out.exit_code == 0, out.output
    table = json.loads((tmp_path / "s" / "table.json").read_text())
    assert list(table["tables"]) == list(new)
    for metric, key in new.items():
        assert metric == key or key in old_names(metric)
        entry = table["tables"][metric]["rows"][0]["fractions"]["f0.3"]
        assert entry["n_seeds"] == 2 and "missing" not in entry, metric
        assert entry["mean"] == pytest.approx(old[key] + 0.005), metric
    text = (tmp_path / "s" / "table.md").read_text()
    assert all(f"## {metric}" in text for metric in new)
    # a metric with no old key is not guessed
    typo = make_study({**raw, "metrics": ["modified_froc_ci_lo"]})
    with pytest.raises(CxrDistillError, match="has no metric 'modified_froc_ci_lo'"):
        build_table(typo, study_cells(typo))


def test_old_names_map_each_renamed_metric_and_keep_the_stage_prefix():
    from cxrdistill.study.table import old_names

    assert old_names("modified_froc") == ["mFROC"] and old_names("teacher/modified_froc") == ["teacher/mFROC"]
    assert old_names("teacher/macro_AUROC") == ["teacher_auroc", "teacher/AUROC"]  # TS-cls, AALS
    assert old_names("student2/delta_teacher/macro_AUROC_ci_high") == ["student2_minus_teacher_ci_high"]
    assert old_names("report_gen2/macro_AUROC") == ["report_gen2/AUROC"]
    assert old_names("mAP@0.5") == [] and old_names("froc") == []


def test_own_teacher_delta_without_per_image_scores_is_the_runs_recorded_paired_delta(tmp_path):
    """Teacher–student classification on a binary task writes no per-class image scores: the table's
    Δ vs own teacher is then what the run recorded (its paired bootstrap) for one seed, the mean and
    an interval over seeds for several; the Δ vs baseline is left out with a note instead of failing."""
    from cxrdistill.study.table import metric_table

    def fill(spec):
        for cell in study_cells(spec):
            cell.run_dir.mkdir(parents=True)
            (cell.run_dir / "final_metrics.json").write_text(json.dumps({"macro_AUROC": 0.8 + 0.01 * cell.seed}))
            delta = 0.1 + 0.02 * cell.seed
            (cell.run_dir / "teacher_comparison.json").write_text(json.dumps({
                "delta_teacher/macro_AUROC": delta, "delta_teacher/macro_AUROC_ci_low": delta - 0.05,
                "delta_teacher/macro_AUROC_ci_high": delta + 0.05, "delta_teacher/macro_AUROC_p_boot": 0.01}))
        return study_cells(spec)

    recipes = {"a": {"config": DET}, "b": {"config": DET, "overrides": ["train.lr=0.01"]}}
    one = make_study(_study(tmp_path / "one", metric="macro_AUROC", recipes=recipes))
    entry = metric_table(one, fill(one), "macro_AUROC")["rows"][1]["fractions"]["f0.3"]
    assert entry["vs_teacher"]["diff"] == pytest.approx(0.1) and entry["vs_teacher"]["ci_low"] == pytest.approx(0.05)
    assert entry["vs_teacher"]["p_boot"] == 0.01 and "vs_baseline" not in entry and "vs_baseline_note" in entry
    two = make_study(_study(tmp_path / "two", seeds=[0, 1], metric="macro_AUROC", recipes=recipes))
    entry = metric_table(two, fill(two), "macro_AUROC")["rows"][0]["fractions"]["f0.3"]
    assert entry["vs_teacher"]["diff"] == pytest.approx(0.11) and entry["vs_teacher"]["seeds"] == 2
    assert entry["vs_teacher"]["ci_low"] < 0.11 < entry["vs_teacher"]["ci_high"] and entry["vs_teacher"]["p_boot"] is None
    assert "Δ +0.110 [" in format_markdown(metric_table(two, study_cells(two), "macro_AUROC"))


def test_command_line_overrides_win_over_the_recipes_own(tmp_path):
    """`cxrdistill compare --study X train.max_steps=3` shrinks every cell, also a row that sets
    train.max_steps itself (it used to be applied before the row's overrides and silently lost)."""
    raw = _study(tmp_path / "s", recipes={"long": {"config": DET, "overrides": ["train.max_steps=200"]},
                                         "plain": {"config": DET}})
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    spec = load_study(study_file, ["train.max_steps=3"])
    from cxrdistill.config import load_config

    for cell in study_cells(spec):
        assert load_config(cell.config, list(cell.overrides)).train.max_steps == 3, cell.recipe
    assert load_config(study_cells(load_study(study_file))[0].config,
                       list(study_cells(load_study(study_file))[0].overrides)).train.max_steps == 200


# ----------------------------------------------------------------------------- compare_to


def test_compare_to_pairs_a_row_with_the_row_it_names_besides_the_baseline(tmp_path):
    """Three tiny runs: `b` names `c`; its `vs_reference` is the paired bootstrap of b − c over the same
    test images (= `paired_over_seeds` on those two folders), shown in the Markdown and on the console."""
    import io

    from cxrdistill.study.table import paired_over_seeds, print_table

    raw = _study(tmp_path / "s", baseline="a", recipes={
        "a": {"config": DET}, "b": {"config": DET, "overrides": ["train.lr=0.01"], "compare_to": "c"},
        "c": {"config": DET, "overrides": ["train.lr=0.003"], "label": "C run"}})
    spec = make_study(raw)
    run_study(spec, console=Console(quiet=True), keep_going=False, report=True)
    table = json.loads((tmp_path / "s" / "table.json").read_text())
    b = next(r for r in table["rows"] if r["recipe"] == "b")["fractions"]["f0.3"]
    c = next(r for r in table["rows"] if r["recipe"] == "c")["fractions"]["f0.3"]
    assert b["vs_reference"]["row"] == "c" and "vs_reference" not in c
    assert b["vs_baseline"]["row"] == "a"
    root = tmp_path / "s"
    expected = paired_over_seeds([(root / "c/f0.3/seed0", root / "b/f0.3/seed0")], "mAP@0.5", spec.n_boot)
    assert b["vs_reference"]["diff"] == pytest.approx(expected.diff)
    assert b["vs_reference"]["diff"] == pytest.approx(b["mean"] - c["mean"], abs=1e-9)
    text = (root / "table.md").read_text()
    assert "vs the row each recipe names" in text and "| b | C run | Δ" in text
    console = Console(file=io.StringIO(), width=200)
    print_table(table, console)
    assert "vs c Δ" in console.file.getvalue()
    assert "vs c Δ" in next(root.glob("*.html")).read_text()


@pytest.mark.parametrize("bad, message", [
    ({"a": {"config": DET, "compare_to": "nope"}}, "compare_to: 'nope' names no row"),
    ({"a": {"config": DET}, "p": {"config": DET, "table": False}, "b": {"config": DET, "compare_to": "p"}},
     "is not one of the table's rows"),
    ({"a": {"config": DET, "labeled_fraction": [0.3]}, "b": {"config": DET, "compare_to": "a"}},
     "does not run at every fraction"),
])
def test_bad_compare_to_is_refused(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        make_study(_study(tmp_path, labeled_fraction=[0.3, 0.5], recipes=bad))


def test_with_two_seeds_a_delta_also_gets_its_interval_over_seeds(tmp_path):
    """Two seeds: each comparison carries every seed's own paired Δ and the t-interval of their mean,
    besides the bootstrap over test images of the seed-averaged Δ."""
    from cxrdistill.study.table import paired_over_seeds, seed_interval

    raw = _study(tmp_path / "s", seeds=[0, 1], baseline="a",
                 recipes={"a": {"config": DET}, "b": {"config": DET, "overrides": ["train.lr=0.01"]}})
    spec = make_study(raw)
    run_study(spec, console=Console(quiet=True), keep_going=False, report=False)
    table = json.loads((tmp_path / "s" / "table.json").read_text())
    cmp = table["rows"][1]["fractions"]["f0.3"]["vs_baseline"]
    root = tmp_path / "s"
    per_seed = [paired_over_seeds([(root / f"a/f0.3/seed{s}", root / f"b/f0.3/seed{s}")], "mAP@0.5", spec.n_boot).diff
                for s in (0, 1)]
    assert cmp["seed_diffs"] == pytest.approx(per_seed)
    mean, low, high = seed_interval(per_seed, "t")
    assert cmp["diff"] == pytest.approx(mean) and cmp["seed_ci"] == pytest.approx([low, high])
    assert f"seeds [{low:+.3f}, {high:+.3f}]" in (root / "table.md").read_text()


# ----------------------------------------------------------------------------- a changed study file


def test_a_finished_cell_is_not_reused_after_the_study_changed_its_settings(tmp_path):
    """Edit a setting of a finished cell in the study file: the study names the cell and the key and
    stops (the table too); --rerun-changed moves the old run aside and runs the cell again. A
    setting that does not change numbers (train.progress) is not a change."""
    from typer.testing import CliRunner

    from cxrdistill.cli import app
    from cxrdistill.study.finished import changed_cells

    raw = _study(tmp_path / "s", recipes={"sup": {"config": DET}})
    spec = load_study(_write(tmp_path / "study.yaml", raw))
    first = run_study(spec, console=Console(quiet=True), report=False)
    (cell,) = first.ran
    assert changed_cells(study_cells(load_study(tmp_path / "study.yaml", ["train.progress=true"]))) == {}

    edited = {**raw, "overrides": [*raw["overrides"], "train.lr=0.0123"]}
    study_file = _write(tmp_path / "study.yaml", edited)
    with pytest.raises(CxrDistillError, match=r"(?s)1 finished cell.*sup/f0.3/seed0: train.lr: .* -> 0.0123.*--rerun-changed"):
        run_study(load_study(study_file), console=Console(quiet=True), report=False)
    out = CliRunner().invoke(app, ["compare", "--study", str(study_file), "--table-only"])
    assert out.exit_code == 2 and "different config" in out.output
    assert json.loads((cell.run_dir / "run.json").read_text())["train.lr"] != 0.0123  # nothing was touched

    again = run_study(load_study(study_file), console=Console(quiet=True), report=False, rerun_changed=True)
    assert [c.run_dir for c in again.ran] == [cell.run_dir]
    assert (cell.run_dir.parent / "seed0.old-1" / "final_metrics.json").is_file()  # kept, not deleted
    assert json.loads((cell.run_dir / "run.json").read_text())["train.lr"] == 0.0123
    assert run_study(load_study(study_file), console=Console(quiet=True), report=False).ran == []


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------- the results archive


def test_an_archived_study_rebuilds_its_table_after_its_folder_is_lost(tmp_path):
    """`--archive DIR`: one small file per finished cell (no checkpoint); a wiped study folder gets its
    finished cells back, runs nothing and builds the same table (paired Δ vs own teacher included);
    an archived cell made with other settings is refused like any finished one."""
    import gzip

    from typer.testing import CliRunner

    from cxrdistill.cli import app
    from cxrdistill.study.archive import archive_path

    archive = tmp_path / "archive"
    raw = _study(tmp_path / "s", recipes={"sup": {"config": DET}, "tsd": {"config": str(ROOT / "configs/tsd.yaml")}})
    study_file = _write(tmp_path / "study.yaml", raw)
    first = run_study(load_study(study_file), console=Console(quiet=True), report=False, archive=archive)
    assert len(first.ran) == 2
    files = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file())
    assert files == ["sup/f0.3/seed0.json.gz", "tsd/f0.3/seed0.json.gz"]
    payload = json.loads(gzip.decompress((archive / files[1]).read_bytes()))
    names = set(payload["files"])
    assert {"final_metrics.json", "run.json", "config.yaml", "metrics.csv", "teacher_comparison.json",
            "eval/predictions.json", "eval_teacher/predictions.json"} <= names
    assert not any(n.endswith((".pt", ".safetensors")) or n.startswith("checkpoints") for n in names)

    import shutil

    shutil.rmtree(tmp_path / "s")
    again = run_study(load_study(study_file), console=Console(quiet=True), report=False, archive=archive)
    assert again.ran == [] and all(c.done for c in again.cells)
    assert again.table == first.table
    assert (tmp_path / "s" / "tsd" / "f0.3" / "seed0" / "eval_teacher" / "predictions.json").is_file()

    shutil.rmtree(tmp_path / "s")
    edited = _write(tmp_path / "study.yaml", {**raw, "overrides": [*raw["overrides"], "train.lr=0.0123"]})
    out = CliRunner().invoke(app, ["compare", "--study", str(edited), "--table-only", "--archive", str(archive)])
    assert out.exit_code == 2 and "different config" in out.output and "train.lr" in out.output

    shutil.rmtree(tmp_path / "s")
    cell = study_cells(load_study(study_file))[0]
    archive_path(archive, tmp_path / "s", cell).write_bytes(gzip.compress(json.dumps(
        {"format": "cxrdistill-cell/1", "files": {"../evil.json": "{}", "final_metrics.json": "{}",
                                                   "run.json": "{}"}}).encode()))
    with pytest.raises(CxrDistillError, match=r"seed0.json.gz: holds files an archive never writes"):
        run_study(load_study(study_file), console=Console(quiet=True), report=False, archive=archive)
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "s" / "sup" / "evil.json").exists()


def test_an_init_from_study_restored_into_another_folder_is_not_a_changed_config(tmp_path, monkeypatch):
    """`init_from` puts the source cell's path in the config; the same cell under another study folder
    (an archive restored elsewhere) is the same setting, another cell is not."""
    import shutil

    from cxrdistill.study.finished import changed_cells

    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")
    raw = _study(tmp_path / "s", recipes={"a": {"config": DET}, "b": {"config": DET, "init_from": "a"}})
    archive = tmp_path / "archive"
    run_study(make_study(raw), console=Console(quiet=True), report=False, archive=archive)
    archived = {p: p.read_bytes() for p in archive.rglob("*.json.gz")}
    moved = {**raw, "output_dir": str(tmp_path / "elsewhere")}
    again = run_study(make_study(moved), console=Console(quiet=True), report=False, archive=archive)
    assert again.ran == [] and all(c.done for c in again.cells)
    assert {p: p.read_bytes() for p in archive.rglob("*.json.gz")} == archived  # restored, not rewritten
    b = study_cells(make_study(moved))[1]
    assert json.loads((b.run_dir / "run.json").read_text())["init_from"] == str(tmp_path / "s/a/f0.3/seed0")
    shutil.rmtree(tmp_path / "elsewhere" / "a")
    other = {**moved, "recipes": {"a": {"config": DET}, "c": {"config": DET}, "b": {"config": DET, "init_from": "c"}}}
    (cell,) = [c for c in study_cells(make_study(other)) if c.recipe == "b"]
    assert [k for k, _, _ in changed_cells([cell])[cell]] == ["init_from"]


def test_cells_patterns_run_only_the_chosen_cells_and_a_typo_is_an_error(tmp_path):
    from typer.testing import CliRunner

    from cxrdistill.cli import app
    from cxrdistill.study.runner import cell_key, select_cells

    raw = _study(tmp_path / "s", seeds=[0, 1], labeled_fraction=[0.3, 0.5],
                 recipes={"sup": {"config": DET}, "other": {"config": DET}})
    spec = make_study(raw)
    cells = study_cells(spec)
    assert [cell_key(c) for c in select_cells(cells, ["sup/*/seed1"])] == ["sup/f0.3/seed1", "sup/f0.5/seed1"]
    assert len(select_cells(cells, ["*/f0.5/*", "other/f0.3/seed0"])) == 5 and select_cells(cells, None) == cells
    with pytest.raises(CxrDistillError, match=r"--cells 'sup/f0.2/\*' matches no cell .*sup/f0.3/seed0"):
        select_cells(cells, ["sup/f0.2/*"])
    result = run_study(spec, console=Console(quiet=True), report=False, only=["other/f0.3/seed0"])
    assert [cell_key(c) for c in result.ran] == ["other/f0.3/seed0"]
    study_file = _write(tmp_path / "study.yaml", raw)
    out = CliRunner().invoke(app, ["compare", "--study", str(study_file), "--print-jobs", "--cells", "sup/f0.5/*"])
    assert out.exit_code == 0, out.output
    jobs = [line for line in out.output.splitlines() if line.startswith("cxrdistill train")]
    assert [j.split("--output-dir ")[1] for j in jobs] == [str(tmp_path / "s/sup/f0.5/seed0"), str(tmp_path / "s/sup/f0.5/seed1")]


def test_a_cell_others_start_from_is_not_restored_while_one_of_them_still_has_to_run(tmp_path, monkeypatch):
    """An archive holds no weights: when a cell starting from `a` (init_from) is not archived, `a`
    runs again rather than being restored without its checkpoint."""
    import shutil

    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")
    raw = _study(tmp_path / "s", recipes={"a": {"config": DET}, "b": {"config": DET, "init_from": "a"}})
    archive = tmp_path / "archive"
    run_study(make_study(raw), console=Console(quiet=True), report=False, archive=archive)
    (archive / "b" / "f0.3" / "seed0.json.gz").unlink()
    shutil.rmtree(tmp_path / "s")
    again = run_study(make_study(raw), console=Console(quiet=True), report=False, archive=archive)
    assert [c.recipe for c in again.ran] == ["a", "b"] and not again.failed
