"""What a run logs and where it goes: each record's losses over the steps since the last (`Window`), to
`metrics.jsonl` (one JSON object per logged step) and TensorBoard event files in `tensorboard/` beside
it (tensorboardX: no TensorFlow needed).

A resumed run drops the lines past its checkpoint and asks TensorBoard to hide the points
past it (`purge_step`), so both show one history. In a multi-host job only process 0 writes.
"""
from __future__ import annotations

import json
import numbers
import os

import numpy as np


class MetricsLog:
    def __init__(self, path: str, resume_step: int, enabled: bool = True):
        self.file = self.board = None
        self.last: dict = {}  # the last record kept from an earlier leg of the run
        if not enabled:
            return
        kept = []
        if os.path.exists(path):
            with open(path) as f:  # a line without its newline was cut short by a kill: drop it, don't fail
                kept = [line for line in f if line.endswith("\n") and line.strip()
                        and json.loads(line).get("step", 0) <= resume_step]
        self.last = json.loads(kept[-1]) if kept else {}
        self.file = open(path, "w")
        self.file.writelines(kept)
        self.file.flush()
        from tensorboardX import SummaryWriter
        board = os.path.join(os.path.dirname(path), "tensorboard")
        earlier = os.path.isdir(board) and bool(os.listdir(board))  # a run killed before its first checkpoint too
        self.board = SummaryWriter(board, purge_step=resume_step + 1 if earlier else None)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real):
                self.board.add_scalar(key, value, record["step"])
        self.board.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.board.close()


class Window:
    """The losses logged at a step, over the steps since the last log, as transformers' Trainer logs them:
    `loss` the mean of those steps' losses (and `aux_loss`, a mixture's load-balancing loss, the same way),
    `loss_<task>` each task's loss over its tokens there. A step whose update was skipped (non-finite) is left
    out."""

    def __init__(self, tasks):
        self.tasks, self.loss, self.aux_loss, self.steps = tasks, 0.0, 0.0, 0
        self.task_loss, self.task_tokens = np.zeros(len(tasks)), np.zeros(len(tasks))

    def add(self, out: dict) -> None:
        self.loss, self.steps = self.loss + float(out["loss"]), self.steps + 1
        self.aux_loss += float(out.get("aux_loss", 0.0))
        if "task_loss" in out:  # a mixture's
            self.task_loss, self.task_tokens = self.task_loss + out["task_loss"], self.task_tokens + out["task_tokens"]

    def losses(self, out: dict) -> dict:
        """{"loss", "aux_loss" (a mixture's), "loss_<task>" ...}; with no finite step since the last log, the logged
        step's own."""
        record = {"loss": self.loss / self.steps if self.steps else float(out["loss"])}
        if "aux_loss" in out:
            record["aux_loss"] = self.aux_loss / self.steps if self.steps else float(out["aux_loss"])
        for task, loss, count in zip(self.tasks, self.task_loss, self.task_tokens):
            if count:
                record[f"loss_{task.name}"] = float(loss / count)
        return record
