"""One process group set-up for every launcher: a single process, torchrun, accelerate launch, srun, submitit.

torchrun, accelerate and submitit's ``TorchDistributedEnvironment().export()`` set RANK/WORLD_SIZE/...; a bare
``srun`` (slurm/train.sbatch) sets only SLURM variables, which are mapped here so both paths run the same code.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mtl.allocator import keep_freed_memory
from mtl.device import bind_deepspeed, choose_device
from mtl.errors import MtlError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def export_slurm_env() -> None:
    """Fill torch's variables from SLURM's when launched by a bare ``srun`` (no-op otherwise).

    Ranks and local ranks are SLURM's (SLURM_PROCID, SLURM_LOCALID: tasks of one node need not be consecutive
    ranks); the rendezvous is the first host of SLURM's node list (``node[1-2]`` -> node1, parsed by submitit as
    in its own jobs), which every node resolves to that node's address. gloo binds to the address of its own
    hostname: where that resolves to loopback, set GLOO_SOCKET_IFNAME (slurm/README.md).
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()  # (JobEnvironment() would want submitit's own job variables)
    os.environ["RANK"] = str(job.global_rank)
    os.environ["WORLD_SIZE"] = str(job.num_tasks)
    os.environ["LOCAL_RANK"] = str(job.local_rank)
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(master_port(int(os.environ.get("SLURM_JOB_ID", "0")))))


def master_port(job_id: int) -> int:
    """A rendezvous port from the job id, 10000-29999: below Linux's ephemeral range (32768-60999), where the
    outgoing connections of other programs may hold any port (as slurm/train.sbatch and `mtl submit` set it)."""
    return 10000 + job_id % 20000


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous on 127.0.0.1 (one process, tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout: timedelta | None = None, device: str = "auto") -> DistEnv:
    """Decide this rank's device (``mtl.device``: train.device, auto | cuda | cpu), make DeepSpeed agree, and join
    (or create) the process group through DeepSpeed: nccl on CUDA, gloo on the CPU (also where GPUs are visible).
    ``timeout``: how long a collective may wait for the other ranks (train.dist_timeout_min; DeepSpeed's default
    otherwise). MtlError at once, before any rendezvous, where CUDA was asked for and is unusable."""
    export_slurm_env()
    if "RANK" not in os.environ:  # one process: DeepSpeed still wants a (world size 1) group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    decision = choose_device(device)  # sets torch's device, and LOCAL_RANK to its index for DeepSpeed
    bind_deepspeed(decision.device)  # before DeepSpeed is imported, where it is not yet
    import deepspeed

    if decision.device.type == "cpu":
        keep_freed_memory()  # else each step's big buffers are fresh pages (ZeRO-2's flatten: 68 vs 13 ms here)
    local_rank = decision.local_rank
    if not dist.is_initialized():
        extra = {"timeout": timeout} if timeout is not None else {}
        try:
            backend = "nccl" if decision.device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend, verbose=False, **extra)
        except dist.DistNetworkError as exc:  # torch's 44-line traceback for a port someone else holds
            if "EADDRINUSE" not in str(exc):
                raise
            port, host = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR")
            raise MtlError(f"rendezvous port {port} on {host} is already in use (MASTER_PORT={port}): another run "
                           "or program holds it; set MASTER_PORT to a free port, or unset it on one process "
                           "(a free one is then picked)") from None  # fmt: skip
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, decision.device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (keeps collective decisions in lockstep)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
