"""The smaller items of issue #21 (item 6): each a clear error naming the record, or a note."""

from __future__ import annotations

import json

import pytest

from cxrdistill.errors import CxrDistillError, ManifestError
from cxrdistill.eval.predictions import ground_truth_from_coco, load_predictions

GT = {"images": [{"id": 4, "file_name": "a.png", "width": 10, "height": 10},
                 {"id": 5, "file_name": "b.png", "width": 10, "height": 10}],
      "annotations": [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [1, 1, 3, 3]}],
      "categories": [{"id": 1, "name": "nodule"}]}


def test_evaluate_loader_names_a_list_as_image_id_instead_of_a_type_error():
    bad = json.loads(json.dumps(GT))
    bad["images"][1]["id"] = [5]
    with pytest.raises(ManifestError, match=r"image #1 \(b.png\): id must be an integer, got \[5\]"):
        ground_truth_from_coco(bad)
    bad = json.loads(json.dumps(GT))
    bad["annotations"][0]["image_id"] = [4]
    with pytest.raises(ManifestError, match=r"annotation #0: id, image_id and category_id must be integers"):
        ground_truth_from_coco(bad)


def _preds(tmp_path, rows):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    return load_predictions(path, ground_truth_from_coco(GT))


def test_prediction_image_id_4_9_is_refused_not_truncated(tmp_path):
    with pytest.raises(CxrDistillError, match=r"row 0: needs integer 'image_id'.*4\.9"):
        _preds(tmp_path, [{"image_id": 4.9, "category_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5}])
    ok = _preds(tmp_path, [{"image_id": 4.0, "category_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5}])
    assert ok.rows[0]["image_id"] == 4


def test_scores_outside_0_1_and_duplicated_rows_get_a_note(tmp_path):
    row = {"image_id": 4, "category_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5}
    preds = _preds(tmp_path, [row, dict(row), {**row, "score": 3.5}])
    assert len(preds.rows) == 2
    assert any("1 prediction score(s) lie outside [0, 1]" in n for n in preds.notes), preds.notes
    assert any("1 fully duplicated prediction row(s)" in n for n in preds.notes), preds.notes


def test_a_cache_folder_that_is_a_file_or_unwritable_is_named(tmp_path, monkeypatch):
    from cxrdistill.data.study import cache_root_checked

    file = tmp_path / "cache"
    file.write_text("x")
    monkeypatch.setenv("CXRDISTILL_CACHE", str(file))
    with pytest.raises(CxrDistillError, match=r"cache folder .*cache \(CXRDISTILL_CACHE\) is not a directory"):
        cache_root_checked()
    import tempfile

    def denied(*args, **kwargs):  # a read-only mount (chmod alone does not stop root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path / "ro"))
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(CxrDistillError, match=r"is not writable \(Permission denied\); set CXRDISTILL_CACHE"):
        cache_root_checked()


def test_predict_folder_refuses_an_escaping_symlink_by_name_and_lenient_leaves_it_out(tmp_path):
    from PIL import Image

    from cxrdistill.commands.predict import folder_manifest

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 90).save(folder / "ok.png")
    Image.new("L", (8, 8), 90).save(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(CxrDistillError) as err:
        folder_manifest(folder, ["nodule"], tmp_path / "m.json")
    assert "link.png: a symlink to" in str(err.value) and "--allow-outside-root" not in str(err.value)
    path, problems = folder_manifest(folder, ["nodule"], tmp_path / "m.json", on_error="lenient")
    assert [im["file_name"] for im in json.loads(path.read_text())["images"]] == ["ok.png"]
    assert len(problems) == 1 and "link.png" in problems[0]


def test_image_size_1_is_refused_by_key():
    from cxrdistill.config import validate_config
    from cxrdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.image_size"):
        validate_config({"method": {"name": "x"}, "data": {"image_size": 1}})
    assert validate_config({"method": {"name": "x"}, "data": {"image_size": 16}}).data.image_size == 16
