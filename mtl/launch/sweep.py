"""Sweeps: a YAML list of override sets -> one SLURM job array, one MLflow parent run with one child per element.

File format (see configs/sweeps/example.yaml)::

    name: mask-prob            # parent run name (default: the file name)
    config: configs/smoke.yaml # used when `--config` is not given (relative to the current directory)
    base: {train.max_steps: 6} # overrides for every element
    grid:                      # optional: the cartesian product of these values ...
      model.mask.prob: [0.1, 0.3]
    runs:                      # ... followed by these explicit override sets (optional)
      - {model.mask.mode: feature, model.mask.prob: 0.5}

Keys are dotted config keys, values YAML values. Precedence: config file < base < command-line overrides <
element. An element is named by its own overrides (``model.mask.prob=0.1``), which is its MLflow run name, and
trains in ``<train.output_dir>/<index>-<name>`` unless it sets train.output_dir itself. Elements may not set
slurm.* (one array has one resource request) or tracking.* (children must share the parent's store and
experiment). Every element is validated before the array is queued.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl.config import Config, read_yaml, replace
from mtl.errors import ConfigError, MtlError
from mtl.launch import prepare, slurm_request
from mtl.launch.jobs import Printer, array_id, echo, slug
from mtl.launch.submit import Plan, describe, follow, queue_plan
from mtl.naming import overrides_name, to_overrides
from mtl.runs.layout import RUN_ID_FILE
from mtl.tracking.runs import client, end_runs, tag_run

_TOP_KEYS = {"name", "config", "base", "grid", "runs"}
_FORBIDDEN = ("slurm.", "tracking.")


@dataclass
class Sweep:
    path: Path
    name: str
    config: str | None
    base: dict[str, Any]
    elements: list[dict[str, Any]]


def _overrides_map(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {value!r}")
    return dict(value)


def read_sweep(path: str | Path) -> Sweep:
    """Parse and shape-check a sweep file (config values are checked later, per element)."""
    path = Path(path)
    data = read_yaml(path)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; a sweep has {sorted(_TOP_KEYS)}")
    base = _overrides_map(data.get("base"), f"{path}: base")
    grid = _overrides_map(data.get("grid"), f"{path}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}: expected a non-empty list of values, got {values!r}")
    runs = data.get("runs") or []
    if not isinstance(runs, list):
        raise ConfigError(f"{path}: runs: expected a list of override mappings, got {runs!r}")
    elements = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    elements += [_overrides_map(r, f"{path}: runs[{i}]") for i, r in enumerate(runs)]
    if not elements:
        raise ConfigError(f"{path}: no runs: give `grid` and/or `runs`")
    for i, el in enumerate(elements):
        for key in el:
            if key.startswith(_FORBIDDEN):
                raise ConfigError(
                    f"{path}: element {i} sets {key}: slurm.* and tracking.* are the same for the whole sweep "
                    "(put them in `base` or on the command line)"
                )
    names = [element_name(el) for el in elements]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: the same override set appears twice: {dupes[0]}")
    config = data.get("config")
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"{path}: config: expected a file path, got {config!r}")
    name = data.get("name") or path.stem
    return Sweep(path, str(name), config, base, elements)


def element_name(element: dict[str, Any]) -> str:
    """The element's own overrides, ``key=value,key=value`` (mtl.naming, as every run is named): its MLflow run
    name."""
    return overrides_name(to_overrides(element)) or "base"


def element_configs(sweep: Sweep, config: str | Path | None, overrides: list[str], flags: dict) -> list[Config]:
    """One validated, path-resolved Config per element; errors name the sweep file and the element."""
    config = config or sweep.config
    common = [*to_overrides(sweep.base), *overrides]
    try:
        base_cfg = slurm_request.load_for_submit(config, common, flags)
    except ConfigError as exc:
        raise ConfigError(f"{sweep.path}: base: {exc}") from None
    cfgs: list[Config] = []
    for i, el in enumerate(sweep.elements):
        name = element_name(el)
        extra = (
            []
            if "train.output_dir" in el
            else [f"train.output_dir={base_cfg.train.output_dir}/{i:03d}-{slug(name, 80)}"]
        )
        try:
            cfgs.append(slurm_request.load_for_submit(config, [*common, *extra, *to_overrides(el)], flags))
        except ConfigError as exc:
            raise ConfigError(f"{sweep.path}: element {i} ({name}): {exc}") from None
    outs = [c.train.output_dir for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"{sweep.path}: two elements share a train.output_dir; each run needs its own")
    return cfgs


def plan_sweep(sweep: Sweep, config: str | Path | None, overrides: list[str], flags: dict) -> tuple[Plan, str | None]:
    """Every element validated and checked, then the parent run and one child run per element: (plan, parent)."""
    from mtl.tracking.mlflow_run import create_run

    cfgs = element_configs(sweep, config, overrides, flags)
    first = cfgs[0]
    partition = slurm_request.check_request(first)
    for cfg in cfgs:
        prepare.check_inputs(cfg)
    for cfg in cfgs:
        if prepare.existing_run_id(cfg):
            raise MtlError(
                f"{cfg.train.output_dir} already holds a run (its {RUN_ID_FILE} file): a sweep starts fresh "
                "runs; set another train.output_dir in the sweep's base or on the command line"
            )
    t = first.tracking
    names = [element_name(el) for el in sweep.elements]
    plan = Plan([], names, partition, sweep.name, array=True)
    parent_id = None
    try:
        if t.enabled:
            parent_id = create_run(
                t, run_name=sweep.name, tags={"mtl.sweep": str(sweep.path), "mtl.sweep.size": str(len(cfgs))}
            )
            plan.made.append(parent_id)
        for cfg, name in zip(cfgs, names):
            run_id = None
            if t.enabled:
                run_id = create_run(t, run_name=name, parent_run_id=parent_id, tags={"mtl.sweep.overrides": name})
                plan.made.append(run_id)
            plan.cfgs.append(replace(cfg, tracking=replace(cfg.tracking, run_id=run_id, run_name=name)))
    except Exception as exc:
        error = (
            exc
            if isinstance(exc, MtlError)
            else MtlError(f"could not make the sweep's MLflow runs in {t.uri}: {str(exc).strip().splitlines()[0]}")
        )
        end_runs(t.uri, plan.made, "FAILED", str(error))
        raise error from exc
    return plan, parent_id


def submit_sweep(
    sweep_file: str | Path,
    config: str | Path | None,
    overrides: list[str],
    flags: dict[str, object],
    *,
    out: Printer = echo,
    wait: bool = False,
) -> int:
    """`mtl submit --sweep FILE`: validate every element, make the runs, queue one array."""
    sweep = read_sweep(sweep_file)
    plan, parent_id = plan_sweep(sweep, config, overrides, flags)
    queued = queue_plan(plan)
    t, array = plan.first.tracking, array_id(queued)
    if parent_id:
        tag_run(t.uri, parent_id, {"submit.job_id": array})
        client(t.uri).set_terminated(parent_id, "FINISHED")  # it groups the children; their states are the truth
    out(f"submitted job array {array} with {len(queued)} element(s) ({describe(plan.first, plan.partition)})")
    if parent_id:
        out(f"  mlflow  parent run {parent_id} '{sweep.name}' (experiment '{t.experiment}') in {t.uri}")
    for q in queued:
        out(f"  {q.job_id}  run {q.run_id}  {q.name}")
        out(f"      stdout {q.task0.paths.stdout}")
    outcomes = follow(plan, queued, wait, out)
    if outcomes is None:
        return 0
    failed = sum(not o.ok for o in outcomes)
    if failed and parent_id:
        client(t.uri).set_terminated(parent_id, "FAILED")
    out(f"sweep {sweep.name}: {len(queued) - failed} of {len(queued)} completed")
    return 1 if failed else 0
