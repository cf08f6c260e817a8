"""The insertion points: the one module of jpeft.peft that model code calls.

Each function takes the leaves of one module (`{"kernel": ..., "lora_a": ..., ...}`) and
applies every registered method whose leaves are present, so a method is active at a site
exactly when its leaves are in that module's parameters, and models never name a method.
The functions are pure, so the chunked LM-head loss calls `dense` on the head directly.

    dense:   w = weight hook or kernel;  x = dense_input(x);  y = x·w + Σ dense_delta;
             y = y + bias;  y = dense_output(y)
    embed:   x = [Σ embed_prepend ; table[ids] + Σ embed_delta]   (soft prompts as extra rows)
    embed_table: the token table a tied LM head reads (trainable tokens' rows in it)
    attention_kv: keys/values with each method's prepended (prefix tuning), before the KV
             cache is written, so a prefix lives in the cache like past tokens
    attention_output: the attention block's output, given its post-RoPE queries (LLaMA-Adapter)
    residual: a layer's attention, cross-attention (T5's decoder) or MLP output before it joins the
             residual stream, given the block's input too (bottleneck adapters); the leaves are the layer's
    norm:    a norm's output (norm_output)
    experts: a mixture's stacked expert weight [E, out, in] (or what a method stores in its place: expert_weight)
             on rows grouped by expert: y = rows·W_eᵀ + Σ expert_delta (PEFT's LoRA on `target_parameters`)

Whole-tree points, read by the model once per call:
    virtual_tokens: (rows prepended to the input, keys prepended in every layer), so the model
             extends its masks and positions (virtual tokens come first, at positions 0..n-1,
             as in PEFT) and drops the prepended rows from its output
    expand:  a reparameterised method's training-time leaves -> the leaves its hooks read
             (prefix tuning's MLP), applied by the model to its variables (nn.map_variables)
    decoding: the tree for decoding steps after a prefill: without the leaves whose effect
             the prefill already wrote into the KV cache
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft import tree as T
from jpeft.peft.registry import BY_NAME, METHODS
from jpeft.products import grouped, matmul

__all__ = ["matmul", "weight", "dense", "embed", "embed_table", "attention_kv", "attention_output", "residual", "norm",
           "experts", "virtual_tokens", "expand", "decoding", "require"]

# The hooks a method may implement; a model lists those it calls (`insertion_points`). `pool` is where a
# classification head reads a decoder's final features (`classifier.classify`).
HOOKS = ("weight", "dense_input", "dense_delta", "dense_output", "embed_delta", "embed_prepend", "embed_table",
         "attention_kv", "attention_output", "residual", "norm_output", "expert_weight", "expert_delta",
         "virtual_tokens", "expand", "pool")


def missing(method, insertion_points) -> list[str]:
    """The insertion points a method (instance or class) acts at that a family's model never calls."""
    return [h for h in HOOKS if hasattr(method, h) and h not in insertion_points]


def usable(insertion_points) -> list[str]:
    """The names of the methods a family with these insertion points takes."""
    return [name for name, cls in BY_NAME.items() if not missing(cls, insertion_points)]


def require(method, insertion_points, family: str) -> None:
    """Refuse a method (instance or class) that needs an insertion point the family's model never
    calls: it would silently do nothing. The error says why (the method's `scope`) and lists the
    methods the family does take."""
    if lacking := missing(method, insertion_points):
        from jpeft.errors import ConfigError
        usable_names = ", ".join(usable(insertion_points))
        why = f" ({method.scope})" if method.scope else ""
        raise ConfigError(f"method {method.name!r} acts at the {', '.join(lacking)} insertion point(s), which "
                          f"{family} models do not have{why}; use one of {usable_names} with this family")


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


def embed(leaves: dict, ids, dtype, prepend: bool = True, scale: float | None = None):
    """Token embeddings: table rows plus every adapter's delta, times `scale` (Gemma's sqrt(hidden), rounded to
    the compute dtype as HF does), after the rows methods prepend (unscaled, as PEFT prepends them to the scaled
    embedding's output; none where `prepend` is off: an encoder-decoder's decoder reads the shared table
    without the soft prompt)."""
    x = jnp.take(leaves["embedding"], ids, axis=0).astype(dtype)
    for method in _with("embed_delta", leaves):
        x = x + method.embed_delta(leaves, ids).astype(dtype)
    if scale is not None:
        x = x * jnp.asarray(scale, dtype)
    for method in _with("embed_prepend", leaves) if prepend else ():
        x = jnp.concatenate([method.embed_prepend(leaves, ids.shape[0]).astype(dtype), x], axis=1)
    return x


def embed_table(leaves: dict):
    """The token table [vocab, D] as a tied LM head reads it."""
    for method in _with("embed_table", leaves):
        return method.embed_table(leaves)
    return leaves["embedding"]


def attention_kv(leaves: dict, k, v):
    """Keys and values [B, S, KV, D] with every method's entries prepended."""
    for method in _with("attention_kv", leaves):
        k, v = method.attention_kv(leaves, k, v)
    return k, v


def attention_output(leaves: dict, q, out, qkv_layout: str | None):
    """The attention block's output [B, T, D] (after o_proj); q [B, T, H, head_dim] after RoPE; `qkv_layout`: how
    the block's fused q/k/v projection lays them out (`attention.split_qkv`), where it has one."""
    for method in _with("attention_output", leaves):
        out = method.attention_output(leaves, q, out, qkv_layout)
    return out


def residual(leaves: dict, h, where: str, x):
    """A block's output h (`where`: "attention", "cross_attention" or "mlp") before it joins the residual
    stream; x is the block's (normalised) input, for methods that run beside the block."""
    for method in _with("residual", leaves):
        h = method.residual(leaves, h, where, x)
    return h


def norm(leaves: dict, y):
    """A normalisation layer's output."""
    for method in _with("norm_output", leaves):
        y = method.norm_output(leaves, y)
    return y


def experts(leaves: dict, rows, sizes):
    """rows [N, in], grouped by expert in order (`sizes[e]` rows each), through their expert's weight with every
    method's delta. A method storing the weight in another form gives it [..., E, in, out] (`expert_weight`),
    rematerialised as `dense` does a stored weight."""
    if stored := _with("expert_weight", leaves):
        y = jax.checkpoint(lambda rows, leaves, sizes: grouped(rows, stored[0].expert_weight(leaves, rows.dtype),
                                                               sizes))(rows, leaves, sizes)
    else:
        y = grouped(rows, leaves["weight"], sizes, transposed=True)
    for method in _with("expert_delta", leaves):
        y = y + method.expert_delta(leaves, rows, sizes).astype(y.dtype)
    return y


def virtual_tokens(params) -> tuple[int, int]:
    """(rows prepended to the input embeddings, keys/values prepended in every layer) for this tree."""
    names = {T.leaf_name(p): v for p, v in T.flatten(params).items()}
    rows = keys = 0
    for method in METHODS:
        if hasattr(method, "virtual_tokens"):
            r, k = method.virtual_tokens(names)
            rows, keys = rows + r, keys + k
    return rows, keys


def expand(variables: dict) -> dict:
    """A model's variables with every reparameterised method's leaves derived (for nn.map_variables)."""
    params = variables.get("params", {})
    for method in METHODS:
        if hasattr(method, "expand") and method.present_in(params):
            params = method.expand(params)
    return {**variables, "params": params}


def decoding(params):
    """`params` for the decoding steps after a prefill: the leaves whose effect is cached dropped."""
    cached = {n for m in METHODS if getattr(m, "cached", False) for n in (*m.trainable, *m.metadata)}
    return T.unflatten({p: v for p, v in T.flatten(params).items() if T.leaf_name(p) not in cached})
