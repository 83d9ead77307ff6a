"""Does a tiny MoCo v2 / BYOL pretraining raise the held-out kNN quality above random init? (issue 23)

Builds a synthetic world, pretrains on its train + val images (labels ignored) for ``--steps``
steps, and scores a kNN (memory: the train images with their labels; queries: the held-out
test images, never seen by pretraining) at random init and after pretraining, per seed:

    OMP_NUM_THREADS=1 nice -n 10 python scripts/ssl_knn_probe.py --seeds 0 1 2 --steps 150

Prints one JSON line per seed and a summary (mean, spread of the gain).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cxrdistill.ssl.probe import ProbeSetting, load_world_tensors, run_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ssl_knn_probe")
    for name, field in ProbeSetting.__dataclass_fields__.items():
        kind = type(field.default)
        if kind is tuple:
            ap.add_argument("--" + name.replace("_", "-"), type=float, nargs="+", default=field.default)
        elif kind is bool:
            ap.add_argument("--" + name.replace("_", "-"), type=lambda s: s.lower() in ("1", "true", "yes"),
                            default=field.default)
        else:
            ap.add_argument("--" + name.replace("_", "-"), type=kind, default=field.default)
    args = ap.parse_args()
    torch.set_num_threads(1)
    values = {k: getattr(args, k) for k in ProbeSetting.__dataclass_fields__}
    values["crop_scale"], values["splits"] = tuple(values["crop_scale"]), tuple(values["splits"])
    setting = ProbeSetting(**values)
    world = load_world_tensors(args.cache, setting, seed=args.world_seed)
    gains = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        res = run_probe(world, setting, seed)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        gains.append(res["gain"])
        print(json.dumps(res), flush=True)
    spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    print(json.dumps({"setting": setting.__dict__, "gain_mean": statistics.mean(gains), "gain_sd": spread,
                      "gains": gains}), flush=True)


if __name__ == "__main__":
    main()
