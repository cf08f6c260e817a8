"""Prefix tuning (Li & Liang 2021): n trained keys and values before the sequence in every layer.

Each attention module holds `prefix_k` / `prefix_v` [layers, n, kv_heads·head_dim] (per KV
head, so GQA models get as many prefixes as they have KV heads). They are prepended where
keys and values enter attention, before the KV cache is written, so a generation prefill
puts them in the cache as past keys/values; the real tokens' positions start at n, as
PEFT's (the prefix acts as n past tokens that RoPE never rotates).

`projection=E` trains PEFT's reparameterisation instead: a shared embedding [n, KV·D]
through Linear(KV·D, E), tanh, Linear(E, layers·2·KV·D). The shared part lives at
`model/prefix_encoder`, each layer's slice of the output layer beside its attention module;
`expand` derives the prefixes from them inside the model (nn.map_variables), and
`save_adapter` writes the derived prefixes, as PEFT does.
Parameters: layers·2·n·KV·D, or with the projection n·KV·D + (KV·D+1)·E + layers·(E+1)·2·KV·D.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import Method, attention_modules, linear_uniform

ENCODER = "prefix_encoder"
SHARED = ("prefix_embedding", "prefix_in_kernel", "prefix_in_bias")  # at model/prefix_encoder
PER_LAYER = ("prefix_out_kernel", "prefix_out_bias")  # beside each attention module


class PrefixTuning(Method):
    name = "prefix"
    peft_type = "PREFIX_TUNING"
    trainable = ("prefix_k", "prefix_v", *SHARED, *PER_LAYER)
    axes = {"prefix_k": ("lead", None, "kv"), "prefix_v": ("lead", None, "kv")}
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
        attention = {path: (lead, kv) for path, (lead, _, kv) in attention_modules(grouped).items()}
        n = self.num_virtual_tokens
        keys = iter(jax.random.split(key, 3 + len(attention)))
        if self.projection is None:
            for path, (lead, width) in attention.items():
                kv = jax.random.normal(next(keys), (*lead, 2, n, width))
                grouped[path] = {**grouped.get(path, {}), "prefix_k": kv[..., 0, :, :], "prefix_v": kv[..., 1, :, :]}
            return T.from_modules(grouped)
        (width,) = {w for _, w in attention.values()}
        e = self.projection
        root = next(iter(attention)).split("/", 1)[0]
        grouped[f"{root}/{ENCODER}"] = {"prefix_embedding": jax.random.normal(next(keys), (n, width)),
                                        "prefix_in_kernel": linear_uniform(next(keys), (width, e), width),
                                        "prefix_in_bias": linear_uniform(next(keys), (e,), width)}
        for path, (lead, width) in attention.items():
            k1, k2 = jax.random.split(next(keys))
            grouped[path] = {**grouped.get(path, {}), "prefix_out_kernel": linear_uniform(k1, (*lead, e, 2 * width), e),
                             "prefix_out_bias": linear_uniform(k2, (*lead, 2 * width), e)}
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
        """The prefixes the projection gives, beside each attention module (a pure tree function)."""
        grouped = T.modules(params)
        encoder = next((leaves for path, leaves in grouped.items() if "prefix_embedding" in leaves), None)
        if encoder is None:
            return params
        h = jnp.tanh(encoder["prefix_embedding"] @ encoder["prefix_in_kernel"] + encoder["prefix_in_bias"])
        for path, leaves in grouped.items():
            if "prefix_out_kernel" in leaves:
                kv = jnp.einsum("ne,...eo->...no", h, leaves["prefix_out_kernel"]) + leaves["prefix_out_bias"][..., None, :]
                width = kv.shape[-1] // 2
                grouped[path] = {**leaves, "prefix_k": kv[..., :width], "prefix_v": kv[..., width:]}
        return T.from_modules(grouped)


def _layers(modules: dict) -> tuple[str, int, int]:
    """(the one stacked attention module, its layers, kv width) a PEFT prefix covers."""
    attention = {path: (lead, kv) for path, (lead, _, kv) in attention_modules(modules).items()}
    if len(attention) != 1 or len(next(iter(attention.values()))[0]) != 1:
        raise AdapterError(f"PEFT's prefix layout needs one stacked attention module; found {sorted(attention)}")
    path, ((layers,), width) = next(iter(attention.items()))
    return path, layers, width


def to_peft(modules: dict) -> tuple[dict, dict]:
    """PEFT's `prompt_embeddings` [n, layers·2·KV·D]: per token, layer by layer, key then value."""
    folded = T.modules(PrefixTuning.expand(T.from_modules(modules)))
    (path,) = [p for p, leaves in folded.items() if "prefix_k" in leaves]
    k, v = (np.asarray(folded[path][name], np.float32) for name in ("prefix_k", "prefix_v"))
    layers, n, width = k.shape
    embeddings = np.stack([k, v], axis=1).transpose(2, 0, 1, 3).reshape(n, layers * 2 * width)
    return {"prompt_embeddings": embeddings}, {
        "num_virtual_tokens": n, "token_dim": width, "num_layers": layers, "num_attention_heads": None,
        "num_transformer_submodules": 1, "prefix_projection": False, "encoder_hidden_size": width,
        "inference_mode": True}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError("prefix-tuning adapters for encoder-decoder models are not supported for this base")
    path, layers, width = _layers(modules)
    n = config["num_virtual_tokens"]
    got = tensors.take("prompt_embeddings")
    tensors.fits("prompt_embeddings", got.shape, (n, layers * 2 * width))
    kv = got.reshape(n, layers, 2, width).transpose(1, 2, 0, 3)
    grouped = dict(modules)
    grouped[path] = {**grouped.get(path, {}), "prefix_k": jnp.asarray(kv[:, 0], jnp.float32),
                     "prefix_v": jnp.asarray(kv[:, 1], jnp.float32)}
    return grouped
