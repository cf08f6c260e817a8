"""How a config.json's RoPE reads: the `Rope` (base, scaling, YaRN's and LongRoPE's parameters) that the
family's transformers model rotates with, one per layer kind where they differ (Gemma 3's). `models.rope` turns
it into the rotation."""
from __future__ import annotations

import dataclasses
import math

from jpeft.errors import CheckpointError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer kinds, which nest rope_parameters


@dataclasses.dataclass(frozen=True)
class Rope:
    """One RoPE: its base and HF `rope_type` scaling (Gemma 3 has one for local, one for global layers)."""
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    # YaRN: the rotation counts bounding its ramp between extrapolated and interpolated frequencies, whether
    # the bounds are whole dimensions, and the factor on cos and sin (attention's temperature)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    # LongRoPE (Phi-3): per-frequency divisors, the long ones where a call reaches past original_max_positions
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # Ministral 3 (Llama 4's attention temperature): queries times 1 + β·ln(1 + ⌊position / original length⌋)
    # after the rotation; 0: none
    query_scaling_beta: float = 0.0


def read_ropes(params: dict | None, hf: dict, source: str, partial: bool, head_dim: int) -> tuple[Rope, Rope | None]:
    """The global rope and (Gemma 3) the sliding layers' own, from the family config's `rope_parameters`:
    transformers reads a file's `rope_scaling` before its `rope_parameters`, fills llama3's and yarn's original
    length from max_position_embeddings and gives Gemma 3 its per-layer-kind defaults (1e6 global, 1e4 local).
    `partial`: the family rotates part of each head (`PARTIAL_ROTARY_TYPES`); the others' transformers models
    rotate whole heads, and the scalings' frequencies for part of one would not fit them."""
    params = dict(params or {})
    if FULL in params or SLIDING in params:
        full, local = params.get(FULL) or {}, params.get(SLIDING)
        return (_rope(full, hf, source, partial, head_dim),
                None if local is None else _rope(local, hf, source, partial, head_dim))
    return _rope(params, hf, source, partial, head_dim, truncate=params.get("truncate", True)), None


def _rope(params: dict, hf: dict, source: str, partial: bool, head_dim: int, truncate: bool = True) -> Rope:
    """One rope. YaRN's `truncate` is read from the un-nested parameters only, as transformers reads it."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; jpeft honours {', '.join(ROPE_TYPES)}")
    if not partial and rope_type != "default" and params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor {params['partial_rotary_factor']} is not supported; "
                              "jpeft rotates whole heads")
    max_positions = hf.get("max_position_embeddings", 8192)
    original = params.get("original_max_position_embeddings", max_positions)
    factor = params.get("factor", 1.0)
    rope = Rope(theta=params.get("rope_theta", hf.get("rope_theta", 10000.0)), type=rope_type, factor=factor,
                low_freq_factor=params.get("low_freq_factor", 1.0), high_freq_factor=params.get("high_freq_factor", 4.0),
                original_max_positions=original, query_scaling_beta=float(
                    params.get("llama_4_scaling_beta") or 0.0) if hf.get("model_type") == "ministral3" else 0.0)
    if rope_type == "longrope":
        return _longrope(rope, params, hf, source, head_dim)
    if rope_type != "yarn":
        return rope
    factor = max_positions / original if factor is None else factor  # DeepSeek-V3's files leave it to the lengths
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, all_dims = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dims) if mscale and all_dims
                            else _yarn_mscale(factor))
    return dataclasses.replace(rope, factor=factor, beta_fast=params.get("beta_fast") or 32.0,
                               beta_slow=params.get("beta_slow") or 1.0, truncate=bool(truncate),
                               attention_factor=float(attention_factor))


def _longrope(rope: Rope, params: dict, hf: dict, source: str, head_dim: int) -> Rope:
    """LongRoPE's factors (one per rotated pair of dimensions) and attention factor, as transformers computes
    them: the factor defaults to the ratio of the lengths, the attention factor to sqrt(1 + ln(factor) / ln(original
    length))."""
    pairs = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2
    for name in ("short_factor", "long_factor"):
        if len(params[name]) != pairs:
            raise CheckpointError(f"{source}: longrope's {name} has {len(params[name])} entries; the heads rotate "
                                  f"{pairs} pairs of dimensions")
    factor = params.get("factor") or hf.get("max_position_embeddings", 8192) / rope.original_max_positions
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) /
                                                             math.log(rope.original_max_positions))
    return dataclasses.replace(rope, factor=factor, attention_factor=float(attention_factor),
                               short_factor=tuple(map(float, params["short_factor"])),
                               long_factor=tuple(map(float, params["long_factor"])))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """The YaRN paper's attention temperature, 0.1·mscale·ln(factor) + 1 (none at factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
