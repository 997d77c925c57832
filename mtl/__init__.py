"""mtl: multi-task (VA, EXPR, AU) facial behaviour training on Aff-Wild2-style video, at cluster scale."""

__version__ = "0.1.0"
