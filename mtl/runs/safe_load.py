"""Read DeepSpeed checkpoint files without running code from them.

DeepSpeed's own loaders (``engine.load_checkpoint`` for resume, ``zero_to_fp32`` for consolidation) call
``torch.load(weights_only=False)``: a crafted ``*.pt`` in a checkpoint directory would run arbitrary code.
torch honours ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` over the caller's argument, so inside ``weights_only_loads()``
those same loaders unpickle tensors, containers and the three plain DeepSpeed types below, and nothing else.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mtl.errors import MtlError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _allowed_globals() -> list[type]:
    """The non-tensor types DeepSpeed 0.19 writes into ZeRO-1/2/3 checkpoints (checked on every stage)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(where: Path | str) -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only; a file that needs more is refused, naming ``where``."""
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it needs {found.group(1)}" if found else str(exc).splitlines()[0]
        raise MtlError(f"{where}: refused to unpickle a checkpoint file ({what}); only weights are loaded") from None
    finally:
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous
