"""`jpeft plot RUN_DIR`: PNGs of a run's metrics.jsonl, while it runs or after.

A run still being written may end in a half-written line; it is skipped, not an error.
"""
from __future__ import annotations

import json
import os

from jpeft.errors import ConfigError


def panels(records: list[dict]) -> dict[str, tuple[str, ...]]:
    """File name -> the metrics it plots: every loss (a mixture's per task too), lr, grad_norm, then the
    other eval_* metrics and the forgetting probes' relative changes where the run has them."""
    keys = sorted({k for r in records for k in r})
    losses = ("loss", *(k for k in keys if k != "loss" and (k.endswith("loss") or k.startswith("loss_"))))
    found = {"loss.png": losses, "lr.png": ("lr",), "grad_norm.png": ("grad_norm",),
             "eval.png": tuple(k for k in keys if k.startswith("eval_") and not k.endswith("loss")),
             "forgetting.png": tuple(k for k in keys if k.startswith("forget_") and k.endswith("_change"))}
    present = {name: tuple(k for k in chosen if k in keys) for name, chosen in found.items()}
    return {name: chosen for name, chosen in present.items() if chosen}  # (a hand-made file may lack lr)


def read_records(path: str) -> list[dict]:
    """The complete JSON lines of a metrics file (a truncated last line is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise ConfigError(f"{path}: line {len(records) + 1} is not JSON; is this a jpeft metrics.jsonl?")
    return records


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write loss.png, lr.png, grad_norm.png (and eval.png, forgetting.png where there are such metrics);
    return their paths."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: pass the out_dir of a `jpeft train` run")
    records = read_records(path)
    if not records:
        raise ConfigError(f"{path} has no records yet: wait for the run's first logged step (train.log_every)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, keys in panels(records).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{os.path.basename(os.path.abspath(run_dir))}: {', '.join(keys)}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
