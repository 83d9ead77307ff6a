"""A run folder knows the config of what it holds (issue #21, item 2).

`cxrdistill train --config tsd -o RUN ... train.max_steps=80 train.lr=0.01 train.seed=7` on a
folder holding a run made with other settings used to return at once with the old model; now it
stops, lists the differing keys and offers --no-resume, which moves the old run aside.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cxrdistill.cli import app

runner = CliRunner()

TINY = ["data.synthetic={n_images: 16, image_size: 32, splits: [0.6, 0.1, 0.3]}", "data.image_size=32",
        "model.base_width=4", "model.options={fpn_channels: 8, fpn_levels: [3, 4], head_convs: 1}",
        "train.batch_size=3", "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=2",
        "method.params.student_steps=2", "method.params.n_boot=0", "method.params.pseudo_score_thresh=0.01"]


def _train(out, *extra):
    return runner.invoke(app, ["train", "--config", "tsd", "-o", str(out), *TINY, *extra])


def _weights(out):
    return torch.load(out / "model.pt", weights_only=True)


def test_a_different_config_in_a_run_folder_stops_and_no_resume_moves_it_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")  # the teacher trains in this run folder
    out = tmp_path / "RUN"
    first = _train(out, "train.max_steps=2")
    assert first.exit_code == 0, first.output
    old_model = (out / "model.pt").read_bytes()
    old_config = (out / "config.yaml").read_text()
    assert json.loads((out / "run.json").read_text())["train.max_steps"] == 2

    again = _train(out, "train.max_steps=3", "train.lr=0.01", "train.seed=7")
    assert again.exit_code == 2, again.output
    text = " ".join(again.output.split())
    for key in ("train.max_steps: 2 -> 3", "train.lr: 0.002 -> 0.01", "train.seed: 0 -> 7"):
        assert key in text, text
    assert "3 key(s) differ" in text and "--no-resume" in text
    assert (out / "model.pt").read_bytes() == old_model  # nothing was touched
    assert (out / "config.yaml").read_text() == old_config and not (out / "config.previous.yaml").exists()

    same = _train(out, "train.max_steps=2")  # the same config still resumes (finished stages reused)
    assert same.exit_code == 0, same.output
    assert (out / "model.pt").read_bytes() == old_model

    fresh = _train(out, "train.max_steps=3", "train.lr=0.01", "train.seed=7", "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert (tmp_path / "RUN.old-1" / "model.pt").read_bytes() == old_model  # the old run, moved aside
    assert (out / "model.pt").read_bytes() != old_model
    assert json.loads((out / "run.json").read_text())["train.seed"] == 7
    done = json.loads((out / "checkpoints" / "supervised" / "done.json").read_text())
    assert done["step"] == 3 and done["resumed_from"] is None


def test_a_changed_manifest_content_is_a_different_run(tmp_path):
    from cxrdistill.config import validate_config
    from cxrdistill.engine.run_dir import MANIFEST_KEY, RunDirectory, RunMismatchError

    manifest = tmp_path / "m.json"
    manifest.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    cfg = validate_config({"method": {"name": "x"}, "data": {"manifest": str(manifest)}})
    run = RunDirectory(tmp_path / "run", min_free_bytes=0)
    run.check_run(cfg, resume=True)
    run.write_config(cfg)
    run.check_run(cfg, resume=True)  # same content: fine
    manifest.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "b"}]}')
    with pytest.raises(RunMismatchError, match=r"1 key\(s\) differ: data.manifest \(sha256"):
        run.check_run(cfg, resume=True)
    assert MANIFEST_KEY in json.loads(run.fingerprint_path.read_text())
    # keys that do not change the numbers (progress bar, output folder) are not a different run
    run2 = RunDirectory(tmp_path / "run2", min_free_bytes=0)
    run2.check_run(cfg, resume=True)
    run2.check_run(cfg.model_copy(update={"output_dir": tmp_path / "elsewhere"}), resume=True)


def test_the_same_manifest_records_elsewhere_are_the_same_run(tmp_path):
    """A manifest saved in another folder (another checkout) differs only in `info.image_root`: the
    run resumes; a changed record is still a different run."""
    from cxrdistill.config import validate_config
    from cxrdistill.data.manifest import manifest_records_sha256
    from cxrdistill.engine.run_dir import RunDirectory, RunMismatchError

    body = '"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]'
    here, there = tmp_path / "a" / "m.json", tmp_path / "b" / "c" / "m.json"
    here.parent.mkdir(parents=True)
    there.parent.mkdir(parents=True)
    here.write_text('{"info": {"image_root": "../data", "source": "x"}, ' + body + "}")
    there.write_text('{\n "info": {"source": "x", "image_root": "../../data"},\n ' + body + "\n}\n")
    assert manifest_records_sha256(here) == manifest_records_sha256(there)
    run = RunDirectory(tmp_path / "run", min_free_bytes=0)
    run.check_run(validate_config({"method": {"name": "x"}, "data": {"manifest": str(here)}}), resume=True)
    run.check_run(validate_config({"method": {"name": "x"}, "data": {"manifest": str(there)}}), resume=True)
    there.write_text('{"info": {"source": "y", "image_root": "../../data"}, ' + body + "}")
    assert manifest_records_sha256(here) != manifest_records_sha256(there)
    with pytest.raises(RunMismatchError, match=r"data.manifest \(sha256 of its records\)"):
        run.check_run(validate_config({"method": {"name": "x"}, "data": {"manifest": str(there)}}), resume=True)


def test_a_run_recorded_with_the_whole_file_sha256_is_upgraded_only_when_the_bytes_match(tmp_path):
    from cxrdistill.atomic import file_sha256
    from cxrdistill.config import validate_config
    from cxrdistill.data.manifest import manifest_records_sha256
    from cxrdistill.engine.run_dir import (
        LEGACY_MANIFEST_KEY,
        MANIFEST_KEY,
        RunDirectory,
        RunMismatchError,
        run_fingerprint,
        upgrade_fingerprint,
    )

    manifest = tmp_path / "m.json"
    manifest.write_text('{"info": {"image_root": ".."}, "images": [], "annotations": [], "categories": []}')
    cfg = validate_config({"method": {"name": "x"}, "data": {"manifest": str(manifest)}})
    legacy = {k: v for k, v in run_fingerprint(cfg).items() if k != MANIFEST_KEY}
    legacy[LEGACY_MANIFEST_KEY] = file_sha256(manifest)
    upgraded = upgrade_fingerprint(legacy, manifest)
    assert LEGACY_MANIFEST_KEY not in upgraded and upgraded[MANIFEST_KEY] == manifest_records_sha256(manifest)
    run = RunDirectory(tmp_path / "run", min_free_bytes=0)
    run.fingerprint_path.write_text(json.dumps(legacy))
    run.check_run(cfg, resume=True)  # the same bytes: the same run, now recorded the new way
    assert MANIFEST_KEY in json.loads(run.fingerprint_path.read_text())
    legacy[LEGACY_MANIFEST_KEY] = "0" * 64  # other bytes: cannot tell, so it is listed
    assert "recorded before" in upgrade_fingerprint(legacy, manifest)[MANIFEST_KEY]
    run.fingerprint_path.write_text(json.dumps(legacy))
    with pytest.raises(RunMismatchError, match="whole-file sha256"):
        run.check_run(cfg, resume=True)


def test_a_legacy_run_from_a_checkout_at_another_depth_is_recognised(tmp_path):
    """A run recorded the whole file's sha256 while the manifest said ``../../data``; the same
    manifest saved one folder shallower says ``../data``: same records, recognised as the same run."""
    from cxrdistill.atomic import file_sha256
    from cxrdistill.config import validate_config
    from cxrdistill.data.manifest import Manifest, load_manifest
    from cxrdistill.engine.run_dir import LEGACY_MANIFEST_KEY, MANIFEST_KEY, run_fingerprint, upgrade_fingerprint

    (tmp_path / "data").mkdir()
    (tmp_path / "m.json").write_text('{"categories": [{"id": 1, "name": "a"}], "images": [], "annotations": []}')
    manifest: Manifest = load_manifest(tmp_path / "m.json", root=tmp_path / "data")
    deep, shallow = tmp_path / "x" / "y" / "m.json", tmp_path / "y" / "m.json"
    deep.parent.mkdir(parents=True)
    shallow.parent.mkdir(parents=True)
    manifest.save(deep)
    manifest.save(shallow)
    assert deep.read_bytes() != shallow.read_bytes()
    cfg = validate_config({"method": {"name": "x"}, "data": {"manifest": str(shallow)}})
    old = {k: v for k, v in run_fingerprint(cfg).items() if k != MANIFEST_KEY}
    old[LEGACY_MANIFEST_KEY] = file_sha256(deep)
    assert upgrade_fingerprint(old, shallow)[MANIFEST_KEY] == run_fingerprint(cfg)[MANIFEST_KEY]
