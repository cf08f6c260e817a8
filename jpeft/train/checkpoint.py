"""Orbax checkpoints of the train state, so a re-run on the same out_dir resumes."""
from __future__ import annotations

import os

import absl.logging
import jax
import orbax.checkpoint as ocp

absl.logging.set_verbosity(absl.logging.WARNING)  # orbax logs every file move at INFO


def manager(out_dir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like):
    """The latest saved state shaped like `like`, or None when there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
