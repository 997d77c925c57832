"""A run's directory (``train.output_dir``): the names in it, and which checkpoint a path or a resume setting means.

``mtl train`` writes it, ``mtl eval`` (and every command that loads a trained run) reads it, ``mtl submit`` checks
it on the login node, so this module imports no torch. Loading the weights it points at is
:mod:`mtl.runs.trained`'s job; saving a checkpoint collectively is :mod:`mtl.engine.checkpoint`'s.

    <output_dir>/run.lock                          who trains in it now (host, pid, SLURM job, lease): mtl.runs.lock
    <output_dir>/mlflow_run_id                     the MLflow run, written before the first checkpoint exists
    <output_dir>/config_changes.jsonl              settings a resume changed, one line per resume that changed any
    <output_dir>/checkpoints/step_NNNNNNNN/        one DeepSpeed checkpoint; counts once complete.json is in it
                                                   (which records every file's size: ``damage``), and
                                                   sha256_rankNNNNN.json (each rank's files' sha256, by it)
    <output_dir>/export/{last,best}.safetensors    consolidated fp32 weights, resolved config in the metadata
    <path>/eval_<split>/                           what `mtl eval` writes by default
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl.errors import MtlError

RUN_ID_FILE = "mlflow_run_id"
LOCK_FILE = "run.lock"
CHANGES_FILE = "config_changes.jsonl"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
COMPLETE = "complete.json"  # written last, by rank 0, once every rank has saved its part
DAMAGED = "damaged.json"  # a complete.json whose files no longer match it, renamed: never complete again
TAG_RE = re.compile(r"^step_(\d{8})$")
WEIGHTS_SUFFIX = ".safetensors"
EXPORTS = ("last", "best")

# ------------------------------------------------------------------------------------------ checkpoint tags


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a completion marker, oldest first (a tag killed mid-save has none and is ignored)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file())


def latest_complete(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


HASHES = "sha256_rank"  # sha256_rankNNNNN.json: {file: sha256} of the files that rank wrote, hashed by it
_OWNER_RE = re.compile(r"(?:zero_pp_rank_|rng_rank)0*(\d+)")


def owner(rel: str) -> int:
    """The rank that writes a checkpoint file: its rank is in DeepSpeed's per-rank names and ours; the rest
    (the model states of ZeRO-0/1/2) are rank 0's."""
    m = _OWNER_RE.search(Path(rel).name)
    return int(m.group(1)) if m else 0


def _payload(tag_dir: Path) -> list[Path]:
    skip = (COMPLETE, DAMAGED, HASHES)
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and not p.name.startswith(skip))


def file_records(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """Size of every file of a tag (its marker and hash files excluded), by path relative to the tag: a stat each,
    however large the checkpoint (the hashes are each writer's, ``write_hashes``)."""
    return {str(p.relative_to(tag_dir)): {"size": p.stat().st_size} for p in _payload(tag_dir)}


def write_hashes(tag_dir: Path, rank: int) -> Path:
    """sha256 of the files ``rank`` wrote in a tag (``owner``), by that rank, right after writing them (they are
    still in its page cache, and every rank hashes its own at once). Atomic."""
    from mtl.data.manifest import file_sha256

    mine = {str(p.relative_to(tag_dir)): file_sha256(p) for p in _payload(tag_dir)
            if owner(str(p.relative_to(tag_dir))) == rank}  # fmt: skip
    path = tag_dir / f"{HASHES}{rank:05d}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(mine, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def recorded_hashes(tag_dir: Path) -> dict[str, str]:
    """Every sha256 the writers recorded (and those of markers from before hashes were per rank)."""
    out: dict[str, str] = {}
    for p in sorted(tag_dir.glob(f"{HASHES}*.json")):
        try:
            out.update(json.loads(p.read_text()))
        except (OSError, ValueError) as exc:
            raise MtlError(f"{p}: unreadable checkpoint hashes ({exc})") from None
    try:
        files = json.loads((tag_dir / COMPLETE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        files = {}
    out.update({rel: rec["sha256"] for rel, rec in files.items() if isinstance(rec, dict) and "sha256" in rec})
    return out


def write_marker(tag_dir: Path, state: dict[str, Any]) -> None:
    """The completion marker, atomically: a checkpoint counts from the moment this rename lands. It records what
    was written (sizes), so a file lost or truncated later is found before DeepSpeed reads it (``damage``)."""
    path = tag_dir / COMPLETE
    tmp = path.with_suffix(path.suffix + ".tmp")
    marker = {"tag": tag_dir.name, "state": state, "files": file_records(tag_dir)}
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The training state saved with a complete checkpoint (step, best tag, run id, resolved config...)."""
    path = tag_dir / COMPLETE
    try:
        with open(path) as f:
            return json.load(f)["state"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MtlError(f"{path}: not a readable checkpoint marker ({exc})") from None


def damage(tag_dir: Path, full: bool = False) -> str | None:
    """What no longer matches the files recorded in a complete tag's marker; None when intact (or unrecorded).
    Sizes only (a stat per file: a lost or truncated file), unless ``full``: then every byte against the sha256
    its writer recorded (``mtl runs verify``, ``train.verify_checkpoint``)."""
    from mtl.data.manifest import file_sha256

    try:
        files = json.loads((tag_dir / COMPLETE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as exc:
        return f"{COMPLETE} unreadable ({exc})"
    for rel, want in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} has {path.stat().st_size} bytes, {want['size']} were written"
    if not full:
        return None
    try:
        hashes = recorded_hashes(tag_dir)
    except MtlError as exc:
        return str(exc)
    for rel in files:
        if rel not in hashes:  # its writer was stopped before hashing it: its size was checked above
            continue
        if file_sha256(tag_dir / rel) != hashes[rel]:
            return f"{rel} does not match the sha256 recorded when it was saved"
    return None


def newest_intact(ckpt_dir: Path, warn: Callable[[str], None], full: bool = False) -> str | None:
    """The newest complete tag whose files are intact (sizes; every byte when ``full``). A damaged newer one is
    marked so (its marker renamed to damaged.json, so nothing treats it as complete again and the next save prunes
    it) and reported. Run it on one rank and share the answer."""
    for tag in reversed(complete_tags(ckpt_dir)):
        problem = damage(ckpt_dir / tag, full)
        if problem is None:
            return tag
        os.replace(ckpt_dir / tag / COMPLETE, ckpt_dir / tag / DAMAGED)
        warn(f"checkpoint {ckpt_dir / tag} is damaged ({problem}); marked {DAMAGED}, falling back to the one before")
    return None


def unhashed(tag_dir: Path) -> list[str]:
    """Files of a complete tag with no sha256 recorded (a writer killed between its save and its hashing): only
    their sizes can be checked."""
    try:
        files = json.loads((tag_dir / COMPLETE).read_text()).get("files", {})
        hashes = recorded_hashes(tag_dir)
    except (OSError, ValueError, AttributeError, MtlError):
        return []
    return sorted(rel for rel in files if rel not in hashes)


def verify_run(path: Path) -> dict[str, str | None]:
    """Every complete checkpoint of a run dir (or a checkpoints dir), every byte against its writers' sha256:
    tag -> problem (None: intact). Marks nothing: `mtl runs verify` reports, a resume decides."""
    path = Path(path)
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    tags = complete_tags(root)
    if not tags:
        raise MtlError(f"{path}: no complete checkpoint (a run dir or its {CHECKPOINTS} dir?)")
    return {tag: damage(root / tag, full=True) for tag in tags}


@dataclass(frozen=True)
class Checkpoint:
    """One complete DeepSpeed checkpoint: ``root / tag`` (DeepSpeed addresses it as the pair)."""

    root: Path
    tag: str

    @property
    def dir(self) -> Path:
        return self.root / self.tag

    def state(self) -> dict[str, Any]:
        return read_marker(self.dir)


# ------------------------------------------------------------------------------------------ the run dir


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def exports(self) -> Path:
        return self.root / EXPORT

    def export_file(self, which: str) -> Path:
        """``which`` is "last" or "best"."""
        return self.exports / f"{which}{WEIGHTS_SUFFIX}"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def changes_file(self) -> Path:
        return self.root / CHANGES_FILE

    @property
    def run_id_file(self) -> Path:
        return self.root / RUN_ID_FILE

    def write_run_id(self, run_id: str) -> None:
        self.run_id_file.write_text(f"{run_id}\n")

    def recorded_run_id(self, resume: str) -> str | None:
        """The MLflow run this directory already belongs to, so a restart or resubmission continues it;
        none under train.resume=never, which starts afresh."""
        if resume == "never" or not self.run_id_file.is_file():
            return None
        return self.run_id_file.read_text().strip() or None

    def latest(self, warn: Callable[[str], None] | None = None, full: bool = False) -> Checkpoint | None:
        """The newest complete checkpoint; with ``warn``, the newest intact one (damaged ones marked, reported;
        ``full``: every byte checked)."""
        tag = latest_complete(self.checkpoints) if warn is None else newest_intact(self.checkpoints, warn, full)
        return Checkpoint(self.checkpoints, tag) if tag else None

    def require_no_checkpoints(self) -> None:
        if complete_tags(self.checkpoints):
            raise MtlError(
                f"train.resume=never but {self.checkpoints} already holds checkpoints; "
                "use train.resume=auto to continue it or choose another train.output_dir"
            )


# ------------------------------------------------------------------------------------------ resolution


def _in_dir(path: Path) -> Checkpoint | None:
    """``path`` as a tag dir, a run dir or a checkpoints dir: that checkpoint, or the latest complete one."""
    if (path / COMPLETE).is_file():
        return Checkpoint(path.parent, path.name)
    for root in (path / CHECKPOINTS, path):
        tag = latest_complete(root)
        if tag is not None:
            return Checkpoint(root, tag)
    return None


def resume_point(
    resume: str, run: RunDir, warn: Callable[[str], None] | None = None, full: bool = False
) -> Checkpoint | None:
    """Where training continues from (None: from scratch), for train.resume = auto | force | never | a directory.
    ``force`` resumes as ``auto`` does; it only lets the resume change settings that make another experiment.

    With ``warn`` (training, on one rank), train.resume=auto skips damaged checkpoints (see ``newest_intact``;
    ``full``: by their hashes, ``train.verify_checkpoint``).
    """
    if resume == "never":
        run.require_no_checkpoints()
        return None
    if resume in ("auto", "force"):
        return run.latest(warn, full)
    path = Path(resume)
    if not path.exists():
        raise MtlError(f"train.resume={resume}: no such checkpoint directory")
    found = _in_dir(path)
    if found is None:
        raise MtlError(f"train.resume={resume}: no complete checkpoint found there")
    return found


def resolve_trained(path: Path) -> Path | Checkpoint:
    """The weights a path means, for commands that load a trained run (`mtl eval`, ...).

    A .safetensors file is itself. A run directory means its exported best weights, else its best complete
    checkpoint (the latest's record of the best, else the latest); an export directory, its best.safetensors;
    a checkpoint tag directory, that checkpoint.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != WEIGHTS_SUFFIX:
            raise MtlError(f"{path}: not a {WEIGHTS_SUFFIX} file; give a run directory, a checkpoint or an export")
        return path
    if not path.is_dir():
        raise MtlError(f"{path}: no such run directory, checkpoint or {WEIGHTS_SUFFIX} file")
    for candidate in (RunDir(path).export_file("best"), path / f"best{WEIGHTS_SUFFIX}"):
        if candidate.is_file():
            return candidate
    found = _in_dir(path)
    if found is None:
        raise MtlError(f"{path}: no exported weights and no complete checkpoint found")
    if (path / COMPLETE).is_file():
        return found  # a tag named explicitly is the one wanted
    best = found.state().get("best_tag")
    if best and (found.root / best / COMPLETE).is_file():
        return Checkpoint(found.root, best)
    return found


def trained_run_id(source: Path | Checkpoint, config: dict[str, Any]) -> str | None:
    """The MLflow run that trained the weights at ``source`` (as ``resolve_trained`` gives it): the checkpoint's
    state, else the run its config names (exports carry it), else the run-id file of the run dir it sits in."""
    if isinstance(source, Checkpoint):
        found = source.state().get("run_id")
        run_root = source.root.parent if source.root.name == CHECKPOINTS else None
    else:
        found = None
        run_root = source.parent.parent if source.parent.name == EXPORT else None
    found = found or (config.get("tracking") or {}).get("run_id")
    if not found and run_root is not None:
        found = RunDir(run_root).recorded_run_id("auto")
    return found


def eval_dir(path: Path, split: str) -> Path:
    """Where `mtl eval` writes by default: beside what it evaluated (in a directory, or next to a file)."""
    path = Path(path)
    return (path if path.is_dir() else path.parent) / f"eval_{split}"
