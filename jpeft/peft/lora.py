"""LoRA as a pure tree transform: `lora_a`/`lora_b` leaves beside each targeted kernel.

y = x·W + s·(x·A)·B with s = alpha/rank (alpha/sqrt(rank) for rsLoRA); B starts at
zero so the model is unchanged at init. The scale travels in the tree as the
frozen leaf `lora_scale`, so the tree alone says how to apply, merge and export it.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import JpeftError

TRAINABLE = ("lora_a", "lora_b")


def module_name(kernel_path: str) -> str:
    """'model/layers/self_attn/q_proj/kernel' -> 'model.layers.self_attn.q_proj'."""
    return kernel_path.rsplit("/", 1)[0].replace("/", ".")


def matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a list matches a module name or its dotted suffix; a string is a full regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


class LoRA:
    """Low-rank adapters on the dense kernels whose HF module names match `targets`.

    `init` names the initialisation scheme of A: "peft" (kaiming-uniform, as PEFT) or
    "gaussian" (N(0, 1/r)); B is always zero. (`.init(key, params)` is the transform.)
    """

    def __init__(self, rank: int = 8, alpha: float = 16.0,
                 targets: Sequence[str] | str = ("q_proj", "v_proj"), dropout: float = 0.0,
                 init: str = "peft", use_rslora: bool = False):
        if rank < 1:
            raise JpeftError(f"LoRA rank must be >= 1, got {rank}")
        if init not in ("peft", "gaussian"):
            raise JpeftError(f"LoRA init must be 'peft' or 'gaussian', got {init!r}")
        if not 0 <= dropout < 1:
            raise JpeftError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.targets = targets if isinstance(targets, str) else tuple(targets)
        self.init_scheme, self.use_rslora = init, use_rslora

    def __repr__(self):
        return (f"LoRA(rank={self.rank}, alpha={self.alpha}, targets={self.targets!r}, "
                f"dropout={self.dropout}, init={self.init_scheme!r}, use_rslora={self.use_rslora})")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def init(self, key, params):
        """Return a new tree with adapter leaves beside every targeted kernel."""
        flat = T.flatten(params)
        kernels = [p for p in flat if p.endswith("/kernel") and matches(module_name(p), self.targets)]
        if not kernels:
            names = sorted({module_name(p) for p in flat if p.endswith("/kernel")})
            raise JpeftError(f"LoRA targets {self.targets!r} "
                             f"match no dense layer; available: {', '.join(names)}")
        for path, k in zip(kernels, jax.random.split(key, len(kernels))):
            kernel = flat[path]
            *lead, d_in, d_out = kernel.shape
            prefix = path[: -len("kernel")]
            if self.init_scheme == "peft":
                bound = 1.0 / math.sqrt(d_in)
                a = jax.random.uniform(k, (*lead, d_in, self.rank), jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(k, (*lead, d_in, self.rank), jnp.float32) / self.rank
            flat[prefix + "lora_a"] = a
            flat[prefix + "lora_b"] = jnp.zeros((*lead, self.rank, d_out), jnp.float32)
            flat[prefix + "lora_scale"] = jnp.full(lead, self.scale, jnp.float32)
            if self.dropout > 0:
                flat[prefix + "lora_dropout"] = jnp.full(lead, self.dropout, jnp.float32)
        return T.unflatten(flat)

    def mask(self, params):
        """Trainable exactly where the LoRA factors are."""
        return T.named(params, TRAINABLE)


def apply(module, x, y):
    """Dense insertion point hook: add s·(dropout(x)·A)·B when the module holds LoRA leaves."""
    if not module.has_variable("params", "lora_a"):
        return y
    get = lambda name: module.get_variable("params", name)
    if module.has_variable("params", "lora_dropout") and module.has_rng("dropout"):
        rate = get("lora_dropout")
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    a, b = get("lora_a").astype(x.dtype), get("lora_b").astype(x.dtype)
    delta = jnp.matmul(jnp.matmul(x, a), b, preferred_element_type=jnp.float32)
    return y + (get("lora_scale") * delta).astype(y.dtype)


def merge(params):
    """Fold s·A·B into each kernel (in float32, cast back) and drop the LoRA leaves."""
    flat = T.flatten(params)
    for path in [p for p in flat if p.endswith("/lora_a")]:
        prefix = path[: -len("lora_a")]
        kernel = flat[prefix + "kernel"]
        a, b = flat.pop(prefix + "lora_a"), flat.pop(prefix + "lora_b")
        scale = flat.pop(prefix + "lora_scale")
        flat.pop(prefix + "lora_dropout", None)
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        flat[prefix + "kernel"] = (kernel.astype(jnp.float32) + scale[..., None, None] * delta).astype(kernel.dtype)
    return T.unflatten(flat)
