"""Fabric DDP on two CPU processes (gloo) = one process on the doubled batch.

Two forked ranks train through `Trainer.fit` with `train.strategy="ddp"` (the trained module set up
by Fabric, gradients all-reduced by DDP, an EMA teacher left unwrapped), each on its own half of
every global batch from the distributed `RatioBatchSampler`. One process then trains the same
model on the whole batches (with gradient accumulation: DDP syncs only the last micro-batch,
`fabric.no_backward_sync`, and still matches one process accumulating the doubled micro-batches). Tolerance: 1e-5 absolute on every weight after 3 Adam steps (the only
difference is the order of float32 sums in the all-reduce). Also: a 2-rank pseudo-labeling pass
writes each image exactly once, a DDP checkpoint resumes on one process, and the trained module
is plain again after `fit`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from cxrdistill.config import TrainConfig
from cxrdistill.engine.checkpoint import load_checkpoint
from cxrdistill.engine.distributed import trained_modules
from cxrdistill.engine.ema import EMATeacher
from cxrdistill.engine.loop import Trainer, make_fabric
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.models.detector import RetinaNet

STEPS, PER_RANK, WORLD, N_IMAGES = 3, 2, 2, 16
ATOL = 1e-5
RECIPES = ("supervised", "mean_teacher", "accumulate")


def _data() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """16 images (1, 32, 32) with one or two boxes each, labels in {0, 1}."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N_IMAGES, 1, 32, 32, generator=g)
    targets = []
    for i in range(N_IMAGES):
        n = 1 + i % 2
        xy = torch.randint(0, 16, (n, 2), generator=g).float()
        wh = torch.randint(6, 14, (n, 2), generator=g).float()
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 2, (n,), generator=g)})
        images[i, :, int(xy[0, 1]):int(xy[0, 1] + wh[0, 1]), int(xy[0, 0]):int(xy[0, 0] + wh[0, 0])] += 1.0
    return images, targets


def _detector() -> RetinaNet:
    torch.manual_seed(0)  # frozen BN: batch statistics would differ between b and 2b images
    return RetinaNet(2, depth=18, base_width=8, freeze_bn=True, fpn_channels=16, fpn_levels=(3, 4, 5), head_convs=1)


def _cfg(world: int, **kw) -> TrainConfig:
    base = dict(max_steps=STEPS, lr=1e-3, schedule="constant", warmup_steps=0, checkpoint_every=2, log_every=1,
                progress=False, tensorboard=False, weight_decay=0.0, optimizer="adam", grad_clip=10.0,
                devices=world, strategy="ddp" if world > 1 else "auto", accelerator="cpu")
    base.update(kw)
    return TrainConfig(**{k: v for k, v in base.items() if k in TrainConfig.model_fields})


def train(recipe: str, out: Path, world: int, rank: int, fabric=None) -> dict[str, torch.Tensor]:
    """Train `recipe` ("supervised" | "mean_teacher" | "accumulate": supervised, 2 micro-batches of
    1 image per rank) for STEPS steps; returns the student's weights."""
    images, targets = _data()
    accumulate = 2 if recipe == "accumulate" else 1
    per = (PER_RANK // accumulate) * (1 if world > 1 else WORLD)
    sampler = RatioBatchSampler(range(N_IMAGES), [], per, 0, seed=3, rank=rank, world_size=world)

    def batches():
        for idx in sampler:
            yield torch.stack([images[i] for i in idx]), idx

    model = _detector()
    modules: dict[str, nn.Module] = {"model": model}
    teacher = None
    if recipe == "mean_teacher":
        teacher = EMATeacher(model, decay=0.5)
        modules["teacher"] = teacher
    trainer = Trainer(_cfg(world, accumulate=accumulate), RunDirectory(out, min_free_bytes=0), recipe, fabric=fabric)

    def step_fn(batch, step):
        x, idx = batch
        out = model(x)
        losses = model.loss(out, [targets[i] for i in idx])
        if teacher is not None:  # consistency with the unwrapped EMA teacher on the same images
            with torch.no_grad():
                t_out = teacher(x)
            # a mean over this rank's images: DDP's average over ranks is then the mean over the global batch
            losses["cons"] = ((out.cls_logits.sigmoid() - t_out.cls_logits.sigmoid()) ** 2).mean()
        return losses

    trainer.fit(step_fn, modules, build_optimizer(model.parameters(), trainer.cfg), batches(), STEPS, sampler=sampler,
                on_step_end=(lambda s: teacher.update(model)) if teacher is not None else None)
    assert "forward" not in model.__dict__  # the recipe's module is plain again
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rank_main(rank: int, port: int, out: str, dataset, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    fabric = make_fabric(_cfg(WORLD))
    assert fabric.world_size == WORLD and fabric.global_rank == rank
    found = {name: train(name, Path(out) / name, WORLD, rank, fabric) for name in RECIPES}
    # a 2-rank pseudo-labeling pass
    from cxrdistill.pseudo.generate import generate_pseudo_labels
    from cxrdistill.pseudo.store import PseudoLabelStore

    seen: list[int] = []

    def predict(batch):
        seen.extend(batch["image_id"].tolist())
        return [{"scores": img.mean().reshape(1), "labels": torch.zeros(1, dtype=torch.long)} for img in batch["image"]]

    store = PseudoLabelStore(Path(out) / "pseudo", generation=0)
    generate_pseudo_labels(predict, dataset, store, rank=rank, world_size=WORLD, batch_size=3)
    fabric.barrier()
    if rank == 0:
        generate_pseudo_labels(predict, dataset, store, rank=rank, world_size=WORLD, batch_size=3)
    found["seen"] = torch.tensor(seen)  # type: ignore[assignment]
    torch.save(found, Path(results) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Both ranks' results (forked processes: no re-import, a few seconds)."""
    from cxrdistill.data.study import StudyData, synthetic_world

    root = tmp_path_factory.mktemp("ddp")
    manifest = synthetic_world({"n_images": 20, "image_size": 32, "seed": 1}, root / "world")
    dataset = StudyData.open(manifest, image_size=16, cache_dir=root / "cache").dataset("train")
    ctx = torch.multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(root / "run"), dataset, str(root))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0], "a DDP rank failed (its traceback is in the test output)"
    return root, dataset, [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_ddp_two_ranks_equal_one_process_on_the_doubled_batch(ddp_run, recipe, tmp_path):
    root, _, ranks = ddp_run
    single = train(recipe, tmp_path / recipe, 1, 0)
    start = _detector().state_dict()
    moved = 0
    for name, value in single.items():
        assert torch.equal(ranks[0][recipe][name], ranks[1][recipe][name]), name  # ranks agree exactly
        assert torch.allclose(ranks[0][recipe][name], value, atol=ATOL, rtol=0), name
        moved += int(not torch.equal(value, start[name]))
    assert moved > 10  # training changed the weights (the comparison is not between two initialisations)


def test_ddp_checkpoint_resumes_on_one_process(ddp_run, tmp_path):
    """The DDP run's last.pt (rank 0, unwrapped state dicts) loads into one process as a done stage."""
    root, _, ranks = ddp_run
    state = load_checkpoint(root / "run" / "supervised" / "checkpoints" / "supervised" / "last.pt")
    assert not any(k.startswith(("module.", "_forward_module.")) for k in state["modules"]["model"])
    model = _detector()
    model.load_state_dict(state["modules"]["model"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, ranks[0]["supervised"][name])


def test_ddp_pseudo_labeling_writes_each_image_once(ddp_run):
    root, dataset, ranks = ddp_run
    seen0, seen1 = ranks[0]["seen"].tolist(), ranks[1]["seen"].tolist()
    assert set(seen0).isdisjoint(seen1) and sorted(seen0 + seen1) == sorted(im.id for im in dataset.images)
    from cxrdistill.pseudo.store import PseudoLabelStore

    store = PseudoLabelStore(root / "run" / "pseudo", generation=0)
    assert store.is_complete() and sorted(store.read()) == sorted(im.id for im in dataset.images)


def test_trained_modules_are_the_outermost_optimized_ones():
    student = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    ema = EMATeacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    assert trained_modules({"s": student, "head": student[1], "teacher": ema}, optimizer) == ["s"]
    with pytest.raises(ValueError, match="share some parameters"):
        trained_modules({"a": student, "b": nn.ModuleList([student[1], nn.Linear(1, 1)])},
                        torch.optim.SGD(list(student.parameters()) + [nn.Parameter(torch.ones(1))], lr=0.1))


def test_strategy_names_are_fabrics():
    for name in ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", "ddp_find_unused_parameters_true"):
        assert TrainConfig(strategy=name).strategy == name
    with pytest.raises(ValueError, match="unknown strategy 'fsdb'.*did you mean 'fsdp'"):
        TrainConfig(strategy="fsdb")


def test_routed_forward_goes_through_the_wrapper_only_for_the_module_itself():
    """While a stage runs, `model(x)` with gradients reaches the wrapper; no-grad / eval calls and a
    deep copy made meanwhile (e.g. a new EMA teacher) run the plain forward."""
    import copy

    from cxrdistill.engine.distributed import route_forward, unroute

    model = nn.Linear(2, 1)
    calls = []

    def wrapper(x):
        calls.append("wrapper")
        return model(x)  # DDP's inner call reaches the original forward

    route_forward(model, wrapper)
    x = torch.ones(1, 2)
    expected = nn.functional.linear(x, model.weight, model.bias)
    assert torch.equal(model(x), expected) and calls == ["wrapper"]
    with torch.no_grad():
        model(x)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), expected) and calls == ["wrapper"]
    with pytest.raises(RuntimeError, match="already set up"):
        route_forward(model, wrapper)
    unroute(model)
    model(x)
    assert calls == ["wrapper"] and "forward" not in model.__dict__
    route_forward(twin, wrapper)  # the copy's stale marker does not block setting it up itself
    unroute(twin)
    assert "forward" not in twin.__dict__
