"""This machine's matmul peak per framework and dtype: the roofline `jpeft bench` divides by.

A roofline is a ceiling, so a framework's peak is the best rate it reaches on any of the train
step's own GEMM shapes (`gemm_shapes`), not a FLOP-weighted mean: how well the step's mix of
shapes runs is part of what the fraction against the peak should show. bf16 means bf16 inputs
with float32 accumulation, as the step's bf16 matmuls do. `xla_peak` and `torch_peak` each run
in their own process (`jpeft bench` starts them), so jax and torch never load side by side;
this module imports neither at the top.
"""
from __future__ import annotations

import time

DTYPES = ("float32", "bfloat16")
MIN_CALLS, MIN_S, MAX_CALLS = 2, 0.2, 50


def gemm_shapes(tokens: int, hidden: int, kv: int, mlp: int, vocab: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the step's representative matmuls: each projection and the LM head forward
    (tokens x in x out), and a weight gradient, which contracts over the tokens."""
    shapes = [(tokens, hidden, hidden), (tokens, hidden, kv), (tokens, hidden, mlp), (tokens, mlp, hidden),
              (tokens, hidden, vocab), (hidden, tokens, mlp)]
    return list(dict.fromkeys(shapes))


def _peak(shapes, operands, matmul) -> float:
    """Best GFLOP/s of `matmul` (which returns once the product is done) over `shapes`. Each shape
    runs once untimed (that compiles under jit), then at least MIN_CALLS times and MIN_S seconds
    (at most MAX_CALLS calls); its fastest call counts, the least disturbed by other load."""
    best = 0.0
    for m, k, n in shapes:
        x, w = operands(m, k, n)
        matmul(x, w)
        times = []
        while len(times) < MAX_CALLS and (len(times) < MIN_CALLS or sum(times) < MIN_S):
            t0 = time.perf_counter()
            matmul(x, w)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * m * k * n / min(times) / 1e9)
    return best


def xla_peak(shapes) -> dict:
    """{dtype: GFLOP/s} of jax.jit(jnp.dot) with float32 accumulation (preferred_element_type)."""
    import jax
    import jax.numpy as jnp

    dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    key = jax.random.key(0)

    def peak(dtype):
        def operands(m, k, n):
            return jax.random.normal(key, (m, k), dtype), jax.random.normal(key, (k, n), dtype)
        return _peak(shapes, operands, lambda x, w: dot(x, w).block_until_ready())

    return {dtype: peak(jnp.dtype(dtype)) for dtype in DTYPES}


def torch_peak(shapes, device: str = "cpu") -> dict:
    """{dtype: GFLOP/s} of torch.matmul on `device` (on CPU, on the threads the caller set); a bf16
    matmul accumulates in float32 and rounds only its output, as under torch.autocast."""
    import torch

    def matmul(x, w):
        torch.matmul(x, w)
        synchronize(device)

    def peak(dtype):
        def operands(m, k, n):
            return torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        return _peak(shapes, operands, matmul)

    return {dtype: peak(getattr(torch, dtype)) for dtype in DTYPES}


def torch_device(jax_platform: str) -> str:
    """The torch device that matches jax's backend, so both sides of a bench run on one kind of chip."""
    return "cuda" if jax_platform == "gpu" else "cpu"


def synchronize(device: str) -> None:
    """Wait for torch's queued work on `device`: CUDA kernels run asynchronously to the clock."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
