"""LoHa (Hyeon-Woo et al., 2022; LyCORIS): a dense layer's update as the Hadamard product of two low-rank
products, with PEFT's semantics.

    y = x·(W + ΔW),   ΔW = (alpha / r) · (B₁·A₁) ⊙ (B₂·A₂)   [in, out]

Two rank-r pairs reach a rank up to r² for the parameters of a rank-2r LoRA. The leaves keep PEFT's names,
each PEFT tensor transposed to jpeft's [in, out] side: `hada_w1_b`, `hada_w2_b` [..., in, r] and
`hada_w1_a`, `hada_w2_a` [..., r, out] (trained), `hada_scale` [...] (metadata). PEFT's init: the A's and
B₁ kaiming-uniform, B₂ zero, so the model is unchanged at init. ΔW has no low-rank shortcut; it is built
whole in every call, as PEFT builds it (what that costs and saves: `jpeft.peft.lycoris`).
Parameters per adapted layer: 2·r·(in + out).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.peft.base import layer_rows, leading, linear_uniform
from jpeft.peft.lycoris import Lycoris, one_setting

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(Lycoris):
    name = "loha"
    peft_type = "LOHA"
    trainable = FACTORS
    metadata = ("hada_scale",)
    axes = {"hada_w1_a": ("lead", None, "out"), "hada_w2_a": ("lead", None, "out"),
            "hada_w1_b": ("lead", "in", None), "hada_w2_b": ("lead", "in", None), "hada_scale": ("lead",)}

    def init_module(self, key, path: str, leaves: dict) -> dict:
        """PEFT's init (kaiming-uniform with a = √5 is U(±1/√fan_in) on torch's [out, r] and [r, in])."""
        lead, r = leading(path, leaves["kernel"]), self.rank
        d_in, d_out = leaves["kernel"].shape[-2:]
        k1a, k1b, k2a = jax.random.split(key, 3)
        return {**leaves, "hada_w1_a": linear_uniform(k1a, (*lead, r, d_out), r),
                "hada_w1_b": linear_uniform(k1b, (*lead, d_in, r), d_in),
                "hada_w2_a": linear_uniform(k2a, (*lead, r, d_out), r),
                "hada_w2_b": jnp.zeros((*lead, d_in, r), jnp.float32),
                "hada_scale": jnp.full(lead, self.alpha / r, jnp.float32)}

    @staticmethod
    def delta(leaves) -> jax.Array:
        """ΔW = scale · (B₁·A₁) ⊙ (B₂·A₂) [..., in, out], in float32."""
        f = {n: leaves[n].astype(jnp.float32) for n in FACTORS}
        scale = leaves["hada_scale"].astype(jnp.float32)[..., None, None]
        return (f["hada_w1_b"] @ f["hada_w1_a"]) * (f["hada_w2_b"] @ f["hada_w2_a"]) * scale

    @classmethod
    def peft_options(cls, modules: dict) -> dict:
        rank, alpha = one_setting(cls.__name__, {
            (leaves["hada_w1_a"].shape[-2], round(float(s) * leaves["hada_w1_a"].shape[-2], 6))
            for path, leaves in modules.items() for s in layer_rows(path, leaves["hada_scale"])})
        return {"r": rank, "alpha": alpha}

    @classmethod
    def from_config(cls, config: dict) -> "LoHa":
        return cls(int(config["r"]), float(config["alpha"]), config["target_modules"])


to_peft, from_peft = LoHa.to_peft, LoHa.from_peft  # this module's adapter-dir mapping (hf_format finds it by peft_type)
