"""Test-wide settings: offline, single-threaded, deterministic, and a private cache per worker."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# synthetic worlds and image caches of tests never touch the user's ~/.cache, and xdist workers
# never share one: a worker inherits the controller's CXRDISTILL_CACHE through the environment, so
# each one works in its own sub-folder (concurrent builds of one image cache are safe — a file lock
# and a union index — but private caches keep the workers' timings independent)
os.environ.setdefault("CXRDISTILL_CACHE", tempfile.mkdtemp(prefix="cxrdistill-test-cache-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["CXRDISTILL_CACHE"] = os.path.join(os.environ["CXRDISTILL_CACHE"], os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.environ["CXRDISTILL_CACHE"], exist_ok=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_runs_root(tmp_path_factory):
    """One folder per test session for the shared tiny recipe runs (`tiny_recipes.shared_run`): under
    xdist the parent of the workers' base folders, so every worker reads the same runs."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_runs"


@pytest.fixture
def fits(monkeypatch):
    """Stages actually trained (not skipped as done) in this test, in order (`Trainer.fit` spied)."""
    from cxrdistill.engine.loop import Trainer

    trained: list[str] = []
    real_fit = Trainer.fit

    def fit(self, *a, **k):
        if not self.is_done():
            trained.append(self.stage)
        return real_fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", fit)
    return trained
