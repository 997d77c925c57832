"""One device decision for a process, shared by torch, DeepSpeed and the loaders.

Why one place: DeepSpeed picks its CUDA device from ``LOCAL_RANK`` (deepspeed/runtime/engine.py,
``set_device(int(LOCAL_RANK))``) whatever the caller chose, and where SLURM binds one GPU to each task every task
sees only device 0, so a task with local rank 3 would die with "invalid device ordinal". And a run that asked for
GPUs must never train on the CPU in silence (a driver too old for torch's CUDA build makes
``torch.cuda.is_available()`` False): it stops at once, in one line saying what it found.

``decide`` is a pure function of the wish, the environment and what torch sees (``CudaFacts``), so it is tested
on a CPU; ``choose_device`` probes, decides and applies the decision to this process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from mtl.errors import MtlError

DeviceWish = Literal["auto", "cuda", "cpu"]
WISHES: tuple[str, ...] = ("auto", "cuda", "cpu")
# Variables SLURM sets when it gave the job (or this step) GPUs.
SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


@dataclass(frozen=True)
class CudaFacts:
    """What torch sees of CUDA, and what explains it when it sees none."""

    available: bool
    count: int
    torch_cuda: str | None  # CUDA version torch was built for (None: a CPU-only build)
    driver: str | None = None  # NVIDIA driver version, where one is installed
    error: str | None = None  # torch's own reason CUDA does not initialise


@dataclass(frozen=True)
class Decision:
    """The device of this process, and the LOCAL_RANK DeepSpeed must read (its device index) if it must change."""

    device: torch.device
    local_rank: int  # the node-local process index (from LOCAL_RANK or SLURM_LOCALID)
    ds_local_rank: int | None = None  # set LOCAL_RANK to this before DeepSpeed reads it (None: leave it)


def local_rank(env: Mapping[str, str]) -> int:
    """This process's index on its node: LOCAL_RANK (torchrun, accelerate, submitit), else SLURM_LOCALID (srun)."""
    raw = env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or "0"
    return int(raw) if raw.isdigit() else 0


def slurm_gave_gpus(env: Mapping[str, str]) -> str | None:
    """The variable that says SLURM gave this job GPUs (``NAME=value``), or None."""
    for name in SLURM_GPU_VARS:
        value = env.get(name, "").strip()
        if value and value not in ("0", "NoDevFiles"):
            return f"{name}={value}"
    cvd = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if "SLURM_JOB_ID" in env and cvd and cvd not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={cvd} (SLURM job {env['SLURM_JOB_ID']})"
    return None


def unusable_line(facts: CudaFacts, env: Mapping[str, str], why: str) -> str:
    """One line: why CUDA was wanted, and what was found (torch's CUDA, the driver, the visible devices)."""
    build = f"torch {torch.__version__} built for CUDA {facts.torch_cuda}" if facts.torch_cuda else (
        f"torch {torch.__version__} is a CPU-only build")  # fmt: skip
    driver = f"NVIDIA driver {facts.driver}" if facts.driver else "no NVIDIA driver found"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    reason = f"; torch says: {facts.error}" if facts.error else ""
    return (f"CUDA is not usable ({why}): {build}, {driver}, {seen}, torch sees {facts.count} device(s){reason}; "
            "run on a GPU node with a driver for that CUDA version, or ask for the CPU (train.device=cpu / "
            "--device cpu)")  # fmt: skip


def decide(wish: str, env: Mapping[str, str], facts: CudaFacts, asked_by: str = "train.device") -> Decision:
    """The device for ``wish`` (auto | cuda | cpu) given the environment and what torch sees.

    auto: CUDA when torch sees a usable device; if it sees none but SLURM gave the job GPUs, that is an error, not
    a CPU run. cuda: a usable device or an error. The index: 0 when one device is visible to a SLURM task or a lone
    process (SLURM binding one GPU per task), else the local rank, which must then name a visible device (NCCL
    refuses two ranks on one GPU), except that a SLURM task given several GPUs of its own takes one of them."""
    if wish not in WISHES:
        raise MtlError(f"{asked_by}: expected one of {', '.join(WISHES)}, got {wish!r}")
    lr = local_rank(env)
    if wish == "cpu":
        return Decision(torch.device("cpu"), lr)
    usable = facts.available and facts.count > 0
    if not usable:
        if wish == "cuda":
            raise MtlError(unusable_line(facts, env, f"{asked_by}=cuda"))
        gave = slurm_gave_gpus(env)
        if gave is not None:
            raise MtlError(unusable_line(facts, env, f"SLURM gave this job GPUs: {gave}; {asked_by}=auto"))
        return Decision(torch.device("cpu"), lr)
    # Ranks that share one view of the node's GPUs: torchrun's (accelerate launch's) processes. SLURM tasks
    # (srun, submitit, which also sets LOCAL_WORLD_SIZE) may each see only the GPUs bound to them.
    shared = int(env.get("LOCAL_WORLD_SIZE", "1") or 1) if "TORCHELASTIC_RUN_ID" in env else 1
    per_task = env.get("SLURM_GPUS_PER_TASK", "").strip()
    if facts.count == 1 and shared <= 1:
        index = 0  # one GPU bound to this task (SLURM --gpus-per-task / --gpu-bind), or one process on one GPU
    elif lr < facts.count and shared <= facts.count:
        index = lr
    elif shared <= 1 and per_task:
        index = lr % facts.count  # SLURM bound several GPUs to each task: any of its own is its own
    else:
        ranks = f"{shared} processes on this node" if shared > 1 else f"local rank {lr}"
        raise MtlError(f"{asked_by}: {ranks} but torch sees {facts.count} CUDA device(s) "
                       f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per "
                       f"GPU (NCCL refuses two ranks on one GPU), or ask for the CPU ({asked_by}=cpu)")  # fmt: skip
    rewrite = None if env.get("LOCAL_RANK") == str(index) else index
    return Decision(torch.device("cuda", index), lr, rewrite)


def _driver_version() -> str | None:
    """The NVIDIA driver's version: /proc/driver/nvidia/version, else nvidia-smi; None where there is none."""
    try:
        text = open("/proc/driver/nvidia/version").read()
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def probe_cuda() -> CudaFacts:
    """What torch sees; where it sees no usable device, also the driver and torch's own reason."""
    count = torch.cuda.device_count()
    available = torch.cuda.is_available()
    if available and count > 0:
        return CudaFacts(True, count, torch.version.cuda)
    error = None
    try:
        torch.cuda.init()
    except Exception as exc:  # torch's reason: no driver, a driver too old for this build, no device...
        error = " ".join(str(exc).split())[:300] or type(exc).__name__
    return CudaFacts(False, count, torch.version.cuda, _driver_version(), error)


def choose_device(wish: str = "auto", asked_by: str = "train.device") -> Decision:
    """Decide this process's device and apply it: torch's current CUDA device and, where it differs from the
    local rank, LOCAL_RANK (so DeepSpeed, which reads it, picks the same device). MtlError: CUDA asked, unusable."""
    d = decide(wish, os.environ, probe_cuda(), asked_by)
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
        if d.ds_local_rank is not None:
            os.environ["LOCAL_RANK"] = str(d.ds_local_rank)
    return d


def pick_device(wish: str | None, asked_by: str = "--device") -> torch.device:
    """The device of a one-process command (`mtl eval`, `mtl features`, `mtl predict`): auto | cuda | cpu as
    ``choose_device`` decides them, or an explicit ``cuda:N``. MtlError (one line) where CUDA is asked and
    unusable: never a silent CPU run."""
    wish = wish or "auto"
    if wish.startswith("cuda:"):
        index = wish.split(":", 1)[1]
        device = choose_device("cuda", asked_by).device
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise MtlError(f"{asked_by} {wish}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")  # fmt: skip
        device = torch.device("cuda", int(index))
        torch.cuda.set_device(device)
        return device
    return choose_device(wish, asked_by).device


def bind_deepspeed(device: torch.device) -> None:
    """Make DeepSpeed's accelerator the decided device's kind: its auto-detection picks CUDA whenever torch sees a
    GPU, also for a run that asked for the CPU. Call it before DeepSpeed is imported where possible (DS_ACCELERATOR
    then decides); an accelerator already chosen is replaced. DeepSpeed then sets its CUDA device from LOCAL_RANK,
    which ``choose_device`` made agree."""
    name = "cuda" if device.type == "cuda" else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    current = getattr(real, "ds_accelerator", None)
    if real is None or current is None or current._name == name:
        return  # not chosen yet: DS_ACCELERATOR decides it
    if name == "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        real.set_accelerator(CPU_Accelerator())
    else:
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        real.set_accelerator(CUDA_Accelerator())


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (inference: eval, features, predict); nothing on the CPU, which runs fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
