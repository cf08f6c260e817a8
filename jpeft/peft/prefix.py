"""Prefix tuning (Li & Liang 2021): n trained keys and values before the sequence in every layer.

Each attention module holds `prefix_k` / `prefix_v` [layers, n, kv_heads·head_dim] (per KV
head, so GQA models get as many prefixes as they have KV heads). They are prepended where
keys and values enter attention, before the KV cache is written, so a generation prefill
puts them in the cache as past keys/values; the real tokens' positions start at n, as
PEFT's (the prefix acts as n past tokens that RoPE never rotates).

An encoder-decoder (T5) gets them where PEFT's SEQ_2_SEQ_LM prefix tuning puts them: PEFT
passes its prefixes as the decoder's past key values, so only the decoder's self-attention
has a prefix (the encoder and cross-attention have none), and its layout ties layers: PEFT
stores `num_layers` blocks (the encoder's depth), duplicates them for its two submodules and
cuts the result into (self, cross) pairs, so decoder layer j reads block 2j mod num_layers and
the cross-attention halves are dropped. jpeft stores those blocks ([num_layers, n, KV·D]
beside the decoder's self-attention) and `prefix_layers` [decoder layers], the block each
layer reads; `expand` gathers them inside the model, so training ties layers as PEFT's does.

`projection=E` trains PEFT's reparameterisation instead: a shared embedding [n, KV·D]
through Linear(KV·D, E), tanh, Linear(E, layers·2·KV·D). The shared part lives at
`<stack>/prefix_encoder`, each layer's (block's) slice of the output layer beside its attention
module; `expand` derives the prefixes from them inside the model (nn.map_variables), and
`save_adapter` writes the derived prefixes, as PEFT does.
Parameters: layers·2·n·KV·D, or with the projection n·KV·D + (KV·D+1)·E + layers·(E+1)·2·KV·D
(layers: the stored blocks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import ATTENTION_PROJECTIONS, Method, attention_modules, linear_uniform, query_width

ENCODER = "prefix_encoder"
SHARED = ("prefix_embedding", "prefix_in_kernel", "prefix_in_bias")  # at <stack>/prefix_encoder
PER_LAYER = ("prefix_out_kernel", "prefix_out_bias")  # beside each attention module
LAYERS = "prefix_layers"  # an encoder-decoder's: the stored block each decoder layer reads
# T5's self-attention in each stack: PEFT's past key values reach the decoder's only.
SEQ2SEQ_DECODER, SEQ2SEQ_ENCODER = "decoder/block/layer_0/SelfAttention", "encoder/block/layer_0/SelfAttention"


class PrefixTuning(Method):
    name = "prefix"
    peft_type = "PREFIX_TUNING"
    trainable = ("prefix_k", "prefix_v", *SHARED, *PER_LAYER)
    metadata = (LAYERS,)
    axes = {"prefix_k": ("lead", None, "kv"), "prefix_v": ("lead", None, "kv"), LAYERS: ("lead",)}
    cached = True  # a prefill writes the prefixes into the KV cache

    def __init__(self, num_virtual_tokens: int = 20, projection: int | None = None):
        if num_virtual_tokens < 1 or (projection is not None and projection < 1):
            raise JpeftError(f"prefix tuning needs num_virtual_tokens >= 1 and projection None or >= 1, "
                             f"got {num_virtual_tokens} and {projection}")
        self.num_virtual_tokens, self.projection = num_virtual_tokens, projection

    def __repr__(self):
        return f"PrefixTuning(num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection})"

    def init(self, key, params):
        """PEFT's init: prefixes (or the projection's embedding) N(0, 1), linear layers torch's default."""
        grouped = T.modules(params)
        attention = _targets(grouped)
        n = self.num_virtual_tokens
        keys = iter(jax.random.split(key, 3 + len(attention)))
        if self.projection is None:
            for path, (lead, width, layers) in attention.items():
                kv = jax.random.normal(next(keys), (*lead, 2, n, width))
                grouped[path] = {**grouped.get(path, {}), "prefix_k": kv[..., 0, :, :], "prefix_v": kv[..., 1, :, :],
                                 **_layer_map(layers)}
            return T.from_modules(grouped)
        (width,) = {w for _, w, _ in attention.values()}
        e = self.projection
        root = next(iter(attention)).split("/", 1)[0]
        grouped[f"{root}/{ENCODER}"] = {"prefix_embedding": jax.random.normal(next(keys), (n, width)),
                                        "prefix_in_kernel": linear_uniform(next(keys), (width, e), width),
                                        "prefix_in_bias": linear_uniform(next(keys), (e,), width)}
        for path, (lead, width, layers) in attention.items():
            k1, k2 = jax.random.split(next(keys))
            grouped[path] = {**grouped.get(path, {}), "prefix_out_kernel": linear_uniform(k1, (*lead, e, 2 * width), e),
                             "prefix_out_bias": linear_uniform(k2, (*lead, 2 * width), e), **_layer_map(layers)}
        return T.from_modules(grouped)

    @staticmethod
    def attention_kv(leaves, k, v):
        b, _, heads, dim = k.shape

        def batch(p):
            p = p.reshape(p.shape[0], heads, dim).astype(k.dtype)
            return jnp.broadcast_to(p, (b, *p.shape))
        return (jnp.concatenate([batch(leaves["prefix_k"]), k], axis=1),
                jnp.concatenate([batch(leaves["prefix_v"]), v], axis=1))

    @staticmethod
    def virtual_tokens(leaves: dict) -> tuple[int, int]:
        if "prefix_k" in leaves:
            return 0, leaves["prefix_k"].shape[-2]
        return (0, leaves["prefix_embedding"].shape[0]) if "prefix_embedding" in leaves else (0, 0)

    @staticmethod
    def expand(params):
        """Each layer's prefixes beside its attention module: the projection's output, and each decoder
        layer's block where layers share blocks (a pure tree function; the leaves it used are dropped)."""
        grouped = T.modules(params)
        for path, (k, v) in _blocks(grouped).items():
            leaves = grouped[path]
            if LAYERS in leaves:
                k, v = (jnp.take(a, leaves[LAYERS], axis=0) for a in (k, v))
            grouped[path] = {**{n: a for n, a in leaves.items() if n not in (*PER_LAYER, LAYERS)},
                             "prefix_k": k, "prefix_v": v}
        return T.from_modules(grouped)


def _blocks(grouped: dict) -> dict:
    """{attention module: (prefix_k, prefix_v) as stored}: the leaves, or what the projection gives."""
    encoder = next((leaves for leaves in grouped.values() if "prefix_embedding" in leaves), None)
    if encoder is not None:
        h = jnp.tanh(encoder["prefix_embedding"] @ encoder["prefix_in_kernel"] + encoder["prefix_in_bias"])
    found = {}
    for path, leaves in grouped.items():
        if "prefix_out_kernel" in leaves:
            kv = jnp.einsum("ne,...eo->...no", h, leaves["prefix_out_kernel"]) + leaves["prefix_out_bias"][..., None, :]
            width = kv.shape[-1] // 2
            found[path] = kv[..., :width], kv[..., width:]
        elif "prefix_k" in leaves:
            found[path] = leaves["prefix_k"], leaves["prefix_v"]
    return found


def _targets(grouped: dict, stored: int | None = None) -> dict:
    """{attention module: (stacked dims of its stored prefixes, kv width, the block each layer reads or None)}.

    A decoder: every attention module, layer i reading its own. An encoder-decoder: the decoder's
    self-attention only, with PEFT's `stored` blocks (its num_layers; by default the encoder's depth,
    or the decoder's where that is deeper, since PEFT fails on a decoder deeper than its blocks)."""
    attention = attention_modules(grouped)
    if SEQ2SEQ_DECODER not in attention:
        return {path: (lead, kv, None) for path, (lead, _, kv) in attention.items()}
    (decoder_layers,), _, width = attention[SEQ2SEQ_DECODER]
    stored = stored or max(attention[SEQ2SEQ_ENCODER][0][0], decoder_layers)
    if stored < decoder_layers:
        raise AdapterError(f"this prefix-tuning adapter stores num_layers={stored} blocks but the decoder has "
                           f"{decoder_layers} layers; PEFT cannot run it on this base either (its decoder layer j "
                           "reads block 2j mod num_layers, and layers past num_layers find none): re-export it "
                           f"with num_layers >= {decoder_layers}")
    return {SEQ2SEQ_DECODER: ((stored,), width, 2 * np.arange(decoder_layers) % stored)}


def _layer_map(layers) -> dict:
    return {} if layers is None else {LAYERS: jnp.asarray(layers, jnp.int32)}


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's `prompt_embeddings` [n, layers·2·KV·D]: per token, layer (block) by layer, key then value.

    `token_dim` is every query head's width (H·D): where a config has no head_dim (Qwen2), PEFT takes the
    head size as token_dim / num_attention_heads, then its GQA rule sets token_dim to KV·D itself."""
    ((path, (k, v)),) = _blocks(modules).items()
    k, v = (np.asarray(a, np.float32) for a in (k, v))
    layers, n, width = k.shape
    embeddings = np.stack([k, v], axis=1).transpose(2, 0, 1, 3).reshape(n, layers * 2 * width)
    return {"prompt_embeddings": embeddings}, {
        "num_virtual_tokens": n, "token_dim": _query_width(tree, path), "num_layers": layers,
        "num_attention_heads": None,
        "num_transformer_submodules": 2 if path == SEQ2SEQ_DECODER else 1, "prefix_projection": False,
        "encoder_hidden_size": width, "inference_mode": True}


def _query_width(tree: dict, path: str) -> int:
    """All query heads' width, read off the attention module's output projection."""
    out = next(o for *_, o in ATTENTION_PROJECTIONS if f"{path}/{o}" in tree)
    return query_width(tree[f"{path}/{out}"])


def from_peft(config: dict, tensors, modules: dict) -> dict:
    seq2seq = SEQ2SEQ_DECODER in attention_modules(modules)
    submodules = 2 if seq2seq else 1
    if config.get("num_transformer_submodules") not in (None, submodules):
        raise AdapterError(f"this prefix-tuning adapter has num_transformer_submodules="
                           f"{config['num_transformer_submodules']}; this base needs {submodules} "
                           f"({'an encoder-decoder' if seq2seq else 'a decoder-only model'})")
    attention = _targets(modules, config.get("num_layers") if seq2seq else None)
    if len(attention) != 1 or len(next(iter(attention.values()))[0]) != 1:
        raise AdapterError(f"PEFT's prefix layout needs one stacked attention module; found {sorted(attention)}")
    path, ((layers,), width, layer_map) = next(iter(attention.items()))
    n = config["num_virtual_tokens"]
    got = tensors.take("prompt_embeddings")
    tensors.fits("prompt_embeddings", got.shape, (n, layers * 2 * width))
    kv = got.reshape(n, layers, 2, width).transpose(1, 2, 0, 3)
    grouped = dict(modules)
    grouped[path] = {**grouped.get(path, {}), "prefix_k": jnp.asarray(kv[:, 0], jnp.float32),
                     "prefix_v": jnp.asarray(kv[:, 1], jnp.float32), **_layer_map(layer_map)}
    return grouped
