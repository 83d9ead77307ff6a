"""Safe by default (issue #12): no unpickling of arbitrary objects, no patient identifiers in any
output, non-finite losses stop the run naming the step and the term."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel
from torch import nn
from typer.testing import CliRunner

from cxrdistill.config import TrainConfig, load_config
from cxrdistill.engine.loop import NonFiniteLossError, Trainer
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.errors import CheckpointError, ConfigError, CxrDistillError
from cxrdistill.methods.registry import get_method, register_method
from cxrdistill.pseudo.store import PseudoLabelStore
from test_reliability_inputs import IDENTIFIERS, ramp, write_dicom


class Exploit:
    """Unpickling this runs `os.system(touch <target>)`: proof of code execution if it happens."""

    target: Path

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


# ---------------------------------------------------------------------------------------------
# malicious pickles


def test_resuming_from_a_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    Exploit.target = tmp_path / "pwned"
    cfg = TrainConfig(max_steps=2, progress=False, tensorboard=False)
    run = RunDirectory(tmp_path / "run", min_free_bytes=0)
    model = nn.Linear(2, 1)
    trainer = Trainer(cfg, run, "stage")
    torch.save({"step": 1, "modules": {"m": model.state_dict()}, "payload": Exploit()}, trainer.last_path)
    with pytest.raises(CheckpointError, match=r"last\.pt: refused to load.*could run code"):
        trainer.fit(lambda b, s: {"l": model(b).sum()}, {"m": model}, build_optimizer(model.parameters(), cfg),
                    iter(lambda: torch.ones(1, 2), None), 2)
    assert not Exploit.target.exists()


def test_pseudo_label_chunk_with_a_pickled_object_is_refused_and_never_runs(tmp_path):
    Exploit.target = tmp_path / "pwned"
    store = PseudoLabelStore(tmp_path / "pseudo", generation=1)
    with store.writer(chunk_size=2) as writer:
        writer.add(1, {"scores": torch.tensor([0.5])})
        writer.add(2, {"scores": torch.tensor([0.7])})
    chunk = store.chunk_files()[0]
    with np.load(chunk) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["image_ids"] = np.array([Exploit(), 2], dtype=object)  # np.savez pickles object arrays
    with open(chunk, "wb") as f:
        np.savez(f, **arrays)
    for call in (store.done_ids, lambda: store.read(require_complete=False)):
        with pytest.raises(CxrDistillError) as err:
            call()
        assert str(chunk) in str(err.value) and "pickled Python objects" in str(err.value)
    assert not Exploit.target.exists()


def test_yaml_config_cannot_construct_python_objects(tmp_path):
    Exploit.target = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"method: !!python/object/apply:os.system ['touch {Exploit.target}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not Exploit.target.exists()


# ---------------------------------------------------------------------------------------------
# NaN / inf losses


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_stage_step_and_term(tmp_path, bad):
    cfg = TrainConfig(max_steps=10, progress=False, tensorboard=False, checkpoint_every=2)
    model = nn.Linear(2, 1)
    trainer = Trainer(cfg, RunDirectory(tmp_path, min_free_bytes=0), "student")

    def step_fn(batch, step):
        term = torch.tensor(bad if step == 4 else 0.0) + 0 * model.weight.sum()
        return {"sup": model(batch).pow(2).mean(), "consistency": term}

    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(step_fn, {"m": model}, build_optimizer(model.parameters(), cfg),
                    iter(lambda: torch.ones(2, 2), None), 10)
    assert f"stage 'student', step 4: non-finite loss term(s): consistency={bad}" in str(err.value)
    assert "sup=" not in str(err.value)  # only the bad term is named
    # the last good checkpoint (step 4) is intact for a resume with a lower learning rate
    assert torch.load(trainer.last_path, weights_only=True)["step"] == 4
    assert not trainer.done_path.exists()


# ---------------------------------------------------------------------------------------------
# patient identifiers never reach logs, reports, outputs or messages


class ProbeParams(BaseModel):
    steps: int = 3


@register_method("reliability_phi_probe", ProbeParams)
def run_phi_probe(cfg, params: ProbeParams, ctx) -> dict[str, float]:
    """A minimal recipe over real data: lenient StudyData (its skipped list is logged and printed as a
    recipe would), a few training steps, predictions written to the run's eval folder."""
    from cxrdistill.data.dataset import collate
    from cxrdistill.data.study import StudyData

    data = StudyData.from_config(cfg.data)
    for issue in data.manifest.skipped:
        ctx.logger.warning("skipped %s", issue)
        ctx.console.print(f"skipped {issue}")
    dataset = data.dataset("train")
    model = nn.Linear(1, 1)
    batch = collate([dataset[i] for i in range(len(dataset))])
    features = batch["image"].mean(dim=(1, 2, 3)).unsqueeze(1)
    targets = batch["image_labels"][:, :1]
    result = ctx.trainer("probe").fit(
        lambda b, s: {"bce": nn.functional.binary_cross_entropy_with_logits(model(b[0]), b[1])},
        {"model": model}, build_optimizer(model.parameters(), cfg.train), iter(lambda: (features, targets), None),
        params.steps)
    scores = torch.sigmoid(model(features)).detach()[:, 0].tolist()
    preds = [{"image_id": i, "category_id": 1, "bbox": [4.0, 4.0, 10.0, 10.0], "score": s}
             for i, s in zip(batch["image_id"].tolist(), scores)]
    (ctx.run_dir.eval / "predictions.json").write_text(json.dumps(preds))
    return {"loss": result.metrics.get("loss", 0.0), "n_images": float(len(dataset)),
            "n_skipped": float(len(data.manifest.skipped))}


def test_patient_identifiers_never_appear_in_outputs_logs_or_messages(tmp_path, caplog):
    from cxrdistill.cli import app

    data = tmp_path / "data"
    names = []
    for i in range(6):
        write_dicom(data / f"img{i}.dcm", np.roll(ramp(high=4095), 3 * i, axis=1))
        names.append(f"img{i}.dcm")
    write_dicom(data / "nopixels.dcm", None, rows=40, columns=48)
    broken = write_dicom(data / "broken.dcm", ramp(high=4095))
    broken.write_bytes(broken.read_bytes()[:-1000])  # pixel data cut short
    names += ["nopixels.dcm", "broken.dcm"]
    raw = {"categories": [{"id": 1, "name": "nodule"}],
           "images": [{"id": k + 1, "file_name": n, "width": 48, "height": 40, "split": "train",
                       "labels": ["nodule"] if k % 2 else []} for k, n in enumerate(names)],
           "annotations": [{"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [4, 4, 10, 10]}
                           for k in range(1, len(names), 2)]}
    (data / "manifest.json").write_text(json.dumps(raw))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{manifest: {data / 'manifest.json'}, cache_dir: {tmp_path / 'cache'}, image_size: 32, "
        "on_error: lenient}\n"
        "train: {max_steps: 3, progress: false, tensorboard: true, log_every: 1, checkpoint_every: 1}\n"
        "method: {name: reliability_phi_probe}\n")
    runner = CliRunner()
    run = tmp_path / "run"
    caplog.set_level(logging.DEBUG)
    outputs = []
    train = runner.invoke(app, ["train", "--config", str(config), "-o", str(run)])
    outputs.append(train.output)
    assert train.exit_code == 0, train.output
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["n_images"] == 6 and metrics["n_skipped"] == 2
    assert "nopixels.dcm" in train.output and "broken.dcm" in train.output  # the skipped are named
    evaluate = runner.invoke(app, ["evaluate", "--manifest", str(data / "manifest.json"), "--predictions",
                                   str(run / "eval" / "predictions.json"), "--split", "all", "--n-boot", "20",
                                   "--out", str(run / "eval" / "metrics.json")])
    outputs.append(evaluate.output)
    report = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "report.html")])
    outputs.append(report.output)
    assert evaluate.exit_code == 0 and report.exit_code == 0, evaluate.output + report.output
    for name in ("broken.dcm", "nopixels.dcm"):  # a strict load names them, with no identifier either
        with pytest.raises(CxrDistillError) as err:
            from cxrdistill.data.cache import ImageCache

            ImageCache.build([data / name], 16, tmp_path / "strict_cache")
        outputs.append(str(err.value))
    outputs += [r.getMessage() for r in caplog.records]

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != data]
    assert {"last.pt", "metrics.csv", "config.yaml", "index_v2_32.json", "predictions.json", "metrics.json",
            "report.html"} <= {p.name for p in written}
    assert any(p.name.startswith("events.out.tfevents") for p in written)
    for path in written:
        content = path.read_bytes()
        for identifier in IDENTIFIERS:
            assert identifier.encode() not in content, f"{identifier!r} found in {path}"
            assert identifier.encode("utf-16-le") not in content, f"{identifier!r} found in {path}"
    for text in outputs:
        assert not any(i in text for i in IDENTIFIERS), text
    # and the identifiers really are in the inputs (the grep would find them)
    assert all(i.encode() in (data / "img0.dcm").read_bytes() for i in IDENTIFIERS)


def test_probe_recipe_is_registered():
    assert get_method("reliability_phi_probe").params_cls is ProbeParams
