"""Config: defaults <- file <- overrides, validated once, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtl.config import ConfigError, dump_yaml, flatten, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_precedence_defaults_file_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  zero_stage: 3\n  max_steps: 50\nmodel:\n  temporal: {layers: 2}\n")
    cfg = load_config(f, ["train.max_steps=7", "optim.lr=3e-4", "model.backbone_kwargs={depth: 2}"])
    assert cfg.train.zero_stage == 3  # file
    assert cfg.train.max_steps == 7  # override beats file
    assert cfg.model.temporal.layers == 2 and cfg.model.temporal.heads == 8  # file merges into defaults
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" is a str to YAML 1.1; still a float here
    assert cfg.model.backbone_kwargs == {"depth": 2}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.zero_stag=3", "unknown config key 'train.zero_stag'; did you mean zero_stage"),
        ("trian.max_steps=3", "unknown config key 'trian'; did you mean train"),
        ("train.zero_stage=4", "train.zero_stage: expected a value in [0, 3], got 4"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("model.pool=max", "model.pool: expected 'avg' | 'cls' | 'flatten'"),
        ("train.max_steps=1.5", "train.max_steps: expected int"),
        ("data.augment.crop_scale=[0.9, 0.5]", "data.augment.crop_scale"),
        ("model.temporal.dim=30", "divisible by model.temporal.heads"),
        ("loss.expr_alpha=[1, 2]", "loss.expr_alpha: expected"),
        ("train.zero_stage", "expected key.sub=value"),
        ("model.temporal=3", "model.temporal: expected a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  clip_len: 8\n  batchsize: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "data.batchsize" in str(err.value) and "batch_size" in str(err.value)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(notmap)


def test_round_trip_and_flatten(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.au_alpha=[1,1,1,1,1,1,1,1,1,1,1,2]", "data.mean=[0.5, 0.5, 0.5]"])
    dump_yaml(cfg, tmp_path / "r.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "r.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(cfg)
    assert flat["train.zero_stage"] == 2 and flat["model.temporal.heads"] == 8
    assert flat["loss.au_alpha"][-1] == 2


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    load_config(path)
