"""AALS recipe: R / N / P targets, the KL + EMA wiring of one step, and an end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cxrdistill.config import validate_config
from cxrdistill.data.manifest import load_manifest
from cxrdistill.data.splits import make_semi_split
from cxrdistill.data.synthetic import make_world
from cxrdistill.engine.ema import EMATeacher
from cxrdistill.methods.aals import (
    AalsParams,
    aals_losses,
    map_matrices,
    map_targets,
    nested_subset,
    project_maps,
    split_sets,
    supervised_map_loss,
    view_pair,
)
from cxrdistill.methods.registry import get_method, validate_method_params
from cxrdistill.models.heatmap import HeatmapFPN
from cxrdistill.pseudo.sharpening import asymmetric_sharpen, kl_map_loss

SIZE, STRIDE, C = 32, 4, 2


def batch_rnp() -> dict:
    """Image 0 in R (a class-1 box), image 1 image-level with class 0 present (P for 0, N for 1),
    image 2 image-level with nothing present (N for both classes)."""
    return {
        "image": torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),
        "boxes": [torch.tensor([[4.0, 4, 20, 12]]), torch.zeros(0, 4), torch.zeros(0, 4)],
        "labels": [torch.tensor([1]), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)],
        "image_labels": torch.tensor([[0.0, 1], [1, 0], [0, 0]]),
        "has_boxes": torch.tensor([True, False, False]),
        "has_image_labels": torch.tensor([True, True, True]),
        "image_id": torch.tensor([10, 11, 12]),
    }


def tiny(seed: int = 0) -> HeatmapFPN:
    torch.manual_seed(seed)
    return HeatmapFPN(C, base_width=4, fpn_channels=8)


def test_targets_split_r_n_p_per_class():
    t = map_targets(batch_rnp(), C, STRIDE, positive_ids=torch.tensor([11]))
    assert t.masks.shape == (3, C, SIZE // STRIDE, SIZE // STRIDE)
    assert t.masks[0, 1].sum() > 0 and t.masks[0, 0].sum() == 0  # R: the box, drawn in its class
    assert t.masks[1:].sum() == 0  # N (and P) images: all-zero masks
    assert torch.equal(t.supervised, torch.tensor([[1.0, 1], [0, 1], [1, 1]]))
    assert torch.equal(t.positive, torch.tensor([[0.0, 0], [1, 0], [0, 0]]))
    unused = map_targets(batch_rnp(), C, STRIDE, positive_ids=torch.tensor([], dtype=torch.long))
    assert unused.positive.sum() == 0  # a P image outside the used fraction gives no KL term
    assert torch.equal(unused.supervised, t.supervised)  # ... but keeps its negative classes


def test_p_maps_contribute_only_the_kl_term():
    targets = map_targets(batch_rnp(), C, STRIDE, positive_ids=torch.tensor([11]))
    logits = torch.randn(3, C, 8, 8, requires_grad=True)
    teacher = torch.rand(3, C, 8, 8) * 0.3
    losses = aals_losses(logits, teacher, targets, t=0.4, a0=4.0)
    (losses["sup"] + losses["semi"]).backward()
    sup_grad = torch.autograd.grad(supervised_map_loss(logits, targets), logits)[0]
    assert sup_grad[1, 0].abs().sum() == 0  # the P map (image 1, class 0) gets no BCE gradient
    semi_grad = torch.autograd.grad(kl_map_loss(logits, asymmetric_sharpen(teacher), targets.positive[:, :, None, None]),
                                    logits)[0]
    assert semi_grad[1, 0].abs().sum() > 0
    nonzero = semi_grad.abs().flatten(2).sum(2) > 0
    assert torch.equal(nonzero, targets.positive.bool())  # and the KL touches nothing else
    # Eq. (5) with each term weighted by its share of the 6 maps: 5 supervised, 1 positive
    target = asymmetric_sharpen(teacher, t=0.4, a0=4.0)
    expected_semi = kl_map_loss(logits[1:2, 0:1], target[1:2, 0:1]) / 6
    assert torch.allclose(losses["semi"], expected_semi)
    assert torch.allclose(losses["sup"], supervised_map_loss(logits, targets) * 5 / 6)


def test_one_step_moves_teacher_by_one_minus_alpha_times_student_minus_teacher():
    student = tiny()
    teacher = EMATeacher(student, decay=0.9)
    batch = batch_rnp()
    targets = map_targets(batch, C, STRIDE, positive_ids=torch.tensor([11]))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    before_t = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        teacher_probs = torch.sigmoid(teacher(batch["image"]))
    losses = aals_losses(student(batch["image"]), teacher_probs, targets, t=0.4, a0=4.0)
    (losses["sup"] + losses["semi"]).backward()
    optimizer.step()
    teacher.update(student)
    moved = 0
    for t_old, t_new, s in zip(before_t, teacher.module.parameters(), student.parameters()):
        assert torch.allclose(t_new - t_old, 0.1 * (s.detach() - t_old), atol=1e-6)
        moved += int(not torch.equal(t_new, t_old))
    assert moved > 0


def test_no_sharpening_at_a0_one_is_plain_mean_teacher_distillation():
    targets = map_targets(batch_rnp(), C, STRIDE, positive_ids=torch.tensor([11]))
    teacher = 0.05 + 0.6 * torch.rand(3, C, 8, 8)  # straddles t: the pixels above t are lifted
    logits = torch.logit(teacher)  # the student already equals the teacher
    losses = aals_losses(logits, teacher, targets, t=0.4, a0=1.0)
    assert losses["semi"].abs() < 1e-6
    assert aals_losses(logits, teacher, targets, t=0.4, a0=4.0)["semi"] > 1e-3


def test_nested_positive_subsets():
    ids = list(range(100))
    small, large = nested_subset(ids, 0.2, 0), nested_subset(ids, 0.6, 0)
    assert len(small) == 20 and len(large) == 60 and set(small) <= set(large)
    assert nested_subset(ids, 0.0, 0) == [] and nested_subset(ids, 1.0, 0) == ids


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("aals")
    path = make_world(root / "world", n_images=40, image_size=32, seed=1)
    manifest = make_semi_split(load_manifest(path), boxed_fraction=0.3, weak_fraction=0.7, seed=0)
    return root, manifest.save(root / "world" / "semi.json")


def run_config(root, manifest, name: str, method: str = "aals", out=None, **params):
    return validate_config({
        "data": {"manifest": str(manifest), "image_size": 32, "cache_dir": str(root / "cache")},
        "model": {"kind": "heatmap", "base_width": 4, "options": {"fpn_channels": 8}},
        "train": {"max_steps": 3, "batch_size": 2, "progress": False, "tensorboard": False},
        "method": {"name": method, "params": {"n_boot": 20, **({"froc_boot": 5} if method == "aals" else {}),
                                              **params}},
        "output_dir": str((out or root) / name),
    })


def test_split_sets_counts_r_n_p_per_class(world):
    from cxrdistill.data.study import StudyData

    root, manifest = world
    cfg = run_config(root, manifest, "sets")
    data = StudyData.from_config(cfg.data)
    sets = split_sets(data, positive_fraction=1.0, seed=0)
    train = data.manifest.select(split="train")
    boxed = sum(im.supervision == "box" for im in train)
    for k, name in enumerate(data.class_names):
        counts = sets.counts[name]
        weak_pos = sum(im.supervision == "image" and data.manifest.image_labels(im.id)[k] for im in train)
        assert counts["R"] == boxed and counts["P"] == counts["P_used"] == weak_pos
        assert counts["R"] + counts["N"] + counts["P"] == len(train)
    none = split_sets(data, positive_fraction=0.0, seed=0)
    assert none.positive == [] and none.supervised == sets.supervised


def test_registered_params_validate():
    assert get_method("aals").params_cls is AalsParams
    assert validate_method_params("aals", {}).a0 == 4.0
    from cxrdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="a0"):
        validate_method_params("aals", {"a0": 0.5})


def test_end_to_end_run_writes_metrics_and_reuses_pretraining(world, monkeypatch):
    from cxrdistill.engine.context import RunContext
    from cxrdistill.engine.run_dir import RunDirectory

    torch.set_num_threads(1)
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")  # the pre-training is trained here, into the run folder
    root, manifest = world
    spec = get_method("aals")
    cfg = run_config(root, manifest, "full")
    params = AalsParams.model_validate(cfg.method.params)
    ctx = RunContext.create(cfg, RunDirectory(cfg.output_dir))
    metrics = spec.run(cfg, params, ctx)
    for model in ("pretrain", "student", "teacher"):
        assert 0.0 <= metrics[f"{model}/macro_AUROC"] <= 1.0
        # the boxes of the maps' connected regions are scored like a detector's (for detection studies)
        assert 0.0 <= metrics[f"{model}/mAP@0.5"] <= 1.0
        saved = json.loads((root / "full" / "eval" / model / "metrics.json").read_text())
        assert saved["class_names"] == ctx_classes(cfg)
        assert metrics[f"{model}/mAP@0.5"] == pytest.approx(saved["detection"]["mAP@0.5"])
        ci = saved["modified_froc_heatmaps"]["bootstrap_CI95"]["macro"]
        assert ci[0] is not None and 0.0 <= ci[0] <= ci[1] <= 1.0
    assert (root / "full" / "checkpoints" / "semi" / "done.json").is_file()
    scores = json.loads((root / "full" / "eval" / "student" / "image_scores.json").read_text())
    assert len(scores) == saved["n_images"] * len(saved["class_names"])

    # pre-training is the shared supervised heat-map stage (its final weights); model selection on
    # the validation split keeps the semi stage's best-validation-AUROC checkpoint, and the exported
    # model is the selected teacher
    assert json.loads((root / "full" / "checkpoints" / "supervised" / "stage_key.json").read_text())["kind"] == "heatmap"
    done = json.loads((root / "full" / "checkpoints" / "semi" / "done.json").read_text())
    assert done["best"]["metric"] == "val_AUROC" and 1 <= done["best"]["step"] <= 3
    assert (root / "full" / "checkpoints" / "semi" / "best.pt").is_file()
    from cxrdistill.engine.checkpoint import load_checkpoint

    best_teacher = load_checkpoint(root / "full" / "checkpoints" / "semi" / "best.pt")["modules"]["teacher"]
    exported = torch.load(root / "full" / "model.pt", weights_only=True)
    exported_state = exported.get("state_dict", exported.get("model", exported))
    if isinstance(exported_state, dict) and "weights" in exported_state:
        exported_state = exported_state["weights"]
    key = next(k for k in best_teacher if k.endswith("weight") and best_teacher[k].ndim == 4)
    assert any(torch.equal(v, best_teacher[key]) for v in _tensors(exported)), "model.pt is not the selected teacher"

    ckpt = root / "full" / "checkpoints" / "supervised" / "last.pt"
    cfg2 = run_config(root, manifest, "mt", a0=1.0, pretrained_checkpoint=str(ckpt))
    ctx2 = RunContext.create(cfg2, RunDirectory(cfg2.output_dir))
    metrics2 = spec.run(cfg2, AalsParams.model_validate(cfg2.method.params), ctx2)
    assert not (root / "mt" / "checkpoints" / "supervised").exists()  # pre-training was reused
    assert metrics2["pretrain/macro_AUROC"] == pytest.approx(metrics["pretrain/macro_AUROC"])


def _tensors(obj):
    """Every tensor inside a nested dict / list (for looking into an exported file)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def test_pretraining_is_the_supervised_heatmap_baseline_checkpoint(world, tmp_path, monkeypatch, fits):
    """Issue 16: AALS pre-trains through the shared supervised stage. The `supervised_heatmap` baseline
    at the same key (same data, model, schedule, ``augment: aals``) is that checkpoint: trained once,
    then read from the stage store (no pre-training in a second AALS run), bit-identical weights."""
    from cxrdistill.engine.checkpoint import load_checkpoint
    from cxrdistill.engine.context import RunContext
    from cxrdistill.engine.run_dir import RunDirectory

    torch.set_num_threads(1)
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", str(tmp_path / "store"))
    trained = fits
    root, manifest = world

    def run(name: str, method: str, **params):
        cfg = run_config(root, manifest, name, method, tmp_path, **params)
        p = validate_method_params(method, cfg.method.params)
        return get_method(method).run(cfg, p, RunContext.create(cfg, RunDirectory(cfg.output_dir)))

    run("baseline", "supervised_heatmap", augment="aals", n_boot=5)
    assert trained == ["supervised"]
    run("aals", "aals", semi_supervised=False, select_best=False)
    assert trained == ["supervised"]  # AALS's pre-training came from the stage store
    marker = json.loads((tmp_path / "aals" / "checkpoints" / "supervised" / "stage_key.json").read_text())
    assert marker["source"] == "store" and marker["kind"] == "heatmap"
    baseline = load_checkpoint(tmp_path / "baseline" / "checkpoints" / "supervised" / "last.pt")["modules"]["model"]
    exported = torch.load(tmp_path / "aals" / "model.pt", weights_only=True)["state_dict"]
    assert baseline.keys() == exported.keys()
    assert all(torch.equal(baseline[k], exported[k]) for k in baseline)
    # a changed key (another pre-training view) trains anew
    run("aals_none", "aals", semi_supervised=False, select_best=False, pretrain_augment="none")
    assert trained == ["supervised", "supervised"]


def test_selection_needs_a_validation_split_other_than_the_test_split(world):
    from cxrdistill.engine.context import RunContext
    from cxrdistill.engine.run_dir import RunDirectory
    from cxrdistill.errors import ConfigError

    root, manifest = world
    cfg = run_config(root, manifest, "sel", val_split="test")
    with pytest.raises(ConfigError, match="val_split"):
        get_method("aals").run(cfg, AalsParams.model_validate(cfg.method.params),
                               RunContext.create(cfg, RunDirectory(cfg.output_dir)))


# ----------------------------------------------------------------------------- views


def _square_batch() -> dict:
    """One 32 px image, black but for a bright 8x8 square at x 4..12, y 8..16 (its box)."""
    image = torch.zeros(1, 1, SIZE, SIZE)
    image[0, 0, 8:16, 4:12] = 1.0
    return {"image": image, "boxes": [torch.tensor([[4.0, 8, 12, 16]])], "labels": [torch.tensor([1])]}


def test_teacher_and_student_views_differ_and_record_their_geometry():
    params = AalsParams(rotate_deg=20.0, flip_p=0.5, intensity=0.1, contrast=0.2)
    batch = _square_batch()
    batch["image"] = batch["image"].repeat(4, 1, 1, 1)
    batch["boxes"], batch["labels"] = batch["boxes"] * 4, batch["labels"] * 4
    teacher, student = view_pair(batch, params, seed=0, stage="semi", step=3)
    assert not torch.allclose(teacher.images, student.images)
    assert not torch.allclose(teacher.matrices, student.matrices)
    # the streams depend on (seed, stage, step) only: a resumed step draws the same views
    again, _ = view_pair(batch, params, seed=0, stage="semi", step=3)
    assert torch.equal(again.images, teacher.images) and torch.equal(again.matrices, teacher.matrices)
    # augment: false is one un-augmented view for both
    same_t, same_s = view_pair(batch, AalsParams(augment=False), seed=0, stage="semi", step=3)
    assert same_t is same_s and torch.equal(same_t.images, batch["image"])


def test_boxes_and_teacher_maps_project_into_the_student_view():
    params = AalsParams(rotate_deg=30.0, flip_p=0.5, intensity=0.0, contrast=0.0)
    batch = _square_batch()
    misaligned = 0
    for step in range(6):
        teacher, student = view_pair(batch, params, seed=1, stage="semi", step=step)
        # the student's box is where its view put the bright square
        (x0, y0, x1, y1), = student.boxes[0].tolist()
        inside = student.images[0, 0, math.ceil(y0) + 1:int(y1) - 1, math.ceil(x0) + 1:int(x1) - 1]
        assert student.labels[0].tolist() == [1] and inside.numel() > 0 and inside.mean() > 0.5
        # a "teacher map" = its view at stride 4, warped into the student's view, matches the student's
        # own view at stride 4 wherever the teacher saw the pixel
        pool = torch.nn.functional.avg_pool2d
        t_map, s_map = pool(teacher.images, STRIDE), pool(student.images, STRIDE)
        moved, seen = project_maps(t_map, map_matrices(teacher.matrices, student.matrices, STRIDE))
        assert seen.sum() > 0.5 * seen.numel()
        err = float((_centroid(moved[0, 0]) - _centroid(s_map[0, 0])).norm())
        unmoved = float((_centroid(t_map[0, 0]) - _centroid(s_map[0, 0])).norm())
        assert err < 0.6, (step, err)  # map pixels: the square lands where the student sees it
        if unmoved > 1.5:  # the two views differ visibly: the projection, not luck, lines them up
            misaligned += 1
        # the rasterised mask of the student view covers the projected square
        masks = map_targets({**batch, "image": student.images, "has_boxes": torch.tensor([True]),
                             "has_image_labels": torch.tensor([True]), "image_labels": torch.tensor([[0.0, 1]]),
                             "image_id": torch.tensor([0])}, C, STRIDE, torch.zeros(0, dtype=torch.long), student)
        assert float((masks.masks[0, 1] * s_map[0, 0]).sum() / masks.masks[0, 1].sum()) > 0.4
    assert misaligned >= 2


def _centroid(image: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre ``(x, y)`` of a 2-D map, in its pixels."""
    ys, xs = torch.meshgrid(torch.arange(image.shape[0]) + 0.5, torch.arange(image.shape[1]) + 0.5, indexing="ij")
    return torch.stack([(xs * image).sum(), (ys * image).sum()]) / image.sum()


def test_semi_loss_ignores_pixels_the_teacher_did_not_see():
    targets = map_targets(batch_rnp(), C, STRIDE, torch.tensor([11]))
    student = torch.zeros(3, C, SIZE // STRIDE, SIZE // STRIDE)
    teacher = torch.full_like(student, 0.9)
    seen = torch.zeros(3, 1, SIZE // STRIDE, SIZE // STRIDE)
    seen[..., :4] = 1
    teacher_off = teacher.clone()
    teacher_off[..., 4:] = 0.0  # what the teacher did not see: no target there
    a = aals_losses(student, teacher, targets, 0.4, 4.0, seen)["semi"]
    b = aals_losses(student, teacher_off, targets, 0.4, 4.0, seen)["semi"]
    assert a.item() == pytest.approx(b.item()) and a.item() > 0


def ctx_classes(cfg) -> list[str]:
    from cxrdistill.data.study import StudyData

    return StudyData.from_config(cfg.data).class_names
