"""Self-supervised pretraining (issue 23): MoCo queue / momentum, InfoNCE, augmentations, monitor, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.models.backbones import ResNetBackbone
from cxrdistill.ssl.augment import CXRAugment, augment, step_generator, two_views
from cxrdistill.ssl.losses import byol_regression, info_nce
from cxrdistill.ssl.models import BYOL, MoCo, momentum_update, queue_problem
from cxrdistill.ssl.monitor import feature_std, is_collapsed, knn_balanced_accuracy

runner = CliRunner()


def tiny_backbone() -> ResNetBackbone:
    torch.manual_seed(0)
    return ResNetBackbone(18, 1, base_width=2)


# ------------------------------------------------------------------ MoCo mechanics


def test_momentum_update_exact_values():
    target, online = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.fill_(1.0), target.bias.fill_(-1.0)
        online.weight.copy_(torch.tensor([[3.0, 5.0]])), online.bias.fill_(1.0)
    momentum_update(target, online, 0.9)
    assert torch.allclose(target.weight, torch.tensor([[1.2, 1.4]]))
    assert torch.allclose(target.bias, torch.tensor([-0.8]))


def test_moco_key_encoder_follows_query_encoder_by_momentum():
    moco = MoCo(tiny_backbone(), dim=4, hidden=8, queue_size=5, momentum=0.75)
    q0 = [p.detach().clone() for p in moco.encoder_q.parameters()]
    k0 = [p.detach().clone() for p in moco.encoder_k.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(q0, k0))  # the key encoder starts as a copy
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())
    assert len(moco.online_parameters()) == len(q0)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    moco.update_key_encoder()
    for k, before in zip(moco.encoder_k.parameters(), k0):
        assert torch.allclose(k, 0.75 * before + 0.25 * (before + 1.0), atol=1e-6)


def test_moco_queue_fifo_with_wraparound():
    moco = MoCo(tiny_backbone(), dim=4, hidden=8, queue_size=5)
    first = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    moco.enqueue(first)
    assert int(moco.queue_ptr) == 3 and torch.equal(moco.queue[:, :3], first.T)
    second = -torch.arange(12, dtype=torch.float32).reshape(3, 4) - 1
    moco.enqueue(second)
    assert int(moco.queue_ptr) == 1
    assert torch.equal(moco.queue[:, 3:5], second[:2].T) and torch.equal(moco.queue[:, 0], second[2])
    assert torch.equal(moco.queue[:, 1:3], first[1:].T)  # the oldest keys were overwritten first
    assert "queue" in moco.state_dict() and "queue_ptr" in moco.state_dict()  # checkpointed


def test_moco_forward_enqueues_normalised_keys_and_backpropagates():
    moco = MoCo(tiny_backbone(), dim=4, hidden=8, queue_size=8)
    images = torch.rand(2, 1, 32, 32)
    loss, q = moco(images, images.flip(-1))
    loss.backward()
    assert q.shape == (2, 4) and torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)
    assert int(moco.queue_ptr) == 4  # symmetric: both views' keys
    assert torch.allclose(moco.queue[:, :4].norm(dim=0), torch.ones(4), atol=1e-5)
    assert moco.encoder_q[0].backbone.body.conv1.weight.grad is not None
    assert all(p.grad is None for p in moco.encoder_k.parameters())


# ------------------------------------------------------------------ losses


def test_info_nce_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # columns (0, 1) and (-1, 0)
    # logits = [0.6, 0, -1] / 0.5 = [1.2, 0, -2]; loss = -log softmax[0]
    expected = -1.2 + math.log(math.exp(1.2) + 1.0 + math.exp(-2.0))
    assert info_nce(q, k, queue, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_byol_regression_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # cos = 1 and 0
    assert byol_regression(p, z).item() == pytest.approx((0.0 + 2.0) / 2)


def test_byol_target_is_ema_and_gets_no_gradient():
    byol = BYOL(tiny_backbone(), dim=4, hidden=8, momentum=0.5)
    loss, z = byol(torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32))
    loss.backward()
    assert z.shape == (3, 4) and all(p.grad is None for p in byol.target.parameters())
    before = [p.detach().clone() for p in byol.target.parameters()]
    with torch.no_grad():
        for p in byol.online.parameters():
            p.add_(1.0)
    byol.update_target(0, 10)  # cosine schedule: tau = base at step 0
    for t, b in zip(byol.target.parameters(), before):
        assert torch.allclose(t, b + 0.5, atol=1e-6)


# ------------------------------------------------------------------ augmentations


def test_augmentations_keep_shape_and_range_and_depend_on_seed_and_step_only():
    images = torch.rand(4, 1, 32, 32)
    aug = CXRAugment()
    out = augment(images, aug, step_generator(0, 3))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, augment(images, aug, step_generator(0, 3)))
    assert not torch.equal(out, augment(images, aug, step_generator(0, 4)))
    v1, v2 = two_views(images, aug, seed=0, step=3)
    assert not torch.equal(v1, v2)
    # rank 0 keeps streams 1 and 2 (single-process runs unchanged); another DDP rank draws its own views
    assert torch.equal(v1, augment(images, aug, step_generator(0, 3, 1)))
    w1, w2 = two_views(images, aug, seed=0, step=3, rank=1)
    assert not torch.equal(w1, v1) and not torch.equal(w2, v2)
    assert torch.equal(w1, two_views(images, aug, seed=0, step=3, rank=1)[0])


def test_identity_and_flip_views_are_exact():
    images = torch.rand(2, 1, 16, 16)
    none = CXRAugment(crop_scale=(1.0, 1.0), rotate_deg=0, flip_p=0.0, brightness=0, contrast=0)
    flip = CXRAugment(crop_scale=(1.0, 1.0), rotate_deg=0, flip_p=1.0, brightness=0, contrast=0)
    assert torch.allclose(augment(images, none, step_generator(1, 1)), images, atol=1e-5)
    assert torch.allclose(augment(images, flip, step_generator(1, 1)), images.flip(-1), atol=1e-5)


def test_crop_zooms_in_without_padding():
    """Crops stay inside the image (no rotation): a constant image stays constant, no zero border."""
    images = torch.full((8, 1, 32, 32), 0.7)
    crop = CXRAugment(crop_scale=(0.5, 0.6), rotate_deg=0, flip_p=0.5, brightness=0, contrast=0)
    assert torch.allclose(augment(images, crop, step_generator(2, 0)), images, atol=1e-5)


# ------------------------------------------------------------------ monitoring


def test_knn_balanced_accuracy_separates_clusters_and_is_chance_on_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([[1.0, 0.0]] * 20 + [[0.0, 1.0]] * 20)
    clustered = torch.cat([torch.randn(20, 8, generator=gen) * 0.1 + 3, torch.randn(20, 8, generator=gen) * 0.1 - 3])
    assert knn_balanced_accuracy(clustered, labels, k=5) == 1.0
    noise = torch.randn(400, 8, generator=gen)
    random_labels = (torch.rand(400, 1, generator=gen) > 0.5).float()
    assert abs(knn_balanced_accuracy(noise, random_labels, k=5) - 0.5) < 0.1
    assert math.isnan(knn_balanced_accuracy(noise[:3], random_labels[:3], k=5))


def test_collapse_check():
    collapsed = torch.ones(16, 32)
    assert feature_std(collapsed) == 0.0 and is_collapsed(0.0, 32, 0.1)
    spread = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    std = feature_std(spread)
    assert std == pytest.approx(1 / math.sqrt(32), rel=0.1) and not is_collapsed(std, 32, 0.1)


# ------------------------------------------------------------------ the command: resume, output, loader


TINY = ["data.synthetic.n_images=40", "data.synthetic.image_size=32", "data.image_size=32", "model.base_width=4",
        "train.batch_size=8", "train.progress=false", "train.tensorboard=false", "method.params.queue_size=16",
        "method.params.dim=8", "method.params.hidden=16", "train.eval_every=3"]


def _pretrain(out, *extra):
    res = runner.invoke(app, ["pretrain", "--config", "pretrain_moco", "-o", str(out), *TINY, *extra])
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("algorithm", ["moco_v2", "byol"])
def test_resume_after_a_crash_is_exact(tmp_path, monkeypatch, algorithm):
    steps = ["train.max_steps=6", "train.checkpoint_every=3", f"method.params.algorithm={algorithm}"]
    if algorithm == "moco_v2":  # with shuffle-BN: its permutations come from (seed, step) too
        steps.append("method.params.shuffle_bn_groups=2")
    _pretrain(tmp_path / "straight", *steps)

    import cxrdistill.ssl.recipe as recipe

    real = recipe.two_views

    def crash_at_4(images, aug, seed, step, rank=0):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real(images, aug, seed, step, rank)

    monkeypatch.setattr(recipe, "two_views", crash_at_4)
    crashed = runner.invoke(app, ["pretrain", "--config", "pretrain_moco", "-o", str(tmp_path / "resumed"), *TINY, *steps])
    assert crashed.exit_code != 0 and (tmp_path / "resumed" / "checkpoints" / "pretrain" / "last.pt").is_file()
    monkeypatch.setattr(recipe, "two_views", real)
    _pretrain(tmp_path / "resumed", *steps)

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(tmp_path / "straight" / "checkpoints" / "pretrain" / "last.pt", weights_only=True)
    cb = torch.load(tmp_path / "resumed" / "checkpoints" / "pretrain" / "last.pt", weights_only=True)
    for key, value in ca["modules"]["model"].items():  # queue, pointer, key / target encoder too
        assert torch.equal(value, cb["modules"]["model"][key]), key


def test_output_loads_with_model_pretrained_run_dir_and_excludes_test(tmp_path):
    from cxrdistill.config import ModelConfig
    from cxrdistill.data.manifest import load_manifest
    from cxrdistill.models.factory import build_model

    out = tmp_path / "run"
    _pretrain(out, "train.max_steps=2")
    info = json.loads((out / "pretrain.json").read_text())
    config = (out / "config.yaml").read_text()
    manifest_path = next(line.split(":", 1)[1].strip() for line in config.splitlines() if "manifest:" in line)
    manifest = load_manifest(manifest_path)
    assert "test" not in info["splits"]
    assert info["n_images"] == sum(im.split != "test" for im in manifest.images)
    model = build_model(ModelConfig(kind="detector", depth=18, base_width=4, pretrained=out), 3)
    saved = load_file(out / "model.safetensors")
    assert torch.equal(model.backbone.body.conv1.weight, saved["conv1.weight"])
    assert math.isfinite(info["knn_acc"]) and math.isfinite(info["knn_acc_init"])
    # the monitor's number is the kNN of the saved backbone's features, recomputed here by hand
    from torch.utils.data import DataLoader, Subset

    from cxrdistill.config import load_config
    from cxrdistill.data.dataset import collate
    from cxrdistill.data.study import StudyData
    from cxrdistill.ssl.models import Embedder
    from cxrdistill.ssl.monitor import embed_all

    dataset = StudyData.from_config(load_config(out / "config.yaml", []).data).dataset(info["splits"])
    labeled = [i for i, im in enumerate(dataset.images) if im.supervision in ("box", "image")]
    assert len(labeled) == info["n_knn_images"] > 5
    backbone = ResNetBackbone(18, 1, base_width=4)
    backbone.body.load_state_dict(saved)
    feats, labels = embed_all(Embedder(backbone), DataLoader(Subset(dataset, labeled), batch_size=32,
                                                             collate_fn=collate), torch.device("cpu"))
    assert knn_balanced_accuracy(feats, labels, k=5) == pytest.approx(info["knn_acc"], abs=1e-12)


def test_pretrain_refuses_other_recipes(tmp_path):
    res = runner.invoke(app, ["pretrain", "--config", "supervised_classifier", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "method 'pretrain'" in res.output


def test_a_queue_longer_than_one_pass_over_the_images_is_refused_with_the_limit(tmp_path):
    """34 pretraining images read 8 at a time: 26 keys fit; 27 would hold keys of the batch's own images."""
    assert queue_problem(26, 34, 8) is None
    problem = queue_problem(27, 34, 8)
    assert problem is not None and "at most 26" in problem and "34 pretraining images" in problem
    res = runner.invoke(app, ["pretrain", "--config", "pretrain_moco", "-o", str(tmp_path / "run"), *TINY,
                              "method.params.queue_size=27", "train.max_steps=1"])
    assert res.exit_code == 2 and "method.params.queue_size" in res.output and "at most 26" in res.output
    assert not (tmp_path / "run" / "model.safetensors").exists()
