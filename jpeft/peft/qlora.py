"""QLoRA: LoRA on a frozen base stored as NF4 or int8, dequantized inside the dense insertion point.

`QLoRA.init` quantizes every dense kernel of the layer stack (as bitsandbytes' 4-bit loading
does; embeddings, norms, the LM head and T5's feed-forward output `wo`, which transformers keeps in float,
stay as they are), then adds LoRA leaves; with `expert_quant` a mixture's expert stacks too. The
quantized leaves (`jpeft.peft.quant`) replace `kernel` (a mixture's `weight`); `Quantized` and `QuantizedExperts`
are the protocol's view of them: their `weight` and `expert_weight` hooks dequantize in the compute dtype, and
merging dequantizes first.
Trainable parameters are LoRA's; the base counts its logical (unquantized) elements.
"""
from __future__ import annotations

import logging

import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft import quant
from jpeft.peft.quant import KINDS as quant_kinds
from jpeft.peft.base import Method, hf_module, in_experts, is_expert_weight
from jpeft.peft.lora import LoRA

log = logging.getLogger("jpeft.peft")
KEEP_FLOAT = ("wo",)  # T5's _keep_in_fp32_modules: transformers loads it unquantized under bitsandbytes


class Quantized(Method):
    """The frozen, quantized base weight of a module (no trainable leaves)."""
    name = "quantized"
    stored = quant.QUANT_LEAVES
    # sharded as the weight they replace (NF4's packed input axis and the absmax blocks split along `in`, as
    # far as the mesh divides them), so a QLoRA base under fsdp/tensor is no larger per device than LoRA's
    axes = {**dict.fromkeys(("kernel_nf4", "kernel_mxfp4", "kernel_int8", "kernel_absmax", "kernel_absmax_q",
                             "kernel_exponent"), ("lead", "in", "out")),
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


class QuantizedExperts(Method):
    """A mixture's frozen stacked expert weight [..., E, out, in], quantized (QLoRA's `expert_quant`): the
    leaves of its transpose, renamed `weight_*` (`quant.EXPERT_LEAVES`)."""
    name = "quantized_experts"
    stored = quant.EXPERT_LEAVES
    axes = {"weight" + n.removeprefix("kernel"): a for n, a in Quantized.axes.items()}

    @staticmethod
    def expert_weight(leaves, dtype):
        """The stack's transpose [..., E, in, out] in `dtype`."""
        return quant.dequantize(quant.expert_codes(leaves), dtype)

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        out = {k: v for k, v in leaves.items() if k not in cls.stored}
        out["weight"] = jnp.swapaxes(quant.dequantize(quant.expert_codes(leaves), jnp.float32), -1, -2)
        return out

    @classmethod
    def count(cls, leaves: dict, name: str) -> int:
        return Quantized.count(quant.expert_codes(leaves), "kernel" + name.removeprefix("weight"))


class QLoRA(LoRA):
    """LoRA over an NF4 (QLoRA paper: 16-value NormalFloat, absmax blocks of 64, optional double
    quantization of the absmax in blocks of 256), int8 (blockwise absmax) or MXFP4 frozen base. `expert_quant`
    ("nf4", "int8" or "mxfp4") quantizes a mixture's stacked experts too (most of its weights), each expert blocked
    as bitsandbytes would block it as a Linear (MXFP4: exactly the values GPT-OSS's experts ship in); bitsandbytes
    under transformers leaves these stacks unquantized, as the default (None) does."""
    name = "qlora"

    def __init__(self, rank: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"), quant: str = "nf4",
                 double_quant: bool = False, expert_quant: str | None = None, **lora_options):
        if quant not in quant_kinds or expert_quant not in (None, *quant_kinds):
            raise JpeftError(f"QLoRA quant and expert_quant must be one of {', '.join(quant_kinds)} (expert_quant also "
                             f"None: float experts), got quant={quant!r}, expert_quant={expert_quant!r}")
        if lora_options.get("init") in ("pissa", "olora"):
            raise JpeftError("QLoRA cannot use PiSSA/OLoRA init here: they rewrite the base weight before it is "
                             "quantized; use LoRA(init=...) on a float base")
        if double_quant and "nf4" not in (quant, expert_quant):
            raise JpeftError("QLoRA double_quant quantizes NF4's absmax blocks; int8 and MXFP4 have none to quantize "
                             "(as in bitsandbytes): drop double_quant or use quant='nf4'")
        super().__init__(rank, alpha, targets, **lora_options)
        self.quant, self.double_quant, self.expert_quant = quant, double_quant, expert_quant

    def __repr__(self):
        experts = f", expert_quant={self.expert_quant!r}" if self.expert_quant else ""
        return f"{super().__repr__()[:-1]}, quant={self.quant!r}, double_quant={self.double_quant}{experts})"

    def init(self, key, params):
        """Quantize the leaves `quantizes` names (those a quantized load left float), then add LoRA's."""
        if self.expert_quant and not any(is_expert_weight(p, m) for p, m in T.modules(params).items()):
            raise JpeftError("QLoRA expert_quant: this model has no mixture of experts to quantize")
        flat = {}
        for path, leaf in T.flatten(params).items():
            flat.update(self.quantized(path, leaf) if self.quantizes(path) else {path: leaf})
        return super().init(key, T.unflatten(flat))

    def quantizes(self, path: str) -> bool:
        """Is the base leaf at `path` stored quantized: a layer stack's dense kernel (not T5's `wo`), and with
        `expert_quant` a mixture's expert stack?"""
        module, name = path.rsplit("/", 1)
        if name == "kernel":
            return T.is_stacked(path) and T.leaf_name(module) not in KEEP_FLOAT
        return bool(self.expert_quant) and name == "weight" and in_experts(module)

    def quantized(self, path: str, weight) -> dict:
        """{path: leaf} of the leaves replacing the weight at `path` (any leading axes: a layer stack, or one layer
        of it): a kernel [..., in, out] quantized, or a mixture's expert stack [..., E, out, in] as its transpose
        (`quant.EXPERT_LEAVES`)."""
        module, name = path.rsplit("/", 1)
        try:
            codes = quant.quantize(weight if name == "kernel" else jnp.swapaxes(weight, -1, -2),
                                   self.quant if name == "kernel" else self.expert_quant, self.double_quant)
        except JpeftError as e:
            raise JpeftError(f"{hf_module(module)}: {e}") from None
        return {f"{module}/{name}{k.removeprefix('kernel')}": v for k, v in codes.items()}


def merge_note(params) -> None:
    if any(quant.is_quantized(leaves) for leaves in T.modules(params).values()):
        log.warning("merge: the base is quantized; it is dequantized to float32 and the adapters are merged "
                    "into that (the result is not re-quantized)")
