"""Optimizer, loss, jit-compiled step, checkpoints and the training loop."""
from jpeft.train.trainer import train

__all__ = ["train"]
