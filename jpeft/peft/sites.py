"""The insertion points: the one module of jpeft.peft that model code calls.

Each function takes the leaves of one module (`{"kernel": ..., "lora_a": ..., ...}`) and
applies every registered method whose leaves are present, so a method is active at a site
exactly when its leaves are in that module's parameters, and models never name a method.
The functions are pure, so the chunked LM-head loss calls `dense` on the head directly.

    dense:   w = weight hook or kernel;  x = dense_input(x);  y = x·w + Σ dense_delta;
             y = y + bias;  y = dense_output(y)
    embed:   x = table[ids] + Σ embed_delta
    attention_kv: keys/values with each method's prepended (prefix tuning, LLaMA-Adapter);
             the model lets every query see what was prepended
    residual: a layer's attention or MLP output before it joins the residual stream, given
             the block's input too (bottleneck adapters); the leaves are the decoder layer's
    norm:    a norm's output (norm_output)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.peft.base import matmul
from jpeft.peft.registry import METHODS

__all__ = ["matmul", "weight", "dense", "embed", "attention_kv", "residual", "norm"]


def _with(hook: str, leaves: dict):
    return [m for m in METHODS if hasattr(m, hook) and m.present(leaves)]


def weight(leaves: dict, dtype=None):
    """The module's dense weight [..., in, out]: the kernel, or what a method stores in its place."""
    for method in _with("weight", leaves):
        return method.weight(leaves, dtype)
    return leaves["kernel"] if dtype is None else leaves["kernel"].astype(dtype)


def dense(leaves: dict, x, rng=None):
    """y = x·W + b with every adapter present applied; `rng` enables adapter dropout."""
    for method in _with("dense_input", leaves):
        x = method.dense_input(leaves, x)
    if _with("weight", leaves):  # rematerialised: the backward pass re-derives W, never stores it
        y = jax.checkpoint(lambda x, leaves: matmul(x, weight(leaves, x.dtype)))(x, leaves)
    else:
        y = matmul(x, leaves["kernel"])
    for method in _with("dense_delta", leaves):
        y = y + method.dense_delta(leaves, x, y, rng).astype(y.dtype)
    if "bias" in leaves:
        y = y + leaves["bias"].astype(y.dtype)
    for method in _with("dense_output", leaves):
        y = method.dense_output(leaves, y)
    return y


def embed(leaves: dict, ids, dtype):
    """Token embeddings: table rows plus every adapter's delta."""
    x = jnp.take(leaves["embedding"], ids, axis=0).astype(dtype)
    for method in _with("embed_delta", leaves):
        x = x + method.embed_delta(leaves, ids).astype(dtype)
    return x


def attention_kv(leaves: dict, k, v):
    """Keys and values [B, S, KV, D] with every method's entries prepended, and how many were added."""
    length = k.shape[1]
    for method in _with("attention_kv", leaves):
        k, v = method.attention_kv(leaves, k, v)
    return k, v, k.shape[1] - length


def residual(leaves: dict, h, where: str, x):
    """A block's output h (`where`: "attention" or "mlp") before it joins the residual stream; x is
    the block's (normalised) input, for methods that run beside the block."""
    for method in _with("residual", leaves):
        h = method.residual(leaves, h, where, x)
    return h


def norm(leaves: dict, y):
    """A normalisation layer's output."""
    for method in _with("norm_output", leaves):
        y = method.norm_output(leaves, y)
    return y
