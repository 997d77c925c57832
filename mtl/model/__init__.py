"""The multi-task network: ``build_model(cfg.model, image_size)`` and ``param_groups(net, cfg.optim)``."""

from mtl.model.network import MultiTaskNet, build_model
from mtl.model.param_groups import param_groups

__all__ = ["MultiTaskNet", "build_model", "param_groups"]
