"""Adapter methods, each a pure transform of the parameter tree, and what reads any of them."""
from jpeft import tree as T
from jpeft.peft import lora
from jpeft.peft.full import Full
from jpeft.peft.lora import LoRA

TRAINABLE_LEAVES = frozenset(lora.TRAINABLE)


def trainable_mask(params):
    """Bool tree: True exactly on adapter leaves (what every PEFT method trains)."""
    return T.named(params, TRAINABLE_LEAVES)


def merge(params):
    """Fold every adapter into the base weights: a plain tree an HF checkpoint can hold."""
    return lora.merge(params)


def count_parameters(params, mask=None) -> tuple[int, int]:
    """(trainable, total) scalar counts; mask defaults to `trainable_mask`."""
    trainable, _ = T.partition(params, trainable_mask(params) if mask is None else mask)
    return T.count(trainable), T.count(params)


def parameter_report(params, mask=None) -> str:
    """PEFT's print_trainable_parameters line."""
    trainable, total = count_parameters(params, mask)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


__all__ = ["LoRA", "Full", "trainable_mask", "merge", "count_parameters", "parameter_report"]
