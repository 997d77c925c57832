"""A rank's CPUs (mtl.engine.cpus): torch's threads and the loader's workers never exceed what its task has, under
SLURM with or without CPU binding and under torchrun. The local SLURM cluster's binding: tests/test_slurm.py."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from mtl.config import load_config
from mtl.engine.cpus import cpu_list, fit_to_cpus, rank_cpus

LAUNCHER_VARS = ("SLURM_CPUS_PER_TASK", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "RANK")


@pytest.fixture(autouse=True)
def _clean(monkeypatch) -> Iterator[None]:
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    threads, mask = torch.get_num_threads(), os.sched_getaffinity(0)
    yield
    torch.set_num_threads(threads)
    os.sched_setaffinity(0, mask)


def _two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    torch.set_num_threads(2)


def test_slurm_without_binding_caps_threads_and_workers_at_the_task(monkeypatch, capsys) -> None:
    """task/none leaves the whole node in the mask: SLURM_CPUS_PER_TASK is the task's share."""
    _two_cpus()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    cfg = fit_to_cpus(load_config(None, ["data.num_workers=3"]))
    assert rank_cpus() == 1 and torch.get_num_threads() == 1 and cfg.data.num_workers == 1
    err = capsys.readouterr().err
    assert "data.num_workers=3 is more than this rank's 1 CPU(s): using 1" in err
    assert "mtl: rank 0: 1 CPU(s) (affinity 0-1), torch threads 1, data.num_workers 1" in err


def test_the_affinity_mask_bounds_a_rank_and_torchrun_ranks_share_it(monkeypatch, capsys) -> None:
    _two_cpus()
    os.sched_setaffinity(0, {1})
    assert rank_cpus() == 1
    os.sched_setaffinity(0, {0, 1})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_cpus() == 1
    cfg = load_config(None, ["data.num_workers=1"])
    assert fit_to_cpus(cfg) is cfg and torch.get_num_threads() == 1  # workers that fit stay; threads capped
    assert capsys.readouterr().err == ""  # rank 1 outside SLURM: nothing to say


def test_fewer_threads_than_cpus_are_left_alone() -> None:
    _two_cpus()
    torch.set_num_threads(1)
    fit_to_cpus(load_config(None, []))
    assert torch.get_num_threads() == 1


def test_cpu_lists_are_written_as_ranges() -> None:
    assert cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8" and cpu_list({3}) == "3"
