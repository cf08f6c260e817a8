"""Orbax checkpoints of the train state that survive preemption and refuse a changed run.

Saves are asynchronous (the state is copied to host, then written while training goes on)
and atomic: orbax writes into a temporary directory and renames it when complete, so a
checkpoint half-written when the process was killed is never taken as the latest. Each
checkpoint records a fingerprint of what determines the state — the config keys that shape
training, the data files, the base weights — and a resume whose fingerprint differs is an
error naming what changed. Mesh, logging and evaluation keys may change between runs: a
checkpoint saved on one mesh restores onto another.
"""
from __future__ import annotations

import hashlib
import os

import absl.logging
import jax
import orbax.checkpoint as ocp

from jpeft.config import RunConfig, config_to_dict, method_options
from jpeft.data.tasks import run_tasks
from jpeft.errors import ConfigError

absl.logging.set_verbosity(absl.logging.WARNING)  # orbax logs every file move at INFO

# Keys that do not change the trained state up to a checkpoint.
FREE_KEYS = ("out_dir", "mesh.", "dist.", "train.log_every", "train.save_every", "train.eval_every",
             "train.keep_checkpoints", "train.on_nonfinite", "data.eval", "data.eval_limit", "data.max_new_tokens",
             "eval.")
# Entries a later jpeft fingerprints: a checkpoint made before lacks them, and is not refused for it.
LATER_ENTRIES = ("model:",)
SAMPLES = 16  # blocks hashed per weight file, besides its header
BLOCK = 1 << 16


def manager(out_dir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """The run's checkpoints; a save that a kill interrupted (a `*.orbax-checkpoint-tmp-*` directory) is removed."""
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                                      cleanup_tmp_directories=True))


def save(mngr: ocp.CheckpointManager, step: int, state, fingerprint: dict) -> None:
    """Start saving `state` at `step`; returns once the state is on the host, the write goes on."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            fingerprint=ocp.args.JsonSave(fingerprint)))


def restore_latest(mngr: ocp.CheckpointManager, like, fingerprint: dict, defaults: dict | None = None):
    """The latest saved state, laid out like `like` (any mesh), or None when there is none.

    Raises ConfigError naming what changed when the checkpoint was made from other inputs. A key
    one side lacks counts as its value in `defaults` (`fingerprint(defaults, [], [])`), so a
    config key added in a later jpeft version does not orphan older checkpoints.
    """
    step = mngr.latest_step()
    if step is None:
        return None
    saved = mngr.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"]
    defaults = defaults or {}
    value = lambda record, k: record.get(k, defaults.get(k))
    compared = set(saved) | {k for k in fingerprint if k in saved or not k.startswith(LATER_ENTRIES)}
    changed = sorted(k for k in compared if value(saved, k) != value(fingerprint, k))
    if changed:
        details = "; ".join(f"{k}: {value(saved, k)!r} -> {value(fingerprint, k)!r}" for k in changed[:6])
        raise ConfigError(f"{mngr.directory}: the checkpoint at step {step} was made from other inputs ({details}); "
                          "restore them, or use a new out_dir to start a fresh run")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]


def fingerprint(flat_config: dict, data_files: list[str], weight_files: list[str],
                model_files: list[str] = ()) -> dict:
    """What a resumed run must share with the checkpoint: config values, data and weight digests, and
    those of the model's other files (config.json, the tokenizer's)."""
    record = {k: repr(v) for k, v in flat_config.items() if not k.startswith(FREE_KEYS)}
    record.update({f"data:{path}": _digest(path, sampled=False) for path in data_files})
    record.update({f"weights:{os.path.basename(path)}": _digest(path, sampled=True) for path in weight_files})
    record.update({f"model:{os.path.basename(path)}": _digest(path, sampled=False) for path in model_files})
    return record


def _digest(path: str, sampled: bool) -> str:
    """sha256 of a file (or a directory's files); `sampled` hashes the size, the safetensors header
    and SAMPLES blocks spread over the file, so fingerprinting many GB of weights takes milliseconds."""
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]
    h = hashlib.sha256()
    for file in files:
        size = os.path.getsize(file)
        h.update(f"{os.path.relpath(file, path)}:{size}".encode())
        with open(file, "rb") as f:
            if not sampled:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                continue
            header = int.from_bytes(f.read(8), "little") + 8
            h.update(f.read(min(header, size) - 8))
            for i in range(SAMPLES):
                f.seek(header + (size - header) * i // SAMPLES)
                h.update(f.read(BLOCK))
    return h.hexdigest()


# A model dir's files besides its weights that shape a run: its architecture and its tokenizer's.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "spiece.model")


def run_fingerprint(cfg: RunConfig) -> tuple[dict, dict]:
    """What a resumed run must share with its checkpoint (`fingerprint`), and the fingerprint of the defaults
    (a key one side lacks counts as its default)."""
    listed = sorted(os.listdir(cfg.model.path))
    weights = [os.path.join(cfg.model.path, f) for f in listed if f.endswith(".safetensors")]
    model_files = [os.path.join(cfg.model.path, f) for f in listed if f in MODEL_FILES]
    tasks = run_tasks(cfg.data)
    files = [t.data.train for t in tasks] + [t.data.template for t in tasks if os.path.isfile(t.data.template or "")]
    return (fingerprint(_shaping_keys(cfg), files, weights, model_files),
            fingerprint(_shaping_keys(RunConfig()), [], []))


def _shaping_keys(cfg: RunConfig) -> dict:
    """Flat config keys, without the options of methods other than the configured one."""
    options = set(method_options(cfg.method.name)) | {"name"}
    return {f"{section}.{k}": v for section, values in config_to_dict(cfg).items() if isinstance(values, dict)
            for k, v in values.items() if section != "method" or k in options}
