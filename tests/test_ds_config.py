"""The DeepSpeed config built from ours: ZeRO overlaps its communication, buckets follow the model."""

from __future__ import annotations

import pytest

from mtl.config import load_config
from mtl.engine.ds_config import MAX_BUCKET, MIN_BUCKET, bucket_elements, build_ds_config
from mtl.errors import ConfigError

VIT_B = 86_000_000


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_overlap_with_buckets_scaled_to_the_model(stage: int) -> None:
    cfg = load_config(None, ["data.batch_size=4", "train.grad_accum=2"])
    ds = build_ds_config(cfg, world_size=8, zero_stage=stage, precision="bf16", n_params=VIT_B)
    z = ds["zero_optimization"]
    assert z["stage"] == stage and z["overlap_comm"] is True and z["contiguous_gradients"] is True
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == VIT_B // 8  # under the model: reduce overlaps
    assert "stage3_prefetch_bucket_size" not in z
    assert ds["train_batch_size"] == 4 * 2 * 8 and ds["bf16"]["enabled"] is True


def test_zero_3_prefetches_and_config_overrides_win() -> None:
    cfg = load_config(None, ["train.zero.overlap_comm=false", "train.zero.reduce_bucket_size=3000000",
                             "train.zero.prefetch_bucket_size=7000000"])  # fmt: skip
    z = build_ds_config(cfg, world_size=2, zero_stage=3, precision="fp32", n_params=VIT_B)["zero_optimization"]
    assert z == {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 3_000_000,
                 "stage3_prefetch_bucket_size": 7_000_000}  # fmt: skip


def test_zero_0_is_plain_and_bucket_sizes_are_clamped() -> None:
    cfg = load_config(None, [])
    assert build_ds_config(cfg, 1, 0, "fp32", VIT_B)["zero_optimization"] == {"stage": 0}
    assert bucket_elements(10_000) == MIN_BUCKET and bucket_elements(10**12) == MAX_BUCKET
    assert cfg.train.dist_timeout_min == 30


def test_zero_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="train.zero.reduce_bucket_size"):
        load_config(None, ["train.zero.reduce_bucket_size=0"])
    with pytest.raises(ConfigError, match="train.zero.overlap"):
        load_config(None, ["train.zero.overlap=true"])
