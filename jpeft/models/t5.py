"""T5, T5 v1.1, FLAN-T5, mT5 and UMT5: the encoder-decoder, from the shared layers.

Parameter paths spell HF's module names (`encoder/block/layer_0/SelfAttention/q/kernel` <->
`encoder.block.{i}.layer.0.SelfAttention.q.weight`); each stack of blocks runs under `nn.scan`.
T5 attention has no RoPE and no 1/sqrt(d) scale: a learned bias per (relative-position bucket,
head), computed once per stack (HF keeps its table in block 0), is added to every layer's scores;
UMT5's self-attention layers each have a table of their own (`position_bias_per_layer`).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jpeft.models import attention as A
from jpeft.models import kv_cache as C
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
    """The [buckets, heads] table of a stack's position biases (HF: its block 0's `relative_attention_bias`),
    read through the embedding insertion point: PEFT adapts it as the embedding it is."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, buckets):
        self.param("embedding", nn.with_logical_partitioning(L.init_normal, (None, "heads")),
                   (self.cfg.relative_buckets, self.cfg.num_heads), jnp.float32)
        return sites.embed(L.module_leaves(self), buckets, jnp.float32, prepend=False)


def position_bias(cfg: ModelConfig, buckets):
    """The bias [1, H, T, S] of relative-position `buckets` [T, S], from the calling module's table."""
    return RelativeBias(cfg, name="relative_attention_bias")(buckets).transpose(2, 0, 1)[None]


class Attention(nn.Module):
    """q/k/v/o attention of `x` over `source` (itself, or the encoder output for cross-attention).

    With `cache` (this kind's stacked [layers, B · H, slots, D] keys and values) the new keys and
    values go into the layer's rows at `index` and attention reads all of them; a cross-attention
    step without `source` reads the encoder's keys and values the prefill wrote. The decoder's
    self-attention (`causal`) is the keys/values insertion point: a prefix comes before its keys and
    is cached like past tokens, as PEFT passes its prefixes there (as past key values) and nowhere else.
    """
    cfg: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x, source, mask, bias, cache=None, layer=None, index=0):
        """`bias`: the stack's position bias [1, H, T, S], or (UMT5's self-attention) the buckets [T, S] this
        layer's own table reads."""
        cfg = self.cfg
        heads, dim = cfg.num_heads, cfg.head_dim
        if bias is not None and bias.ndim == 2:
            bias = position_bias(cfg, bias)
        split = lambda a: a.reshape(*a.shape[:2], heads, dim)  # noqa: E731
        q = split(L.Dense(heads * dim, ("embed", "heads"), name="q")(x))
        if source is not None:
            k, v = (split(L.Dense(heads * dim, ("embed", "kv"), name=n)(source)) for n in ("k", "v"))
            if self.causal:
                k, v = sites.attention_kv(L.module_leaves(self), k, v)
        if source is not None:
            cache, k, v = C.keys_values(cache, k, v, layer, index)
        else:  # a decoding step: the encoder's keys/values as the prefill wrote them
            k, v = (C.layer_rows(c, layer) for c in cache)
        if cache is not None:
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        # Without a cache the queries are the last keys (after any prefix): causal in static slots.
        causal_offset = k.shape[2] - q.shape[1] if self.causal and cache is None else None
        out = A.attend(q, k, v, mask, 1.0, None, causal_offset, bias=bias,
                       dropout=A.attention_dropout(self, cfg.attention_dropout))
        return L.Dense(cfg.hidden_size, ("heads", "embed"), name="o")(out.reshape(*x.shape[:2], heads * dim)), cache


class DenseReluDense(nn.Module):
    """wo(dropout(act(wi(x)))), or v1.1's gated wo(dropout(act(wi_0(x)) · wi_1(x)))."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = lambda name: L.Dense(cfg.intermediate_size, ("embed", "mlp"), name=name)(x)  # noqa: E731
        inputs = (dense("wi_0"), dense("wi_1")) if cfg.gated_mlp else (dense("wi"),)
        h = L.dropout(self, L.activate(cfg.hidden_act, *inputs), cfg.residual_dropout)
        return L.Dense(cfg.hidden_size, ("mlp", "embed"), name="wo")(h)


class Sublayer(nn.Module):
    """dropout(f(layer_norm(x))) and layer_norm(x): HF's T5LayerSelfAttention, T5LayerCrossAttention and
    T5LayerFF before their residual sum, which the block takes through the residual insertion point."""
    cfg: ModelConfig
    kind: str  # SelfAttention | EncDecAttention | DenseReluDense
    causal: bool = False

    @nn.compact
    def __call__(self, x, source=None, mask=None, bias=None, cache=None, layer=None, index=0):
        normed = L.RMSNorm(self.cfg.rms_norm_eps, name="layer_norm")(x)
        if self.kind == "DenseReluDense":
            h = DenseReluDense(self.cfg, name=self.kind)(normed)
        else:
            source = normed if self.kind == "SelfAttention" else source
            h, cache = Attention(self.cfg, self.causal, name=self.kind)(normed, source, mask, bias, cache, layer,
                                                                        index)
        return L.dropout(self, h, self.cfg.residual_dropout), normed, cache


class Block(nn.Module):
    """One encoder block (self-attention, FF) or decoder block (causal self-, cross-attention, FF).

    Each sublayer's output joins the residual stream through the residual insertion point: "attention"
    (self-attention), "cross_attention" and "mlp" (the FF), as the decoders' blocks name theirs.
    The carry holds the stacked KV caches (self, cross) and the layer counter, as the decoders' does.
    """
    cfg: ModelConfig
    decoder: bool

    @nn.compact
    def __call__(self, carry, context):
        x, caches, layer = carry
        mask, bias, encoded, cross_mask, index = context
        x = nn.with_logical_constraint(x, L.ACTIVATION_AXES)
        own, cross = caches if caches is not None else (None, None)
        h, normed, own = Sublayer(self.cfg, "SelfAttention", self.decoder, name="layer_0")(x, None, mask, bias, own,
                                                                                           layer, index)
        x = x + sites.residual(L.module_leaves(self), h, "attention", normed)
        if self.decoder:
            h, normed, cross = Sublayer(self.cfg, "EncDecAttention", name="layer_1")(x, encoded, cross_mask, None,
                                                                                     cross, layer)
            x = x + sites.residual(L.module_leaves(self), h, "cross_attention", normed)
        h, normed, _ = Sublayer(self.cfg, "DenseReluDense", name=f"layer_{1 + self.decoder}")(x)
        x = x + sites.residual(L.module_leaves(self), h, "mlp", normed)
        return (x, None if caches is None else (own, cross), layer + 1), None


class Stack(nn.Module):
    """The encoder or decoder: dropout on its input, its relative-position bias (UMT5's buckets, which each layer's
    table reads), the scanned blocks, the final norm and dropout on its output."""
    cfg: ModelConfig
    decoder: bool

    @nn.compact
    def __call__(self, x, q_slots, k_slots, mask, encoded=None, cross_mask=None, caches=None, index=0):
        cfg = self.cfg
        buckets = relative_buckets(k_slots[None, :] - q_slots[:, None], not self.decoder, cfg.relative_buckets,
                                   cfg.relative_max_distance)
        bias = buckets if cfg.position_bias_per_layer else position_bias(cfg, buckets)  # UMT5's: in each layer
        x = L.dropout(self, x, cfg.embed_dropout)
        stack = L.scan_layers(Block, cfg, cfg.num_decoder_layers if self.decoder else cfg.num_layers)
        (x, caches, _), _ = stack(cfg, self.decoder, name="block")(
            (x, caches, jnp.int32(0)), (mask, bias, encoded, cross_mask, index))
        x = nn.with_logical_constraint(x, L.ACTIVATION_AXES)
        return L.dropout(self, L.RMSNorm(cfg.rms_norm_eps, name="final_layer_norm")(x), cfg.residual_dropout), caches


class T5(L.LMHead, nn.Module):
    """`__call__(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None, cache=None)`.

    Returns decoder logits [B, T_dec, vocab] (float32), or the decoder's hidden states with
    `return_hidden=True`. Masks are 0 on padding (segment ids, as for the decoders: a decoder token
    sees the encoder tokens of its own segment). Without decoder ids (initialisation) the decoder
    reads one start token. With a cache (`init_cache`) it returns `(output, new_cache)`: a call
    with `input_ids` encodes them and writes every layer's cross-attention keys/values; later
    calls pass `input_ids=None` and only decoder tokens. Virtual tokens go where PEFT's SEQ_2_SEQ_LM
    methods put them: a soft prompt's rows before the encoder's input, a prefix's keys before the
    decoder's self-attention keys (slots 0..n-1 of its cache, so the decoder tokens' relative
    positions count from n, as transformers' T5 counts them after n past tokens).
    """
    config: ModelConfig
    base_prefix = None  # its names have none
    embedding_path = "shared/embedding"  # the token embedding, the head when tied
    # No LLaMA-Adapter gates: T5 calls no attention_output point (see LlamaAdapter.scope).
    insertion_points = tuple(hook for hook in sites.HOOKS if hook not in ("attention_output", "pool"))

    @nn.compact
    def __call__(self, input_ids, decoder_input_ids=None, attention_mask=None, decoder_attention_mask=None,
                 cache=None, return_hidden=False):
        cfg = self.config
        shared = L.Embed(cfg.vocab_size, cfg.hidden_size, name="shared")
        dtype = jnp.dtype(cfg.dtype)
        if decoder_input_ids is None:
            decoder_input_ids = jnp.full((input_ids.shape[0], 1), cfg.decoder_start_token_id, jnp.int32)
        rows, keys = sites.virtual_tokens(self.variables.get("params", {}))
        dec_segments = _segments(decoder_input_ids, decoder_attention_mask)
        prefixed = jnp.concatenate([jnp.full((dec_segments.shape[0], keys), -1, jnp.int32), dec_segments], axis=1)
        q_slots, k_slots, k_segments, index = C.slots(prefixed, cache, keys)  # prefix keys: seen by every token
        caches = None if cache is None else ((cache["k"], cache["v"]), (cache["cross_k"], cache["cross_v"]))
        encoded = None
        if input_ids is not None:
            segments = _segments(input_ids, attention_mask)  # soft prompt rows: seen by, and seeing, every token
            segments = jnp.concatenate([jnp.ones((segments.shape[0], rows), jnp.int32), segments], axis=1)
            slots = jnp.arange(segments.shape[1])
            encoded, _ = Stack(cfg, False, name="encoder")(
                shared(input_ids, dtype), slots, slots, A.attention_mask(slots, slots, segments, segments, None, False))
        else:
            segments = cache["encoder_segments"]
        cross_mask = A.attention_mask(q_slots, jnp.arange(segments.shape[1]), dec_segments, segments, None, False)
        decoder = nn.map_variables(Stack, "params", trans_in_fn=sites.expand, init=self.is_initializing())
        hidden, caches = decoder(cfg, True, name="decoder")(
            shared(decoder_input_ids, dtype, prepend=False), q_slots, k_slots,
            A.attention_mask(q_slots, k_slots, dec_segments, k_segments, None), encoded, cross_mask, caches, index)
        if cfg.scale_decoder_outputs:
            hidden = hidden * jnp.asarray(cfg.hidden_size ** -0.5, hidden.dtype)
        out = self.outputs(hidden, return_hidden)
        if cache is None:
            return out
        (k, v), (cross_k, cross_v) = caches
        return out, {"k": k, "v": v, "cross_k": cross_k, "cross_v": cross_v, "segments": k_segments,
                     "encoder_segments": segments, "index": index + keys + decoder_input_ids.shape[1]}

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int, dtype=None, encoder_len: int = 1) -> dict:
        """An empty cache for `max_len` decoder slots (prefix keys included) over an encoder input of
        `encoder_len` tokens."""
        cross = C.empty_cache(self.config, batch, encoder_len, dtype)
        return {**C.empty_cache(self.config, batch, max_len, dtype), "cross_k": cross["k"], "cross_v": cross["v"],
                "encoder_segments": cross["segments"]}


def _segments(ids, mask):
    return jnp.ones(ids.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
