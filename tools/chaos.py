#!/usr/bin/env python
"""Chaos benchmark: a CPU training run killed at random moments, N times in a row, resumed each time.

Each kill is one of SIGKILL, SIGTERM, SIGINT, SIGUSR2 sent at a random step (and a random instant within it), or
a SIGKILL in the middle of saving a checkpoint (after DeepSpeed's files, before the completion marker). After the
N kills the run is resumed to the end, and compared with the same config trained once, uninterrupted.

Reported: kills survived (the next start resumed from a complete checkpoint, no earlier than the one before the
kill, and trained on), steps lost per kill (steps trained before the kill minus the step resumed from, against
train.ckpt_every; a stop signal saves at the end of its step, so it loses none), and whether the final exported
weights and every logged metric history (train and validation, step by step, in MLflow) equal the uninterrupted
run's.

With ``--nproc 2`` every start is a 2-rank torchrun, and each kill hits rank 0, rank 1 or both (the other rank
is then stopped by torchrun); the uninterrupted run is a 2-rank run too.

Two faults of another kind are tried on the way, and count as survived when the folder's owner and its history are
untouched: a second `mtl train` started on the same folder while one trains (refused in one line naming the
holder: run.lock), and a resume with a changed experiment key (refused in one line naming the key and both
values); one round also resumes with a changed setting (train.keep_last), which is taken.

    python tools/chaos.py --kills 8          # JSON on stdout and in bench-results/chaos.json
    python tools/chaos.py --nproc 2 --kills 5 --max-steps 24

The children run `mtl train` through a small wrapper that prints `STEP n` after each optimizer step (how far a
killed run got), `PID rank pid` at the start, and, for the in-save kill, kills itself (the chosen rank, or every
rank) inside ``checkpoint.save``. Progress goes to stderr; the last line on stdout is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
KINDS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGUSR2", "kill_in_save")

CHILD = """
import os, signal, sys
from mtl.engine import checkpoint as ckpt, trainer as tm
from mtl.cli import main

kill_save_from = int(sys.argv[1])  # SIGKILL inside the first save at or after this step (0: never)
kill_rank = int(sys.argv[2])  # ... of this rank (-1: every rank)
rank = int(os.environ.get("RANK", "0"))
real_micro, real_save, real_rng, saving = tm.Trainer._micro_step, ckpt.save, ckpt._rng_state, [0]
print(f"PID {rank} {os.getpid()}\\n", end="", flush=True)  # one write: the ranks share torchrun's stdout

def micro(self, batch):
    stepped = real_micro(self, batch)
    if stepped and rank == 0:
        print(f"STEP {self.state.step}\\n", end="", flush=True)
    return stepped

def save(engine, ckpt_dir, state, *a, **k):
    saving[0] = state.step
    return real_save(engine, ckpt_dir, state, *a, **k)

def rng_state():  # runs inside save: DeepSpeed's files written, the marker not yet
    if kill_save_from and saving[0] >= kill_save_from and kill_rank in (-1, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rng()

tm.Trainer._micro_step, ckpt.save, ckpt._rng_state = micro, save, rng_state
sys.exit(main(["train", *sys.argv[3:]]))
"""


def _log(msg: str) -> None:
    print(f"chaos: {msg}", file=sys.stderr, flush=True)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


class Child:
    """One `mtl train` (torchrun when ``nproc`` > 1); its `STEP n` and `PID rank pid` lines followed on a thread."""

    def __init__(self, args: list[str], nproc: int = 1, kill_in_save_from: int = 0, kill_rank: int = -1):
        script = Path(tempfile.gettempdir()) / f"mtl-chaos-child-{os.getpid()}.py"
        script.write_text(CHILD)
        launch = [sys.executable]
        if nproc > 1:
            from mtl.engine.distributed import free_port

            launch += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
        self.proc = subprocess.Popen(
            [*launch, str(script), str(kill_in_save_from), str(kill_rank), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
        )  # fmt: skip
        self.nproc, self.step, self.pids, self.lines, self.err = nproc, None, {}, [], []
        threading.Thread(target=self._follow, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()

    def _follow(self) -> None:
        for line in self.proc.stdout:  # the ranks' lines may still meet on one line
            self.lines.append(line)
            for step in re.findall(r"STEP (\d+)", line):
                self.step = int(step)
            for rank, pid in re.findall(r"PID (\d+) (\d+)", line):
                self.pids[int(rank)] = int(pid)

    def wait(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.2)  # let the reader threads drain the pipes
        return rc

    def exit_code(self) -> int:
        """The process's status; under torchrun, that of the first rank that failed (torchrun itself says 1)."""
        rc = self.proc.returncode
        if self.nproc == 1 or rc == 0:
            return rc
        found = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", "".join(self.err), re.S)
        return int(found.group(1)) if found else rc

    def signal(self, sig: int, ranks: list[int]) -> None:
        for rank in ranks:
            if rank in self.pids:
                try:
                    os.kill(self.pids[rank], sig)
                except ProcessLookupError:
                    pass

    def scores(self) -> dict[str, float]:
        last = [line for line in self.lines if line.startswith("{")]
        return json.loads(last[-1]) if last else {}


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> bool:
    """Refused as a user's mistake: exit 2, no traceback, one `error:` line holding every word."""
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    return (proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1
            and all(w in lines[0] for w in words))  # fmt: skip


def intrude(shards: Path, out: Path, a: argparse.Namespace, owner: Child) -> dict[str, Any]:
    """A second `mtl train` on the folder ``owner`` trains in: refused naming the owner, which trains on."""
    from mtl.runs.layout import RunDir

    lock = RunDir(out).lock_file
    held = lock.read_text() if lock.is_file() else None
    proc = subprocess.run([sys.executable, "-m", "mtl.cli", "train", *train_args(shards, out, a)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)  # fmt: skip
    ok = one_error_line(proc, "in use by", f"pid {owner.pids.get(0)}") and owner.proc.poll() is None
    ok = ok and held is not None and lock.read_text() == held
    _log(f"fault: a second start on the same folder: {'refused' if ok else 'NOT refused as expected'}")
    return {"kind": "concurrent_start", "survived": ok, "exit": proc.returncode,
            "error": proc.stderr.strip().splitlines()[-1:] }  # fmt: skip


def changed_experiment(shards: Path, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """A resume with another optim.lr: refused naming the key and both values, nothing written."""
    before = latest_step(out)
    args = [*train_args(shards, out, a), "optim.lr=0.0123"]
    proc = subprocess.run([sys.executable, "-m", "mtl.cli", "train", *args],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)  # fmt: skip
    ok = one_error_line(proc, "optim.lr 0.001 -> 0.0123", "train.resume=force")
    ok = ok and latest_step(out) == before
    _log(f"fault: a resume with a changed experiment key: {'refused' if ok else 'NOT refused as expected'}")
    return {"kind": "changed_experiment", "survived": ok, "exit": proc.returncode, "resumable_from": before,
            "error": proc.stderr.strip().splitlines()[-1:]}  # fmt: skip


def make_data(work: Path) -> Path:
    from mtl.data.pack import PackOptions, pack
    from mtl.data.synth import make_synth

    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        root = make_synth(work / "synth", videos=6, frames=48, seed=0)
        pack(
            PackOptions(root / "cropped_aligned", root / "annotations", shards, segment_len=16, shard_size=3, workers=1)
        )
    return shards


def train_args(shards: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return ["--config", str(SMOKE), f"data.shards={shards}", f"train.output_dir={out}",
            f"tracking.uri=sqlite:///{out.parent / (out.name + '.db')}", f"train.max_steps={a.max_steps}",
            f"train.ckpt_every={a.ckpt_every}", f"train.eval_every={a.eval_every}", "train.keep_last=2"]  # fmt: skip


def latest_step(out: Path) -> int:
    from mtl.runs.layout import latest_complete

    tag = latest_complete(out / "checkpoints")
    return int(tag[5:]) if tag else 0


def same_weights(a: Path, b: Path) -> tuple[bool, float]:
    """(bitwise equal, largest absolute difference) of two exported weight files."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        return False, float("inf")
    diff = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
    return all(x[k].equal(y[k]) for k in x), diff


def chaos(a: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(a.seed)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="mtl-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = make_data(work)
    for d in ("whole", "chaos"):
        for p in (work / d, work / f"{d}.db"):
            if p.exists():
                subprocess.run(["rm", "-rf", str(p)], check=True)

    _log(f"the uninterrupted run ({a.nproc} rank(s))")
    t0 = time.time()
    whole = Child(train_args(shards, work / "whole", a), a.nproc)
    if whole.wait() != 0:
        raise SystemExit("".join(whole.err)[-3000:])
    whole_s = time.time() - t0

    out, kills, faults = work / "chaos", [], []
    kinds = [KINDS[i % len(KINDS)] for i in range(a.kills)]  # every kind, once N >= 5, in a random order
    rng.shuffle(kinds)
    setting_round = 1 if a.kills > 1 else None  # this round resumes with a changed setting (taken)
    for i, kind in enumerate(kinds):
        resumed = latest_step(out)
        if resumed >= a.max_steps - 2:
            _log("too close to the end for another kill")
            break
        if resumed > 0 and not any(f["kind"] == "changed_experiment" for f in faults):
            faults.append(changed_experiment(shards, out, a))
        ranks = [0] if a.nproc == 1 else rng.choice([[0], [1], list(range(a.nproc))])
        target = rng.randint(resumed + 1, min(a.max_steps - 2, resumed + a.ckpt_every + 1))
        if kind == "kill_in_save":
            target = max(target, (resumed // a.ckpt_every + 1) * a.ckpt_every)  # a step that saves
        args = train_args(shards, out, a) + (["train.keep_last=3"] if i == setting_round else [])
        in_save = target if kind == "kill_in_save" else 0
        child = Child(args, a.nproc, kill_in_save_from=in_save, kill_rank=ranks[0] if len(ranks) == 1 else -1)
        if i == 0:  # while it trains (frozen meanwhile, so its steps stay where they are), another start
            while child.proc.poll() is None and (child.step is None or len(child.pids) < a.nproc):
                time.sleep(0.05)
            child.signal(signal.SIGSTOP, list(child.pids))
            faults.append(intrude(shards, out, a, child))
            child.signal(signal.SIGCONT, list(child.pids))
        if kind != "kill_in_save":
            while child.proc.poll() is None and (child.step or 0) < target:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.3))  # somewhere inside the next step
            if child.proc.poll() is None:
                child.signal(getattr(signal, kind), ranks)
        rc = child.wait()
        code = child.exit_code()
        reached = child.step or resumed
        saved = latest_step(out)
        if kind in ("SIGKILL", "kill_in_save"):  # under torchrun the first failure may be the other rank's
            expected = code == -signal.SIGKILL if a.nproc == 1 else code not in (0, 3)
        else:  # a stop signal: every rank saves at the end of the step, and exits as preempted
            expected = code == 3 and saved == reached
        victims = "the process" if a.nproc == 1 else ("both ranks" if len(ranks) > 1 else f"rank {ranks[0]}")
        kills.append({"kind": kind, "ranks": ranks, "at_step": reached, "resumed_from": resumed, "exit": code,
                      "exit_expected": expected, "checkpoint_after": saved})  # fmt: skip
        _log(f"kill {i + 1}/{a.kills}: {kind} to {victims} at step {reached} (resumed from {resumed}), exit {code}, "
             f"latest checkpoint {saved}")  # fmt: skip
        if i == setting_round:
            said = "with changed settings: train.keep_last 2 -> 3" in "".join(child.err) or resumed == 0
            faults.append({"kind": "changed_setting", "survived": said and reached > resumed})
            _log(f"fault: a resume with a changed setting: {'taken and said' if said else 'NOT said'}")
        if rc == 0:
            _log("the run completed before it could be killed")
            break

    _log("resumed to the end")
    final = Child(train_args(shards, out, a), a.nproc)
    if final.wait() != 0:
        raise SystemExit("".join(final.err)[-3000:])
    # A kill survived: the next start resumed from the newest complete checkpoint (never older than before it).
    starts = [k["resumed_from"] for k in kills[1:]] + [latest_before_final(kills, out)]
    for k, next_start in zip(kills, starts):
        k["survived"] = k["exit_expected"] and next_start >= k["resumed_from"]
        k["steps_lost"] = max(0, k["at_step"] - next_start)
    equal, max_diff = same_weights(work / "whole" / "export" / "last.safetensors", out / "export" / "last.safetensors")
    logged, logged_whole = metrics_of(out), metrics_of(work / "whole")
    differ = sorted(k for k in logged.keys() | logged_whole.keys() if logged.get(k) != logged_whole.get(k))
    lost = [k["steps_lost"] for k in kills]
    whole_equal = not differ and bool(logged) and equal
    tried = kills + faults
    return {
        "nproc": a.nproc,
        "faults_tried": len(tried),
        "faults_nothing_lost": sum(f["survived"] and whole_equal for f in tried),
        "kills": len(kills),
        "kills_survived": sum(k["survived"] for k in kills),
        "by_kind": {kind: sum(k["kind"] == kind for k in kills) for kind in KINDS},
        "steps_lost_per_kill": lost,
        "steps_lost_mean": sum(lost) / max(1, len(lost)),
        "steps_lost_max": max(lost, default=0),
        "ckpt_every": a.ckpt_every,
        "max_steps": a.max_steps,
        "final_scores": {k: v[-1][1] for k, v in logged.items() if k.startswith("val/") and "/" not in k[4:]},
        "uninterrupted_scores": whole.scores(),
        "metrics_equal": not differ and bool(logged),  # every train/ and val/ history, step by step
        "metrics_differing": differ,
        "weights_bitwise_equal": equal,
        "weights_max_abs_diff": max_diff,
        "uninterrupted_s": round(whole_s, 1),
        "kill_log": kills,
        "other_faults": faults,
        "workdir": str(work),
        "load_avg": os.getloadavg()[0],
    }


def metrics_of(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged history of the run's MLflow run except the timing ones, as (step, value) pairs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent / (out.name + '.db')}")
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-smoke").experiment_id])
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
        if key != "train/frames_per_s"
    }


def latest_before_final(kills: list[dict], out: Path) -> int:
    """Where the final start resumed: the checkpoint the last kill left."""
    return kills[-1]["checkpoint_after"] if kills else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1, help="ranks of every start (torchrun when > 1)")
    p.add_argument("--workdir", help="where data and runs go (default: a new temporary directory)")
    p.add_argument("--out", default=str(REPO / "bench-results" / "chaos.json"))
    a = p.parse_args()
    result = chaos(a)
    text = json.dumps(result, indent=2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    print(text)
    print(f"chaos: {result['faults_tried']} faults tried ({result['kills']} kills on {a.nproc} rank(s), "
          f"{result['faults_tried'] - result['kills']} others), {result['faults_nothing_lost']} ended with nothing "
          f"lost; weights bitwise equal: {result['weights_bitwise_equal']}, metric histories equal: "
          f"{result['metrics_equal']}")  # fmt: skip
    return 0 if result["faults_nothing_lost"] == result["faults_tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
