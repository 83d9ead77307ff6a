"""Test-wide settings: offline, single-threaded, deterministic, and a private cache per worker."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# synthetic worlds and image caches of tests never touch the user's ~/.cache, and xdist workers
# never share one (each worker imports this file once)
os.environ.setdefault("CXRDISTILL_CACHE", tempfile.mkdtemp(prefix="cxrdistill-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_runs_root(tmp_path_factory):
    """One folder per test session for the shared tiny recipe runs (`tiny_recipes.shared_run`): under
    xdist the parent of the workers' base folders, so every worker reads the same runs."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_runs"
