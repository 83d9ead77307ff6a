"""Lenient mode lists every record it leaves out; record text is printed verbatim (issue #21).

Written from the issue's reproductions: a truncated PNG among the training images vanished from a
lenient ``train`` without a word (and ``prepare`` accepted it, reading headers only); a file name
with ``[/]`` crashed ``prepare`` with a Rich MarkupError and a NaN box vanished from the message;
one file behind two records in train and test leaked without a warning.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from cxrdistill.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from cxrdistill.data.synthetic import make_world

    return make_world(tmp_path_factory.mktemp("lenient_world"), n_images=14, image_size=32, seed=1,
                      splits=(0.6, 0.1, 0.3))


def _copy_world(world, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(world.parent, root)
    return root / "manifest.json"


def _truncate_a_training_png(manifest_path):
    raw = json.loads(manifest_path.read_text())
    im = next(im for im in raw["images"] if im["split"] == "train")
    png = manifest_path.parent / im["file_name"]
    data = png.read_bytes()
    png.write_bytes(data[: len(data) * 6 // 10])  # header intact, pixel data cut
    return im


TRAIN = ["data.image_size=32", "data.boxed_fraction=0.6", "model.base_width=4",
         "model.options={fpn_channels: 8, fpn_levels: [3, 4], head_convs: 1}", "train.max_steps=1",
         "train.batch_size=2", "train.progress=false", "train.tensorboard=false", "method.params.n_boot=0"]


def test_lenient_train_lists_the_truncated_png_on_the_console_and_in_skipped_json(world, tmp_path):
    manifest = _copy_world(world, tmp_path)
    bad = _truncate_a_training_png(manifest)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    strict = runner.invoke(app, ["train", "--config", "supervised_detector", "-o", str(tmp_path / "s"),
                                 f"data.manifest={manifest}", cache, *TRAIN])
    assert strict.exit_code == 2 and bad["file_name"] in strict.output and "truncated" in strict.output

    res = runner.invoke(app, ["train", "--config", "supervised_detector", "-o", str(tmp_path / "run"),
                              f"data.manifest={manifest}", cache, "data.on_error=lenient", *TRAIN])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert f"skipped (cache build) image {bad['id']} ({bad['file_name']})" in out, out
    listed = [e for e in json.loads((tmp_path / "run" / "skipped.json").read_text()) if "image_id" not in e]
    assert [(e["stage"], e["id"], e["file"]) for e in listed] == [("cache build", bad["id"], bad["file_name"])]
    assert "truncated" in listed[0]["reason"]


def test_prepare_check_images_decodes_fully_and_lists_what_it_leaves_out(world, tmp_path):
    manifest = _copy_world(world, tmp_path)
    bad = _truncate_a_training_png(manifest)
    out = tmp_path / "m.json"
    headers_only = runner.invoke(app, ["prepare", "--manifest", str(manifest), "-o", str(out), "--lenient"])
    assert headers_only.exit_code == 0 and not (tmp_path / "m.json.skipped.json").exists()

    strict = runner.invoke(app, ["prepare", "--manifest", str(manifest), "-o", str(out), "--check-images"])
    assert strict.exit_code == 2 and f"image {bad['id']} ({bad['file_name']})" in strict.output
    res = runner.invoke(app, ["prepare", "--manifest", str(manifest), "-o", str(out), "--check-images",
                              "--lenient", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert f"skipped (prepare) image {bad['id']} ({bad['file_name']}): unreadable image (full decode)" in \
        " ".join(res.output.split())
    listed = json.loads((tmp_path / "m.json.skipped.json").read_text())
    images = [e for e in listed if "image_id" not in e]  # the rest: its annotations, listed as left out too
    assert [(e["stage"], e["id"], e["file"]) for e in images] == [("prepare", bad["id"], bad["file_name"])]
    assert all(e["image_id"] == bad["id"] for e in listed if "image_id" in e)
    assert bad["id"] not in {im["id"] for im in json.loads(out.read_text())["images"]}


def _png(path, size=(8, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 100).save(path)
    Image.open(path).load()


def _manifest(tmp_path, images, annotations=()):
    raw = {"categories": [{"id": 1, "name": "nodule"}], "images": images, "annotations": list(annotations)}
    path = tmp_path / "in.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("lenient", [False, True])
def test_markup_in_a_file_name_does_not_crash_prepare_and_a_nan_box_stays_visible(tmp_path, lenient):
    name = "x[/]y[bold]z.png"
    _png(tmp_path / name)
    _png(tmp_path / "ok.png")
    manifest = _manifest(tmp_path, [
        {"id": 1, "file_name": name, "width": 8, "height": 8, "split": "train"},
        {"id": 2, "file_name": "ok.png", "width": 8, "height": 8, "split": "train"},
        {"id": 3, "file_name": "gone[/].png", "width": 8, "height": 8, "split": "train"},
    ], [{"id": 7, "image_id": 2, "category_id": 1, "bbox": [float("nan"), 1, 2, 3]}])
    args = ["prepare", "--manifest", str(manifest), "-o", str(tmp_path / "out.json"), "--val-fraction", "0",
            "--test-fraction", "0"] + (["--lenient"] if lenient else [])
    res = runner.invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    out = " ".join(res.output.split())
    assert res.exit_code == (0 if lenient else 2), out
    assert "image 3 (gone[/].png)" in out and "[nan, 1, 2, 3]" in out, out
    if lenient:
        assert name in {im["file_name"] for im in json.loads((tmp_path / "out.json").read_text())["images"]}


@pytest.mark.parametrize("hash_files", [False, True])
def test_one_file_behind_two_records_in_train_and_test_is_flagged(tmp_path, hash_files):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", (8, 9))
    if hash_files:
        shutil.copy(tmp_path / "a.png", tmp_path / "a_copy.png")
    twin = "a_copy.png" if hash_files else "./a.png"
    images = [{"id": 1, "file_name": "a.png", "width": 8, "height": 8, "split": "train", "patient_id": "p1"},
              {"id": 2, "file_name": twin, "width": 8, "height": 8, "split": "test", "patient_id": "p2"},
              {"id": 3, "file_name": "b.png", "width": 8, "height": 9, "split": "test", "patient_id": "p3"}]
    manifest = _manifest(tmp_path, images)
    base = ["prepare", "--manifest", str(manifest), "-o", str(tmp_path / "out.json")] + \
        (["--hash-files"] if hash_files else [])
    strict = runner.invoke(app, base)
    assert strict.exit_code == 2, strict.output
    text = " ".join(strict.output.split())
    assert f"image 2 ({twin}): uses" in text and "image 1 (a.png)" in text and "'train' and 'test'" in text
    lenient = runner.invoke(app, [*base, "--lenient"])
    assert lenient.exit_code == 0, lenient.output
    kept = json.loads((tmp_path / "out.json").read_text())["images"]
    assert sorted(im["id"] for im in kept) == [1, 3]
    listed = json.loads((tmp_path / "out.json.skipped.json").read_text())
    assert [(e["id"], e["file"]) for e in listed] == [(2, twin)]
