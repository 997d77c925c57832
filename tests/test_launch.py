"""The launch layer's login-node logic without a cluster: sweep files, precedence, and checks before queuing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

from mtl.engine.preemption import StopFlag
from mtl.errors import ConfigError, MtlError
from mtl.launch import partition, prepare, slurm_request
from mtl.launch.sweep import element_configs, element_name, read_sweep
from mtl.runs.layout import RUN_ID_FILE

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def _sweep(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_example_sweep_expands_grid_then_runs_and_validates_every_element(tmp_path: Path) -> None:
    sweep = read_sweep(REPO / "configs" / "sweeps" / "example.yaml")
    names = [element_name(e) for e in sweep.elements]
    assert names == [
        "model.mask.prob=0.1",
        "model.mask.prob=0.3",
        "model.mask.prob=0.5",
        "model.mask.mode=feature,model.mask.prob=0.3",
    ]
    cfgs = element_configs(sweep, REPO / sweep.config, [f"data.shards={tmp_path}"], {"partition": "p"})
    assert [c.model.mask.prob for c in cfgs] == [0.1, 0.3, 0.5, 0.3]
    assert cfgs[3].model.mask.mode == "feature" and cfgs[0].model.mask.mode == "token"
    assert all(c.train.max_steps == 5000 and c.slurm.partition == "p" for c in cfgs)
    outs = [Path(c.train.output_dir) for c in cfgs]
    assert len(set(outs)) == 4 and all(o.is_absolute() and o.parent.name == "mask-prob" for o in outs)
    assert outs[0].name == "000-model.mask.prob=0.1"


def test_sweep_precedence_file_base_cli_element(tmp_path: Path) -> None:
    path = _sweep(
        tmp_path,
        {
            "base": {"optim.lr": 0.01, "train.max_steps": 7, "model.mask.prob": 0.2},
            "runs": [{"model.mask.prob": 0.4}, {"optim.lr": 0.5, "train.output_dir": str(tmp_path / "mine")}],
        },
    )
    cfgs = element_configs(read_sweep(path), SMOKE, ["optim.lr=0.02"], {"time": 30})
    assert [c.optim.lr for c in cfgs] == [0.02, 0.5]  # CLI beats base; the element beats CLI
    assert [c.model.mask.prob for c in cfgs] == [0.4, 0.2]
    assert {c.train.max_steps for c in cfgs} == {7} and {c.slurm.time_min for c in cfgs} == {30}
    assert cfgs[0].model.backbone_kwargs["embed_dim"] == 32  # the file still underneath
    assert cfgs[1].train.output_dir == str(tmp_path / "mine")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"runs": [{"model.mask.prob": 0.1}], "gird": {}}, "unknown key(s) ['gird']"),
        ({"name": "x"}, "no runs"),
        ({"grid": {"model.mask.prob": []}}, "grid.model.mask.prob: expected a non-empty list"),
        ({"runs": [{"slurm.nodes": 2}]}, "element 0 sets slurm.nodes"),
        ({"runs": [{"tracking.experiment": "e"}]}, "element 0 sets tracking.experiment"),
        ({"runs": [{"optim.lr": 0.1}, {"optim.lr": 0.1}]}, "the same override set appears twice"),
        ({"runs": ["optim.lr=0.1"]}, "runs[0]: expected a mapping"),
    ],
)
def test_sweep_file_errors_name_the_file_and_the_problem(tmp_path: Path, data: dict, message: str) -> None:
    path = _sweep(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        read_sweep(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_bad_element_is_named_before_anything_is_queued(tmp_path: Path) -> None:
    path = _sweep(tmp_path, {"runs": [{"model.mask.prob": 0.1}, {"model.mask.prob": 1.5}]})
    with pytest.raises(ConfigError) as err:
        element_configs(read_sweep(path), SMOKE, [], {})
    msg = str(err.value)
    assert "element 1 (model.mask.prob=1.5)" in msg and "model.mask.prob: expected a value in [0, 1]" in msg


def test_flags_override_the_slurm_section_and_paths_become_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = slurm_request.load_for_submit(
        SMOKE,
        ["slurm.nodes=3", "slurm.partition=a", "data.shards=sh", "train.resume=ckpts/x"],
        {"nodes": 2, "partition": None, "gpus_per_node": 0, "tasks_per_node": 2, "time": 15, "folder": "logs/%j"},
    )
    assert (cfg.slurm.nodes, cfg.slurm.partition, cfg.slurm.time_min) == (2, "a", 15)
    assert slurm_request.tasks_per_node(cfg) == 2
    assert cfg.data.shards == str(tmp_path / "sh")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "smoke")
    assert cfg.train.resume == str(tmp_path / "ckpts" / "x")
    assert cfg.slurm.folder == str(tmp_path / "logs" / "%j")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_one_task_per_gpu_by_default() -> None:
    cfg = slurm_request.load_for_submit(None, [], {"gpus_per_node": 4})
    assert slurm_request.tasks_per_node(cfg) == 4
    assert slurm_request.tasks_per_node(slurm_request.load_for_submit(None, [], {"gpus_per_node": 0})) == 1


def test_request_checks_fail_before_slurm_is_asked(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")  # no SLURM tool could be reached: these must fail first
    cfg = slurm_request.load_for_submit(None, [], {"time": 1})
    with pytest.raises(ConfigError, match=r"slurm.time_min=1 min is not longer than slurm.signal_delay_s=90 s"):
        slurm_request.check_request(cfg)
    cfg = slurm_request.load_for_submit(None, [], {"nodes": 2, "gpus_per_node": 0})
    with pytest.raises(ConfigError, match="set slurm.tasks_per_node"):
        slurm_request.check_request(cfg)
    with pytest.raises(MtlError, match="sbatch not found on PATH"):
        slurm_request.check_request(slurm_request.load_for_submit(None, [], {}))


def test_inputs_the_job_would_open_are_checked(tmp_path: Path) -> None:
    cfg = slurm_request.load_for_submit(SMOKE, [f"data.shards={tmp_path / 'none'}"], {})
    with pytest.raises(MtlError, match=r"data.shards=.*none: no manifest.json"):
        prepare.check_inputs(cfg)
    (tmp_path / "manifest.json").write_text("{}")
    ok = [f"data.shards={tmp_path}", f"train.output_dir={tmp_path / 'out'}"]
    prepare.check_inputs(slurm_request.load_for_submit(SMOKE, ok, {}))
    with pytest.raises(ConfigError, match="model.backbone='vit_tiny_patch16_225' is not a timm model"):
        prepare.check_inputs(slurm_request.load_for_submit(SMOKE, [*ok, "model.backbone=vit_tiny_patch16_225"], {}))
    with pytest.raises(MtlError, match="model.pretrained_file=.*: file not found"):
        prepare.check_inputs(slurm_request.load_for_submit(SMOKE, [*ok, "model.pretrained_file=w.safetensors"], {}))
    done = tmp_path / "out" / "checkpoints" / "step_00000003"
    done.mkdir(parents=True)
    (done / "complete.json").write_text("{}")
    with pytest.raises(MtlError, match="train.resume=never but .* already holds checkpoints"):
        prepare.check_inputs(slurm_request.load_for_submit(SMOKE, [*ok, "train.resume=never"], {}))


def test_runs_made_at_submission_and_continued_from_the_output_dir(tmp_path: Path, monkeypatch) -> None:
    """A new run per submission; a resubmitted output_dir continues the run the engine recorded there."""
    from mlflow.tracking import MlflowClient

    from mtl.tracking.runs import open_run as open_tracking_run

    def open_run(cfg, name, tags):  # as `mtl submit` calls it
        return open_tracking_run(cfg.tracking, name, tags, prepare.existing_run_id(cfg))

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db, out = tmp_path / "mlflow.db", tmp_path / "out"
    base = [f"train.output_dir={out}", f"tracking.uri=sqlite:///{db}", "tracking.experiment=e"]
    cfg = slurm_request.load_for_submit(SMOKE, base, {})
    run_id, made = open_run(cfg, "first", {"k": "v"})
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert made and run.info.run_name == "first" and run.data.tags["k"] == "v"

    out.mkdir()
    (out / RUN_ID_FILE).write_text(f"{run_id}\n")
    assert open_run(cfg, "again", {}) == (run_id, False)
    fresh, made = open_run(slurm_request.load_for_submit(SMOKE, [*base, "train.resume=never"], {}), None, {})
    assert made and fresh != run_id
    with pytest.raises(MtlError, match="MLflow run 0123abc not found"):
        open_run(slurm_request.load_for_submit(SMOKE, [*base, "tracking.run_id=0123abc"], {}), None, {})
    disabled = slurm_request.load_for_submit(SMOKE, [*base, "tracking.enabled=false"], {})
    assert open_run(disabled, None, {}) == (None, False)


def test_slurm_train_outside_a_job_fails_with_one_line(monkeypatch, capsys) -> None:
    from mtl.cli import main

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    rc = main(["slurm-train", "--config", str(SMOKE)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mtl slurm-train: error: SLURM_JOB_ID is not set") and "`mtl train`" in err
    assert len(err.strip().splitlines()) == 1


def test_requeue_names_the_job_as_squeue_does(monkeypatch) -> None:
    """An array element is ``<array>_<index>`` for squeue/scontrol (as submitit names it), not its own job id."""
    from mtl.launch.requeue import slurm_job_id

    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "130")
    assert slurm_job_id() == "130"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "123")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert slurm_job_id() == "123_4"


# A partition as `scontrol show partition/node` describe one: two 2-CPU nodes and one with 4 GPUs.
_SMALL = partition.Node("node1", 2, 0, 4000), partition.Node("node2", 2, 0, 4000)
_PART = partition.Partition("debug", "node[1-3]", (*_SMALL, partition.Node("gpu1", 32, 4, 256000)), None, 60,
                            None, None)  # fmt: skip


def _req(**kw: int | None) -> partition.Request:
    base = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "gpus_per_node": 0, "mem_mb": None, "time_min": 10}
    return partition.Request(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"nodes": 2, "cpus_per_task": 64}, "slurm.cpus_per_task=64 x 1 task(s) per node = 64 CPUs per node, "
                                            "but partition debug's nodes have at most 32 CPUs"),
        ({"nodes": 2, "tasks_per_node": 2, "cpus_per_task": 8}, "= 16 CPUs per node, but only 1 of partition "
                                                                "debug's nodes have that many (2 needed)"),
        ({"nodes": 4}, "slurm.nodes=4, but partition debug has 3 node(s)"),
        ({"gpus_per_node": 8}, "slurm.gpus_per_node=8, but partition debug's nodes have at most 4 GPUs"),
        ({"mem_mb": 512 * 1024}, "slurm.mem_gb=512, but partition debug's nodes have at most 256000 MB"),
        ({"time_min": 90}, "slurm.time_min=90 is over partition debug's time limit of 60 min"),
        ({"nodes": 2, "gpus_per_node": 1}, "but only 1 of partition debug's nodes have that many (2 needed)"),
    ],
)  # fmt: skip
def test_a_request_the_partition_cannot_run_is_named(kw: dict, expected: str) -> None:
    why = partition.misfit(_req(**kw), _PART)
    assert why is not None and expected in why, why


def test_a_request_that_fits_passes_and_the_offer_is_described() -> None:
    assert partition.misfit(_req(nodes=3), _PART) is None
    assert partition.misfit(_req(nodes=2, tasks_per_node=2, cpus_per_task=1, mem_mb=4000), _PART) is None
    assert partition.misfit(_req(gpus_per_node=4, cpus_per_task=8, tasks_per_node=4), _PART) is None
    assert _PART.offers() == (
        "3 node(s) (node[1-3]): node1, node2 with 2 CPUs, 0 GPUs, 4000 MB each; gpu1 with 32 CPUs, 4 GPUs, "
        "256000 MB each; time limit 60 min"
    )


def test_slurm_time_and_gres_formats() -> None:
    assert [partition.parse_time_min(t) for t in ("30", "1:30:00", "2-00:00:00", "5:30", "UNLIMITED")] == [
        30, 90, 2880, 6, None,
    ]  # fmt: skip
    assert partition.gres_gpus("gpu:a100:4(S:0-1),shard:8") == 4
    assert partition.gres_gpus("gpu:2,gpu:v100:2") == 4
    assert partition.gres_gpus("(null)") == 0


def test_a_stop_signal_before_the_trainer_starts_is_not_lost() -> None:
    """`mtl slurm-train` installs a StopFlag first thing; the trainer's own one takes over what it caught."""
    early = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert early.signum == signal.SIGUSR2
        later = StopFlag().install()
        assert later.requested and later.signum == signal.SIGUSR2
        later.uninstall()
        assert signal.getsignal(signal.SIGUSR2) == early._handle
        again = StopFlag().install()
        assert again.requested  # every StopFlag of this process sees the early stop
        again.uninstall()
    finally:
        early.uninstall()
