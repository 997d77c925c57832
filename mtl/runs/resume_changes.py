"""What a resume may change: one table, by config key or section, of settings taken and changes that make another
experiment.

A resumed run continues from its checkpoint's weights, optimizer and schedule, so a changed value takes effect
only where this decides it may. SETTING keys (how long, how often to evaluate, save and log, where, on which
ZeRO stage and launcher) are taken and said. EXPERIMENT keys (model, data, loss, optimiser, and the training
settings that change what is learnt) stop the resume with one line naming each changed key with both values,
unless ``train.resume=force``, which takes them, and the change is recorded in the run folder
(``config_changes.jsonl``) and as MLflow tags. UNCOMPARED keys are not part of what a run is (its name, the resume
setting itself). Classified by section prefix, the most specific entry wins: a key added to a section later, or
renamed inside it, is classified without a change here.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mtl.config import Config, flatten, from_dict, to_dict
from mtl.errors import MtlError
from mtl.runs.layout import RunDir

Kind = Literal["setting", "experiment", "uncompared"]
SETTING: Kind = "setting"
EXPERIMENT: Kind = "experiment"
UNCOMPARED: Kind = "uncompared"

POLICY: dict[str, Kind] = {
    "tasks": EXPERIMENT,
    "data": EXPERIMENT,
    "data.num_workers": SETTING,  # how batches are read, not which
    "data.eval_batch_size": SETTING,
    "model": EXPERIMENT,
    "loss": EXPERIMENT,
    "optim": EXPERIMENT,
    "optim.fused": SETTING,  # the same update through one kernel
    "train": EXPERIMENT,  # grad_accum, grad_clip, precision, seed
    "train.output_dir": SETTING,  # a run folder moved
    "train.max_steps": SETTING,
    "train.zero_stage": SETTING,  # a universal checkpoint converts (as for another world size)
    "train.eval_every": SETTING,
    "train.ckpt_every": SETTING,
    "train.keep_last": SETTING,
    "train.verify_checkpoint": SETTING,
    "train.log_every": SETTING,
    "train.progress": SETTING,
    "train.max_bad_steps": SETTING,
    "train.zero": SETTING,  # overlap and bucket sizes: how the reduce runs, not what it computes
    "train.dist_timeout_min": SETTING,
    "train.device": SETTING,  # where it runs (train.precision=auto follows it)
    "train.resume": UNCOMPARED,
    "tracking": SETTING,
    "tracking.run_name": UNCOMPARED,  # named after the command's overrides, which a resume changes
    "tracking.run_id": UNCOMPARED,  # the checkpoint's own run wins
    "slurm": SETTING,
}
PATHS = ("data.shards", "data.features", "model.pretrained_file", "train.output_dir")  # compared resolved


def kind_of(key: str) -> Kind:
    """The policy of a flattened config key: its most specific entry in POLICY (experiment if none)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = POLICY.get(".".join(parts[:n]))
        if found is not None:
            return found
    return EXPERIMENT


def _norm(key: str, value: Any) -> Any:
    """Paths resolved (a submitted job's are absolute, a local run's may be relative to the same directory)."""
    if key not in PATHS or value is None:
        return value
    if isinstance(value, list):
        return [str(Path(v).expanduser().resolve()) for v in value]
    return str(Path(value).expanduser().resolve())


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any
    kind: Kind

    def __str__(self) -> str:
        return f"{self.key} {json.dumps(self.before)} -> {json.dumps(self.after)}"


@dataclass
class ResumeChanges:
    """The changes between a checkpoint's config and this start's; empty for a fresh start."""

    tag: str | None = None
    forced: bool = False
    changes: list[Change] = field(default_factory=list)

    def of(self, kind: Kind) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    def summary(self, kind: Kind) -> str:
        return "; ".join(map(str, self.of(kind)))

    def tags(self) -> dict[str, str]:
        """MLflow tags of this resume's changes (a run's params keep its first values; MLflow cannot change them)."""
        if not self.changes or self.tag is None:
            return {}
        out = {f"config_change/{self.tag}": "; ".join(map(str, self.changes))[:5000]}
        if self.of(EXPERIMENT):
            out[f"config_change/{self.tag}/forced"] = "true"
        return out

    def record(self, run_dir: RunDir) -> Path | None:
        """One line in the run folder's changes file (append-only: every resume that changed something)."""
        if not self.changes:
            return None
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed_from": self.tag,
                "forced": bool(self.of(EXPERIMENT)), "changes": [asdict(c) for c in self.changes]}  # fmt: skip
        with open(run_dir.changes_file, "a") as f:
            f.write(json.dumps(line) + "\n")
        return run_dir.changes_file


def _defaults() -> dict[str, Any]:
    return flatten(Config())


def _as_now(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config read as this version reads it (keys moved since at their new place, new keys at their
    defaults); as saved when this version cannot read it (then its keys are compared as they are)."""
    try:
        return to_dict(from_dict(saved))
    except MtlError:
        return saved


def compare(saved: dict[str, Any], cfg: Config, tag: str) -> ResumeChanges:
    """Every key whose value differs between a checkpoint's resolved config and ``cfg``. A key one side lacks
    counts as its default."""
    before, after, defaults = flatten(_as_now(saved)), flatten(to_dict(cfg)), _defaults()
    changes = []
    for key in sorted(before.keys() | after.keys()):
        kind = kind_of(key)
        if kind == UNCOMPARED:
            continue
        old, new = _norm(key, before.get(key, defaults.get(key))), _norm(key, after.get(key, defaults.get(key)))
        if old != new:
            changes.append(Change(key, before.get(key, defaults.get(key)), after.get(key, defaults.get(key)), kind))
    return ResumeChanges(tag, cfg.train.resume == "force", changes)


def check(saved: dict[str, Any], cfg: Config, where: Path, tag: str) -> ResumeChanges:
    """The changes a resume from the checkpoint at ``where`` makes; MtlError (one line, every experiment key with
    both values) when they make another experiment and train.resume is not ``force``."""
    found = compare(saved, cfg, tag)
    if found.of(EXPERIMENT) and not found.forced:
        raise MtlError(
            f"{where} was trained with other settings, which make another experiment: {found.summary(EXPERIMENT)}; "
            "train.resume=force resumes with them anyway, or choose another train.output_dir"
        )
    return found
