"""The DeepSpeed config, derived from ours, so there is one source of truth for batch, stage and precision."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from mtl.config import Config

ACCELERATE_STAGE_ENV = "ACCELERATE_DEEPSPEED_ZERO_STAGE"


def resolve_zero_stage(cfg: Config) -> int:
    """``accelerate launch --use_deepspeed --zero_stage N`` wins over train.zero_stage, and says so."""
    raw = os.environ.get(ACCELERATE_STAGE_ENV)
    if raw is None or raw == "":
        return cfg.train.zero_stage
    stage = int(raw)
    if stage != cfg.train.zero_stage and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"mtl: ZeRO stage {stage} from accelerate launch ({ACCELERATE_STAGE_ENV}) overrides "
            f"train.zero_stage={cfg.train.zero_stage}",
            file=sys.stderr,
            flush=True,
        )
    return stage


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """train.precision=auto: bf16 on the decided device when it is a GPU, fp32 on the CPU (also where a GPU is
    visible but train.device=cpu)."""
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


BUCKETS_PER_MODEL = 8  # default buckets: about this many per pass over the parameters
MIN_BUCKET, MAX_BUCKET = 1_000_000, 500_000_000  # elements; DeepSpeed's own default is the maximum


def bucket_elements(n_params: int) -> int:
    """Default bucket size for ``n_params`` parameters. DeepSpeed's 5e8 is larger than most models, so with it the
    gradient reduce of a ViT-B starts only after the whole backward: nothing overlaps. An eighth of the model lets
    the first buckets travel while backward still runs, yet keeps each message large enough for full bandwidth."""
    return int(min(MAX_BUCKET, max(MIN_BUCKET, n_params // BUCKETS_PER_MODEL)))


def zero_section(cfg: Config, zero_stage: int, n_params: int) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization``: the stage, and for ZeRO 1-3 the overlap of communication with backward
    (``train.zero``; a None size is scaled to the model)."""
    if zero_stage == 0:
        return {"stage": 0}
    z, default = cfg.train.zero, bucket_elements(n_params)
    out: dict[str, Any] = {
        "stage": zero_stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size or default,
    }
    if zero_stage == 3:
        out["stage3_prefetch_bucket_size"] = z.prefetch_bucket_size or default
    else:
        out["allgather_bucket_size"] = z.allgather_bucket_size or default
        out["reduce_scatter"] = True
    return out


def build_ds_config(cfg: Config, world_size: int, zero_stage: int, precision: str, n_params: int) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg``; ``n_params``: the model's parameter count (it sizes the buckets)."""
    micro = cfg.data.batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro * cfg.train.grad_accum * world_size,
        # DeepSpeed >= 0.19.3 defaults to 1.0; set it explicitly so the config says what runs.
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero_section(cfg, zero_stage, n_params),
        "zero_allow_untested_optimizer": True,  # our AdamW carries the parameter groups
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the model runs in for a resolved precision ("bf16" or "fp32")."""
    return torch.bfloat16 if precision == "bf16" else torch.float32
