"""Fingerprints of tiny recipe runs: a refactor that must not change results compares them.

    OMP_NUM_THREADS=1 CXRDISTILL_STAGE_STORE=off python tests/recipe_fingerprints.py OUT.json [RECIPE ...]

Each recipe runs (in its own process, so no global RNG state carries over) on the crash matrix's
tiny config (``tiny_recipes.py``: packaged config + tiny overrides, 32 px world, 4 steps a stage). The JSON holds,
per recipe, a sha256 of every stage's final weights (``checkpoints/<stage>/last.pt`` modules), of
the exported ``model.pt`` and the final metrics. Two files are compared with ``--compare A B``.
Not a test module (no ``test_`` prefix): the equivalence check of a refactor (docs in the notes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT = ["supervised_detector", "supervised_multitask", "supervised_heatmap", "supervised_classifier", "tsd",
           "ceird", "stac", "unbiased_teacher", "soft_teacher", "mean_teacher", "oxnet", "aals", "cam", "pi_model",
           "temporal_ensembling"]


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        if hasattr(t, "numpy"):
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(t).encode())
    return h.hexdigest()[:16]


def fingerprint(run: Path) -> dict:
    import torch

    out: dict = {"weights": {}}
    for stage in sorted(d.name for d in (run / "checkpoints").iterdir()):
        last = run / "checkpoints" / stage / "last.pt"
        if last.is_file():
            state = torch.load(last, weights_only=True)
            for module, tensors in state["modules"].items():
                out["weights"][f"{stage}/{module}"] = _digest(tensors)
    if (run / "model.pt").is_file():
        out["weights"]["model.pt"] = _digest(torch.load(run / "model.pt", weights_only=True)["state_dict"])
    metrics = json.loads((run / "final_metrics.json").read_text())
    out["metrics"] = {k: v for k, v in sorted(metrics.items()) if isinstance(v, (int, float))}
    return out


def one(recipe: str, root: Path) -> dict:
    """Train `recipe` tiny (`tiny_recipes.py`: its packaged config + tiny overrides, stage store off)."""
    from tiny_recipes import stage_store_off, train

    out = root / recipe
    with stage_store_off():
        train(recipe, out)
    return fingerprint(out)


def compare(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for recipe in sorted(set(x) & set(y)):  # NaN metrics compare equal through their JSON text
        same = json.dumps(x[recipe], sort_keys=True) == json.dumps(y[recipe], sort_keys=True)
        bad += not same
        print(f"{recipe:24s} {'identical' if same else 'DIFFERENT'}")
        if not same and "weights" in x[recipe] and "weights" in y[recipe]:
            for part in ("weights", "metrics"):
                for k in sorted(set(x[recipe][part]) | set(y[recipe][part])):
                    if json.dumps(x[recipe][part].get(k)) != json.dumps(y[recipe][part].get(k)):
                        print(f"    {part} {k}: {x[recipe][part].get(k)} -> {y[recipe][part].get(k)}")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compare"]:
        return compare(Path(argv[1]), Path(argv[2]))
    if argv[:1] == ["--one"]:
        print(json.dumps(one(argv[1], Path(argv[2]))))
        return 0
    target, recipes = Path(argv[0]), argv[1:] or DEFAULT
    env = {**os.environ, "CXRDISTILL_STAGE_STORE": "off", "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            proc = subprocess.run([sys.executable, __file__, "--one", recipe, tmp], env=env, capture_output=True,
                                  text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                results[recipe] = {"error": proc.returncode}
            else:
                results[recipe] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(recipe, "done", file=sys.stderr, flush=True)
            target.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")  # after each recipe
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
