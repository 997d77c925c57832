"""`mtl features --array K`: feature extraction as one SLURM job array of K tasks, checked on the login node
first, then queued and waited for as `mtl submit`'s jobs are (mtl.launch.jobs, mtl.launch.wait).

Task i extracts its share of the plan's output shards, dealt by frames (``mtl.extraction.extract.share``: a long
video's samples are spread over several shards, so one long video holds no task up); the last task to finish
(every planned shard on disk) writes the manifest. A preempted task is requeued by submitit and resumes: finished
shards are kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mtl.errors import MtlError
from mtl.launch.jobs import Printer, Queued, array_id, echo, queue, slug
from mtl.launch.wait import failure, wait_all


class FeaturesTask:
    """Picklable callable for ``executor.submit``; the spec travels as a plain dict."""

    def __call__(self, shards: str, out: str, spec: dict[str, Any], index: int, count: int) -> dict[str, Any]:
        from mtl.extraction.extract import ExtractSpec, Part, extract

        manifest = extract(Path(shards), Path(out), ExtractSpec(**spec), part=Part(index, count), progress=False)
        return {"task": index, "wrote_manifest": manifest is not None}

    def checkpoint(self, *args: Any) -> Any:
        """Preempted or timed out: run the same task again (it skips the shards it finished)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def check_inputs(shards: Path, spec: Any) -> None:
    """What the tasks would fail on first, here in seconds: the pack, the weights or run, the backbone name."""
    import timm

    from mtl.data.manifest import read_manifest
    from mtl.extraction.extract import check_spec

    check_spec(spec)
    read_manifest(shards)
    if spec.checkpoint is not None:
        from mtl.runs.layout import resolve_trained

        resolve_trained(Path(spec.checkpoint))
    elif not timm.is_model(spec.backbone):
        raise MtlError(f"--backbone {spec.backbone!r}: not a timm model")


def submit_features(
    shards: Path,
    out: Path,
    spec: Any,
    count: int,
    flags: dict[str, object],
    *,
    overwrite: bool = False,
    wait: bool = False,
    say: Printer = echo,
) -> int:
    """Queue the array; with ``wait``, block and return 0 only if every task completed and the manifest exists."""
    from mtl.extraction.extract import clear_output
    from mtl.launch.slurm_request import check_request, load_for_submit

    if count < 1:
        raise MtlError(f"--array: expected a positive number of tasks, got {count}")
    shards, out = Path(_abs(str(shards))), Path(_abs(str(out)))
    spec = dataclasses.replace(spec, weights=_abs(spec.weights), checkpoint=_abs(spec.checkpoint))
    check_inputs(shards, spec)
    cfg = load_for_submit(None, [], {**flags, "tasks_per_node": 1, "nodes": 1})
    partition = check_request(cfg)
    if overwrite:
        clear_output(out)
    name = f"features-{slug(out.name, 40)}"
    payload = dataclasses.asdict(spec)
    calls = [(str(shards), str(out), payload, i, count) for i in range(count)]
    jobs = queue(cfg, partition, name, FeaturesTask(), calls, array=True)
    queued = [Queued(job, f"{name} task {i}", None, str(out)) for i, job in enumerate(jobs)]
    say(f"submitted job array {array_id(queued)} with {count} task(s) to partition {partition}")
    for q in queued:
        say(f"  {q.job_id}  stdout {q.task0.paths.stdout}")
    say(f"  output  {out}")
    if not wait:
        return 0
    outcomes = wait_all(queued, say)
    for q, o in zip(queued, outcomes):
        if not o.ok:
            say(failure(q, o))
    failed = sum(not o.ok for o in outcomes)
    written = (out / "manifest.json").is_file()
    say(f"features: {count - failed} of {count} task(s) completed; manifest {'written' if written else 'missing'}")
    return 0 if not failed and written else 1
