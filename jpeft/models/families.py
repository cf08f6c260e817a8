"""What the model families differ in: which config.json fields each family's transformers model reads, and
the rules by which jpeft reads a family's own fields (its experts, its rotating layers, its dropout, its
activation). `ModelConfig.from_hf` (config.py) puts them together.
"""
from __future__ import annotations

from jpeft.errors import CheckpointError
from jpeft.models.rope_params import SLIDING

SUPPORTED_TYPES = ("llama", "exaone", "mistral", "ministral", "ministral3", "qwen2", "qwen3", "gemma", "gemma2",
                   "gemma3_text", "granite", "olmo2", "olmo3", "phi3", "smollm3", "ernie4_5", "helium", "exaone4",
                   "seed_oss", "arcee", "glm", "glm4", "olmo", "cohere", "cohere2", "stablelm", "mixtral", "qwen2_moe",
                   "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "granitemoeshared", "gpt_neox", "phi", "gptj",
                   "codegen", "opt", "bloom", "falcon", "starcoder2", "mpt", "t5", "mt5", "umt5", "gpt2")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
OLMO_TYPES = ("olmo2", "olmo3")  # OLMo 1 (`olmo`) is a Llama with parameterless LayerNorms
POST_NORM_TYPES = (*OLMO_TYPES, "exaone4")  # blocks that normalise their outputs only, not their inputs
GLM_TYPES = ("glm", "glm4")
GRANITE_MOE_TYPES = ("granitemoe", "granitemoeshared")
COHERE_TYPES = ("cohere", "cohere2")
GPTJ_TYPES = ("gptj", "codegen")  # CodeGen is GPT-J with q/k/v in one projection (`fused_qkv_layout`)
# families normalising by LayerNorm (mean and variance, in float32) instead of RMSNorm, by what it learns: StableLM's
# a scale and a bias, Cohere's and MPT's a scale, OLMo 1's nothing
LAYER_NORM_TYPES = {"olmo": "none", **dict.fromkeys((*COHERE_TYPES, "mpt"), "scale"),
                    **dict.fromkeys(("stablelm", "gpt_neox", "phi", *GPTJ_TYPES, "opt", "bloom", "falcon",
                                    "starcoder2"), "scale_bias")}
# attention and the MLP both read the layer's one normed input, summed
PARALLEL_BLOCK_TYPES = (*COHERE_TYPES, "phi", *GPTJ_TYPES)
# biases whatever the file says: Phi's on every projection and the LM head, GPT-NeoX's on the MLP, GPT-J's on the MLP
# and the head
BIASED_TYPES = {"phi": ("attention", "mlp", "head"), "gpt_neox": ("mlp",), **dict.fromkeys(GPTJ_TYPES, ("mlp", "head")),
                "bloom": ("attention", "mlp")}
# their MLP: down(act(up(x))), no gate
UNGATED_MLP_TYPES = ("arcee", "gpt_neox", "phi", *GPTJ_TYPES, "opt", "bloom", "falcon", "starcoder2", "mpt")
# Module names of a family whose transformers model names its modules its own way (GPT-NeoX's, Phi's, GPT-J's,
# OPT's, MPT's), by the Llama name jpeft's decoder gives each; a tree path spells the family's, as its checkpoints and
# PEFT's adapters do
MODULE_NAMES = {"gpt_neox": {"embed_tokens": "embed_in", "self_attn": "attention",
                             "qkv_proj": "query_key_value", "o_proj": "dense", "up_proj": "dense_h_to_4h",
                             "down_proj": "dense_4h_to_h", "norm": "final_layer_norm"},
                "phi": {"o_proj": "dense", "up_proj": "fc1", "down_proj": "fc2", "norm": "final_layernorm",
                        "q_norm": "q_layernorm", "k_norm": "k_layernorm"},
                **dict.fromkeys(GPTJ_TYPES, {"embed_tokens": "wte", "layers": "h", "input_layernorm": "ln_1",
                                             "self_attn": "attn", "o_proj": "out_proj", "up_proj": "fc_in",
                                             "down_proj": "fc_out", "norm": "ln_f"}),
                "opt": {"o_proj": "out_proj", "up_proj": "fc1", "down_proj": "fc2",
                        "input_layernorm": "self_attn_layer_norm", "post_attention_layernorm": "final_layer_norm",
                        "norm": "final_layer_norm"},
                "starcoder2": {"up_proj": "c_fc", "down_proj": "c_proj"},
                "mpt": {"embed_tokens": "wte", "layers": "blocks", "input_layernorm": "norm_1", "self_attn": "attn",
                        "qkv_proj": "Wqkv", "o_proj": "out_proj", "post_attention_layernorm": "norm_2", "mlp": "ffn",
                        "norm": "norm_f"},
                **dict.fromkeys(("bloom", "falcon"), {
                    "embed_tokens": "word_embeddings", "embed_norm": "word_embeddings_layernorm", "layers": "h",
                    "self_attn": "self_attention", "qkv_proj": "query_key_value", "o_proj": "dense",
                    "up_proj": "dense_h_to_4h", "down_proj": "dense_4h_to_h", "norm": "ln_f"})}
# Weights a family's files name apart from its modules (transformers renames them on loading and back on saving), as
# (module name's part, file name's part) pairs applied in order: GPT-NeoX's head, `lm_head` to PEFT, `embed_out` in
# the hub's files; EXAONE 3's whole checkpoint, a Llama to transformers 5 (and PEFT) in GPT-2-like names on the hub
FILE_NAMES = {"gpt_neox": (("lm_head.weight", "embed_out.weight"),),
              "exaone": (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."),
                         ("model.norm.", "transformer.ln_f."), (".self_attn.o_proj.", ".attn.attention.out_proj."),
                         (".self_attn.", ".attn.attention."), (".input_layernorm.", ".ln_1."),
                         (".post_attention_layernorm.", ".ln_2."), (".mlp.gate_proj.", ".mlp.c_fc_0."),
                         (".mlp.up_proj.", ".mlp.c_fc_1."), (".mlp.down_proj.", ".mlp.c_proj."))}
# config.json switches a family's transformers model has that jpeft does not run (while they are on), and why
UNSUPPORTED = {("stablelm", "qk_layernorm"): "a LayerNorm module per head of the queries and keys (StableLM 2 12B)",
               ("stablelm", "hidden_dropout"): "dropout on the MLP's output alone, in training",
               ("opt", "layerdrop"): "skipping whole layers at random, in training",
               ("bloom", "apply_residual_connection_post_layernorm"): "each block's residual taken after its norm",
               ("falcon", "hidden_dropout"): "dropout over the sum of attention's and the MLP's outputs, in training",
               **{(family, "tie_word_embeddings"): "a head tied to the token embedding that keeps a bias of its own"
                  for family in ("phi", *GPTJ_TYPES)}}
QKV_BIAS_ONLY_TYPES = ("qwen2", "qwen2_moe", "helium", *GLM_TYPES)  # attention biases on q/k/v alone, never on o_proj
# the config.json field of a family's dropout on each block's output before the residual sum
RESIDUAL_DROPOUT_FIELDS = {"phi3": "resid_pdrop", "seed_oss": "residual_dropout", "gpt_neox": "hidden_dropout",
                           "phi": "resid_pdrop", **dict.fromkeys(GPTJ_TYPES, "resid_pdrop"), "opt": "dropout",
                           "bloom": "hidden_dropout", "starcoder2": "residual_dropout", "mpt": "attn_pdrop"}
EMBED_DROPOUT_FIELDS = {"gpt_neox": "hidden_dropout", "phi": "embd_pdrop", **dict.fromkeys(GPTJ_TYPES, "embd_pdrop"),
                        "starcoder2": "embedding_dropout"}  # on the embeddings
ATTENTION_DROPOUT_FIELDS = dict.fromkeys((*GPTJ_TYPES, "mpt"), "attn_pdrop")  # the others' `attention_dropout`
# families whose transformers model rotates a part of each head
PARTIAL_ROTARY_TYPES = ("phi3", *GLM_TYPES, "stablelm", "gpt_neox", "phi", *GPTJ_TYPES)
# families that rotate neighbouring dimensions together (GPT-J's)
INTERLEAVED_ROPE_TYPES = ("ernie4_5", "helium", *GLM_TYPES, *COHERE_TYPES, *GPTJ_TYPES)
FLOAT32_SCALE_NORM_TYPES = (*OLMO_TYPES, "helium", "gpt_oss")  # RMSNorm's w · x in float32
QK_NORM_TYPES = {"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "exaone4": "head",
                 **dict.fromkeys((*OLMO_TYPES, "olmoe"), "all")}
# Mixture-of-experts families: config.json's field of their expert count and of each expert's width
MOE_FIELDS = {"mixtral": ("num_local_experts", "intermediate_size"), "qwen2_moe": ("num_experts", "moe_intermediate_size"),
              "qwen3_moe": ("num_experts", "moe_intermediate_size"), "olmoe": ("num_experts", "intermediate_size"),
              **dict.fromkeys(("gpt_oss", *GRANITE_MOE_TYPES), ("num_local_experts", "intermediate_size"))}
# Mixture-of-experts families whose router is a softmax over the top-k logits (the renormalised top-k of the full one)
TOPK_SOFTMAX_TYPES = ("mixtral", "gpt_oss", *GRANITE_MOE_TYPES)
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu", "relu2")
ACTIVATION_ALIASES = {"gelu_new": "gelu_pytorch_tanh", "swish": "silu"}  # transformers' names for the same functions
T5_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_pytorch_tanh", "silu": "silu"}
# the names of a block's norms after attention, before the MLP and after it where it has all three (Gemma 2/3's)
SANDWICH_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
GLM4_SANDWICH_NORMS = ("post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")
# config.json fields that only some families' transformers models read; the others ignore them, and so does jpeft.
# Where a file leaves one out, the family's transformers config supplies its default (Gemma 2's caps, 256 as
# Gemma's query_pre_attn_scalar, a 4096-token window), as it resolves `use_sliding_window` (Qwen2/3).
FAMILY_FIELDS = {
    "attention_bias": ("llama", "exaone", "qwen3", "qwen3_moe", *GEMMA_TYPES, "granite", *GRANITE_MOE_TYPES, "olmo",
                       *OLMO_TYPES, "olmoe", "smollm3", "helium", "seed_oss", "arcee", *GLM_TYPES, *COHERE_TYPES,
                       "gpt_oss", "gpt_neox"),
    "qkv_bias": ("qwen2_moe",),
    "use_qkv_bias": ("stablelm",),
    "use_parallel_residual": ("stablelm", "gpt_neox"),  # their parallel block, where it asks for one
    "attention_out_bias": ("seed_oss",),  # o_proj's bias, apart from q/k/v's
    "mlp_bias": ("llama", "exaone", "granite", "smollm3", "helium", "seed_oss", "arcee"),
    "use_bias": ("ernie4_5", "starcoder2"),  # every projection's bias
    "enable_bias": ("opt",),  # the same
    "bias": ("falcon",),  # the same
    "sliding_window": ("mistral", "ministral", "ministral3", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo3", "phi3",
                       "smollm3", "exaone4", "cohere2", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "starcoder2"),
    "clip_qkv": ("olmo", "olmoe", "mpt"),
    "softmax_scale": ("mpt",),  # the attention's scale, 1/√head_dim where null
    "logit_scale": COHERE_TYPES,  # logits times it (Granite's logits_scaling divides)
    "attn_logit_softcapping": ("gemma2",),  # Gemma 3's attention reads no cap
    "final_logit_softcapping": ("gemma2", "gemma3_text"),
    "query_pre_attn_scalar": ("gemma2", "gemma3_text"),
    **dict.fromkeys(("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"),
                    ("granite", *GRANITE_MOE_TYPES)),
}


def file_name(model_type: str, name: str, reverse: bool = False) -> str:
    """A weight's name in the family's files (`FILE_NAMES`), or with `reverse` its module name from the file's."""
    for module, file in FILE_NAMES.get(model_type, ()):
        name = name.replace(*((file, module) if reverse else (module, file)))
    return name


def expert_fields(model_type: str, family, layers: int, source: str) -> dict:
    """The MoE fields of a mixture-of-experts family (`MOE_FIELDS`), {} for a dense one. Refused: dense MLP
    layers between the sparse ones (Qwen's `mlp_only_layers`, `decoder_sparse_step`)."""
    if model_type not in MOE_FIELDS:
        return {}
    experts, k = getattr(family, MOE_FIELDS[model_type][0]), family.num_experts_per_tok
    if not isinstance(experts, int) or isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= experts:
        raise CheckpointError(f"{source}: a {model_type} model needs num_experts_per_tok (got {k!r}) between 1 and "
                              f"its number of experts (got {experts!r})")
    step, dense = getattr(family, "decoder_sparse_step", 1) or 1, getattr(family, "mlp_only_layers", None) or []
    if step != 1 or dense:
        sparse = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
        if len(sparse) != layers:
            raise CheckpointError(f"{source}: layers {sorted(set(range(layers)) - set(sparse))} have a dense MLP "
                                  "(mlp_only_layers, decoder_sparse_step); jpeft runs models whose every layer has "
                                  "the experts")
    return dict(num_experts=experts, experts_per_token=k,
                norm_topk_prob=model_type in TOPK_SOFTMAX_TYPES or bool(getattr(family, "norm_topk_prob", False)),
                float32_expert_weights=model_type == "mixtral",
                shared_expert_size=getattr(family, "shared_expert_intermediate_size", 0) or 0,
                router_aux_loss_coef=float(family.router_aux_loss_coef) if family.output_router_logits else 0.0,
                router_jitter=dropout_rate(getattr(family, "router_jitter_noise", 0.0), "router_jitter_noise", source),
                **(dict(router_name="router", router_bias=True, expert_bias=True,
                        swiglu_limit=float(family.swiglu_limit), swiglu_alpha=float(family.swiglu_alpha))
                   if model_type == "gpt_oss" else {}),
                **(dict(router_name="router", moe_name="block_sparse_moe",
                        shared_mlp_size=getattr(family, "shared_intermediate_size", 0) or 0)
                   if model_type in GRANITE_MOE_TYPES else {}))


def rotating_layers(model_type: str, family, layers: int, layer_types: tuple, window, source: str) -> tuple[bool, ...]:
    """Which layers rotate, where not all do: SmolLM3's per-layer switch (`no_rope_layers`: 1 where a layer rotates,
    every fourth one not by default, as its transformers config derives them); EXAONE 4's sliding layers alone
    where it has a window; Cohere 2's sliding layers alone (none without a window)."""
    if model_type == "exaone4" and window is not None or model_type == "cohere2":
        return tuple(window is not None and kind == SLIDING for kind in layer_types)
    if model_type != "smollm3":
        return ()
    flags = tuple(family.no_rope_layers)
    if len(flags) != layers or set(flags) - {0, 1}:
        raise CheckpointError(f"{source}: no_rope_layers must give 0 or 1 for each of the {layers} layers, got "
                              f"{list(flags)}")
    return tuple(map(bool, flags))


def own_fields(model_type: str, family):
    """Where a family's own fields sit: MPT keeps its attention's (clip_qkv, softmax_scale, ALiBi's, and attn_pdrop,
    the one dropout rate it applies) in `attn_config`; the others at the top of their config."""
    return family.attn_config if model_type == "mpt" else family


def own_dropout_rate(fields: dict, model_type: str, family, source: str) -> float:
    """The rate of a family's dropout read from its own field (`RESIDUAL_DROPOUT_FIELDS`, `EMBED_DROPOUT_FIELDS`), 0
    for the families that have none."""
    field = fields.get(model_type)
    return dropout_rate(getattr(own_fields(model_type, family), field), field, source) if field else 0.0


def norm_eps(model_type: str, family) -> float:
    """The epsilon of the family's norms: Cohere's and StableLM's `layer_norm_eps`, GPT-J's, BLOOM's, Falcon's and MPT's
    `layer_norm_epsilon`, StarCoder2's `norm_epsilon`; OLMo 1's and OPT's LayerNorm's own 1e-5 (transformers' read no
    field); the others' `rms_norm_eps` (the family's default where the file has none: OLMo 2's 1e-5)."""
    if model_type in ("olmo", "opt"):
        return 1e-5
    if model_type in (*GPTJ_TYPES, "bloom", "falcon", "mpt"):
        return family.layer_norm_epsilon
    if model_type == "starcoder2":
        return family.norm_epsilon
    return family.layer_norm_eps if model_type in LAYER_NORM_TYPES else family.rms_norm_eps


def refuse_unsupported(model_type: str, family, source: str) -> None:
    """A CheckpointError naming the first of the family's `UNSUPPORTED` switches the config turns on, or a combination
    of switches its transformers model runs otherwise than jpeft would: BLOOM's output projections summed in
    `pretraining_tp` slices without their biases (`slow_but_exact`); Falcon's new decoder without the parallel block
    (it then wants norms it never made), and its sequential block's attention output dropped at attention_dropout in
    training (jpeft drops both blocks' outputs at one rate)."""
    for (family_type, field), what in UNSUPPORTED.items():
        if model_type == family_type and getattr(family, field, None):
            raise CheckpointError(f"{source}: {field} is {getattr(family, field)!r} ({what}), which jpeft does not run")
    if model_type == "bloom" and family.slow_but_exact and family.pretraining_tp > 1:
        raise CheckpointError(f"{source}: slow_but_exact with pretraining_tp {family.pretraining_tp} (BLOOM's output "
                              "projections summed in slices, their biases left out), which jpeft does not run")
    if model_type == "mpt":
        refuse_mpt_switches(family, source)
    if model_type == "falcon" and family.new_decoder_architecture and not family.parallel_attn:
        raise CheckpointError(f"{source}: new_decoder_architecture with parallel_attn false, which transformers' "
                              "Falcon does not run either")
    if model_type == "falcon" and not (family.parallel_attn or family.new_decoder_architecture) \
            and family.attention_dropout:
        raise CheckpointError(f"{source}: attention_dropout {family.attention_dropout} with parallel_attn false "
                              "(Falcon then drops attention's output at that rate in training), which jpeft does not "
                              "run")


def refuse_mpt_switches(family, source: str) -> None:
    """MPT's config.json switches transformers' MPT does not read: it builds multi-head attention with ALiBi's default
    slopes, without biases or a query/key LayerNorm, a causal mask over the whole row, an MLP 4 × hidden wide and
    unscaled logits, whatever the file asks; a file asking otherwise describes a model neither runs."""
    attention = family.attn_config
    built = {"attn_config.attn_type": "multihead_attention", "attn_config.qk_ln": False,
             "attn_config.prefix_lm": False, "attn_config.attn_uses_sequence_id": False, "attn_config.alibi": True,
             "attn_config.alibi_bias_max": 8, "no_bias": True, "expansion_ratio": 4, "logit_scale": None}
    for field, runs in built.items():
        value = getattr(attention if field.startswith("attn_config.") else family, field.rpartition(".")[2])
        if value != runs:
            raise CheckpointError(f"{source}: {field} is {value!r}, which transformers' MPT does not run (it builds "
                                  "multi-head attention with ALiBi's default slopes, without biases, a causal mask, an "
                                  "MLP 4 × hidden wide and unscaled logits whatever the file says), and neither does "
                                  "jpeft")


def own_intermediate_size(model_type: str, family, hidden: int) -> int | None:
    """The MLP width of a family whose config names it its own way (GPT-J's `n_inner`, OPT's `ffn_dim`, Falcon's
    `ffn_hidden_size`, 4 × hidden where GPT-J leaves it out and always in BLOOM and MPT); None for
    `intermediate_size`."""
    return {**dict.fromkeys(GPTJ_TYPES, lambda: family.n_inner or 4 * hidden), "opt": lambda: family.ffn_dim,
            **dict.fromkeys(("bloom", "mpt"), lambda: 4 * hidden),
            "falcon": lambda: family.ffn_hidden_size}.get(model_type, lambda: None)()


def norm_places(model_type: str, family) -> dict:
    """Where a family's norms sit and what they learn: before each block (`pre_norms`; not OLMo 2/3's or EXAONE 4's,
    nor OPT-350m's), after each residual sum (OPT-350m's `norm_after_residual`), at the end (none in OPT-350m or an
    OPT file with `_remove_final_layer_norm`); LayerNorm instead of RMSNorm (`LAYER_NORM_TYPES`; OPT's learns nothing
    where `layer_norm_elementwise_affine` is false)."""
    layer_norm = LAYER_NORM_TYPES.get(model_type)
    if model_type != "opt":
        return dict(pre_norms=model_type not in POST_NORM_TYPES, layer_norm=layer_norm)
    before = family.do_layer_norm_before
    return dict(pre_norms=before, norm_after_residual=not before,
                final_norm=before and not family._remove_final_layer_norm,
                layer_norm=layer_norm if family.layer_norm_elementwise_affine else "none")


def parallel_block_fields(model_type: str, family, own) -> dict:
    """The parallel block's fields: Cohere's, StableLM's, Phi's and GPT-J's on one norm, GPT-NeoX's on two where it
    asks for one; Falcon's on one norm, or on two (`ln_attn`, `ln_mlp`) in its new decoder by default."""
    if model_type == "falcon":
        two = family.new_decoder_architecture and (family.num_ln_in_parallel_attn or 2) == 2
        return dict(parallel_block=bool(family.parallel_attn or family.new_decoder_architecture) and not two,
                    parallel_norms=two, **({"parallel_norm_names": ("ln_attn", "ln_mlp")} if two else {}))
    return dict(parallel_block=model_type in PARALLEL_BLOCK_TYPES or bool(own("use_parallel_residual")),
                parallel_norms=model_type == "gpt_neox" and bool(own("use_parallel_residual")))


def fused_qkv_layout(model_type: str, family) -> str | None:
    """How a family's one q/k/v projection lays them out (`attention.split_qkv`): Phi-3's and MPT's in blocks,
    GPT-NeoX's and BLOOM's by heads, CodeGen's in its shards, Falcon's by KV groups in its new decoder and under
    multi-query attention (one group), else by heads; None for separate projections."""
    if model_type == "falcon":
        return "groups" if family.new_decoder_architecture or family.multi_query else "heads"
    return {"phi3": "blocks", "mpt": "blocks", "gpt_neox": "heads", "bloom": "heads",
            "codegen": "shards"}.get(model_type)


def dropout_rate(value, key: str, source: str) -> float:
    """A dropout rate from config.json: a number in [0, 1) (null is transformers' 0)."""
    value = 0.0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise CheckpointError(f"{source}: {key} must be a dropout rate in [0, 1), got {value!r}")
    return float(value)


def activation(hf: dict, model_type: str, family) -> str:
    """The MLP's activation as the family's transformers model reads it: Gemma 2/3 from `hidden_activation`, GPT-J
    and OPT from `activation_function`, Falcon from `activation` (their config's default where the file has none),
    the others from `hidden_act`; Gemma's default is the tanh GELU, and Gemma 1's legacy "gelu" means it too; BLOOM's
    is the tanh GELU and MPT's the exact one whatever their file says."""
    if model_type in ("gemma2", "gemma3_text"):
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    elif model_type == "gemma":
        act = hf.get("hidden_act", "gelu_pytorch_tanh")
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    elif model_type == "bloom":  # its own tanh GELU, whatever the file says
        act = "gelu_pytorch_tanh"
    elif model_type == "mpt":
        act = "gelu"
    elif model_type in (*GPTJ_TYPES, "opt", "falcon"):
        act = family.activation if model_type == "falcon" else family.activation_function
    else:  # (EXAONE 3's file names it `activation_function`)
        act = getattr(family, "hidden_act", None) or hf.get("hidden_act", "silu")
    return ACTIVATION_ALIASES.get(act, act)


def family_config(hf: dict, source: str):
    """The family's transformers config of this config.json: the defaults of fields the file leaves out, its
    layer kinds (derived in older Qwen2/3 and Gemma 2/3 files) and its RoPE as transformers resolves it, so
    none of them can drift from the family's own rules. A file it refuses (a field of the wrong type: a strict
    dataclass's error; a field it computes: an AttributeError) is a CheckpointError."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    try:
        return AutoConfig.for_model(**hf)
    except (ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:
        raise CheckpointError(f"{source}: transformers does not accept this {hf['model_type']} config ({e})") from None
