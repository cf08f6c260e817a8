"""Shared layers and the insertion points where adapter leaves act.

Every model family builds from these. An insertion point reads whatever adapter
leaves the parameter tree holds beside its weight and applies them; the math of
each method lives in `jpeft.peft`.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft.models.config import ModelConfig
from jpeft.peft import sites
from jpeft.products import einsum, row_major

NEG_INF = -1e30
init_normal = nn.initializers.normal(0.02)


# The residual stream [B, T, D] is split over the batch only, whatever its weights' layout; under a
# mesh and `jpeft.parallel.RULES` this keeps GSPMD from resharding activations like the weights
# (outside them it is a no-op).
ACTIVATION_AXES = ("batch", None, None)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(block, cfg: ModelConfig, length: int):
    """`block` under nn.scan: its params stacked on a leading `layers` axis, compiled once whatever the
    depth, carry in and out, context broadcast; rematerialised as `cfg.remat` says. With `cfg.unrolled`
    the same stack runs layer by layer over per-layer params (`Unrolled`)."""
    if cfg.unrolled:
        return lambda *args, name: Unrolled(block, args, length, name=name)
    if cfg.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,), length=length, metadata_params={nn.PARTITION_NAME: "layers"})


class Unrolled(nn.Module):
    """A scanned stack's layers in turn, each over its own params (`{stack}/{i}/...`, `tree.unstack`) and,
    where the carry's cache holds them (`unstack_cache`), its own keys/values arrays.

    What decoding runs on CPU: inside a loop XLA:CPU copies a layer's slice out of a stacked weight (or
    cache) before every matmul, every step; per-layer arrays are read in place (decoding 1.2-2.7x faster
    at hidden 512-1024, docs/design.md §8).
    The carry is (x, cache, layer counter), as every family's stack has it.
    """
    block: type
    args: tuple
    length: int

    @nn.compact
    def __call__(self, carry, context):
        x, cache, layer = carry
        for i in range(self.length):
            own = jax.tree.map(lambda rows: rows[i] if isinstance(rows, list) else rows, cache, is_leaf=_per_layer)
            (x, own, layer), _ = self.block(*self.args, name=str(i))((x, own, layer), context)
            cache = jax.tree.map(lambda rows, new: [*rows[:i], new, *rows[i + 1:]] if isinstance(rows, list) else new,
                                 cache, own, is_leaf=_per_layer)
        return (x, cache, layer), None


def _per_layer(node) -> bool:
    return isinstance(node, list)


def module_leaves(module: nn.Module) -> dict:
    """Every leaf the module holds in `params`, adapter leaves included (what the insertion points read)."""
    return nn.meta.unbox(dict(module.variables.get("params", {})))


def dropout_rng(module: nn.Module):
    return module.make_rng("dropout") if module.has_rng("dropout") else None


def dropout(module: nn.Module, x, rate: float):
    """Inverted dropout of `x` at `rate` where the call has a dropout key (a train step), as torch's in
    training: each value kept with probability 1 - rate and scaled by 1 / (1 - rate) in float32 before
    rounding (in bf16 the scale itself would round, 1 / 0.9 to 1.109); `x` itself otherwise."""
    rng = dropout_rng(module) if rate > 0 else None
    return x if rng is None else dropped(x, jax.random.bernoulli(rng, 1 - rate, x.shape), rate)


def dropped(x, keep, rate: float):
    """x where `keep`, scaled by 1 / (1 - rate) in float32, and 0 elsewhere, in x's dtype."""
    return jnp.where(keep, x.astype(jnp.float32) / (1 - rate), 0).astype(x.dtype)


def attention_dropout(module: nn.Module, rate: float):
    """(key, rate) for `attend` to drop attention probabilities with, or None outside a train step."""
    rng = dropout_rng(module) if rate > 0 else None
    return None if rng is None else (rng, rate)


class Dense(nn.Module):
    """The dense insertion point: y = x·W + b, with every adapter whose leaves are present applied."""
    features: int
    axes: tuple[str, str]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        if self.is_initializing():
            self.param("kernel", nn.with_logical_partitioning(init_normal, self.axes),
                       (x.shape[-1], self.features), jnp.float32)
            if self.use_bias:
                self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                           (self.features,), jnp.float32)
        return sites.dense(module_leaves(self), x, dropout_rng(self))


class RMSNorm(nn.Module):
    """Llama's RMSNorm (w · x, cast first), or Gemma's (`plus_one`: (1 + w) · x in float32, w born zero)."""
    eps: float
    plus_one: bool = False
    axes: tuple[str] = ("embed",)

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, self.axes), (x.shape[-1],), jnp.float32)
        return sites.norm(module_leaves(self), _rms_normed(x, scale, self.eps, self.plus_one))


class LayerNorm(nn.Module):
    """GPT-2's LayerNorm: mean and variance in float32, then w · x + b."""
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                           jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (x.shape[-1],),
                          jnp.float32)
        return sites.norm(module_leaves(self), _layer_normed(x, scale, bias, self.eps))


def recomputed(*static_argnums: int):
    """A function that autodiff keeps only the inputs of, recomputing it in the backward pass. For the
    float32 math the layers do on bf16 inputs (activation, norms): its float32 intermediates would
    otherwise be saved, and stacked for every layer by the layer scan (the bench's bf16 LoRA step: the
    scan's temporaries 869 -> 485 MB, ~10% faster; docs/design.md §8)."""
    return partial(jax.checkpoint, static_argnums=static_argnums, prevent_cse=False)


@recomputed(2, 3)
def _rms_normed(x, scale, eps: float, plus_one: bool):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (h * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * h.astype(x.dtype)


@recomputed(3)
def _layer_normed(x, scale, bias, eps: float):
    h = x.astype(jnp.float32)
    h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + eps)
    return (h * scale + bias).astype(x.dtype)


class Embed(nn.Module):
    """The input-embedding insertion point."""
    vocab_size: int
    features: int

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(init_normal, ("vocab", "embed")),
                                    (self.vocab_size, self.features), jnp.float32)

    def __call__(self, ids, dtype, prepend: bool = True, scale: float | None = None):
        self.embedding  # noqa: B018 - creates the table at init
        return sites.embed(module_leaves(self), ids, dtype, prepend, scale)


def attention_mask(q_slots, k_slots, q_segments, k_segments, window: int | None, causal: bool = True,
                   q_positions=None):
    """Bool [B, Tq, Tk]: causal over cache slots (unless `causal` is off: an encoder, cross-attention),
    optional sliding window, and within a segment.

    Segment ids [B, T] generalise a 0/1 attention mask: 0 is padding (never attended to), a
    query sees only keys of its own segment (packed examples never see each other), and a
    negative id (virtual tokens) is seen by every segment. The window spans slots within a segment; to a
    virtual key (at slot = position 0..n-1) it spans the query's `q_positions` [B, Tq], so that an example
    packed behind others (or after left padding) sees as many virtual tokens as it would alone.
    """
    allowed = k_slots[None, None, :] <= q_slots[None, :, None] if causal else True
    if window is not None:
        distance = q_slots[None, :, None] - k_slots[None, None, :]
        if q_positions is not None:
            distance = jnp.where(k_segments[:, None, :] < 0, q_positions[:, :, None] - k_slots[None, None, :], distance)
        allowed &= distance < window
    same = (k_segments[:, None, :] == q_segments[:, :, None]) | (k_segments[:, None, :] < 0)
    return allowed & same & (k_segments[:, None, :] != 0)


def slots(segments, cache, first_query: int = 0):
    """(q_slots, k_slots, k_segments, index) of a call whose new slots hold `segments` [B, n]: written into
    the cache at its index (without one, slots 0..n-1 are all there is); keys span every slot, the
    queries are the new slots from `first_query` on (a decoder's prefix keys come before its queries)."""
    if cache is None:
        index, k_segments = 0, segments
    else:
        index = cache["index"]
        k_segments = jax.lax.dynamic_update_slice(cache["segments"], segments, (0, index))
    return index + jnp.arange(first_query, segments.shape[1]), jnp.arange(k_segments.shape[1]), k_segments, index


class DecoderInputs(NamedTuple):
    """What a decoder-only call derives from its inputs once methods' virtual tokens come first."""
    rows: int  # soft-prompt rows prepended to the input embeddings
    keys: int  # prefix keys/values prepended in every layer
    positions: jax.Array  # [B, rows + T]: the virtual rows' and the real tokens' positions
    q_segments: jax.Array  # [B, rows + T]: the queries' segment ids (virtual rows: -1)
    q_slots: jax.Array
    k_slots: jax.Array
    k_segments: jax.Array
    index: jax.Array  # the cache slot this call writes first (0 without a cache)


def decoder_inputs(params, input_ids, attention_mask=None, positions=None, cache=None) -> DecoderInputs:
    """Masks' and positions' inputs of a decoder call, with virtual tokens first as PEFT puts them: the prefix's
    keys at slots 0..keys-1 (positions of their own, never given), the soft prompt's rows at positions
    keys..keys+rows-1 and the real tokens' positions shifted by keys + rows; every segment sees them.

    `positions` default to the tokens' cache slots (0..T-1 without a cache); `attention_mask` to all ones."""
    b, t = input_ids.shape
    rows, keys = sites.virtual_tokens(params)
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    segments = jnp.concatenate([jnp.full((b, rows + keys), -1, jnp.int32), attention_mask.astype(jnp.int32)], 1)
    q_slots, k_slots, k_segments, index = slots(segments, cache, keys)
    if positions is None:
        positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
    positions = jnp.concatenate([jnp.broadcast_to(keys + jnp.arange(rows), (b, rows)), positions + rows + keys], 1)
    return DecoderInputs(rows, keys, positions, segments[:, keys:], q_slots, k_slots, k_segments, index)


def written_cache(cache_kv, d: DecoderInputs, t: int) -> dict:
    """A decoder's cache after a call of `t` tokens: its keys/values, every slot's segment, the next slot."""
    return {"k": cache_kv[0], "v": cache_kv[1], "segments": d.k_segments, "index": d.index + d.keys + d.rows + t}


def head_leaves(params, embedding_path: str, tied: bool) -> dict:
    """The LM head's leaves for the dense insertion point: the token embedding at `embedding_path`, transposed,
    where the head is tied to it; else the model's own `lm_head`."""
    if not tied:
        return dict(params["lm_head"])
    table = params
    for key in embedding_path.split("/"):
        table = table[key]
    return {"kernel": table.T}


def head_logits(head: dict, hidden, cap: float | None = None):
    """float32 logits of hidden states [..., D] through the LM head's leaves, soft-capped where a family does."""
    return softcap(sites.dense(head, hidden).astype(jnp.float32), cap)


def empty_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty decoder KV cache: k/v [layers, batch · kv_heads, max_len, head_dim] (as `attend` reads them;
    compute dtype by default), each slot's segment id (0: empty), the write index."""
    shape = (cfg.num_decoder_layers or cfg.num_layers, batch * cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segments": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}


# The cache entries with a row per layer (a decoder's keys/values; an encoder-decoder's cross-attention ones).
LAYER_ROWS = ("k", "v", "cross_k", "cross_v")


def unstack_cache(cache: dict) -> dict:
    """The cache for `Unrolled` layers: each per-layer entry a list of the layers' own arrays."""
    return {name: list(c) if name in LAYER_ROWS else c for name, c in cache.items()}


def layer_rows(c, layer):
    """A layer's keys or values [B · KV, slots, D]: row `layer` of a stacked entry, or the layer's own array."""
    return c if c.ndim == 3 else c[layer]


def keys_values(cache_kv, k, v, layer, index):
    """(cache, k, v): new keys/values [B, T, KV, D] heads first ([B, KV, T, D], as `attend` reads them), or
    with a cache, written in place into the layer's rows of it at slot `index` and all its slots read back
    as the cache holds them ([B · KV, slots, D]).

    A layer's own array is read as written (no reshape between the write and the matmul that reads it: XLA
    would fuse the write into the reshape and copy the whole entry, every step)."""
    k, v = (a.transpose(0, 2, 1, 3) for a in (k, v))
    if cache_kv is None:
        return None, k, v
    k, v = (a.reshape(-1, *a.shape[2:]) for a in (k, v))
    cache_kv = tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, index, 0)) if c.ndim == 3 else
                     jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), (layer, 0, index, 0))
                     for c, new in zip(cache_kv, (k, v)))
    return (cache_kv, *(layer_rows(c, layer) for c in cache_kv))


def softcap(x, cap: float | None):
    """Gemma's tanh soft-capping: cap · tanh(x / cap), or x when there is no cap."""
    return x if cap is None else cap * jnp.tanh(x / cap)


QUERY_BLOCK = 128  # causal attention's queries per block (`attend`)


def query_blocks(t: int, block: int = QUERY_BLOCK) -> list[tuple[int, int]]:
    """(start, end) of causal attention's query blocks over t queries."""
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def causal_keys(t: int, block: int = QUERY_BLOCK) -> int:
    """Query-key pairs causal attention over t tokens computes: each query block against the keys up to
    its last query (t² when the queries fit one block)."""
    return sum((end - start) * end for start, end in query_blocks(t, block))


def attend(q, k, v, mask, scale: float, cap: float | None = None, causal_offset: int | None = None,
           block: int = QUERY_BLOCK, bias=None, dropout=None):
    """Grouped-query attention: q [B,T,H,D], k/v [B,KV,S,D] (or [B·KV,S,D], as a cache holds them), mask
    [B,T,S] -> [B,T,H,D]; `bias` [B or 1, H, T, S] is added to the scaled scores (T5's relative positions);
    `dropout` (key, rate) drops attention probabilities (`attention_dropout`).

    With `causal_offset` (static: the key slot of the first query) query i sees no key past
    slot causal_offset + i, so queries go in blocks, each against only the keys up to its last
    query: about half the work of the whole [T, S] score matrix, in tiles small enough to stay in
    cache (on a 2-core CPU, 310 -> 180 ms fwd+bwd per layer at [8, 512], 4 heads of 64).
    """
    t = q.shape[1]
    if causal_offset is None or t <= block:
        return _attend(q, k, v, mask, scale, cap, bias, dropout)
    return jnp.concatenate([_attend(q[:, start:end], k[..., :causal_offset + end, :], v[..., :causal_offset + end, :],
                                    mask[:, start:end, :causal_offset + end], scale, cap,
                                    None if bias is None else bias[:, :, start:end, :causal_offset + end],
                                    dropout and (jax.random.fold_in(dropout[0], start), dropout[1]))
                            for start, end in query_blocks(t, block)], axis=1)


def _attend(q, k, v, mask, scale: float, cap: float | None, bias=None, dropout=None):
    """Attention as batched matmuls over (batch, kv head), a head's query group folded into its rows. The
    training path keeps batch and heads apart ([B, KV, ...]), so each keeps its own sharding."""
    b, t, h, d = q.shape
    kv = k.shape[1] if k.ndim == 4 else k.shape[0] // b
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(*k.shape[:-2], h // kv * t, d)
    if k.ndim == 4:  # not a cache: q, k, v are transposed views, which XLA:CPU ran some bf16 products of in float32
        q, k, v = (row_major(x) for x in (q, k, v))
    scores = einsum("...qd,...sd->...qs", q, k.astype(q.dtype), jnp.float32) * scale
    scores = scores.reshape(b, kv, h // kv, t, -1)
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], kv, h // kv, t, -1)
    scores = softcap(scores, cap)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF).reshape(*v.shape[:-2], h // kv * t, -1)
    rng, rate = dropout or (None, 0.0)
    keep = None if rng is None else jax.random.bernoulli(rng, 1 - rate, scores.shape)
    out = attention_values(scores, v, keep, rate)
    return out.reshape(b, kv, h // kv, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


WEIGHTED_VALUES = "...qs,...sd->...qd"  # probabilities [..., Q, S] times values [..., S, D]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_values(scores, v, keep=None, rate: float = 0.0):
    """softmax(scores) [..., Q, S], rounded to v's dtype, times v [..., S, D], accumulated in float32; with
    `keep` (a boolean mask) the rounded probabilities go through dropout at `rate` first, as torch drops them.

    Its backward keeps only the rounded probabilities (which the product's own gradient needs) and the
    float32 output, not softmax's float32 output beside them, which the layer scan would stack for every
    layer, and takes softmax's row term Σₛ dP·P as Σ_d dO·O (FlashAttention's; from the unrounded output it
    is exact for the rounded probabilities): XLA:CPU fused the row sum into the dP = dO·vᵀ product, which
    then ran at ~65 GFLOP/s against ~250 without it (in-process A/B, the bench's LoRA step bf16
    0.93-0.97x, float32 0.93x, full bf16 0.98x, and its bf16 temporaries 420 -> 405 MB; keeping one bf16
    copy of the probabilities had taken them 485 -> 436). In float32 its gradient is autodiff's up to
    rounding. Under dropout the row term is unchanged: with dP the gradient of the dropped probabilities
    pulled back through dropout, Σ_d dO·O = Σₛ dP·P."""
    return _attention_values_fwd(scores, v, keep, rate)[0]


def _attention_values_fwd(scores, v, keep, rate):
    p = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = einsum(WEIGHTED_VALUES, p if keep is None else dropped(p, keep, rate), v, jnp.float32)
    return out.astype(v.dtype), (p, v, out, keep)


def _attention_values_bwd(rate, res, g):
    p, v, out, keep = res
    dp, dv = jax.vjp(lambda p, v: einsum(WEIGHTED_VALUES, p, v), p if keep is None else dropped(p, keep, rate),
                     v)[1](g)
    dp = dp.astype(jnp.float32) if keep is None else jnp.where(keep, dp.astype(jnp.float32) / (1 - rate), 0)
    rows = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    return p.astype(jnp.float32) * (dp - rows), dv, None


attention_values.defvjp(_attention_values_fwd, _attention_values_bwd)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@recomputed(0)
def activate(name: str, x, up=None):
    """The MLP's act(x), or its gated act(x) · up, computed in float32 and rounded once to x's dtype (torch
    computes each in float32 and rounds twice). XLA:CPU runs bf16 exp and divide slowly: silu(x) · up on
    bf16 [2048, 1408] takes ~8 ms in bf16 and ~1.6 ms through float32."""
    h = ACTIVATIONS[name](x.astype(jnp.float32))
    return (h if up is None else h * up.astype(jnp.float32)).astype(x.dtype)
