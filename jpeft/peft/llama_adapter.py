"""LLaMA-Adapter (Zhang et al. 2023; PEFT's "adaption prompt"): learned prompts in the top layers,
read through a zero-initialised gate, so the model is unchanged at init.

In each adapted layer a prompt P [adapter_len, D] goes through the layer's own key and value
projections (no RoPE); the queries attend to those keys in a softmax of their own, and the result,
scaled by the layer's gate, is added to the attention output. Where the prompt goes is PEFT's
per-model table (TRANSFORMERS_MODEL_CONFIG in peft/tuners/adaption_prompt/config.py):

    Llama, Mistral (and jpeft's other Llama-like families):
        out = o_proj(attention(x)) + o_proj(gate · softmax(q·k_proj(P)ᵀ / √d) · v_proj(P))
    GPT-2 (model_type gpt2):
        out = c_proj(attention(x)) + gate · softmax(q·kᵀ / √d) · v,   (_, k, v) = split(c_attn(P))

so on GPT-2 the prompt's keys and values carry c_attn's bias, and the gated result does not pass
through c_proj (o_proj's bias, on a Llama-like family that has one, is applied to both terms). Leaves
beside each attention module: `adaption_prompt` [layers, len, D], `adaption_gate` [layers, 1]
(trained) and `adaption_layers` [layers] (1 where a layer is adapted: the stack is scanned,
so the lower layers carry unused zeros-gated leaves that get no gradient and are not counted
or saved). Parameters: adapter_layers·(adapter_len·D + 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import Method, attention_modules, hf_module, layer_names


PEFT_MODEL_TYPES = ("llama", "mistral", "gpt2")  # the model types PEFT's adaption prompt takes


class LlamaAdapter(Method):
    name = "llama_adapter"
    peft_type = "ADAPTION_PROMPT"
    trainable = ("adaption_prompt", "adaption_gate")
    metadata = ("adaption_layers",)
    axes = {"adaption_prompt": ("lead", None, "embed"), "adaption_gate": ("lead", None), "adaption_layers": ("lead",)}
    scope = ("LLaMA-Adapter adds a gated prompt attention to a decoder layer's attention output, as PEFT's adaption "
             "prompt does for llama, mistral and gpt2 and jpeft for its Llama-like families and GPT-2; PEFT has no "
             "adaption prompt for T5")

    def __init__(self, adapter_len: int = 10, adapter_layers: int | None = None):
        if adapter_len < 1 or (adapter_layers is not None and adapter_layers < 1):
            raise JpeftError(f"LLaMA-Adapter needs adapter_len >= 1 and adapter_layers None or >= 1, "
                             f"got {adapter_len} and {adapter_layers}")
        self.adapter_len, self.adapter_layers = adapter_len, adapter_layers

    def __repr__(self):
        return f"LlamaAdapter(adapter_len={self.adapter_len}, adapter_layers={self.adapter_layers})"

    def init(self, key, params):
        """Prompts N(0, 1) and gates 0, as PEFT's; only the top `adapter_layers` layers adapted."""
        grouped = T.modules(params)
        attention = attention_modules(grouped)
        if not all(any(f"{path}/{p}" in grouped for p in PROMPT_KEYS) for path in attention):
            raise JpeftError(f"LLaMA-Adapter cannot adapt this model: {self.scope}")
        for (path, (lead, dim, _)), k in zip(attention.items(), jax.random.split(key, len(attention))):
            layers = lead[0] if lead else 1
            top = layers if self.adapter_layers is None else self.adapter_layers
            if top > layers:
                raise JpeftError(f"adapter_layers={top} but {hf_module(path)} has {layers} layers")
            grouped[path] = {**grouped.get(path, {}),
                             "adaption_prompt": jax.random.normal(k, (*lead, self.adapter_len, dim)),
                             "adaption_gate": jnp.zeros((*lead, 1)),
                             "adaption_layers": (jnp.arange(layers) >= layers - top).astype(jnp.float32).reshape(lead)}
        return T.from_modules(grouped)

    @staticmethod
    def attention_output(leaves, q, out, qkv_layout):
        from jpeft.peft import sites  # the prompt goes through the layer's own projections (sites imports us)
        b, t, heads, dim = q.shape
        k, v, output = _through_attention(leaves, leaves["adaption_prompt"].astype(q.dtype), heads, dim, qkv_layout)
        kv = k.shape[-1] // dim
        k, v = (a.reshape(a.shape[0], kv, dim) for a in (k, v))
        q = q.reshape(b, t, kv, heads // kv, dim)
        scores = jnp.einsum("btkgd,skd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(dim)
        probs = (leaves["adaption_gate"].astype(jnp.float32) * jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
        gated = jnp.einsum("bkgts,skd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
        delta = gated.reshape(b, t, heads * dim)
        if output is not None:
            projection = leaves[output]
            delta = sites.dense({name: leaf for name, leaf in projection.items() if name != "bias"}
                                if output in UNBIASED_OUTPUTS else projection, delta)
        return out + (leaves["adaption_layers"] * delta).astype(out.dtype)

    @classmethod
    def count(cls, leaves: dict, name: str) -> int:
        adapted = np.asarray(leaves["adaption_layers"])
        return int(np.size(leaves[name]) // max(adapted.size, 1) * adapted.sum())


# PEFT's TRANSFORMERS_MODEL_CONFIG by the projection the prompt's keys come from: (its values' projection, the names
# of the projection the gated result passes through: Phi's is `dense`, GPT-J's `out_proj`). GPT-2's fused c_attn
# gives keys and values both; no projection follows. Phi-3's and CodeGen's fused qkv_proj and GPT-NeoX's
# query_key_value are read as Llama's three (PEFT has no adaption prompt for them), as are BLOOM's and Falcon's
# query_key_value and MPT's Wqkv.
PROMPT_KEYS = {"k_proj": ("v_proj", ("o_proj", "dense", "out_proj")), "c_attn": ("c_attn", ()),
               "qkv_proj": ("qkv_proj", ("o_proj", "out_proj")), "query_key_value": ("query_key_value", ("dense",)),
               "Wqkv": ("Wqkv", ("out_proj",))}
# GPT-NeoX's and Phi's output projection, which PEFT's adaption prompt does not take: the gated prompt passes its weight
# alone, as the attention output already carries its bias, so zero gates leave the model as it was. (PEFT passes
# o_proj's bias a second time where a Llama has one, and jpeft does as PEFT there.)
UNBIASED_OUTPUTS = ("dense",)


def _through_attention(leaves: dict, prompt, heads: int, dim: int, qkv_layout: str | None):
    """(keys, values, the output projection's name or None) of the prompt through the layer's own projections, a
    fused one split as the model splits it (`qkv_layout`)."""
    from jpeft.models.attention import split_qkv
    from jpeft.peft import sites
    key_proj = next(p for p in PROMPT_KEYS if p in leaves)
    value_proj, outputs = PROMPT_KEYS[key_proj]
    output = next((o for o in outputs if o in leaves), None)
    if key_proj == value_proj:  # fused q/k/v, split as the model splits it
        qkv = sites.dense(leaves[key_proj], prompt)
        _, k, v = split_qkv(qkv, qkv_layout, heads, dim)
        return k, v, output
    return sites.dense(leaves[key_proj], prompt), sites.dense(leaves[value_proj], prompt), output


def _adapted(path: str, leaves: dict):
    """A module's adapted layers as (index, HF name), and copies of its prompts [layers, len, D] and gates
    [layers, 1] (one layer per row, stacked or not)."""
    on = np.asarray(leaves["adaption_layers"]).reshape(-1)
    prompt = np.array(leaves["adaption_prompt"], np.float32).reshape(on.size, *np.shape(leaves["adaption_prompt"])[-2:])
    gate = np.array(leaves["adaption_gate"], np.float32).reshape(on.size, 1)
    return [(i, name) for i, name in enumerate(layer_names(path, on.size)) if on[i]], prompt, gate


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's per-layer `adaption_prompt` [1, len, D] and `adaption_gate` [1] of the adapted layers."""
    tensors, lengths, counts, names = {}, set(), set(), set()
    for path, leaves in modules.items():
        names.add(path.rpartition("/")[2])  # PEFT's target_modules: the attention module's name (self_attn, attn)
        layers, prompt, gate = _adapted(path, leaves)
        for i, name in layers:
            tensors[f"{name}.adaption_prompt"], tensors[f"{name}.adaption_gate"] = prompt[i][None], gate[i]
        lengths.add(prompt.shape[1])
        counts.add(len(layers))
    if len(lengths) != 1 or len(counts) != 1 or len(names) != 1:
        raise AdapterError("PEFT's adaption prompt has one adapter_len, adapter_layers and target module for the "
                           "whole model")
    return tensors, {"adapter_len": lengths.pop(), "adapter_layers": counts.pop(), "target_modules": names.pop()}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    method = LlamaAdapter(config["adapter_len"], config["adapter_layers"])
    grouped = T.modules(method.init(jax.random.key(0), T.from_modules(modules)))
    for path, leaves in grouped.items():
        if "adaption_layers" not in leaves:
            continue
        layers, prompt, gate = _adapted(path, leaves)
        for i, name in layers:
            prompt[i] = _fitting(tensors, f"{name}.adaption_prompt", (1, *prompt.shape[1:]))[0]
            gate[i] = _fitting(tensors, f"{name}.adaption_gate", (1,))
        grouped[path] = {**leaves, "adaption_prompt": jnp.asarray(prompt.reshape(leaves["adaption_prompt"].shape)),
                         "adaption_gate": jnp.asarray(gate.reshape(leaves["adaption_gate"].shape))}
    return grouped


def _fitting(tensors, key: str, shape: tuple) -> np.ndarray:
    got = tensors.take(key)
    tensors.fits(key, got.shape, shape)
    return got
