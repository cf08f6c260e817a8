"""Rotary position embeddings: each RoPE's inverse frequencies (with HF's scalings), the cos/sin tables
of a call's positions, computed once before the layer scan, and the rotation of queries and keys."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models.config import ModelConfig
from jpeft.models.rope_params import Rope


def rope_inverse_frequencies(dim: int, rope: Rope, long: bool = False) -> np.ndarray:
    """RoPE inverse frequencies for `dim` rotated dimensions (float32, as HF computes them), with the rope's
    scaling; `long`: LongRoPE's long factors (the short ones otherwise)."""
    powers = np.float32(rope.theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    inv = (1.0 / powers).astype(np.float32)
    if rope.type == "longrope":
        inv = (1.0 / (np.float32(rope.long_factor if long else rope.short_factor) * powers)).astype(np.float32)
    elif rope.type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.type == "llama3":
        factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old = rope.original_max_positions
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope.type == "yarn":
        inv = _yarn(powers, dim, rope)
    return inv


def _yarn(powers: np.ndarray, dim: int, rope: Rope) -> np.ndarray:
    """YaRN (arXiv 2309.00071) in transformers' float32 steps: the frequencies that turn fewer than `beta_slow` times
    over the original length are interpolated (divided by the factor), those turning more than `beta_fast` times kept,
    with a linear ramp over the dimensions between."""
    def dimension(rotations):  # the dimension whose frequency turns `rotations` times over the original length
        return dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high += 0.001 if low == high else 0
    kept = 1 - np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    interpolated, extrapolated = 1.0 / (rope.factor * powers), 1.0 / powers
    return (interpolated * (1 - kept) + extrapolated * kept).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions):
    """(cos, sin) [kinds, B, T, rotary_dim / 2] at integer positions [B, T]: one kind, or two where Gemma 3's sliding
    layers have a RoPE of their own; and the queries' factor (`query_scale`, None for most). Computed once a call,
    before the layer scan: inside it each layer recomputed them, XLA fused the cos and sin into every head's
    rotation, and the scan stacked them for the backward pass (with `apply_rope`'s pairs, in-process A/B on the bench
    model: LoRA bf16 step 0.92-0.96x, full bf16 0.94x, LoRA float32 0.98x). LongRoPE picks its long factors for the
    whole call where its last position reaches past the original length, as transformers does per forward pass."""
    ropes = [cfg.rope] + ([cfg.local_rope] if cfg.local_rope and any(cfg.sliding_layers) else [])
    inv_freq = jnp.asarray(np.stack([rope_inverse_frequencies(cfg.rotary_dim, rope) for rope in ropes]))
    if cfg.rope.type == "longrope":
        long = np.stack([rope_inverse_frequencies(cfg.rotary_dim, rope, long=True) for rope in ropes])
        inv_freq = jnp.where(jnp.max(positions) + 1 > cfg.rope.original_max_positions, long, inv_freq)
    freqs = positions[None, ..., None].astype(jnp.float32) * inv_freq[:, None, None, :]
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    scale = np.array([rope.attention_factor for rope in ropes], np.float32)[:, None, None, None]
    tables = (cos, sin) if np.all(scale == 1) else (cos * scale, sin * scale)  # YaRN's temperature
    return (*tables, query_scale(cfg.rope, positions))


def query_scale(rope, positions):
    """Ministral 3's factor on each query after its rotation [B, T, 1, 1] (Llama 4's attention temperature past the
    original length: 1 + β·ln(1 + ⌊position / original length⌋)); None where the rope has none."""
    if not rope.query_scaling_beta:
        return None
    steps = jnp.floor(positions.astype(jnp.float32) / rope.original_max_positions)
    return (1 + rope.query_scaling_beta * jnp.log(1 + steps))[..., None, None]


def layer_rope(cfg: ModelConfig, tables, layer):
    """This layer's (cos, sin) [B, T, rotary_dim / 2] of `rope_tables`, and the queries' factor; a layer without RoPE
    (SmolLM3's NoPE layers) gets cos 1 and sin 0, a rotation that leaves every value as it was, bit for bit."""
    cos, sin, scale = tables
    if len(cos) == 1:
        cos, sin = cos[0], sin[0]
    else:
        local = jnp.asarray(cfg.sliding_layers)[layer]
        cos, sin = jnp.where(local, cos[1], cos[0]), jnp.where(local, sin[1], sin[0])
    if cfg.rope_layers and not all(cfg.rope_layers):
        rotates = jnp.asarray(cfg.rope_layers)[layer]
        cos, sin = jnp.where(rotates, cos, 1.0), jnp.where(rotates, sin, 0.0)
    return cos, sin, scale


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def apply_rope(x, cos, sin, interleaved: bool = False):
    """Rotate-half RoPE on x [B, T, heads, head_dim] by a layer's tables [B, T, rotary_dim / 2]: each pair
    (x1, x2) of the rotated dimensions' two halves (`interleaved`: of neighbouring dimensions, GPT-J's pairs, as
    ERNIE 4.5 and Helium rotate) becomes (x1·cos − x2·sin, x2·cos + x1·sin), in float32, rounded once; the
    dimensions past rotary_dim (Phi-3's partial rotation) pass unchanged.
    Its gradient is the inverse rotation (sin negated), not autodiff's: the halves' slices would
    become pads, which XLA:CPU fused with the cotangent's transposes into slow loops (in-process A/B,
    the bench's bf16 LoRA step 0.97x). The tables are positions' functions, never differentiated."""
    return _rotate(x, cos, sin, interleaved)


def _rotate(x, cos, sin, interleaved: bool):
    """The rotation, stacked along a new axis rather than concatenated (XLA:CPU, bf16 [8, 256, 8, 64]:
    backward 3.1 -> 0.7 ms)."""
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:
        return jnp.concatenate([_rotate(x[..., :rotated], cos, sin, interleaved), x[..., rotated:]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    axis = -1 if interleaved else -2  # the axis of a pair's two members: side by side, or a half apart
    pairs = x.reshape(*x.shape[:-1], *((-1, 2) if interleaved else (2, -1))).astype(jnp.float32)
    x1, x2 = (jax.lax.index_in_dim(pairs, i, axis, keepdims=False) for i in (0, 1))
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis).reshape(x.shape).astype(x.dtype)


def _apply_rope_fwd(x, cos, sin, interleaved):
    return _rotate(x, cos, sin, interleaved), (cos, sin)


def _apply_rope_bwd(interleaved, tables, g):
    cos, sin = tables
    return _rotate(g, cos, -sin, interleaved), None, None


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)
