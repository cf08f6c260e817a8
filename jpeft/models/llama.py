"""The Llama-family decoder (Llama, EXAONE 3, Mistral, Ministral 1/3, Qwen2/3, Gemma 1/2/3, Granite, OLMo 1/2/3, Phi-3,
SmolLM3, ERNIE 4.5, Helium, EXAONE 4, Seed-OSS, Arcee, GLM, GLM-4, Cohere 1/2, StableLM, GPT-NeoX, Phi, GPT-J, CodeGen,
OPT, BLOOM, Falcon, StarCoder2, MPT, and with the experts of `moe` Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS and
GraniteMoE(-Shared)): one module, families differ by config (and a family's own module names, `families.MODULE_NAMES`).

Parameter paths follow HF module names (`model/layers/self_attn/q_proj/kernel`); the
layers are stacked on a leading `layers` axis and run under `nn.scan`, so compile time
does not grow with depth. A KV cache (see `init_cache`) is an explicit argument and
result, so decoding stays a pure function.
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models import attention as A
from jpeft.models import kv_cache as C
from jpeft.models import layers as L
from jpeft.models import moe
from jpeft.models.config import ModelConfig
from jpeft.models.rope import apply_rope, layer_rope, rope_tables
from jpeft.peft import sites


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rope, bias, mask, cache_kv, cache_index, layer):
        cfg = self.cfg
        b, t, _ = x.shape
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if cfg.fused_qkv:  # split as transformers splits it
            qkv = L.Dense(q_width + 2 * kv_width, ("embed", "heads"), cfg.qkv_bias, name=cfg.module_name("qkv_proj"))(x)
            q, k, v = A.split_qkv(qkv, cfg.fused_qkv, cfg.num_heads, cfg.head_dim)
        else:
            q = L.Dense(q_width, ("embed", "heads"), cfg.qkv_bias, name="q_proj")(x)
            k = L.Dense(kv_width, ("embed", "kv"), cfg.qkv_bias, name="k_proj")(x)
            v = L.Dense(kv_width, ("embed", "kv"), cfg.qkv_bias, name="v_proj")(x)
        if cfg.qk_norm == "all":
            q, k = (norm(cfg, (axis,), name)(a) for name, a, axis in (("q_norm", q, "heads"), ("k_norm", k, "kv")))
        if cfg.clip_qkv is not None:  # OLMoE's, after its norms
            q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = (norm(cfg, ("head_dim",), name)(a) for name, a in (("q_norm", q), ("k_norm", k)))
        elif cfg.qk_norm == "each_head":  # Cohere's: a scale per head and dimension
            q, k = (norm(cfg, (heads, "head_dim"), name)(a) for name, a, heads in (("q_norm", q, "heads"),
                                                                                    ("k_norm", k, "kv")))
        if rope is not None:  # OPT's positions are learned, added to the input; BLOOM's are ALiBi's `bias`
            cos, sin, query_scale = rope
            q, k = (apply_rope(a, cos, sin, cfg.rope_interleaved) for a in (q, k))
            q = q if query_scale is None else q * query_scale.astype(q.dtype)  # Ministral 3's
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        k, v = sites.attention_kv(L.module_leaves(self), k, v)  # a prefix is cached like past tokens
        cache_kv, k, v = C.keys_values(cache_kv, k, v, layer, cache_index)
        # Without a cache the queries are the last keys (after any prefix): causal in static slots.
        causal_offset = None if cache_kv is not None else k.shape[2] - q.shape[1]
        sinks = self.param("sinks", nn.with_logical_partitioning(L.init_normal, ("heads",)), (cfg.num_heads,),
                           jnp.float32) if cfg.attention_sinks else None
        out = A.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, cfg.query_scale, cfg.attn_softcap,
                       causal_offset, bias=bias, dropout=A.attention_dropout(self, cfg.attention_dropout), sinks=sinks)
        out = L.Dense(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, name=cfg.module_name("o_proj"))(
            out.reshape(b, t, cfg.num_heads * cfg.head_dim))
        return sites.attention_output(L.module_leaves(self), q, out, cfg.fused_qkv), cache_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        return self.experts(x) if self.cfg.num_experts else dense_mlp(self.cfg, x)

    def experts(self, x):
        """The routed experts (`moe`), plus Qwen2-MoE's dense shared expert, gated per token by a sigmoid; in
        training Mixtral's jitter on their input (`router_jitter`)."""
        cfg = self.cfg
        if (rng := L.dropout_rng(self, cfg.router_jitter)) is not None:
            x = x * jax.random.uniform(rng, x.shape, x.dtype, 1 - cfg.router_jitter, 1 + cfg.router_jitter)
        h = moe.Experts(cfg, name="experts")(x, *moe.Router(cfg, name=cfg.router_name)(x))
        if not cfg.shared_expert_size:
            return h
        shared = MLP(cfg.replace(num_experts=0, intermediate_size=cfg.shared_expert_size), name="shared_expert")(x)
        return h + jax.nn.sigmoid(L.Dense(1, ("embed", None), name="shared_expert_gate")(x)) * shared


def dense_mlp(cfg: ModelConfig, x):
    """A dense MLP's projections, made in the module calling it: an `MLP`, or OPT's layer, which holds fc1 and fc2
    itself (`mlp_in_layer`)."""
    dense = lambda width, name: L.Dense(width, ("embed", "mlp"), cfg.mlp_bias, name=cfg.module_name(name))(x)
    if cfg.fused_gate_up:  # Phi-3's and GLM's gate_up_proj: gate, then up
        h = L.activate(cfg.hidden_act, *jnp.split(dense(2 * cfg.intermediate_size, "gate_up_proj"), 2, axis=-1))
    elif cfg.gated_mlp:
        h = L.activate(cfg.hidden_act, dense(cfg.intermediate_size, "gate_proj"),
                       dense(cfg.intermediate_size, "up_proj"))
    else:  # Arcee's, GPT-NeoX's, Phi's, GPT-J's and OPT's act(up_proj(x)), no gate
        h = L.activate(cfg.hidden_act, dense(cfg.intermediate_size, "up_proj"))
    return L.Dense(cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, name=cfg.module_name("down_proj"))(h)


class SharedMLP(nn.Module):
    """GraniteMoE-Shared's dense MLP beside the experts, added to their output ungated: act(gate) · up of its fused
    `input_linear` (gate, then up), then `output_linear`."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate_up = L.Dense(2 * cfg.shared_mlp_size, ("embed", "mlp"), name="input_linear")(x)
        return L.Dense(cfg.hidden_size, ("mlp", "embed"), name="output_linear")(
            L.activate(cfg.hidden_act, *jnp.split(gate_up, 2, axis=-1)))


class DecoderLayer(nn.Module):
    """Pre-norm residual blocks; Gemma 2/3 (`sandwich_norms`) also normalise each block's output, OLMo 2/3 and EXAONE 4
    only that (no `pre_norms`), Granite scales it (`residual_multiplier`), Phi-3 and Seed-OSS drop it in training
    (`residual_dropout`); Cohere's and StableLM's attention and MLP read one normed input (`parallel_block`), GPT-NeoX's
    each its own norm of the layer's input (`parallel_norms`, Falcon's named its own way); OPT-350m normalises each
    residual sum instead (`norm_after_residual`)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, context):
        x, cache_kv, layer = carry
        rope, bias, masks, cache_index = context
        cfg = self.cfg
        block_norm = partial(norm, cfg, ("embed",))
        x = nn.with_logical_constraint(x, L.ACTIVATION_AXES)
        input_norm, mlp_input_norm = cfg.parallel_norm_names  # the second only in a parallel block of two norms
        normed = block_norm(input_norm)(x) if cfg.pre_norms else x
        if cfg.parallel_norms:
            normed_apart = block_norm(mlp_input_norm)(x)
        h, cache_kv = Attention(cfg, name=cfg.module_name("self_attn"))(
            normed, rope and layer_rope(cfg, rope, layer), bias, layer_mask(cfg, masks, layer), cache_kv, cache_index,
            layer)
        after_attention, before_mlp, after_mlp = cfg.sandwich_norm_names
        if cfg.sandwich_norms:
            h = block_norm(after_attention)(h)
        h = L.dropout(self, L.scaled(h, cfg.residual_multiplier), cfg.residual_dropout)
        x = x + sites.residual(L.module_leaves(self), h, "attention", normed)
        if cfg.norm_after_residual:
            x = block_norm("input_layernorm")(x)
        if cfg.parallel_norms:
            normed = normed_apart
        elif not cfg.parallel_block:  # whose MLP reads attention's input
            mlp_norm = before_mlp if cfg.sandwich_norms else "post_attention_layernorm"
            normed = block_norm(mlp_norm)(x) if cfg.pre_norms else x
        mlp = partial(dense_mlp, cfg) if cfg.mlp_in_layer \
            else MLP(cfg, name=cfg.moe_name if cfg.num_experts else cfg.module_name("mlp"))
        h = mlp(normed)
        if cfg.shared_mlp_size:
            h = h + SharedMLP(cfg, name="shared_mlp")(normed)
        if cfg.sandwich_norms:
            h = block_norm(after_mlp)(h)
        h = L.dropout(self, L.scaled(h, cfg.residual_multiplier), cfg.residual_dropout)
        x = x + sites.residual(L.module_leaves(self), h, "mlp", normed)
        if cfg.norm_after_residual:
            x = block_norm("post_attention_layernorm")(x)
        return (x, cache_kv, layer + 1), None


def norm(cfg: ModelConfig, axes: tuple[str, ...], name: str) -> L.RMSNorm | L.LayerNorm:
    """The family's norm over a tensor's last axis (logical `axes`): its RMSNorm, or its LayerNorm (`layer_norm`),
    named as the family names the module jpeft calls `name`."""
    name = cfg.module_name(name)
    if cfg.layer_norm:
        return L.LayerNorm(cfg.rms_norm_eps, cfg.layer_norm != "none", cfg.layer_norm == "scale_bias", axes, name=name)
    return L.RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, axes, cfg.norm_float32_scale, name=name)


def layer_mask(cfg: ModelConfig, masks, layer):
    """The mask of this layer's kind: (full, sliding-window) masks, picked per layer where they alternate."""
    full, sliding = masks  # None where no layer is of that kind
    if full is None or sliding is None:
        return sliding if full is None else full
    return jnp.where(jnp.asarray(cfg.sliding_layers)[layer], sliding, full)


class Decoder(nn.Module):
    """Embedding (BLOOM's normalised), the scanned layers, final norm; OPT's learned positions and its projections
    around the layers where its token embeddings are narrower (`embed_width`).

    The stacked KV cache is part of the scan's carry, not its per-layer inputs/outputs: as
    those, every call would copy the whole cache (a slice in, a re-stacked array out); as
    carry, each layer writes only the new tokens' keys/values in place and reads its own rows.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, context, cache_kv, positions):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        scale = np.sqrt(cfg.hidden_size) if cfg.embed_scale else None  # Gemma's; a soft prompt stays unscaled
        x = L.Embed(cfg.vocab_size, cfg.embed_width or cfg.hidden_size, name=cfg.module_name("embed_tokens"))(
            input_ids, dtype, scale=scale)
        if cfg.embed_width:
            x = L.Dense(cfg.hidden_size, (None, "embed"), name="project_in")(x)
        if cfg.embed_norm:
            x = norm(cfg, ("embed",), "embed_norm")(x)
        if cfg.learned_positions:  # the virtual tokens' positions too, as they are prepended to the embeddings
            x = x + L.Embed(cfg.max_position_embeddings + cfg.position_offset, cfg.hidden_size,
                            name="embed_positions")(positions + cfg.position_offset, dtype, prepend=False)
        x = L.scaled(x, cfg.embedding_multiplier)  # Granite's, on the whole input (PEFT's soft prompt too)
        x = L.dropout(self, x, cfg.embed_dropout)  # GPT-NeoX's hidden_dropout, the soft prompt's too
        stack = L.scan_layers(DecoderLayer, cfg, cfg.num_layers)
        (x, cache_kv, _), _ = stack(cfg, name=cfg.module_name("layers"))((x, cache_kv, jnp.int32(0)), context)
        x = nn.with_logical_constraint(x, L.ACTIVATION_AXES)
        if cfg.final_norm:
            x = norm(cfg, ("embed",), "norm")(x)
        if cfg.embed_width:
            x = L.Dense(cfg.embed_width, ("embed", None), name="project_out")(x)
        return x, cache_kv


class NestedDecoder(nn.Module):
    """The decoder one module further down (OPT's `model.decoder`), as transformers nests it."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, *inputs):
        return Decoder(self.cfg, name="decoder")(*inputs)


class CausalLM(L.LMHead, nn.Module):
    """Decoder + LM head. `__call__(input_ids, attention_mask=None, positions=None, cache=None)`.

    Returns logits [B, T, vocab] (float32), or hidden states with `return_hidden=True`
    (for a chunked loss that never materialises all logits). With a cache it returns
    `(output, new_cache)`. Virtual tokens a method adds (soft prompts, prefixes) come before
    the input at positions 0..n-1, shift the given `positions` by n, and are not in the output.
    `attention_mask` [B, T] is 0 on padding and may hold segment ids (1, 2, ... for examples
    packed into one row, with `positions` restarting per example): a token attends only to its
    own segment (and to virtual tokens).
    """
    config: ModelConfig
    insertion_points = sites.HOOKS
    base_prefix = "model"  # transformers' base_model_prefix: a base-model checkpoint's names lack it
    embedding_path = "model/embed_tokens/embedding"  # the token embedding, the head when tied
    decoder = Decoder  # the module under base_prefix

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, return_hidden=False):
        cfg = self.config
        if cfg.positions_over_mask and positions is None and attention_mask is not None and cache is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask != 0, axis=-1) - 1, 0)
        d = C.decoder_inputs(self.variables.get("params", {}), input_ids, attention_mask, positions, cache)
        C.check_position_table(cfg, d, input_ids.shape[1], positions, cache)
        cache_kv = None if cache is None else (cache["k"], cache["v"])
        masks = tuple(A.attention_mask(d.q_slots, d.k_slots, d.q_segments, d.k_segments, window,
                                       q_positions=d.positions) if use else None
                      for window, use in ((None, not all(cfg.sliding_layers)),
                                          (cfg.sliding_window, any(cfg.sliding_layers))))
        # mapped at init too; in an apply that collects sown values (`moe.router_logits`) flax would otherwise
        # first run the decoder on the unexpanded params
        decoder = nn.map_variables(self.decoder, "params", trans_in_fn=sites.expand, init=self.is_initializing())
        context = (rope_tables(cfg, d.positions) if cfg.rotary_dim else None,
                   A.alibi(cfg, d.k_segments) if cfg.alibi else None, masks, d.index)
        hidden, cache_kv = decoder(cfg, name=self.base_prefix)(input_ids, context, cache_kv, d.positions)
        hidden = hidden[:, d.rows:]
        out = self.outputs(hidden, return_hidden)
        if cache is None:
            return out
        return out, C.written_cache(cache_kv, d, input_ids.shape[1])


class GPTNeoX(CausalLM):
    """GPT-NeoX (Pythia): the decoder above under the family's own module names (`families.MODULE_NAMES`)."""
    base_prefix = "gpt_neox"
    embedding_path = "gpt_neox/embed_in/embedding"


class GPTJ(CausalLM):
    """GPT-J, CodeGen and MPT: the decoder above under the family's own module names (`families.MODULE_NAMES`),
    GPT-2's top ones."""
    base_prefix = "transformer"
    embedding_path = "transformer/wte/embedding"


class Bloom(CausalLM):
    """BLOOM and Falcon: the decoder above under their module names (GPT-2's top one, a `word_embeddings` table);
    BLOOM's with ALiBi instead of RoPE and its embeddings normalised."""
    base_prefix = "transformer"
    embedding_path = "transformer/word_embeddings/embedding"


class OPT(CausalLM):
    """OPT: the decoder above one module down (`model.decoder`), under the family's module names, with learned
    positions instead of RoPE."""
    embedding_path = "model/decoder/embed_tokens/embedding"
    decoder = NestedDecoder


def init_params(model: CausalLM, key) -> dict:
    """A randomly initialised plain parameter tree (HF's normal(0.02) init)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(jax.jit(model.init)(key, ids)["params"])
