"""GPT-2: learned positions, LayerNorm, fused q/k/v, from the shared layers.

Parameter paths spell HF's names (`transformer/h/attn/c_attn/kernel` <-> `transformer.h.{i}.attn.c_attn.weight`).
Its projections are HF `Conv1D`s, whose weights are already [in, out], so they are read and
written untransposed (`jpeft.peft.base.is_conv1d`); PEFT adapts them with `fan_in_fan_out`.

Virtual tokens go where PEFT's CAUSAL_LM methods put them (peft 0.21, transformers 5): a soft prompt is
prepended to the input embeddings, so GPT-2 adds its learned positions 0..n-1 to the prompt and n.. to
the real tokens; a prefix is passed as n past keys/values, so the real tokens' positions start at n and
the prefix itself has none (its keys and values are per head, after c_attn's split). LLaMA-Adapter's
gated prompt attention joins c_proj's output (`attention_output`), as PEFT's GPT-2 adaption prompt adds it.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jpeft.models import attention as A
from jpeft.models import kv_cache as C
from jpeft.models import layers as L
from jpeft.models.config import ModelConfig
from jpeft.peft import sites


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, cache_kv, index, layer):
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = L.Dense(3 * cfg.hidden_size, ("embed", "heads"), True, name="c_attn")(x)
        q, k, v = (a.reshape(b, t, cfg.num_heads, cfg.head_dim) for a in jnp.split(qkv, 3, axis=-1))
        k, v = sites.attention_kv(L.module_leaves(self), k, v)  # a prefix is cached like past tokens
        cache_kv, k, v = C.keys_values(cache_kv, k, v, layer, index)
        out = A.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, cfg.query_scale, None,
                       None if cache_kv is not None else k.shape[2] - t,
                       dropout=A.attention_dropout(self, cfg.attention_dropout))
        out = L.Dense(cfg.hidden_size, ("heads", "embed"), True, name="c_proj")(out.reshape(b, t, -1))
        out = L.dropout(self, out, cfg.residual_dropout)  # inside HF's attention module, before PEFT's adaption prompt
        return sites.attention_output(L.module_leaves(self), q, out, "blocks"), cache_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = L.Dense(cfg.intermediate_size, ("embed", "mlp"), True, name="c_fc")(x)
        h = L.Dense(cfg.hidden_size, ("mlp", "embed"), True, name="c_proj")(L.activate(cfg.hidden_act, h))
        return L.dropout(self, h, cfg.residual_dropout)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, context):
        x, cache_kv, layer = carry
        mask, index = context
        x = nn.with_logical_constraint(x, L.ACTIVATION_AXES)
        normed = L.LayerNorm(self.cfg.rms_norm_eps, name="ln_1")(x)
        h, cache_kv = Attention(self.cfg, name="attn")(normed, mask, cache_kv, index, layer)
        x = x + sites.residual(L.module_leaves(self), h, "attention", normed)
        normed = L.LayerNorm(self.cfg.rms_norm_eps, name="ln_2")(x)
        x = x + sites.residual(L.module_leaves(self), MLP(self.cfg, name="mlp")(normed), "mlp", normed)
        return (x, cache_kv, layer + 1), None


class Transformer(nn.Module):
    """HF's GPT2Model: token and position embeddings, the scanned blocks `h`, the final norm."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions, mask, cache_kv, index):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = (L.Embed(cfg.vocab_size, cfg.hidden_size, name="wte")(input_ids, dtype)
             + L.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="wpe")(positions, dtype, prepend=False))
        x = L.dropout(self, x, cfg.embed_dropout)
        stack = L.scan_layers(Block, cfg, cfg.num_layers)
        (x, cache_kv, _), _ = stack(cfg, name="h")((x, cache_kv, jnp.int32(0)), (mask, index))
        return L.LayerNorm(cfg.rms_norm_eps, name="ln_f")(nn.with_logical_constraint(x, L.ACTIVATION_AXES)), cache_kv


class GPT2(L.LMHead, nn.Module):
    """`__call__(input_ids, attention_mask=None, positions=None, cache=None)`, as `CausalLM`'s (virtual tokens
    included); the head is the token embedding, tied, unless a checkpoint holds its own."""
    config: ModelConfig
    insertion_points = sites.HOOKS
    base_prefix = "transformer"  # as CausalLM's
    embedding_path = "transformer/wte/embedding"  # the token embedding, the head when tied

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, return_hidden=False):
        cfg = self.config
        d = C.decoder_inputs(self.variables.get("params", {}), input_ids, attention_mask, positions, cache)
        C.check_position_table(cfg, d, input_ids.shape[1], positions, cache)
        cache_kv = None if cache is None else (cache["k"], cache["v"])
        mask = A.attention_mask(d.q_slots, d.k_slots, d.q_segments, d.k_segments, None)
        transformer = nn.map_variables(Transformer, "params", trans_in_fn=sites.expand, init=self.is_initializing())
        hidden, cache_kv = transformer(cfg, name="transformer")(input_ids, d.positions, mask, cache_kv, d.index)
        hidden = hidden[:, d.rows:]
        out = self.outputs(hidden, return_hidden)
        if cache is None:
            return out
        return out, C.written_cache(cache_kv, d, input_ids.shape[1])
