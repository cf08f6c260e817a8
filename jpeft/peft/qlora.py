"""QLoRA: LoRA on a frozen base stored as NF4 or int8, dequantized inside the dense insertion point.

`QLoRA.init` quantizes every dense kernel of the layer stack (as bitsandbytes' 4-bit loading
does; embeddings, norms, the LM head and T5's feed-forward output `wo`, which transformers keeps in float,
stay as they are), then adds LoRA leaves. The
quantized leaves (`jpeft.peft.quant`) replace `kernel`; `Quantized` is the protocol's view of
them: its `weight` hook dequantizes in the compute dtype, and merging dequantizes first.
Trainable parameters are LoRA's; the base counts its logical (unquantized) elements.
"""
from __future__ import annotations

import logging

import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft import quant
from jpeft.peft.base import Method, hf_module
from jpeft.peft.lora import LoRA

log = logging.getLogger("jpeft.peft")
KINDS = ("nf4", "int8")
KEEP_FLOAT = ("wo",)  # T5's _keep_in_fp32_modules: transformers loads it unquantized under bitsandbytes


class Quantized(Method):
    """The frozen, quantized base weight of a module (no trainable leaves)."""
    name = "quantized"
    stored = quant.QUANT_LEAVES
    # sharded as the weight they replace (NF4's packed input axis and the absmax blocks split along `in`, as
    # far as the mesh divides them), so a QLoRA base under fsdp/tensor is no larger per device than LoRA's
    axes = {"kernel_nf4": ("lead", "in", "out"), "kernel_int8": ("lead", "in", "out"),
            "kernel_absmax": ("lead", "in", "out"), "kernel_absmax_q": ("lead", "in", "out"),
            "kernel_absmax_scale": ("lead", None), "kernel_absmax_offset": ("lead",)}

    @staticmethod
    def weight(leaves, dtype=None):
        return quant.dequantize(leaves, jnp.float32 if dtype is None else dtype)

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        out = {k: v for k, v in leaves.items() if k not in cls.stored}
        out["kernel"] = quant.dequantize(leaves, jnp.float32)
        return out

    @classmethod
    def count(cls, leaves: dict, name: str) -> int:
        """The logical weight's elements, counted once per module (on its first stored leaf)."""
        first = next(n for n in cls.stored if n in leaves)
        return quant.num_elements(leaves) if name == first else 0


class QLoRA(LoRA):
    """LoRA over an NF4 (QLoRA paper: 16-value NormalFloat, absmax blocks of 64, optional double
    quantization of the absmax in blocks of 256) or int8 (blockwise absmax) frozen base."""
    name = "qlora"

    def __init__(self, rank: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"), quant: str = "nf4",
                 double_quant: bool = False, **lora_options):
        if quant not in KINDS:
            raise JpeftError(f"QLoRA quant must be one of {', '.join(KINDS)}, got {quant!r}")
        if lora_options.get("init") in ("pissa", "olora"):
            raise JpeftError("QLoRA cannot use PiSSA/OLoRA init here: they rewrite the base weight before it is "
                             "quantized; use LoRA(init=...) on a float base")
        if double_quant and quant != "nf4":
            raise JpeftError("QLoRA double_quant quantizes NF4's absmax blocks; int8 has none to quantize (as in "
                             "bitsandbytes): drop double_quant or use quant='nf4'")
        super().__init__(rank, alpha, targets, **lora_options)
        self.quant, self.double_quant = quant, double_quant

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, quant={self.quant!r}, double_quant={self.double_quant})"

    def init(self, key, params):
        grouped = T.modules(params)
        for path, leaves in grouped.items():
            if "kernel" in leaves and T.is_stacked(path + "/kernel") and T.leaf_name(path) not in KEEP_FLOAT:
                rest = {k: v for k, v in leaves.items() if k != "kernel"}
                try:
                    grouped[path] = {**rest, **quant.quantize(leaves["kernel"], self.quant, self.double_quant)}
                except JpeftError as e:
                    raise JpeftError(f"{hf_module(path)}: {e}") from None
        return super().init(key, T.from_modules(grouped))


def merge_note(params) -> None:
    if any(quant.is_quantized(leaves) for leaves in T.modules(params).values()):
        log.warning("merge: the base is quantized; it is dequantized to float32 and the adapters are merged "
                    "into that (the result is not re-quantized)")
