"""What the machine can do: its CPU's instruction flags, the compute dtype that follows, and the
float32 matmul precision every backend is held to.

`model.dtype: auto` (the default) picks bfloat16 only where matmuls in it are native: on
accelerators, and on CPUs with bf16 dot-product instructions (AVX512_BF16, AMX, Arm BF16).
Elsewhere bf16 matmuls are emulated and slower than float32 (measured on an AVX2-only CPU:
1,122 vs 1,201 tok/s on the demo model), so auto picks float32 there.
"""
from __future__ import annotations

import functools
import os
import sys

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, aarch64 FEAT_BF16
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where the OS has no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.split(":")[0].strip() in ("flags", "Features")]
    except OSError:
        return frozenset()
    return frozenset(lines[0].split(":", 1)[1].split()) if lines else frozenset()


def reported_flags() -> list[str]:
    """The flags that decide matmul speed, as quoted beside every measured figure."""
    return [f for f in REPORTED_FLAGS if f in cpu_flags()]


def auto_dtype(backend: str | None = None, flags: frozenset[str] | None = None) -> str:
    """bfloat16 where the backend (default: jax's) has native bf16 matmuls, else float32."""
    if backend is None:
        import jax
        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if set(BF16_FLAGS) & (cpu_flags() if flags is None else flags) else "float32"


def float32_matmuls_in_float32() -> None:
    """Run float32 matmuls in float32 in this process and those it starts, unless the user chose.

    JAX's default precision runs them as TF32 on NVIDIA GPUs (a 512x512 product's relative error 3.0e-4
    against 2.9e-7 in float32, measured on an H200) and in bf16 passes on TPUs, while PyTorch, the
    reference, keeps float32; under that default 29 of jpeft's parity tests failed on the H200. bf16
    compute (`model.dtype: auto` on accelerators) is unaffected, and so is XLA:CPU, which always
    multiplies float32 in float32 (its compiled step is the same program).
    """
    if "JAX_DEFAULT_MATMUL_PRECISION" in os.environ:
        return
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "float32"  # read when jax is imported, here or in a child
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_default_matmul_precision is None:
        jax.config.update("jax_default_matmul_precision", "float32")


def step_compiler_options() -> dict | None:
    """XLA options for the train and eval steps: on CPU, bfloat16 data movement stays bfloat16.

    XLA:CPU computes every bf16 op but a matmul in float32 ("float normalization"), slices and
    reshapes included: a layer scan's slice of a frozen bf16 weight stack became a float32 copy of
    the whole stack, hoisted out of the loop and made again every step, and so did the bf16
    activations the backward loop reads. Without the pass its kernels read and write bf16 in
    place (the bf16 LoRA step ~8% faster, docs/design.md §8); float32 programs are unchanged.
    """
    import jax
    return {"xla_disable_hlo_passes": "float-normalization-bf16"} if jax.default_backend() == "cpu" else None


def resolve_dtype(dtype: str | None) -> str | None:
    """A configured dtype with `auto` made concrete."""
    return auto_dtype() if dtype == "auto" else dtype
