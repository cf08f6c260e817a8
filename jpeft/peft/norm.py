"""Norm tuning: train only the scales of the normalisation layers (RMSNorm / LayerNorm).

No new leaves: the mask picks the `scale` of every module whose name ends in `norm` (GPT-2's: `ln_*`).
Parameters: hidden size per norm (two per layer plus the final norm for Llama).
"""
from jpeft import tree as T
from jpeft.peft.base import Method


class NormTuning(Method):
    name = "norm"

    def __repr__(self):
        return "NormTuning()"

    def mask(self, params):
        return T.map_with_path(lambda p, _: p.endswith("/scale") and _is_norm(p.split("/")[-2]), params)


def _is_norm(module: str) -> bool:
    return module.endswith("norm") or module.startswith("ln_")
