"""The model configuration jpeft honours, read from (and written back to) HF config.json.

Llama, Mistral, Qwen2/3 and Gemma 1/2/3 differ only in these fields; anything in a config.json that
jpeft cannot honour is an error here rather than a silently different model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jpeft.errors import CheckpointError, read_json

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
QK_NORM_TYPES = ("qwen3", "gemma3_text")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Rope:
    """One RoPE: its base and HF `rope_type` scaling (Gemma 3 has one for local, one for global layers)."""
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


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
    rms_norm_eps: float = 1e-6
    rope: Rope = Rope()
    local_rope: Rope | None = None  # the rope of sliding-window layers, where it differs
    tie_word_embeddings: bool = False
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
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's queries and keys before RoPE
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    max_position_embeddings: int = 2048
    # Run-time knobs, not part of the checkpoint.
    dtype: str = "float32"          # activation / matmul dtype
    remat: str = "none"             # none | full | dots
    # The original config.json, written back on save (excluded from hashing).
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend within the sliding window?"""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return tuple(t == SLIDING for t in self.layer_types) or (True,) * self.num_layers

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Translate an HF config dict, refusing what would change the model's math."""
        def need(key):
            if key not in hf:
                raise CheckpointError(f"{source}: missing required field '{key}'")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported; jpeft supports "
                f"{', '.join(SUPPORTED_TYPES)} (decoder-only Llama-family models)")
        gemma = model_type in GEMMA_TYPES
        act = (hf.get("hidden_activation") if model_type != "gemma" else None) or hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; use one of {ACTIVATIONS}")
        layers = need("num_hidden_layers")
        layer_types = _layer_types(hf)
        if len(layer_types) not in (0, layers) or set(layer_types) - {SLIDING, FULL}:
            raise CheckpointError(f"{source}: layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                                  f"{layers} layers, got {list(layer_types)}")
        rope, local_rope = _ropes(hf, source)
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        if hf.get("pretraining_tp", 1) != 1:
            raise CheckpointError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported; set it to 1")
        bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=rope,
            local_rope=local_rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            qkv_bias=model_type == "qwen2" or bias,
            o_bias=model_type != "qwen2" and bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=act,
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
            layer_types=layer_types,
            norm_plus_one=gemma,
            embed_scale=gemma,
            sandwich_norms=model_type in ("gemma2", "gemma3_text"),
            qk_norm=model_type in QK_NORM_TYPES,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
            attn_softcap=hf.get("attn_logit_softcapping"),
            final_softcap=hf.get("final_logit_softcapping"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            hf_config=dict(hf),
        )

    def to_hf(self) -> dict[str, Any]:
        return dict(self.hf_config)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _layer_types(hf: dict) -> tuple[str, ...]:
    """Each layer's attention kind; where the file leaves them out (older Qwen2/3 and Gemma 2/3 files),
    the family's own transformers config derives them, so they cannot drift from its rule."""
    if hf.get("layer_types") or hf["model_type"] in ("llama", "mistral", "gemma"):
        return tuple(hf.get("layer_types") or ())
    from transformers import AutoConfig
    return tuple(AutoConfig.for_model(**hf).layer_types)


def _ropes(hf: dict, source: str) -> tuple[Rope, Rope | None]:
    """The global rope and (Gemma 3) the sliding layers' own. transformers 5 writes `rope_parameters`
    (per layer type where they differ), older files `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if FULL in params or SLIDING in params:
        full, local = params.get(FULL) or {}, params.get(SLIDING)
        return _rope(full, hf, source), None if local is None else _rope(local, hf, source)
    local = hf.get("rope_local_base_freq")
    return _rope(params, hf, source), None if local is None else Rope(theta=local)


def _rope(params: dict, hf: dict, source: str) -> Rope:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; jpeft honours {', '.join(ROPE_TYPES)}")
    return Rope(theta=params.get("rope_theta", hf.get("rope_theta", 10000.0)), type=rope_type,
                factor=params.get("factor", 1.0), low_freq_factor=params.get("low_freq_factor", 1.0),
                high_freq_factor=params.get("high_freq_factor", 4.0),
                original_max_positions=params.get("original_max_position_embeddings", 8192))


def read_config(path: str) -> ModelConfig:
    hf = read_json(path, CheckpointError, "a model directory needs an HF config.json")
    return ModelConfig.from_hf(hf, source=path)
