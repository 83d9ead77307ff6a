"""Run configs: YAML + overrides, clear errors for unknown keys and wrong types, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from cxrdistill.config import RunConfig, dump_config, load_config
from cxrdistill.errors import ConfigError
from cxrdistill.methods import registry
from cxrdistill.methods.registry import get_method, load_run_config, register_method, validate_method_params


class ToyParams(BaseModel):
    kappa: float = 0.5
    generations: int = 1


@register_method("config_test_toy", ToyParams)
def _run(cfg, params, ctx):
    return {}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
data: {image_size: 64}
train: {max_steps: 20, lr: 0.001}
method: {name: config_test_toy, params: {kappa: 0.3}}
output_dir: runs/x
"""


def test_yaml_and_typed_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.lr=3e-4", "train.devices=[0, 1]", "model.options.fpn=true",
                                              "method.params.generations=3", "data.manifest=data/m.json"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 20 and cfg.train.devices == [0, 1]
    assert cfg.model.options == {"fpn": True} and cfg.data.image_size == 64
    assert cfg.data.manifest == Path("data/m.json") and cfg.method.params == {"kappa": 0.3, "generations": 3}
    assert validate_method_params(cfg.method.name, cfg.method.params) == ToyParams(kappa=0.3, generations=3)


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key; did you mean 'max_steps'\?"):
        load_config(write(tmp_path, BASE + "\n"), ["train.max_step=5"])
    with pytest.raises(ConfigError, match=r"modle: unknown key; did you mean 'model'\?"):
        load_config(write(tmp_path, BASE + "modle: {depth: 3}\n"))


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), ["train.max_steps=many"])
    assert "train.max_steps: expected int, got 'many' (str)" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.precision: expected one of '32-true', 'bf16-mixed', '16-mixed', got 'fp8'"):
        load_config(write(tmp_path, BASE), ["train.precision=fp8"])


def test_method_params_are_validated_by_the_method(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_scanned", True)  # only this file's method: skip importing every recipe
    with pytest.raises(ConfigError, match=r"method\.params\.kapa: unknown parameter .*did you mean 'kappa'"):
        load_run_config(write(tmp_path, BASE), ["method.params.kapa=1"])
    with pytest.raises(ConfigError, match=r"method\.params\.generations: expected int, got 'two'"):
        load_run_config(write(tmp_path, BASE), ["method.params.generations=two"])
    with pytest.raises(ConfigError, match=r"unknown method 'config_test_tyo'; did you mean 'config_test_toy'"):
        load_run_config(write(tmp_path, BASE), ["method.name=config_test_tyo"])
    assert get_method("config_test_toy").params_cls is ToyParams


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected the form a.b.c=value"):
        load_config(write(tmp_path, BASE), ["train.lr"])
    with pytest.raises(ConfigError, match=r"train\.lr is a value"):
        load_config(write(tmp_path, BASE), ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"method: required key is missing"):
        load_config(write(tmp_path, "train: {lr: 0.1}\n"))


def test_dump_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.precision=bf16-mixed"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and isinstance(again, RunConfig)
    assert "warmup_steps: 0" in (tmp_path / "resolved.yaml").read_text()  # defaults are written out
