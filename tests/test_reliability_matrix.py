"""Crash matrix (issue #21): every registered recipe, SIGKILLed in each of its stages, resumes exactly.

For each recipe (its packaged config made tiny by ``tiny_recipes.py``: 4 steps a stage, a checkpoint
every 2) a forked child runs ``run_training`` and kills itself with a real ``SIGKILL`` at one point:

- ``<stage>@mid``: inside the optimizer step after the stage's first checkpoint (step 3: resumes
  from the step-2 checkpoint), or inside its last step when it is that short;
- ``<stage>@1``: inside step 1 of a later stage (no checkpoint of it yet: the earlier stages are
  reused and the stage starts over, so nothing it draws may depend on the earlier stages' RNG use);
- ``pseudo``: in the offline pseudo-label pass, at its third record (two one-record chunks on disk).

The same config is then rerun in this process (resume) and every stage's final weights
(``checkpoints/<stage>/last.pt``) and the exported ``model.pt`` must equal those of an uninterrupted
run bit for bit (CPU). Every recipe draws its augmentation from ``step_generator(seed, step)`` or
from state in the checkpoint, so no point is xfail.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_recipes import CHECKPOINT, RECIPES, shared_run, stage_store_off, train  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _no_stage_store():
    # Every run trains its own supervised stage: a stage read back from the shared stage store
    # (methods/kit.py) would never reach the kill point. Store reuse is tested in test_shared_stage.
    with stage_store_off():
        yield


def _stages(run: Path) -> list[str]:
    """Stages with optimizer steps, in the order they were trained (their done.json times)."""
    done = [d for d in (run / "checkpoints").iterdir() if (d / "done.json").is_file() and (d / "last.pt").is_file()]
    return [d.name for d in sorted(done, key=lambda d: (d / "done.json").stat().st_mtime_ns)]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child(recipe: str, out: str, point: str) -> None:
    """Install one kill point and train; the process dies there (never returns normally)."""
    from cxrdistill.engine.loop import Trainer
    from cxrdistill.pseudo.store import PseudoLabelWriter

    if point == "pseudo":
        real_init, real_add = PseudoLabelWriter.__init__, PseudoLabelWriter.add
        added = [0]

        def init(self, store, chunk_size, rank):
            real_init(self, store, 1, rank)  # one record a chunk: one is on disk when the pass dies

        def add(self, image_id, record):
            if added[0] == 2:
                _die()
            added[0] += 1
            return real_add(self, image_id, record)

        PseudoLabelWriter.__init__, PseudoLabelWriter.add = init, add
    else:
        stage, step = point.rsplit("@", 1)
        real_step = Trainer._optimizer_step

        def optimizer_step(self, *args, **kwargs):
            if self.stage == stage and self.step == int(step) - 1:
                out = real_step(self, *args, **kwargs)  # the step's work is done, not yet checkpointed
                _die()
                return out
            return real_step(self, *args, **kwargs)

        Trainer._optimizer_step = optimizer_step
    train(recipe, Path(out))
    os._exit(3)  # the kill point was never reached


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for stage in sorted(d.name for d in (run / "checkpoints").iterdir()):
        last = run / "checkpoints" / stage / "last.pt"
        if last.is_file():
            state = torch.load(last, weights_only=True)
            for module, tensors in state["modules"].items():
                out[f"{stage}/{module}"] = tensors
    if (run / "model.pt").is_file():
        out["model.pt"] = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    return out


def _differing(a: dict, b: dict) -> list[str]:
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        for name in sorted(set(a[key]) | set(b[key])):
            x, y = a[key].get(name), b[key].get(name)
            if x is None or y is None or x.shape != y.shape or not torch.equal(x, y):
                bad.append(f"{key}:{name}")
    return bad


def _points(recipe: str, stages: list[str], pseudo: bool) -> list[str]:
    points = [f"{s}@mid" for s in stages] + [f"{s}@1" for s in stages[1:]]
    return points + (["pseudo"] if pseudo else [])


# The kill points of each recipe, known up front so that pytest can list them (checked below
# against the stages the uninterrupted run really trained).
STAGES = {
    "supervised_detector": ["supervised"], "supervised_multitask": ["multitask"],
    "supervised_heatmap": ["supervised"], "supervised_classifier": ["classifier"], "supervised_report": [],
    "mean_teacher": ["supervised", "mean_teacher"], "unbiased_teacher": ["supervised", "mean_teacher"],
    "soft_teacher": ["supervised", "mean_teacher"],
    "stac": ["supervised", "student"], "tsd": ["supervised", "vision_gen1"],
    "ceird": ["supervised", "vision_gen1", "vision_gen2"], "oxnet": ["supervised", "oxnet"],
    "aals": ["supervised", "semi"], "cam": ["classifier"], "pi_model": ["pi_model"],
    "temporal_ensembling": ["temporal_ensembling"],
    "teacher_student_cls": ["classifier", "student1_pseudo", "student1_finetune", "student2_pseudo",
                            "student2_finetune"],
}
PSEUDO = {"stac", "tsd", "ceird", "teacher_student_cls"}
CASES = [pytest.param(r, p, id=f"{r}-{p}")
         for r in STAGES for p in _points(r, STAGES[r], r in PSEUDO)]


def test_every_registered_recipe_is_in_the_matrix():
    from cxrdistill.methods.registry import _REGISTRY, available_methods

    available_methods()  # imports every recipe module; test modules may register toy recipes too
    registered = {m for m, spec in _REGISTRY.items() if spec.run.__module__.startswith("cxrdistill.methods.")}
    assert registered <= set(STAGES) and set(STAGES) == set(RECIPES), sorted(registered ^ set(STAGES))


@pytest.mark.parametrize("recipe,point", CASES)
def test_killed_in_a_stage_and_rerun_gives_bit_identical_weights(tiny_runs_root, tmp_path, recipe, point):
    reference = shared_run(tiny_runs_root, recipe)  # the uninterrupted run (also the recipe's smoke test)
    assert _stages(reference) == STAGES[recipe]
    if point.endswith("@mid"):
        stage = point[: -len("@mid")]
        steps = json.loads((reference / "checkpoints" / stage / "done.json").read_text())["max_steps"]
        point = f"{stage}@{min(CHECKPOINT + 1, steps)}"
    out = tmp_path / "run"
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(recipe, str(out), point))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL, f"the child did not die at {point} (exit code {proc.exitcode})"
    if point == "pseudo":
        assert any(p.name.startswith("chunk_") for p in (out / "pseudo").rglob("*")), "no chunk on disk at the kill"
        assert not any(p.name == "COMPLETE.json" for p in (out / "pseudo").rglob("*"))
    train(recipe, out)
    assert _differing(_weights(reference), _weights(out)) == []
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics.keys() == json.loads((reference / "final_metrics.json").read_text()).keys()
