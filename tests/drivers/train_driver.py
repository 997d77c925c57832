"""Runs `mtl.engine.trainer` under test control (as `mtl train` would), for faults no CLI flag should offer.

usage: train_driver.py MODE CONFIG [key=value ...]
  plain                normal run; each rank prints `DIGEST <rank> <sha256 of all parameters>` at the end
  kill_in_save=N       SIGKILL this process in the middle of saving step N (DeepSpeed files written, no marker)
  nan_at_micro=K       the loss of micro-batch K (1-based, this process's count) is NaN
  nan_from_micro=K     every loss from micro-batch K on is NaN
  kill_after_log=N     SIGKILL this process right after the metrics of step N reached MLflow
  stop_at_step=N       stop as a preemption signal would, right after step N (checkpoint saved, exit 3)
  host_syncs           count the calls `mtl/` code makes that wait for the device (Tensor.item, __bool__, tolist,
                       cpu, numpy, torch.nonzero), per optimizer step: `SYNCS <rank> <step> <count> <names>`
                       (grad_accum 1: from the start of the step's micro-batch to the start of the next one)
Every mode also prints `LOADED <rank> <step> <sha256> <AdamW step>` once the trainer is built (what it resumed
with), `GROUPS_LOADED`/`GROUPS_END <rank> <json>` (the parameter groups' settings, after loading and at the end) and
`SAMPLES <rank> <epoch> <id> ...` per epoch: the training sample ids this process consumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from mtl.config import load_config
from mtl.engine import checkpoint as ckpt
from mtl.engine import trainer as trainer_mod
from mtl.runs.layout import RunDir, tag_for


def param_digest(engine) -> str:
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):  # ZeRO-3: gather the partitions to compare whole tensors
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return param_digest_plain(engine.module)
    return param_digest_plain(engine.module)


def param_digest_plain(module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def optimizer_step(engine) -> int:
    """AdamW's step count (0 before any step: a resume that lost the optimizer state shows here)."""
    steps = [int(st["step"]) for st in engine.optimizer.optimizer.state.values() if "step" in st]
    return max(steps, default=0)


def group_settings(engine) -> str:
    """Each parameter group's weight decay and lr relative to the first group's, as JSON."""
    groups = engine.optimizer.optimizer.param_groups
    return json.dumps([[g["weight_decay"], round(g["lr"] / groups[0]["lr"], 9)] for g in groups])


class SyncCounter(TorchFunctionMode):
    """Records the name of each call, from a file under mtl/, of a torch function that makes the host wait for the
    device (the caller is the frame that called the function: these are all C functions)."""

    WAITS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.nonzero, torch.Tensor.nonzero}  # fmt: skip
    MTL = str(Path(trainer_mod.__file__).resolve().parents[1]) + os.sep

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.WAITS:
            caller = sys._getframe(1).f_code.co_filename
            if os.path.realpath(caller).startswith(self.MTL):
                self.calls.append(f"{getattr(func, '__name__', func)}@{Path(caller).name}")
        return func(*args, **(kwargs or {}))


def main() -> int:
    mode, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(config, overrides)
    if mode.startswith("kill_in_save="):
        # _rng_state runs inside checkpoint.save after DeepSpeed has written its files and before the marker.
        target_dir = RunDir(Path(cfg.train.output_dir).resolve()).checkpoints / tag_for(int(mode.split("=")[1]))
        original = ckpt._rng_state

        def dying_rng_state():
            if any(target_dir.glob("*model_states.pt")):
                os.kill(os.getpid(), signal.SIGKILL)
            return original()

        ckpt._rng_state = dying_rng_state
    t = trainer_mod.Trainer(cfg)
    print(f"LOADED {t.env.rank} {t.state.step} {param_digest(t.engine.ds)} {optimizer_step(t.engine.ds)}", flush=True)
    print(f"GROUPS_LOADED {t.env.rank} {group_settings(t.engine.ds)}", flush=True)
    seen: dict[int, list[int]] = {}
    micro_step = t._micro_step

    def recording_micro_step(batch):
        seen.setdefault(t.state.epoch, []).extend(int(i) for i in batch["sample"])
        return micro_step(batch)

    t._micro_step = recording_micro_step
    if mode.startswith("stop_at_step="):
        n, log = int(mode.split("=")[1]), t._log

        def log_then_stop(step):
            log(step)
            if step >= n:
                t.stop.signum = signal.SIGUSR2

        t._log = log_then_stop
    if mode.startswith(("nan_at_micro=", "nan_from_micro=")):
        k = int(mode.split("=")[1])
        real_loss, count = t.loss_fn, [0]

        def poisoned(outputs, batch):
            count[0] += 1
            total, parts = real_loss(outputs, batch)
            bad = count[0] == k or (mode.startswith("nan_from") and count[0] >= k)
            return (total * float("nan") if bad else total), parts

        t.loss_fn = poisoned
    if mode.startswith("kill_after_log="):
        n, log_metrics = int(mode.split("=")[1]), t.tracker.log_metrics

        def log_then_die(metrics, step, flush=False):
            log_metrics(metrics, step, flush)
            if step >= n:
                t.tracker.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        t.tracker.log_metrics = log_then_die
    if mode == "host_syncs":
        counter = SyncCounter()
        marks: list[tuple[int, int]] = []  # (calls counted before the micro-batch, step after it)

        def marking_micro_step(batch, inner=t._micro_step):
            before = len(counter.calls)
            stepped = inner(batch)
            marks.append((before, t.state.step))
            return stepped

        t._micro_step = marking_micro_step
        with counter:
            result = t.run()
        bounds = [b for b, _ in marks] + [len(counter.calls)]
        for i, (_, step) in enumerate(marks):
            names = sorted(set(counter.calls[bounds[i] : bounds[i + 1]]))
            print(f"SYNCS {t.env.rank} {step} {bounds[i + 1] - bounds[i]} {','.join(names) or '-'}", flush=True)
    else:
        result = t.run()
    for epoch, ids in sorted(seen.items()):
        print(f"SAMPLES {t.env.rank} {epoch} {' '.join(map(str, ids))}", flush=True)
    print(f"RESULT {t.env.rank} {result.status} {result.step} {result.run_id}", flush=True)
    print(f"DIGEST {t.env.rank} {param_digest(t.engine.ds)}", flush=True)
    print(f"GROUPS_END {t.env.rank} {group_settings(t.engine.ds)}", flush=True)
    return 3 if result.status == "preempted" else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
