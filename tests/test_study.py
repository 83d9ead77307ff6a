"""Study runner: every cell is a normal run, finished cells are never recomputed (also after a
real SIGKILL), and the table's numbers are the per-run metric files'."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from scipy import stats
from typer.testing import CliRunner

from cxrdistill.study import load_study, make_study, run_study, study_cells
from cxrdistill.study.table import seed_interval

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic={n_images: 40, image_size: 32, seed: 3}", "data.image_size=32", "train.max_steps=2",
        "train.batch_size=2", "train.progress=false", "train.tensorboard=false", "model.options.fpn_channels=8",
        "model.options.head_convs=1", "method.params.n_boot=10"]


def _spec(out: Path, seeds=(0, 1)) -> dict:
    return {"name": "tiny", "output_dir": str(out), "fractions": [0.3, 0.6], "seeds": list(seeds), "n_boot": 20,
            "overrides": TINY, "metric": "mAP@0.5",
            "recipes": {"supervised": {"config": str(ROOT / "configs/supervised_detector.yaml")},
                        "multitask": {"config": str(ROOT / "configs/supervised_multitask.yaml"),
                                      "overrides": ["data.weak_fraction=0.3"]}}}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _mtimes(cells):
    return {c.run_dir: (c.run_dir / "final_metrics.json").stat().st_mtime_ns for c in cells if c.done}


def test_study_runs_resumes_and_the_table_matches_the_run_files(tmp_path):
    spec = make_study(_spec(tmp_path / "study", seeds=(0, 1)))
    result = run_study(spec, console=Console(quiet=True), keep_going=False)
    assert len(result.ran) == 8 and not result.failed and all(c.done for c in result.cells)
    for row in result.table["rows"]:
        for fraction in (0.3, 0.6):
            cells = [c for c in result.cells if c.recipe == row["recipe"] and c.fraction == fraction]
            values = [json.loads((c.run_dir / "final_metrics.json").read_text())["mAP@0.5"] for c in cells]
            entry = row["fractions"][f"f{fraction:g}"]
            mean, low, high = seed_interval(values, "t")
            assert entry["mean"] == pytest.approx(sum(values) / len(values))
            assert entry["ci"] == [pytest.approx(low), pytest.approx(high)]
            if row["recipe"] == "multitask":  # paired comparison: same numbers as the run files
                base = [json.loads((c.run_dir / "final_metrics.json").read_text())["mAP@0.5"]
                        for c in result.cells if c.recipe == "supervised" and c.fraction == fraction]
                assert entry["vs_baseline"]["a"] == pytest.approx(sum(base) / len(base), abs=1e-6)
                assert entry["vs_baseline"]["diff"] == pytest.approx(entry["mean"] - sum(base) / len(base), abs=1e-6)
    assert (tmp_path / "study" / "table.md").is_file() and result.report_path.is_file()
    page = result.report_path.read_text()
    assert page.count("<tr>") == 1 + len(spec.recipes) and 'alt="difference vs baseline"' in page
    multitask_at_03 = result.table["rows"][1]["fractions"]["f0.3"]
    assert f"{multitask_at_03['mean']:.3f}" in page and f"Δ {multitask_at_03['vs_baseline']['diff']:+.3f}" in page
    # each cell is a normal run directory with the fraction and seed in its config
    cfg = yaml.safe_load((result.cells[-1].run_dir / "config.yaml").read_text())
    assert cfg["data"]["boxed_fraction"] == result.cells[-1].fraction and cfg["train"]["seed"] == result.cells[-1].seed

    before = _mtimes(result.cells)
    again = run_study(spec, console=Console(quiet=True), report=False)
    assert again.ran == [] and _mtimes(again.cells) == before
    # a simulated interruption: one cell lost its final metrics (its stage is done): only it reruns
    victim = result.cells[3]
    (victim.run_dir / "final_metrics.json").unlink()
    third = run_study(spec, console=Console(quiet=True), report=False)
    assert third.ran == [victim]
    assert {k: v for k, v in _mtimes(third.cells).items() if k != victim.run_dir} == \
        {k: v for k, v in before.items() if k != victim.run_dir}


@pytest.mark.slow
def test_a_killed_study_continues_without_recomputing_finished_cells(tmp_path):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(_spec(tmp_path / "study", seeds=(0,))))
    spec = load_study(study_file)
    proc = subprocess.Popen([sys.executable, "-m", "cxrdistill.cli", "compare", "--study", str(study_file),
                             "--no-report"], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(c.done for c in study_cells(spec)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _mtimes(study_cells(spec))
    assert finished, "no cell finished before the kill"
    result = run_study(spec, console=Console(quiet=True), report=False)
    assert all(c.done for c in result.cells) and not result.failed
    assert {c.run_dir for c in result.ran}.isdisjoint(finished)
    assert all(_mtimes(result.cells)[d] == t for d, t in finished.items())


def test_print_jobs_lists_one_train_command_per_missing_cell(tmp_path):
    from cxrdistill.cli import app

    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(_spec(tmp_path / "study")))
    out = CliRunner().invoke(app, ["compare", "--study", str(study_file), "--print-jobs"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("cxrdistill train --config ") for line in lines)
    assert "data.boxed_fraction=0.3" in lines[0] and "train.seed=0" in lines[0] and "--output-dir" in lines[0]
    done = study_cells(load_study(study_file))[0].run_dir
    done.mkdir(parents=True)
    (done / "final_metrics.json").write_text("{}")
    out = CliRunner().invoke(app, ["compare", "--study", str(study_file), "--print-jobs"])
    assert len(out.output.strip().splitlines()) == 7 and str(done) not in out.output


def test_seed_intervals_and_study_validation():
    mean, low, high = seed_interval([1.0, 2.0, 3.0], "t")
    half = stats.t.ppf(0.975, 2) * 1.0 / 3**0.5
    assert (mean, low, high) == (pytest.approx(2.0), pytest.approx(2 - half), pytest.approx(2 + half))
    mean, low, high = seed_interval([1.0, 2.0, 3.0], "bootstrap")
    assert 1.0 <= low < mean < high <= 3.0
    assert seed_interval([0.5], "t")[0] == 0.5 and all(map(lambda x: x != x, seed_interval([0.5], "t")[1:]))
    from cxrdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="baseline"):
        make_study({"name": "x", "output_dir": "o", "fractions": [0.1], "baseline": "nope",
                    "recipes": {"a": {"config": "c.yaml"}}})


def test_shards_split_the_matrix_without_overlap_and_refuse_bad_input(tmp_path):
    from cxrdistill.cli import app
    from cxrdistill.study.runner import parse_shard, shard_cells

    cells = study_cells(make_study(_spec(tmp_path / "study", seeds=(0, 1, 2))))
    shares = [shard_cells(cells, (k, 3)) for k in range(3)]
    assert sorted((c.run_dir for share in shares for c in share), key=str) == sorted((c.run_dir for c in cells), key=str)
    assert all(len(share) == 4 for share in shares) and shard_cells(cells, None) == cells
    # a recipe is not pinned to one runner: over the blocks every runner gets some of each recipe
    two = [shard_cells(cells, (k, 2)) for k in range(2)]
    assert all({c.recipe for c in share} == {"supervised", "multitask"} for share in two)
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(_spec(tmp_path / "study")))
    out = CliRunner().invoke(app, ["compare", "--study", str(study_file), "--shard", "3/2"])
    assert out.exit_code == 2 and "0 <= K < N" in out.output


@pytest.mark.parametrize("study_file", sorted((ROOT / "src/cxrdistill/configs/studies").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_packaged_study_builds_valid_run_configs(study_file, tmp_path):
    """Each cell's config (recipe config + study, recipe, fraction and seed overrides) validates,
    so a typo in a shipped study fails here rather than an hour into a run."""
    from cxrdistill.methods.registry import load_run_config

    spec = load_study(study_file)
    cells = study_cells(spec, tmp_path)
    assert len(cells) == sum(len(spec.row_fractions(r)) for r in spec.rows) * len(spec.seeds)
    for cell in (c for c in cells if c.seed == spec.seeds[-1]):  # every recipe and fraction
        cfg = load_run_config(cell.config, list(cell.overrides))
        assert cfg.train.seed == cell.seed
