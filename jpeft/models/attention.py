"""Attention: which keys each query may see (cache slots, segments, sliding windows), grouped-query
attention in causal query blocks, ALiBi's biases, and softmax·V with a backward that keeps less
(`attention_values`)."""
from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models.layers import dropout_rng, dropped, softcap
from jpeft.products import einsum, row_major

NEG_INF = -1e30


def attention_dropout(module: nn.Module, rate: float):
    """(key, rate) for `attend` to drop attention probabilities with, or None outside a train step."""
    rng = dropout_rng(module, rate)
    return None if rng is None else (rng, rate)


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


QUERY_BLOCK = 128  # causal attention's queries per block (`attend`)


def query_blocks(t: int, block: int = QUERY_BLOCK) -> list[tuple[int, int]]:
    """(start, end) of causal attention's query blocks over t queries."""
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def causal_keys(t: int, block: int = QUERY_BLOCK) -> int:
    """Query-key pairs causal attention over t tokens computes: each query block against the keys up to
    its last query (t² when the queries fit one block)."""
    return sum((end - start) * end for start, end in query_blocks(t, block))


CODEGEN_SHARDS = 4  # transformers' CodeGen `mp_num`


def split_qkv(qkv, layout: str, heads: int, dim: int):
    """The queries, keys and values [..., width each] of a fused projection's output, laid out as "blocks" (Phi-3's
    qkv_proj, GPT-2's c_attn, Falcon's multi-query query_key_value: all queries, then the keys, then the values),
    "heads" (GPT-NeoX's and BLOOM's: each head's query, key and value side by side), "groups" (Falcon's new
    decoder: each KV head's queries, then its key and value) or "shards" (CodeGen's, trained on 4 model-parallel
    shards: each shard's queries, then its values, then its keys). The KV heads are what the width leaves."""
    lead, kv = qkv.shape[:-1], (qkv.shape[-1] // dim - heads) // 2
    if layout == "blocks":
        return tuple(jnp.split(qkv, (heads * dim, (heads + kv) * dim), axis=-1))
    if layout == "shards":
        q, v, k = jnp.split(qkv.reshape(*lead, CODEGEN_SHARDS, -1), 3, axis=-1)
    elif layout == "heads":
        q, k, v = jnp.split(qkv.reshape(*lead, heads, 3 * dim), 3, axis=-1)
    else:
        grouped = qkv.reshape(*lead, kv, heads // kv + 2, dim)
        q, k, v = grouped[..., :-2, :], grouped[..., -2, :], grouped[..., -1, :]
    return tuple(a.reshape(*lead, -1) for a in (q, k, v))


def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi's slope of each head (BLOOM's, as transformers computes them): the powers 1..n of 2^(-8/n) for the
    largest power of two n <= heads, then the odd powers of 2^(-4/n) for the heads past it. MPT's are the same (as it
    computes them: the powers 1..2n of 2^(-4/n), the even ones first, then the odd ones, the first `heads` kept)."""
    closest = 2 ** math.floor(math.log2(heads))
    slopes = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3)))) ** np.arange(1, closest + 1, dtype=np.float32)
    if closest != heads:
        extra = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        slopes = np.concatenate([slopes, extra ** np.arange(1, 1 + 2 * min(closest, heads - closest), 2,
                                                             dtype=np.float32)])
    return slopes


def alibi(cfg, k_segments):
    """ALiBi's bias [B, H, 1, S]: each head's slope times each key's position, counted as transformers' BLOOM and
    Falcon count them over the mask of one example a row: the virtual keys (segment -1, first) from 0, then the
    example's tokens, padding skipped. A packed row's examples each count from past the virtual keys, as they would
    alone (a query sees its own example's keys only). A query's own position would add the same to all its scores,
    which softmax ignores; MPT counts each key by its slot back from the row's last (padding not skipped), which moves
    all of a row's scores alike too. Falcon-RW's (`cfg.alibi` "falcon") rounds slope and position to bfloat16, and
    so their product, as torch multiplies a bfloat16 tensor by an integer one, then divides by √head_dim."""
    slots = jnp.arange(k_segments.shape[-1])
    starts = jnp.where(jnp.diff(k_segments, axis=-1, prepend=-2) != 0, slots, 0)  # where each run of a segment starts
    within = slots - jax.lax.cummax(starts, axis=k_segments.ndim - 1)
    virtual = k_segments == -1
    positions = jnp.where(virtual, slots, virtual.sum(axis=-1, keepdims=True) + within)[:, None, None, :]
    slopes = jnp.asarray(alibi_slopes(cfg.num_heads))[None, :, None, None]
    if cfg.alibi == "falcon":
        rounded = slopes.astype(jnp.bfloat16) * positions.astype(jnp.bfloat16)
        return rounded.astype(jnp.float32) / np.float32(math.sqrt(cfg.head_dim))
    return slopes * positions.astype(jnp.float32)


def attend(q, k, v, mask, scale: float, cap: float | None = None, causal_offset: int | None = None,
           block: int = QUERY_BLOCK, bias=None, dropout=None, sinks=None):
    """Grouped-query attention: q [B,T,H,D], k/v [B,KV,S,D] (or [B·KV,S,D], as a cache holds them), mask
    [B,T,S] -> [B,T,H,D]; `bias` [B or 1, H, T or 1, S] is added to the scaled scores (T5's relative positions,
    ALiBi's); `dropout` (key, rate) drops attention probabilities (`attention_dropout`); `sinks` [H]: a logit per
    head that joins every query's softmax without a value (GPT-OSS's attention sinks).

    With `causal_offset` (static: the key slot of the first query) query i sees no key past
    slot causal_offset + i, so queries go in blocks, each against only the keys up to its last
    query: about half the work of the whole [T, S] score matrix, in tiles small enough to stay in
    cache (on a 2-core CPU, 310 -> 180 ms fwd+bwd per layer at [8, 512], 4 heads of 64).
    """
    t = q.shape[1]
    if causal_offset is None or t <= block:
        return _attend(q, k, v, mask, scale, cap, bias, dropout, sinks)
    return jnp.concatenate([_attend(q[:, start:end], k[..., :causal_offset + end, :], v[..., :causal_offset + end, :],
                                    mask[:, start:end, :causal_offset + end], scale, cap,
                                    None if bias is None else (bias if bias.shape[2] == 1 else bias[:, :, start:end])
                                    [..., :causal_offset + end],
                                    dropout and (jax.random.fold_in(dropout[0], start), dropout[1]), sinks)
                            for start, end in query_blocks(t, block)], axis=1)


def _attend(q, k, v, mask, scale: float, cap: float | None, bias=None, dropout=None, sinks=None):
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
        scores = scores + bias.reshape(bias.shape[0], kv, h // kv, bias.shape[2], -1)
    scores = softcap(scores, cap)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF).reshape(*v.shape[:-2], h // kv * t, -1)
    rng, rate = dropout or (None, 0.0)
    keep = None if rng is None else jax.random.bernoulli(rng, 1 - rate, scores.shape)
    if sinks is not None:  # per head, as each query's row of scores lies: [.., KV, H/KV · T, 1]
        sinks = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(kv, h // kv, 1, 1), (b, kv, h // kv, t, 1))
        sinks = sinks.reshape(*scores.shape[:-1], 1)
    out = attention_values(scores, v, keep, rate, sinks)
    return out.reshape(b, kv, h // kv, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


WEIGHTED_VALUES = "...qs,...sd->...qd"  # probabilities [..., Q, S] times values [..., S, D]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_values(scores, v, keep=None, rate: float = 0.0, sinks=None):
    """softmax(scores) [..., Q, S], rounded to v's dtype, times v [..., S, D], accumulated in float32; with
    `keep` (a boolean mask) the rounded probabilities go through dropout at `rate` first, as torch drops them;
    with `sinks` [..., Q, 1] each row's sink logit joins its softmax and takes no value (`softmax`).

    Its backward keeps only the rounded probabilities (which the product's own gradient needs) and the
    float32 output, not softmax's float32 output beside them, which the layer scan would stack for every
    layer, and takes softmax's row term Σₛ dP·P as Σ_d dO·O (FlashAttention's; from the unrounded output it
    is exact for the rounded probabilities): XLA:CPU fused the row sum into the dP = dO·vᵀ product, which
    then ran at ~65 GFLOP/s against ~250 without it (in-process A/B, the bench's LoRA step bf16
    0.93-0.97x, float32 0.93x, full bf16 0.98x, and its bf16 temporaries 420 -> 405 MB; keeping one bf16
    copy of the probabilities had taken them 485 -> 436). In float32 its gradient is autodiff's up to
    rounding. Under dropout the row term is unchanged: with dP the gradient of the dropped probabilities
    pulled back through dropout, Σ_d dO·O = Σₛ dP·P. A sink's gradient is -P_sink · Σₛ dP·P."""
    return _attention_values_fwd(scores, v, keep, rate, sinks)[0]


def softmax(scores, sinks=None):
    """(softmax over the keys [..., Q, S], each row's sink probability [..., Q, 1] or None): with `sinks` each row's
    sink logit joins the normaliser and its own probability is dropped, as GPT-OSS's attention computes it."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1), None
    top = jnp.maximum(scores.max(axis=-1, keepdims=True), sinks)
    e, sink = jnp.exp(scores - top), jnp.exp(sinks - top)
    total = e.sum(axis=-1, keepdims=True) + sink
    return e / total, sink / total


def _attention_values_fwd(scores, v, keep, rate, sinks):
    p, sink = softmax(scores, sinks)
    p = p.astype(v.dtype)
    out = einsum(WEIGHTED_VALUES, p if keep is None else dropped(p, keep, rate), v, jnp.float32)
    return out.astype(v.dtype), (p, v, out, keep, sink)


def _attention_values_bwd(rate, res, g):
    p, v, out, keep, sink = res
    dp, dv = jax.vjp(lambda p, v: einsum(WEIGHTED_VALUES, p, v), p if keep is None else dropped(p, keep, rate),
                     v)[1](g)
    dp = dp.astype(jnp.float32) if keep is None else jnp.where(keep, dp.astype(jnp.float32) / (1 - rate), 0)
    rows = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    return p.astype(jnp.float32) * (dp - rows), dv, None, None if sink is None else -sink * rows


attention_values.defvjp(_attention_values_fwd, _attention_values_bwd)
