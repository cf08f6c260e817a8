"""The model configuration jpeft honours, read from (and written back to) HF config.json.

Llama, EXAONE 3, Mistral, Ministral 1/3, Qwen2/3, Gemma 1/2/3, Granite, OLMo 1/2/3, Phi-3, SmolLM3, ERNIE 4.5, Helium,
EXAONE 4, Seed-OSS, Arcee, GLM/GLM-4, Cohere/Cohere 2, StableLM, GPT-NeoX, Phi, GPT-J, CodeGen, OPT, BLOOM, Falcon,
StarCoder2, MPT and the mixtures of experts Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS and GraniteMoE(-Shared) differ only in
these fields, and T5 in a few more; anything in a config.json that jpeft cannot honour is an error here rather than a
silently different model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jpeft.errors import CheckpointError, read_json
from jpeft.models.families import (ACTIVATIONS, ACTIVATION_ALIASES, ATTENTION_DROPOUT_FIELDS, BIASED_TYPES,
                                   EMBED_DROPOUT_FIELDS, FAMILY_FIELDS, FLOAT32_SCALE_NORM_TYPES, GEMMA_TYPES,
                                   GLM4_SANDWICH_NORMS, GLM_TYPES, GPTJ_TYPES, INTERLEAVED_ROPE_TYPES, MODULE_NAMES,
                                   MOE_FIELDS, PARTIAL_ROTARY_TYPES, POST_NORM_TYPES, QKV_BIAS_ONLY_TYPES,
                                   QK_NORM_TYPES, RESIDUAL_DROPOUT_FIELDS, SANDWICH_NORMS, SUPPORTED_TYPES,
                                   T5_ACTIVATIONS, UNGATED_MLP_TYPES, activation, dropout_rate, expert_fields,
                                   family_config, fused_qkv_layout, norm_eps, norm_places, own_dropout_rate, own_fields,
                                   own_intermediate_size, parallel_block_fields, refuse_unsupported, rotating_layers)
from jpeft.models.rope_params import FULL, SLIDING, Rope, read_ropes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # the norms' epsilon (a LayerNorm's too: GPT-2's, T5's, `layer_norm` families')
    rope: Rope = Rope()
    local_rope: Rope | None = None  # the rope of sliding-window layers, where it differs
    tie_word_embeddings: bool = False
    head_bias: bool = False  # Phi's and GPT-J's LM head has a bias
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer SLIDING or FULL; () = all SLIDING when a window is set
    # Gemma: norms scale by (1 + w), embeddings by sqrt(hidden), norms after attention and MLP too,
    # queries by query_pre_attn_scalar ** -0.5, tanh soft-capped attention scores and logits.
    norm_plus_one: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    sandwich_norm_names: tuple[str, str, str] = SANDWICH_NORMS  # GLM-4 names them its own way
    pre_norms: bool = True  # OLMo 2/3: False, its blocks normalise their outputs only (`sandwich_norms` without these)
    norm_after_residual: bool = False  # OPT-350m: x = norm(x + block(x)), the original Transformer's order
    final_norm: bool = True  # OPT-350m has none
    # OPT-350m's word_embed_proj_dim: its token embeddings (and the tied head) this wide, projected to the hidden
    # size and back (`project_in`, `project_out`); None where they are hidden_size wide
    embed_width: int | None = None
    embed_norm: bool = False  # BLOOM: a LayerNorm over the token embeddings (a soft prompt's too)
    # ALiBi instead of RoPE (`attention.alibi`): each head's slope times the key's position, counted over the keys the
    # mask keeps, added to the attention scores, as BLOOM's ("bloom"), Falcon-RW's ("falcon": slope and position
    # rounded to bfloat16, so their product, then divided by √head_dim) transformers model adds it (MPT's is
    # BLOOM's: the same slopes); None without
    alibi: str | None = None
    norm_float32_scale: bool = False  # OLMo 2/3: RMSNorm's w · x in float32, then cast
    # LayerNorm (mean and variance in float32) instead of RMSNorm, by what it learns: "scale_bias" (StableLM's),
    # "scale" (Cohere's), "none" (OLMo 1's); None for RMSNorm
    layer_norm: str | None = None
    parallel_block: bool = False  # Cohere, StableLM: x + attention(norm(x)) + mlp(norm(x)), one norm a layer
    parallel_norms: bool = False  # GPT-NeoX's parallel block: x + attention(norm₁(x)) + mlp(norm₂(x))
    parallel_norm_names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")  # Falcon's ln_attn, ln_mlp
    # The norm of the queries and keys before RoPE: over each head ("head": Qwen3, Gemma 3), the same with a scale of
    # each head's own ("each_head": Cohere's `use_qk_norm`) or over the whole projection ("all": OLMo 2/3)
    qk_norm: str | None = None
    # q/k/v in one projection, as "blocks" (Phi-3's qkv_proj: all queries, then keys, then values) or by "heads"
    # (GPT-NeoX's query_key_value: each head's query, key and value together); Phi-3 and GLM: gate/up in one
    # `gate_up_proj` (HF's modules: an adapter acts on the fused projection, as PEFT's do), RoPE on the first
    # partial_rotary_factor of each head only
    fused_qkv: str | None = None
    fused_gate_up: bool = False
    partial_rotary_factor: float = 1.0
    rope_layers: tuple[bool, ...] = ()  # per layer: does it rotate (SmolLM3's NoPE layers do not)? () = every layer
    rope_interleaved: bool = False  # ERNIE 4.5, Helium: RoPE's pairs are neighbouring dimensions, not halves
    # Phi-3: its generate drops the cache at the first step past LongRoPE's original length and re-reads the
    # sequence with the long factors (`generate._longrope_switch`)
    longrope_rereads: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Granite: embeddings times embedding_multiplier, each block's output times residual_multiplier before the
    # residual sum, attention_multiplier as the query scale (MPT's softmax_scale too), logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    logit_scale: float = 1.0  # Cohere: logits times logit_scale
    max_position_embeddings: int = 2048
    gated_mlp: bool = True  # act(gate)·up; T5 v1.0's act(wi) and Arcee's act(up) are not gated
    clip_qkv: float | None = None  # OLMoE: queries, keys and values clipped to [-clip_qkv, clip_qkv]
    # Mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE): each token's MLP is the weighted sum of the
    # experts_per_token experts (of num_experts, each intermediate_size wide) its router scores highest, their
    # softmax weights renormalised to sum 1 where `norm_topk_prob` (Mixtral always) and kept in float32 (Mixtral's)
    # or rounded to the compute dtype (the others'); Qwen2-MoE adds a sigmoid-gated dense `shared_expert`,
    # GraniteMoE-Shared a dense `shared_mlp` of the layer (fused input_linear: gate, then up; output_linear).
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = False
    float32_expert_weights: bool = False
    shared_expert_size: int = 0
    shared_mlp_size: int = 0
    # GPT-OSS: a bias on the router and on each expert's projections, its experts stored [E, in, out] with gate and
    # up interleaved (gate_up_proj's columns gate0, up0, gate1, ...), their activation (up + 1) · glu with
    # glu = gate · sigmoid(alpha · gate), gate clamped above at swiglu_limit and up to ±swiglu_limit, the router
    # named `router`; and a learned logit per attention head (`sinks`) that joins each query's softmax.
    router_name: str = "gate"
    moe_name: str = "mlp"  # the layer's module holding router and experts (GraniteMoE's `block_sparse_moe`)
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0
    attention_sinks: bool = False
    # The weight of the routers' load-balancing loss (Switch Transformer's, `moe.balance_loss`) added to the
    # training loss: config.json's router_aux_loss_coef where its output_router_logits asks for it, else 0.
    router_aux_loss_coef: float = 0.0
    # T5: an encoder of num_layers blocks and a decoder of num_decoder_layers, with a learned bias per
    # relative-position bucket and head instead of RoPE; v1.0 scales the decoder output by
    # hidden ** -0.5 before its tied head.
    num_decoder_layers: int = 0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_decoder_outputs: bool = False
    decoder_start_token_id: int = 0
    position_bias_per_layer: bool = False  # UMT5: each block's self-attention has a bias table of its own
    # The model's own dropout, applied in a train step as transformers applies it in training (GPT-2's and
    # T5's are 0.1 by default, the Llama family's attention_dropout 0): on the embeddings (GPT-2 embd_pdrop, T5
    # dropout_rate), on attention probabilities (attn_pdrop, dropout_rate, attention_dropout), and on each
    # sublayer's output before the residual sum (resid_pdrop, dropout_rate; T5 also on its FF's hidden units
    # and each stack's output).
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    router_jitter: float = 0.0  # Mixtral's router_jitter_noise: its MoE input times U(1 - this, 1 + this)
    pad_token_id: int | None = None  # what HF's sequence classifiers pool past (the last token not this id)
    # Run-time knobs, not part of the checkpoint.
    dtype: str = "float32"          # activation / matmul dtype
    remat: str = "none"             # none | full | dots
    unrolled: bool = False          # layers one by one over per-layer params (`tree.unstack`): CPU decoding
    # What decoding stops at: generation_config.json's eos_token_id (one id or a list, as instruct
    # checkpoints give their end-of-turn token too), else config.json's; excluded from hashing.
    eos_token_ids: tuple[int, ...] = dataclasses.field(default=(), compare=False, hash=False)
    # The original config.json, written back on save (excluded from hashing).
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend within the sliding window?"""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return tuple(t == SLIDING for t in self.layer_types) or (True,) * self.num_layers

    @property
    def rotary_dim(self) -> int:
        """How many of a head's dimensions RoPE rotates (the first ones), as transformers rounds it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def dropout_rates(self) -> dict[str, float]:
        """The model's own dropout rates above zero, by field."""
        rates = {k: getattr(self, k) for k in ("embed_dropout", "attention_dropout", "residual_dropout", "router_jitter")}
        return {k: v for k, v in rates.items() if v > 0}

    def without_dropout(self) -> "ModelConfig":
        return self.replace(embed_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0, router_jitter=0.0)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_decoder_layers > 0

    @property
    def learned_positions(self) -> bool:
        """Are positions rows of a table (GPT-2's wpe, OPT's embed_positions), so that none exists past
        max_position_embeddings? (RoPE and T5's relative positions run on, as in transformers.)"""
        return self.model_type in ("gpt2", "opt")

    @property
    def position_offset(self) -> int:
        """The row of position 0 in the positions' table: OPT's tables start 2 rows in (a fairseq legacy)."""
        return 2 if self.model_type == "opt" else 0

    @property
    def mlp_in_layer(self) -> bool:
        """Does each layer hold its MLP's projections itself (OPT's fc1 and fc2), not in an `mlp` module?"""
        return self.model_type == "opt"

    @property
    def positions_over_mask(self) -> bool:
        """Are positions not given counted over the attention mask, so that a left-padded row's first token is at
        0 (OPT's, as transformers counts them), rather than by slot?"""
        return self.model_type == "opt"

    @property
    def positions_key(self) -> str:
        """The config.json field max_position_embeddings is read from (GPT-2's and T5's n_positions)."""
        return "n_positions" if self.model_type in ("gpt2", "t5", *GPTJ_TYPES) else "max_position_embeddings"

    def module_name(self, name: str) -> str:
        """The family's name of the module jpeft's Llama-family decoder calls `name` (`families.MODULE_NAMES`)."""
        return MODULE_NAMES.get(self.model_type, {}).get(name, name)

    @property
    def query_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Translate an HF config dict, refusing what would change the model's math."""
        def need(key):
            if key not in fields:
                raise CheckpointError(f"{source}: missing required field '{key}'")
            return fields[key]

        fields = hf

        model_type = hf.get("model_type")
        text = hf["text_config"].get("model_type") if isinstance(hf.get("text_config"), dict) else None
        if model_type not in SUPPORTED_TYPES and text in SUPPORTED_TYPES:  # Gemma 3's, Mistral 3's
            classes = ", ".join(hf.get("architectures") or [])
            raise CheckpointError(f"{source}: a multimodal {model_type} checkpoint ({classes}); jpeft reads its text "
                                  f"model alone (model_type {text}): load the text model in transformers and save "
                                  "it, or use a text-only checkpoint")
        if model_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported; jpeft supports "
                f"{', '.join(SUPPORTED_TYPES)} (Llama-family decoders, GPT-NeoX, Phi, GPT-J, CodeGen, OPT, BLOOM, "
                "Falcon, StarCoder2, MPT, T5 and GPT-2)")
        pad = hf.get("pad_token_id")
        if model_type in ("t5", "mt5", "umt5"):
            return _t5(hf, source, need).replace(pad_token_id=pad)
        if model_type == "gpt2":
            return _gpt2(hf, source, need).replace(pad_token_id=pad)
        gemma = model_type in GEMMA_TYPES
        family = family_config(hf, source)
        # the standard names of fields a family's file names its own way (GPT-J's n_layer, n_embd, ...)
        fields = {**{k: hf[v] for k, v in getattr(family, "attribute_map", {}).items() if v in hf}, **hf}
        held = own_fields(model_type, family)  # where its own fields sit (MPT's attention's in attn_config)
        own = lambda key: getattr(held, key, None) if model_type in FAMILY_FIELDS[key] else None
        refuse_unsupported(model_type, family, source)
        act = activation(hf, model_type, family)
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; use one of {ACTIVATIONS}")
        if model_type in ("gemma", "gemma3_text") and hf.get("use_bidirectional_attention"):
            raise CheckpointError(f"{source}: use_bidirectional_attention is true (an embedding model's encoder); "
                                  "jpeft runs causal decoders only")
        layers = need("num_hidden_layers")
        layer_types = tuple(hf.get("layer_types") or getattr(family, "layer_types", None) or ())
        if len(layer_types) not in (0, layers) or set(layer_types) - {SLIDING, FULL}:
            raise CheckpointError(f"{source}: layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                                  f"{layers} layers, got {list(layer_types)}")
        partial = model_type in PARTIAL_ROTARY_TYPES
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = getattr(family, "head_dim", None) or hidden // heads  # the family's default (Gemma's 256)
        rope_parameters = getattr(family, "rope_parameters", None)  # GPT-J's config has none: its `rotary_dim`
        if model_type in GPTJ_TYPES and not 0 < family.rotary_dim <= head_dim:
            raise CheckpointError(f"{source}: rotary_dim must be between 1 and the head size {head_dim}, got "
                                  f"{family.rotary_dim}")
        rope, local_rope = read_ropes(rope_parameters, hf, source, partial, head_dim)
        biased = BIASED_TYPES.get(model_type, ())
        every_bias = any(own(field) for field in ("use_bias", "enable_bias", "bias"))  # ERNIE 4.5's, OPT's, Falcon's
        bias = bool(own("attention_bias")) or every_bias or "attention" in biased
        moe = expert_fields(model_type, family, layers, source)
        alibi = "bloom" if model_type in ("bloom", "mpt") else "falcon" if model_type == "falcon" and family.alibi \
            else None
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=getattr(family, MOE_FIELDS[model_type][1]) if moe
            else own_intermediate_size(model_type, family, hidden) or need("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=family.num_key_value_heads if model_type == "falcon"
            else hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=norm_eps(model_type, family),
            rope=rope,
            local_rope=local_rope,
            tie_word_embeddings=bool(family.tie_word_embeddings),  # the family's default where the file has none
            qkv_bias=model_type == "qwen2" or bias or bool(own("qkv_bias") or own("use_qkv_bias")),
            o_bias=bool(own("attention_out_bias")) if model_type in FAMILY_FIELDS["attention_out_bias"]
            else bias and model_type not in QKV_BIAS_ONLY_TYPES,
            mlp_bias=bool(own("mlp_bias")) or every_bias or "mlp" in biased,
            head_bias="head" in biased,
            hidden_act=act,
            sliding_window=own("sliding_window"),
            layer_types=layer_types,
            norm_plus_one=gemma,
            embed_scale=gemma,
            sandwich_norms=model_type in ("gemma2", "gemma3_text", *POST_NORM_TYPES, "glm4"),
            sandwich_norm_names=GLM4_SANDWICH_NORMS if model_type == "glm4" else SANDWICH_NORMS,
            **norm_places(model_type, family),
            embed_width=family.word_embed_proj_dim if model_type == "opt" and family.word_embed_proj_dim != hidden
            else None,
            embed_norm=model_type == "bloom",
            alibi=alibi,
            norm_float32_scale=model_type in FLOAT32_SCALE_NORM_TYPES,
            **parallel_block_fields(model_type, family, own),
            qk_norm="each_head" if model_type == "cohere" and family.use_qk_norm
            else "head" if model_type == "phi" and family.qk_layernorm else QK_NORM_TYPES.get(model_type),
            fused_qkv=fused_qkv_layout(model_type, family),
            fused_gate_up=model_type in ("phi3", *GLM_TYPES),
            partial_rotary_factor=family.rotary_dim / head_dim if model_type in GPTJ_TYPES
            else 0.0 if model_type == "opt" or alibi
            else float((rope_parameters or {}).get("partial_rotary_factor", 1.0)) if partial else 1.0,
            rope_layers=rotating_layers(model_type, family, layers, layer_types, own("sliding_window"), source),
            rope_interleaved=model_type in INTERLEAVED_ROPE_TYPES,
            longrope_rereads=model_type == "phi3",
            gated_mlp=model_type not in UNGATED_MLP_TYPES,
            clip_qkv=None if own("clip_qkv") is None else float(own("clip_qkv")),
            **moe,
            attention_sinks=model_type == "gpt_oss",
            query_pre_attn_scalar=own("query_pre_attn_scalar"),
            attn_softcap=own("attn_logit_softcapping"),
            final_softcap=own("final_logit_softcapping"),
            embedding_multiplier=float(own("embedding_multiplier") or 1.0),
            residual_multiplier=float(own("residual_multiplier") or 1.0),
            attention_multiplier=None if (scale := own("attention_multiplier") or own("softmax_scale")) is None
            else float(scale),
            logits_scaling=float(own("logits_scaling") or 1.0),
            logit_scale=1.0 if own("logit_scale") is None else float(own("logit_scale")),
            # ERNIE 4.5's attention drops nothing, whatever a file says
            attention_dropout=0.0 if model_type == "ernie4_5" else dropout_rate(
                getattr(held, attention_dropout := ATTENTION_DROPOUT_FIELDS.get(model_type, "attention_dropout")),
                attention_dropout, source),
            residual_dropout=own_dropout_rate(RESIDUAL_DROPOUT_FIELDS, model_type, family, source),
            embed_dropout=own_dropout_rate(EMBED_DROPOUT_FIELDS, model_type, family, source),
            max_position_embeddings=family.max_seq_len if model_type == "mpt"
            else fields.get("max_position_embeddings", 2048),
            pad_token_id=pad,
            hf_config=dict(hf),
        )

    def to_hf(self) -> dict[str, Any]:
        return dict(self.hf_config)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _t5(hf: dict, source: str, need) -> ModelConfig:
    """T5, T5 v1.1, FLAN-T5, mT5 (`model_type` mt5, read as the T5 it is), UMT5 (a position-bias table in every block):
    `feed_forward_proj` is `relu` (v1.0) or `gated-gelu` (v1.1, mT5's and UMT5's default). v1.0 scales the decoder
    output (transformers 5 writes that as `scale_decoder_outputs`, older files as `tie_word_embeddings`) and ties its
    head; mT5 never scales (transformers' MT5 has no such switch); whether a checkpoint's head is tied
    `from_pretrained` decides by its weights (their own `lm_head.weight` or none), as transformers does."""
    mt5 = hf["model_type"] == "mt5"
    proj = hf.get("feed_forward_proj", "relu" if hf["model_type"] == "t5" else "gated-gelu")  # each family's default
    gated, _, act = proj.rpartition("-")
    act = "gelu_new" if proj == "gated-gelu" else act
    if gated not in ("", "gated") or act not in T5_ACTIVATIONS:
        raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not supported; use relu, gated-gelu, "
                              f"or [gated-]{{{', '.join(T5_ACTIVATIONS)}}}")
    scaled = not mt5 and hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    heads, layers = need("num_heads"), need("num_layers")
    rate = dropout_rate(hf.get("dropout_rate", 0.1), "dropout_rate", source)
    return ModelConfig(
        model_type="t5", vocab_size=need("vocab_size"), hidden_size=need("d_model"), intermediate_size=need("d_ff"),
        num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=need("d_kv"),
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_word_embeddings=mt5 or scaled,
        hidden_act=T5_ACTIVATIONS[act], gated_mlp=gated == "gated",
        num_decoder_layers=hf.get("num_decoder_layers") or layers,
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        scale_decoder_outputs=scaled, decoder_start_token_id=hf.get("decoder_start_token_id") or 0,
        position_bias_per_layer=hf["model_type"] == "umt5",
        embed_dropout=rate, attention_dropout=rate, residual_dropout=rate,
        max_position_embeddings=hf.get("n_positions", 512), hf_config=dict(hf))


def _gpt2(hf: dict, source: str, need) -> ModelConfig:
    """GPT-2: learned positions, LayerNorm, biases everywhere, a tied head, 1/sqrt(d) attention scale."""
    for key, default in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
        if bool(hf.get(key, default)) != default:
            raise CheckpointError(f"{source}: {key}={hf[key]} is not supported; jpeft scales GPT-2's attention "
                                  f"by its default 1/sqrt(head_dim) ({key}={default})")
    act = hf.get("activation_function", "gelu_new")
    act = ACTIVATION_ALIASES.get(act, act)
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported")
    hidden, heads = need("n_embd"), need("n_head")
    return ModelConfig(
        model_type="gpt2", vocab_size=need("vocab_size"), hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden, num_layers=need("n_layer"), num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=True, o_bias=True, mlp_bias=True,
        hidden_act=act, gated_mlp=False,
        embed_dropout=dropout_rate(hf.get("embd_pdrop", 0.1), "embd_pdrop", source),
        attention_dropout=dropout_rate(hf.get("attn_pdrop", 0.1), "attn_pdrop", source),
        residual_dropout=dropout_rate(hf.get("resid_pdrop", 0.1), "resid_pdrop", source),
        max_position_embeddings=hf.get("n_positions", 1024), hf_config=dict(hf))


def read_config(path: str) -> ModelConfig:
    hf = read_json(path, CheckpointError, "a model directory needs an HF config.json")
    return ModelConfig.from_hf(hf, source=path)
