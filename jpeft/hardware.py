"""What the machine can do fast: its CPU's instruction flags, and the compute dtype that follows.

`model.dtype: auto` (the default) picks bfloat16 only where matmuls in it are native: on
accelerators, and on CPUs with bf16 dot-product instructions (AVX512_BF16, AMX, Arm BF16).
Elsewhere bf16 matmuls are emulated and slower than float32 (measured on an AVX2-only CPU:
1,122 vs 1,201 tok/s on the demo model), so auto picks float32 there.
"""
from __future__ import annotations

import functools

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


def wide_vectors(flags: frozenset[str] | None = None) -> dict:
    """XLA's option to build its own CPU kernels with 512-bit vectors, on a CPU with AVX-512 ({} elsewhere).

    XLA:CPU prefers 256-bit vectors by default. Decoding, whose few-row products run in XLA's own dot
    emitter, gains from the wider ones (Zen 5, the bench model in float32, interleaved runs: a batch-8
    step 7.9 -> 7.4 ms, batch 1 4.2 -> 3.8 ms); the train step, whose products run in YNNPACK, did not
    (`jpeft bench --dtype both`: LoRA and full within noise in either dtype), so it keeps the default.
    """
    return {"xla_cpu_prefer_vector_width": 512} if "avx512f" in (cpu_flags() if flags is None else flags) else {}


def resolve_dtype(dtype: str | None) -> str | None:
    """A configured dtype with `auto` made concrete."""
    return auto_dtype() if dtype == "auto" else dtype
