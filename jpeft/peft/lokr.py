"""LoKr (Edalati et al., 2022; LyCORIS): a dense layer's update as the Kronecker product of two small factors,
with PEFT's semantics.

    y = x·(W + ΔW),   ΔW = (alpha / r) · W₁ ⊗ W₂   [in, out] = [in_m·in_n, out_l·out_k]

Each width splits into two factors (PEFT's `factorization`: the divisor pair nearest its square root, or
`decompose_factor` where given): W₁ is [in_m, out_l], W₂ [in_n, out_k]. W₂ is a rank-r product B₂·A₂ where r is
below half its larger side, else a whole matrix; W₁ is whole unless `decompose_both` and r below half its larger
side. The leaves keep PEFT's names, each tensor transposed to jpeft's [in, out] side: `lokr_w1` or `lokr_w1_b`
[..., in_m, r] and `lokr_w1_a` [..., r, out_l]; `lokr_w2` or `lokr_w2_b`, `lokr_w2_a` likewise (trained);
`lokr_scale` and `lokr_rank` [...] (metadata). PEFT's init: W₁ (or A₁) zero, the rest kaiming-uniform, so the
model is unchanged at init. ΔW is built whole in every call, as PEFT builds it (`jpeft.peft.lycoris`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import AdapterError
from jpeft.peft.base import layer_rows, leading, linear_uniform
from jpeft.peft.lycoris import Lycoris, one_setting

WHOLE = {1: "lokr_w1", 2: "lokr_w2"}
PAIRS = {1: ("lokr_w1_b", "lokr_w1_a"), 2: ("lokr_w2_b", "lokr_w2_a")}  # [in side, r], [r, out side]


class LoKr(Lycoris):
    name = "lokr"
    peft_type = "LOKR"
    trainable = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    metadata = ("lokr_scale", "lokr_rank")
    # the factors' sides are factors of the weight's widths, which no mesh axis divides alike: kept whole
    axes = {**{leaf: ("lead", None, None) for leaf in trainable}, "lokr_scale": ("lead",), "lokr_rank": ("lead",)}

    def __init__(self, rank: int = 8, alpha: float = 8.0, targets: Sequence[str] | str = ("q_proj", "v_proj"),
                 decompose_both: bool = False, decompose_factor: int = -1):
        super().__init__(rank, alpha, targets)
        self.decompose_both, self.decompose_factor = bool(decompose_both), int(decompose_factor)

    def __repr__(self):
        return (f"LoKr(rank={self.rank}, alpha={self.alpha}, targets={self.targets!r}, "
                f"decompose_both={self.decompose_both}, decompose_factor={self.decompose_factor})")

    def init_module(self, key, path: str, leaves: dict) -> dict:
        """PEFT's shapes and init (kaiming-uniform with a = √5 is U(±1/√fan_in) on torch's [out, in] sides)."""
        lead, r = leading(path, leaves["kernel"]), self.rank
        d_in, d_out = leaves["kernel"].shape[-2:]
        (in_m, in_n), (out_l, out_k) = (factorization(d, self.decompose_factor) for d in (d_in, d_out))
        k1, k2a, k2b = jax.random.split(key, 3)
        out = {**leaves, "lokr_scale": jnp.full(lead, self.alpha / r, jnp.float32),
               "lokr_rank": jnp.full(lead, r, jnp.int32)}
        if self.decompose_both and r < max(out_l, in_m) / 2:
            out |= {"lokr_w1_b": linear_uniform(k1, (*lead, in_m, r), in_m),
                    "lokr_w1_a": jnp.zeros((*lead, r, out_l), jnp.float32)}
        else:
            out["lokr_w1"] = jnp.zeros((*lead, in_m, out_l), jnp.float32)
        if r < max(out_k, in_n) / 2:
            out |= {"lokr_w2_b": linear_uniform(k2b, (*lead, in_n, r), in_n),
                    "lokr_w2_a": linear_uniform(k2a, (*lead, r, out_k), r)}
        else:
            out["lokr_w2"] = linear_uniform(k2b, (*lead, in_n, out_k), in_n)
        return out

    @staticmethod
    def delta(leaves) -> jax.Array:
        """ΔW = scale · W₁ ⊗ W₂ [..., in, out] in float32: row i·in_n + j, column o·out_k + p holds W₁[i, o]·W₂[j, p]."""
        w1, w2 = factor(leaves, 1), factor(leaves, 2)
        *lead, in_m, out_l = w1.shape
        in_n, out_k = w2.shape[-2:]
        scale = leaves["lokr_scale"].astype(jnp.float32)[..., None, None, None, None]
        return (jnp.einsum("...io,...jp->...ijop", w1, w2) * scale).reshape(*lead, in_m * in_n, out_l * out_k)

    @classmethod
    def peft_options(cls, modules: dict) -> dict:
        rank, alpha = one_setting(cls.__name__, {
            (int(r), round(float(s) * int(r), 6)) for path, leaves in modules.items()
            for r, s in zip(layer_rows(path, leaves["lokr_rank"]), layer_rows(path, leaves["lokr_scale"]))})
        splits = {(kernel_shape(leaves), factor_shapes(leaves)) for leaves in modules.values()}
        sides = {side for _, shapes in splits for shape in shapes for side in shape}
        factor_ = next((f for f in (-1, *sorted(sides)) if all(
            (factorization(d_in, f), factorization(d_out, f)) == shapes
            for (d_in, d_out), shapes in splits)), None)
        if factor_ is None:
            raise AdapterError(f"save_adapter: no decompose_factor makes PEFT split these LoKr modules' widths as "
                               f"they are split ({sorted(splits)})")
        return {"r": rank, "alpha": alpha, "decompose_both": any("lokr_w1_a" in m for m in modules.values()),
                "decompose_factor": factor_, "rank_dropout_scale": False}

    @classmethod
    def from_config(cls, config: dict) -> "LoKr":
        return cls(int(config["r"]), float(config["alpha"]), config["target_modules"],
                   bool(config.get("decompose_both", False)), int(config.get("decompose_factor", -1)))


def factor(leaves, n: int) -> jax.Array:
    """W₁ or W₂ [..., in side, out side] in float32: the whole factor, or its rank-r product."""
    if WHOLE[n] in leaves:
        return leaves[WHOLE[n]].astype(jnp.float32)
    b, a = (leaves[leaf].astype(jnp.float32) for leaf in PAIRS[n])
    return b @ a


def kernel_shape(leaves) -> tuple[int, int]:
    return tuple(int(d) for d in np.shape(leaves["kernel"])[-2:])


def factor_shapes(leaves) -> tuple[tuple[int, int], tuple[int, int]]:
    """((in_m, in_n), (out_l, out_k)): how the module's widths are split."""
    sides = []
    for n in (1, 2):
        if WHOLE[n] in leaves:
            sides.append(np.shape(leaves[WHOLE[n]])[-2:])
        else:
            sides.append((np.shape(leaves[PAIRS[n][0]])[-2], np.shape(leaves[PAIRS[n][1]])[-1]))
    (in_m, out_l), (in_n, out_k) = sides
    return (int(in_m), int(in_n)), (int(out_l), int(out_k))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS') split of a width into (m, n), m·n = dimension: (factor, dimension / factor) where the
    factor divides it; else the divisor pair nearest the square root with m at most the factor (-1: no bound),
    smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    for k in range(2, math.isqrt(dimension) + 2):
        if m >= n or k > bound:
            break
        if dimension % k == 0:
            m, n = k, dimension // k
    return min(m, n), max(m, n)


to_peft, from_peft = LoKr.to_peft, LoKr.from_peft  # this module's adapter-dir mapping (hf_format finds it by peft_type)
