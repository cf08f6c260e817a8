"""LoHa (Hyeon-Woo et al., 2022; LyCORIS): a dense layer's update as the Hadamard product of two low-rank
products, with PEFT's semantics.

    y = x·(W + ΔW),   ΔW = (alpha / r) · (B₁·A₁) ⊙ (B₂·A₂)   [in, out]

Two rank-r pairs reach a rank up to r² for the parameters of a rank-2r LoRA. The leaves keep PEFT's names,
each PEFT tensor transposed to jpeft's [in, out] side: `hada_w1_b`, `hada_w2_b` [..., in, r] and
`hada_w1_a`, `hada_w2_a` [..., r, out] (trained), `hada_scale` [...] (metadata). PEFT's init: the A's and
B₁ kaiming-uniform, B₂ zero, so the model is unchanged at init. ΔW has no low-rank shortcut; it is built
whole in every call, as PEFT builds it, and added to the weight before the product (the `weight` insertion
point): one product with x and one for its gradient, where PEFT's separate x·ΔW takes two more (equal to
float32 rounding). PEFT's training-time `rank_dropout` and `module_dropout` are not implemented.
Parameters per adapted layer: 2·r·(in + out).
"""
from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (ALL_LINEAR, CONV1D, Method, exact_targets, from_layer_rows, layer_rows, leading,
                             linear_uniform, module_layers, module_names, refuse_second_init, refuse_tied_head,
                             saved_base_weight, whole_stacks)
from jpeft.peft.quant import is_quantized

log = logging.getLogger("jpeft.peft")
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(Method):
    name = "loha"
    peft_type = "LOHA"
    trainable = FACTORS
    metadata = ("hada_scale",)
    axes = {"hada_w1_a": ("lead", None, "out"), "hada_w2_a": ("lead", None, "out"),
            "hada_w1_b": ("lead", "in", None), "hada_w2_b": ("lead", "in", None), "hada_scale": ("lead",)}

    def __init__(self, rank: int = 8, alpha: float = 8.0, targets: Sequence[str] | str = ("q_proj", "v_proj")):
        if rank < 1:
            raise JpeftError(f"LoHa rank must be >= 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.targets = targets if isinstance(targets, str) else tuple(targets)
        if self.targets == (ALL_LINEAR,):  # as a one-entry list from the command line
            self.targets = ALL_LINEAR

    def __repr__(self):
        return f"LoHa(rank={self.rank}, alpha={self.alpha}, targets={self.targets!r})"

    def chosen(self, grouped: dict) -> list[str]:
        """The dense modules LoHa adapts: whole layer stacks of float Linear weights (`all-linear`: all but the
        output head), the layers PEFT's LoHa takes."""
        def refusal(path, leaves):
            if is_quantized(leaves):
                return "its weight is quantized: LoHa adapts float weights"
            if "kernel" not in leaves:
                return "it is an embedding: PEFT's LoHa adapts Linear layers"
            if path.rpartition("/")[2] in CONV1D:
                return "it is GPT-2's Conv1D, which PEFT's LoHa does not adapt"
        return whole_stacks(self, grouped, refusal)

    def init(self, key, params):
        grouped = T.modules(params)
        refuse_tied_head(self.targets, grouped)
        chosen = self.chosen(grouped)
        for path, k in zip(chosen, jax.random.split(key, len(chosen))):
            refuse_second_init(self, path, grouped[path], self.trainable)
            grouped[path] = self.init_module(k, path, grouped[path])
        return T.from_modules(grouped)

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
    def weight(leaves, dtype=None):
        """W + ΔW, summed in float32."""
        w = leaves["kernel"].astype(jnp.float32) + delta(leaves)
        return w if dtype is None else w.astype(dtype)

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        out = {k: v for k, v in leaves.items() if k not in cls.trainable + cls.metadata}
        out["kernel"] = cls.weight(leaves).astype(leaves["kernel"].dtype)
        return out


def delta(leaves) -> jax.Array:
    """ΔW = scale · (B₁·A₁) ⊙ (B₂·A₂) [..., in, out], in float32."""
    f = {n: leaves[n].astype(jnp.float32) for n in FACTORS}
    scale = leaves["hada_scale"].astype(jnp.float32)[..., None, None]
    return (f["hada_w1_b"] @ f["hada_w1_a"]) * (f["hada_w2_b"] @ f["hada_w2_a"]) * scale


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's `hada_w*` tensors in torch's layout, and the config that adapts exactly these modules."""
    tensors, adapted, settings = {}, [], set()
    for path, leaves in modules.items():
        names = module_layers(path, leaves)
        rank = leaves["hada_w1_a"].shape[-2]
        settings |= {(rank, round(float(s) * rank, 6)) for s in layer_rows(path, leaves["hada_scale"])}
        for leaf in FACTORS:
            tensors.update({f"{name}.{leaf}": row.T for name, row in zip(names, layer_rows(path, leaves[leaf]))})
        adapted += names
    if len(settings) != 1:
        raise AdapterError(f"save_adapter: the LoHa modules have different ranks or alphas {sorted(settings)}; "
                           "PEFT's LoHa config holds one of each")
    (rank, alpha), = settings
    return tensors, {"r": rank, "alpha": alpha, "target_modules": exact_targets(adapted, module_names(tree)),
                     "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                     "init_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                     "alpha_pattern": {}, "modules_to_save": None, "exclude_modules": None, "inference_mode": True}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(field):
            raise AdapterError(f"LoHa adapters with {field} are not supported; jpeft's LoHa adapts whole layer "
                               "stacks at one rank and alpha")
    if config.get("rank_dropout") or config.get("module_dropout"):
        log.warning("this LoHa adapter was trained with rank_dropout/module_dropout, which jpeft does not "
                    "implement: its outputs are the same (they act in training only), but training it further "
                    "runs without them")
    method = LoHa(int(config["r"]), float(config["alpha"]), config["target_modules"])
    chosen = method.chosen(modules)
    refuse_tied_head(method.targets, modules, AdapterError)
    out = dict(modules)
    for path in chosen:
        leaves = method.init_module(jax.random.key(0), path, modules[path])  # then filled from the file
        factors = {leaf: layer_rows(path, leaves[leaf]) for leaf in FACTORS}
        for i, name in enumerate(module_layers(path, leaves)):
            for leaf, rows in factors.items():
                got = tensors.take(f"{name}.{leaf}").T
                tensors.fits(f"{name}.{leaf}", got.T.shape, rows[i].T.shape)
                rows[i] = got
            leaves.update(saved_base_weight(tensors, name, modules[path]))
        out[path] = {**leaves, **{leaf: from_layer_rows(path, rows) for leaf, rows in factors.items()}}
    return out
