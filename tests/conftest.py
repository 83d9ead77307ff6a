"""Test-wide settings: offline, single-threaded, deterministic, and a private cache per worker."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# synthetic worlds and image caches of tests never touch the user's ~/.cache, and xdist workers
# never share one (each worker imports this file once)
os.environ.setdefault("CXRDISTILL_CACHE", tempfile.mkdtemp(prefix="cxrdistill-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)
