"""The JAX settings every jpeft command runs under.

They are set as environment variables, which jax reads when it is imported, so the processes a
command starts (the bench's workers) run under them too; a variable the user set is left alone.

- ``JAX_DEFAULT_MATMUL_PRECISION=float32``: float32 matmuls in float32 on every backend. JAX's
  default runs them as TF32 on NVIDIA GPUs (a 512x512 product's relative error 3.0e-4, against
  2.9e-7 in float32, on an H200) and in bf16 passes on TPUs, while PyTorch, the reference, keeps
  float32: under that default 29 of jpeft's parity tests failed on the H200. bf16 compute
  (`model.dtype: auto` on accelerators) is unaffected, and so is XLA:CPU, which multiplies float32
  in float32 either way (its compiled step is the same program).
- ``JAX_COMPILATION_CACHE_DIR`` (``$XDG_CACHE_HOME/jpeft/xla``, 2 GiB at most, least recently used
  out first): a compiled step is kept across runs, so a rerun, an eval after a train, or a resume
  after preemption loads it instead of compiling again (the bench's LoRA step: 8.5 s to compile, 1.7
  s to trace and load). An empty value turns it off; so does a cache directory that cannot be made
  (a read-only home), where jax would otherwise warn at every compile.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_MAX_BYTES = 2 * 2**30


def apply() -> None:
    """Set each setting the user has not set."""
    _set("JAX_DEFAULT_MATMUL_PRECISION", "float32")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _set("JAX_COMPILATION_CACHE_DIR", _cache_dir())
        _set("JAX_COMPILATION_CACHE_MAX_SIZE", CACHE_MAX_BYTES)


def _set(name: str, value) -> None:
    """`name` in the environment unless the user set it, and in jax's config if jax is already imported
    (it read the environment before this ran)."""
    if name in os.environ:
        return
    os.environ[name] = str(value)
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.config.update(name.lower(), value)


def _cache_dir() -> str:
    """$XDG_CACHE_HOME/jpeft/xla (~/.cache/...), made if need be; "" (no cache) where it cannot be."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "jpeft", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return ""
    return path


def worker_env() -> dict:
    """The environment of a process a bench starts: this checkout's jpeft first on the path, and no
    persistent compile cache, so that a worker's first step times a cold compile."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": "",
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def matmul_precision() -> str:
    """The float32 matmul precision jax runs at in this process and its children, as reported beside figures."""
    return os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "default")
