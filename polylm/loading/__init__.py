"""Finding plugins and loading a checkpoint: model directory → family → IR → weights → backend runtime."""

from .load import infer_task, load, model_ir

__all__ = ["infer_task", "load", "model_ir"]
