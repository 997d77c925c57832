"""The one device decision (mtl.device): a pure function of the wish, the environment and what torch sees, so the
GPU cases are proven here on a CPU; and the commands stop in one line where CUDA is asked and unusable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, SMOKE, mtl

from mtl.config import load_config
from mtl.device import CudaFacts, autocast, bind_deepspeed, decide, probe_cuda, slurm_gave_gpus
from mtl.errors import ConfigError, MtlError

GPUS = lambda n: CudaFacts(True, n, "13.0")  # noqa: E731
NO_DRIVER = CudaFacts(False, 0, "13.0", None, "Found no NVIDIA driver on your system.")
OLD_DRIVER = CudaFacts(False, 0, "13.0", "535.104.05", "The NVIDIA driver on your system is too old (found 12020)")


def test_one_bound_gpu_is_device_0_and_local_rank_is_rewritten_for_deepspeed() -> None:
    d = decide("auto", {"LOCAL_RANK": "3", "SLURM_LOCALID": "3"}, GPUS(1))
    assert d.device == torch.device("cuda", 0) and d.local_rank == 3 and d.ds_local_rank == 0


def test_submitit_tasks_bound_to_one_gpu_each_are_device_0() -> None:
    env = {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "5"}  # submitit's export
    d = decide("auto", env, GPUS(1))
    assert d.device == torch.device("cuda", 0) and d.ds_local_rank == 0


def test_eight_visible_gpus_give_the_local_rank_its_own() -> None:
    torchrun = {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "x"}
    d = decide("cuda", torchrun, GPUS(8))
    assert d.device == torch.device("cuda", 3) and d.ds_local_rank is None  # LOCAL_RANK already says 3


def test_a_slurm_task_with_two_gpus_of_its_own_takes_one() -> None:
    d = decide("cuda", {"SLURM_LOCALID": "3", "SLURM_GPUS_PER_TASK": "2", "SLURM_JOB_ID": "5"}, GPUS(2))
    assert d.device == torch.device("cuda", 1) and d.ds_local_rank == 1


def test_srun_without_local_rank_reads_slurm_localid() -> None:
    d = decide("auto", {"SLURM_LOCALID": "2"}, GPUS(4))
    assert d.device == torch.device("cuda", 2) and d.ds_local_rank == 2  # DeepSpeed wants LOCAL_RANK set


def test_more_local_ranks_than_gpus_is_an_error_not_two_ranks_on_one_gpu() -> None:
    with pytest.raises(MtlError, match="2 processes on this node but torch sees 1 CUDA device"):
        decide("auto", {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, GPUS(1))
    with pytest.raises(MtlError, match="local rank 5 but torch sees 4"):
        decide("auto", {"LOCAL_RANK": "5"}, GPUS(4))


def test_cpu_wish_is_the_cpu_even_with_gpus() -> None:
    assert decide("cpu", {"LOCAL_RANK": "1"}, GPUS(8)).device == torch.device("cpu")


def test_auto_without_cuda_is_the_cpu_unless_slurm_gave_gpus() -> None:
    assert decide("auto", {}, NO_DRIVER).device == torch.device("cpu")
    with pytest.raises(MtlError) as exc:
        decide("auto", {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, OLD_DRIVER)
    line = str(exc.value)
    assert "\n" not in line and "SLURM_GPUS_ON_NODE=4" in line and "535.104.05" in line and "CUDA 13.0" in line
    assert "CUDA_VISIBLE_DEVICES='0,1,2,3'" in line and "too old" in line


def test_cuda_asked_without_cuda_is_one_line_naming_versions_and_devices() -> None:
    with pytest.raises(MtlError) as exc:
        decide("cuda", {"CUDA_VISIBLE_DEVICES": "0"}, NO_DRIVER)
    line = str(exc.value)
    assert "\n" not in line
    assert "train.device=cuda" in line and f"torch {torch.__version__} built for CUDA 13.0" in line
    assert "no NVIDIA driver found" in line and "CUDA_VISIBLE_DEVICES='0'" in line and "torch sees 0" in line
    assert "Found no NVIDIA driver" in line


def test_slurm_gpu_variables() -> None:
    assert slurm_gave_gpus({}) is None
    assert slurm_gave_gpus({"SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_ID": "1"}) is None
    assert slurm_gave_gpus({"SLURM_JOB_GPUS": "2,3"}) == "SLURM_JOB_GPUS=2,3"
    assert slurm_gave_gpus({"CUDA_VISIBLE_DEVICES": "1"}) is None  # not SLURM's: a user's own
    assert "SLURM job 9" in slurm_gave_gpus({"CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_ID": "9"})


def test_an_unknown_wish_names_the_key() -> None:
    with pytest.raises(MtlError, match="--device: expected one of auto, cuda, cpu, got 'gpu'"):
        decide("gpu", {}, GPUS(1), asked_by="--device")
    with pytest.raises(ConfigError, match="train.device"):
        load_config(SMOKE, ["train.device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's probe")
def test_probe_on_this_machine_says_why() -> None:
    facts = probe_cuda()
    assert not facts.available and facts.count == 0 and facts.error
    assert facts.torch_cuda == torch.version.cuda


def test_deepspeed_follows_a_cpu_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", ""))  # restored after the test
    bind_deepspeed(torch.device("cpu"))
    assert os.environ["DS_ACCELERATOR"] == "cpu" and get_accelerator().device_name() == "cpu"


def test_autocast_is_nothing_on_the_cpu() -> None:
    with autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _one_line_error(proc: subprocess.CompletedProcess, command: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"mtl {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")
def test_train_with_cuda_asked_stops_in_one_line(tmp_path) -> None:
    proc = mtl("train", "--config", str(SMOKE), "train.device=cuda", f"train.output_dir={tmp_path / 'run'}",
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", timeout=300)  # fmt: skip
    line = _one_line_error(proc, "train")
    assert "CUDA is not usable (train.device=cuda)" in line and f"torch {torch.__version__}" in line
    assert not (tmp_path / "mlflow.db").exists()  # stopped before anything was made


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")
def test_train_under_a_slurm_gpu_job_without_cuda_stops_too(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "8"}
    proc = subprocess.run([sys.executable, "-m", "mtl.cli", "train", "--config", str(SMOKE), "train.device=auto",
                           f"train.output_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'db'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)  # fmt: skip
    assert "SLURM gave this job GPUs: SLURM_GPUS_ON_NODE=8" in _one_line_error(proc, "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")
@pytest.mark.parametrize("command", ["eval", "predict", "features"])
def test_one_process_commands_with_cuda_asked_stop_in_one_line(command: str, tmp_path) -> None:
    args = {
        "eval": ["eval", "--checkpoint", str(tmp_path / "run"), "--device", "cuda"],
        "predict": ["predict", "--checkpoint", str(tmp_path / "run"), str(tmp_path / "v.mp4"), "--out",
                    str(tmp_path / "out"), "--device", "cuda"],
        "features": ["features", "--shards", str(tmp_path), "--out", str(tmp_path / "f"), "--backbone",
                     "vit_tiny_patch16_224", "--device", "cuda"],
    }[command]  # fmt: skip
    line = _one_line_error(mtl(*args, timeout=300), command)
    assert "CUDA is not usable (--device=cuda)" in line


@pytest.mark.cuda
def test_on_cuda_train_eval_and_features_use_the_gpu(tiny_shards, tmp_path) -> None:
    """Where a GPU is usable: `mtl train` with train.device=cuda trains in bf16 (auto precision) and `mtl eval` and
    `mtl features` run there too (skipped without CUDA)."""
    from helpers import ok, smoke_overrides

    out = tmp_path / "run"
    overrides = smoke_overrides(tiny_shards, out, tmp_path / "mlflow.db", "train.max_steps=2", "train.device=cuda")
    ok(mtl("train", "--config", str(SMOKE), *overrides))
    ok(mtl("eval", "--checkpoint", str(out), "--device", "cuda", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"))
    ok(mtl("features", "--shards", str(tiny_shards), "--out", str(tmp_path / "f"), "--checkpoint", str(out),
           "--device", "cuda", "--no-progress"))  # fmt: skip
