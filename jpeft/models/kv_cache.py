"""The decoder's KV cache and the slots, segments and positions of a call that reads and writes it.

A cache holds k/v [layers, batch · kv_heads, slots, head_dim] (a list of per-layer arrays for unrolled
decoding), each slot's segment id and the next slot to write; a call's new tokens (after any virtual
tokens) take the slots from that index on.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jpeft.errors import JpeftError
from jpeft.models.config import ModelConfig
from jpeft.peft import sites


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


def check_position_table(cfg: ModelConfig, d: DecoderInputs, t: int, positions, cache) -> None:
    """Refuse a call whose tokens count past a learned positions' table (GPT-2's, OPT's), where the lookup would
    read no row: `t` tokens after the virtual ones, counted from 0 (given positions and a cache's are the
    caller's to keep inside it, as `generate` does)."""
    needed = d.keys + d.rows + t
    if positions is None and cache is None and cfg.learned_positions and needed > cfg.max_position_embeddings:
        raise JpeftError(f"{t} tokens (after {d.keys + d.rows} virtual ones) need more positions than the model's "
                         f"table holds ({cfg.max_position_embeddings}, {cfg.positions_key})")


def written_cache(cache_kv, d: DecoderInputs, t: int) -> dict:
    """A decoder's cache after a call of `t` tokens: its keys/values, every slot's segment, the next slot."""
    return {"k": cache_kv[0], "v": cache_kv[1], "segments": d.k_segments, "index": d.index + d.keys + d.rows + t}


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
