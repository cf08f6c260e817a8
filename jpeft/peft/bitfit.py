"""BitFit: train only the bias terms of the dense layers.

Llama-family layers mostly have no biases; BitFit adds zero-initialised ones where the base
has none (a documented choice: the model is unchanged at init, and every targeted layer can
learn a shift), and trains the ones it has. The biases are ordinary `bias` leaves, so the
dense insertion point needs no hook. Parameters: the output width of every targeted layer.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft.base import Method, dense_layers, hf_module, matches

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BitFit(Method):
    name = "bitfit"
    trainable = ("bias",)

    def __init__(self, targets: Sequence[str] | str = ALL_PROJECTIONS):
        self.targets = targets if isinstance(targets, str) else tuple(targets)

    def __repr__(self):
        return f"BitFit(targets={self.targets!r})"

    def init(self, key, params):
        del key
        grouped = T.modules(params)
        chosen = [p for p, leaves in grouped.items() if "kernel" in leaves and matches(hf_module(p), self.targets)]
        if not chosen:
            raise JpeftError(f"BitFit targets {self.targets!r} match no dense layer; the dense layers: "
                             f"{dense_layers(grouped)}")
        for path in chosen:
            kernel = grouped[path]["kernel"]
            grouped[path].setdefault("bias", jnp.zeros((*kernel.shape[:-2], kernel.shape[-1]), jnp.float32))
        return T.from_modules(grouped)

    def mask(self, params):
        return T.map_with_path(lambda p, _: p.endswith("/bias") and matches(hf_module(p.rsplit("/", 1)[0]),
                                                                             self.targets), params)
