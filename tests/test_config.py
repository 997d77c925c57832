"""Config: defaults <- file <- overrides, validated once, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtl.config import dump_yaml, flatten, from_dict, load_config, replace, to_dict
from mtl.errors import ConfigError

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
        ("loss.tasks.expr.alpha=[1, 2]", "loss.tasks.expr.alpha: expected 'auto', 'none' or a list of 8 non-neg"),
        ("loss.tasks.au.alpha=[2,2,2,2,2,2,2,2,2,2,2,2]", "loss.tasks.au.alpha: expected 'auto', 'none' or a li"),
        ("loss.tasks.expr.alpha=some", "loss.tasks.expr.alpha: expected 'auto' | 'none' or list[float], got 'some'"),
        ("loss.tasks.au.gamma=-1", "loss.tasks.au.gamma: expected a value >= 0, got -1"),
        ("loss.tasks.expr.alhpa=none", "'loss.tasks.expr.alhpa'; did you mean alpha? (valid keys in loss.tasks.expr"),
        ("loss.tasks.exr.alpha=none", "'loss.tasks.exr'; did you mean expr? (valid keys in loss.tasks: au, expr, va)"),
        ("loss.tasks.va.alpha=none", "unknown config key 'loss.tasks.va.alpha' (loss.tasks.va takes no keys)"),
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


def test_errors_name_their_source_file_or_command_line(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  max_steps: 50\nmodel:\n  temporal: {dim: 30, heads: 6}\n")
    for override, needle in [
        ("train.max_step=3", "command line: unknown config key 'train.max_step'; did you mean max_steps"),
        ("train.zero_stage=9", "command line: train.zero_stage: expected a value in [0, 3], got 9"),
        ("model.temporal.heads=8", "command line: model.temporal.dim (30) must be divisible"),  # file fine alone
        ("train.max_steps", "command line: override 'train.max_steps': expected key.sub=value"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(good, [override])
        assert str(err.value).startswith(needle) and str(good) not in str(err.value)

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 50\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["train.max_steps=3"])  # a valid override does not hide the file's error
    assert str(err.value).startswith(f"{bad}: unknown config key 'train.max_step'") and "command line" not in str(
        err.value
    )

    apart = tmp_path / "apart.yaml"  # each key valid, together not
    apart.write_text("model:\n  temporal: {dim: 30}\n")
    with pytest.raises(ConfigError) as err:
        load_config(apart)
    assert str(err.value).startswith(f"{apart}: model.temporal.dim (30) must be divisible")
    with pytest.raises(ConfigError) as err:
        load_config(apart, ["model.temporal.heads=7"])
    assert str(err.value).startswith(f"{apart} with the command-line overrides: model.temporal.dim (30)")
    assert load_config(apart, ["model.temporal.heads=6"]).model.temporal.heads == 6  # the command line may fix it


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"train": {"progress": 1}}, "train.progress: expected bool, got 1 (int)"),
        ({"train": {"progress": "yes"}}, "train.progress: expected bool, got 'yes' (str)"),
        ({"train": {"max_steps": 1.5}}, "train.max_steps: expected int, got 1.5 (float)"),
        ({"train": {"max_steps": "2"}}, "train.max_steps: expected int, got '2' (str)"),
        ({"train": {"seed": True}}, "train.seed: expected int, got True (bool)"),
        ({"optim": {"lr": True}}, "optim.lr: expected float, got True (bool)"),
        ({"train": {"resume": 3}}, "train.resume: expected str, got 3 (int)"),
        ({"data": {"augment": {"crop_scale": [0.5, "x"]}}}, "data.augment.crop_scale[1]: expected float, got 'x'"),
        ({"data": {"mean": [0.5, 0.5]}}, "data.mean: expected tuple[float, float, float] or NoneType"),
        ({"slurm": {"tasks_per_node": 0}}, "slurm.tasks_per_node: expected a value >= 1, got 0"),
    ],
)
def test_field_types_are_strict(section: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(section)
    assert needle in str(err.value)


def test_whole_floats_are_ints_and_numeric_strings_are_floats() -> None:
    cfg = from_dict({"train": {"max_steps": 2.0}, "optim": {"lr": "1e-4", "eps": 1}})
    assert cfg.train.max_steps == 2 and type(cfg.train.max_steps) is int
    assert cfg.optim.lr == pytest.approx(1e-4) and type(cfg.optim.eps) is float


def test_loss_weights_map_task_names(tmp_path: Path) -> None:
    assert load_config(None).loss.weights == {"va": 1.0, "expr": 1.0, "au": 1.0}
    assert load_config(None, ["loss.weights.au=0"]).loss.weights == {"va": 1.0, "expr": 1.0, "au": 0.0}
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.weights.vaa=2"])
    assert "unknown config key 'loss.weights.vaa'; did you mean va?" in str(err.value)
    assert "(valid keys in loss.weights: au, expr, va)" in str(err.value)
    with pytest.raises(ConfigError, match=r"loss.weights.expr: expected a value >= 0, got -1"):
        load_config(None, ["loss.weights.expr=-1"])
    with pytest.raises(ConfigError, match="loss.weights.va: expected float, got 'x'"):
        load_config(None, ["loss.weights.va=x"])


def test_loss_options_belong_to_their_task() -> None:
    cfg = load_config(None, ["loss.tasks.expr.alpha=none", "loss.tasks.au.gamma=0.5"])
    assert cfg.loss.tasks["expr"].alpha == "none" and cfg.loss.tasks["expr"].gamma == 2.0  # the task's default
    assert cfg.loss.tasks["au"].gamma == 0.5 and cfg.loss.tasks["au"].alpha == "auto"
    assert set(type(cfg.loss).model_fields) == {"weights", "tasks"}, "no loss setting belongs to one task"
    assert replace(cfg.loss, weights={"va": 2.0}).tasks == cfg.loss.tasks


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("loss.expr_alpha=none", "'loss.expr_alpha' is now loss.tasks.expr.alpha"),
        ("loss.au_alpha=none", "'loss.au_alpha' is now loss.tasks.au.alpha"),
        ("loss.focal_gamma=1", "'loss.focal_gamma' is now loss.tasks.expr.gamma, loss.tasks.au.gamma"),
    ],
)
def test_a_users_old_loss_key_is_refused_naming_the_new_one(tmp_path: Path, old: str, new: str) -> None:
    with pytest.raises(ConfigError, match=f"^command line: config key {new}"):
        load_config(None, [old])
    key, value = old.split("=")
    f = tmp_path / "old.yaml"
    f.write_text(f"loss:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match=f"^{f}: config key {new}"):
        load_config(f)


def test_a_saved_config_of_an_older_release_reads_its_loss_keys_where_they_live_now() -> None:
    old = {"loss": {"weights": {"va": 2.0}, "focal_gamma": 1.5, "expr_alpha": list(range(1, 9)), "au_alpha": "none"}}
    cfg = from_dict(old)
    assert cfg.loss.weights["va"] == 2.0
    assert cfg.loss.tasks["expr"].gamma == 1.5 and cfg.loss.tasks["expr"].alpha == list(range(1, 9))
    assert cfg.loss.tasks["au"].gamma == 1.5 and cfg.loss.tasks["au"].alpha == "none"
    assert "focal_gamma" in old["loss"], "the caller's dict is left as it was"
    both = from_dict({"loss": {"focal_gamma": 1.5, "tasks": {"au": {"gamma": 3}}}})
    assert both.loss.tasks["au"].gamma == 3.0 and both.loss.tasks["expr"].gamma == 1.5  # the new place wins
    with pytest.raises(ConfigError, match="loss.tasks.expr.alpha: expected 'auto', 'none' or a list of 8"):
        from_dict({"loss": {"expr_alpha": [1, 2]}})  # moved, then checked like any value


def test_replace_copies_a_section_with_changes_validated() -> None:
    cfg = from_dict({})
    out = replace(cfg, train=replace(cfg.train, max_steps=5))
    assert out.train.max_steps == 5 and out.train.zero_stage == cfg.train.zero_stage and cfg.train.max_steps == 10_000
    with pytest.raises(ValueError, match="max_steps"):
        replace(cfg.train, max_steps=1.5)


def test_round_trip_and_flatten(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.tasks.au.alpha=[1,1,1,1,1,1,1,1,1,1,1,0.5]", "data.mean=[0.5, 0.5, 0.5]"])
    dump_yaml(cfg, tmp_path / "r.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "r.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(cfg)
    assert flat["train.zero_stage"] == 2 and flat["model.temporal.heads"] == 8
    assert flat["loss.tasks.au.alpha"][-1] == 0.5 and flat["loss.tasks.expr.gamma"] == 2.0


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    load_config(path)
