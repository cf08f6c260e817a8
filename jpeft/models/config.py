"""The model configuration jpeft honours, read from (and written back to) HF config.json.

Llama, Mistral and Qwen2 differ only in these fields; anything in a config.json that
jpeft cannot honour is an error here rather than a silently different model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jpeft.errors import CheckpointError, read_json

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


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
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    # Run-time knobs, not part of the checkpoint.
    dtype: str = "float32"          # activation / matmul dtype
    remat: str = "none"             # none | full | dots
    # The original config.json, written back on save (excluded from hashing).
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

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
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; use one of {ACTIVATIONS}")
        rope = _rope_parameters(hf, source)
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        sliding = None
        if model_type == "mistral":
            sliding = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            raise CheckpointError(
                f"{source}: qwen2 with use_sliding_window=true (per-layer windows) is not supported; "
                "set it to false if the model was trained without it")
        if hf.get("pretraining_tp", 1) != 1:
            raise CheckpointError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported; set it to 1")
        qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope["rope_theta"],
            rope_type=rope["rope_type"],
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_positions=rope.get("original_max_position_embeddings", 8192),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=act,
            sliding_window=sliding,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            hf_config=dict(hf),
        )

    def to_hf(self) -> dict[str, Any]:
        return dict(self.hf_config)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _rope_parameters(hf: dict, source: str) -> dict:
    """transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; jpeft honours {', '.join(ROPE_TYPES)}")
    rope["rope_type"] = rope_type
    return rope


def read_config(path: str) -> ModelConfig:
    hf = read_json(path, CheckpointError, "a model directory needs an HF config.json")
    return ModelConfig.from_hf(hf, source=path)
