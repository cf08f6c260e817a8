"""T5, T5 v1.1 and FLAN-T5: the encoder-decoder, from the shared layers.

Parameter paths spell HF's module names (`encoder/block/layer_0/SelfAttention/q/kernel` <->
`encoder.block.{i}.layer.0.SelfAttention.q.weight`); each stack of blocks runs under `nn.scan`.
T5 attention has no RoPE and no 1/sqrt(d) scale: a learned bias per (relative-position bucket,
head), computed once per stack (HF keeps its table in block 0), is added to every layer's scores.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jpeft.models import layers as L
from jpeft.models.config import ModelConfig
from jpeft.peft import sites


def relative_buckets(relative, bidirectional: bool, buckets: int, max_distance: int):
    """Mesh TensorFlow's bucket of each key-minus-query distance: exact near, logarithmic far."""
    out = 0
    if bidirectional:
        buckets //= 2
        out = (relative > 0).astype(jnp.int32) * buckets
        relative = jnp.abs(relative)
    else:
        relative = -jnp.minimum(relative, 0)
    exact = buckets // 2
    far = exact + (jnp.log(jnp.maximum(relative, 1).astype(jnp.float32) / exact) / np.log(max_distance / exact)
                   * (buckets - exact)).astype(jnp.int32)
    return out + jnp.where(relative < exact, relative, jnp.minimum(far, buckets - 1))


class RelativeBias(nn.Module):
    """The [buckets, heads] table of a stack's position biases (HF: its block 0's `relative_attention_bias`)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, buckets):
        table = self.param("embedding", nn.with_logical_partitioning(L.init_normal, (None, "heads")),
                           (self.cfg.relative_buckets, self.cfg.num_heads), jnp.float32)
        return jnp.take(table, buckets, axis=0)


class Attention(nn.Module):
    """q/k/v/o attention of `x` over `source` (itself, or the encoder output for cross-attention)."""
    cfg: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x, source, mask, bias):
        cfg = self.cfg
        heads, dim = cfg.num_heads, cfg.head_dim
        q = L.Dense(heads * dim, ("embed", "heads"), name="q")(x).reshape(*x.shape[:2], heads, dim)
        k, v = (L.Dense(heads * dim, ("embed", "kv"), name=n)(source).reshape(*source.shape[:2], heads, dim)
                for n in ("k", "v"))
        out = L.attend(q, k, v, mask, 1.0, None, 0 if self.causal else None, bias=bias)
        return L.Dense(cfg.hidden_size, ("heads", "embed"), name="o")(out.reshape(*x.shape[:2], heads * dim))


class DenseReluDense(nn.Module):
    """wo(act(wi(x))), or v1.1's gated wo(act(wi_0(x)) · wi_1(x))."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        act = L.ACTIVATIONS[cfg.hidden_act]
        dense = lambda name: L.Dense(cfg.intermediate_size, ("embed", "mlp"), name=name)(x)  # noqa: E731
        h = act(dense("wi_0")) * dense("wi_1") if cfg.gated_mlp else act(dense("wi"))
        return L.Dense(cfg.hidden_size, ("mlp", "embed"), name="wo")(h)


class Sublayer(nn.Module):
    """x + f(layer_norm(x)): HF's T5LayerSelfAttention, T5LayerCrossAttention and T5LayerFF."""
    cfg: ModelConfig
    kind: str  # SelfAttention | EncDecAttention | DenseReluDense
    causal: bool = False

    @nn.compact
    def __call__(self, x, *context):
        normed = L.RMSNorm(self.cfg.rms_norm_eps, name="layer_norm")(x)
        if self.kind == "DenseReluDense":
            h = DenseReluDense(self.cfg, name=self.kind)(normed)
        else:
            source, mask, bias = context
            h = Attention(self.cfg, self.causal, name=self.kind)(normed, normed if source is None else source,
                                                                 mask, bias)
        return x + h


class Block(nn.Module):
    """One encoder block (self-attention, FF) or decoder block (causal self-, cross-attention, FF)."""
    cfg: ModelConfig
    decoder: bool

    @nn.compact
    def __call__(self, x, context):
        x = nn.with_logical_constraint(x, L.ACTIVATION_AXES)
        mask, bias, encoded, cross_mask = context
        parts = [Sublayer(self.cfg, "SelfAttention", self.decoder, name="layer_0")(x, None, mask, bias)]
        if self.decoder:
            parts.append(Sublayer(self.cfg, "EncDecAttention", name="layer_1")(parts[-1], encoded, cross_mask, None))
        return Sublayer(self.cfg, "DenseReluDense", name=f"layer_{len(parts)}")(parts[-1]), None


class Stack(nn.Module):
    """The encoder or decoder: its relative-position bias, the scanned blocks, the final norm."""
    cfg: ModelConfig
    decoder: bool

    @nn.compact
    def __call__(self, x, mask, encoded=None, cross_mask=None):
        cfg = self.cfg
        t = x.shape[1]
        buckets = relative_buckets(jnp.arange(t)[None, :] - jnp.arange(t)[:, None], not self.decoder,
                                   cfg.relative_buckets, cfg.relative_max_distance)
        bias = RelativeBias(cfg, name="relative_attention_bias")(buckets).transpose(2, 0, 1)[None]  # [1, H, T, T]
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,), length=cfg.num_decoder_layers if self.decoder else cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(cfg, self.decoder, name="block")(x, (mask, bias, encoded, cross_mask))
        x = nn.with_logical_constraint(x, L.ACTIVATION_AXES)
        return L.RMSNorm(cfg.rms_norm_eps, name="final_layer_norm")(x)


class T5(nn.Module):
    """`__call__(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None)`.

    Returns decoder logits [B, T_dec, vocab] (float32), or the decoder's hidden states with
    `return_hidden=True`. Masks are 0 on padding (segment ids, as for the decoders). Without
    decoder ids (initialisation) the decoder reads one start token.
    """
    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, decoder_input_ids=None, attention_mask=None, decoder_attention_mask=None,
                 return_hidden=False):
        cfg = self.config
        if decoder_input_ids is None:
            decoder_input_ids = jnp.zeros((input_ids.shape[0], 1), jnp.int32)
        segments = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        dec_segments = (jnp.ones(decoder_input_ids.shape, jnp.int32) if decoder_attention_mask is None
                        else decoder_attention_mask.astype(jnp.int32))
        slots, dec_slots = jnp.arange(input_ids.shape[1]), jnp.arange(decoder_input_ids.shape[1])
        shared = L.Embed(cfg.vocab_size, cfg.hidden_size, name="shared")
        dtype = jnp.dtype(cfg.dtype)
        encoded = Stack(cfg, False, name="encoder")(
            shared(input_ids, dtype), L.attention_mask(slots, slots, segments, segments, None, causal=False))
        # Decoder tokens see the encoder tokens of their own segment (all of them without packing).
        cross_mask = L.attention_mask(dec_slots, slots, jnp.minimum(dec_segments, 1), segments, None, causal=False)
        hidden = Stack(cfg, True, name="decoder")(
            shared(decoder_input_ids, dtype), L.attention_mask(dec_slots, dec_slots, dec_segments, dec_segments, None),
            encoded, cross_mask)
        if cfg.scale_decoder_outputs:
            hidden = hidden * jnp.asarray(cfg.hidden_size ** -0.5, hidden.dtype)
        if not cfg.tie_word_embeddings and self.is_initializing():
            L.Dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head")(hidden)  # creates the head's kernel
        return hidden if return_hidden else self.logits(self.head_leaves(L.module_leaves(self)), hidden)

    @nn.nowrap
    def head_leaves(self, params) -> dict:
        if self.config.tie_word_embeddings:
            return {"kernel": params["shared"]["embedding"].T}
        return dict(params["lm_head"])

    @nn.nowrap
    def logits(self, head: dict, hidden):
        return sites.dense(head, hidden).astype(jnp.float32)
