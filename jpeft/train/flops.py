"""Model FLOPs of one train step, counted as the step really does them (the numerator of MFU).

Every matmul weight — a dense kernel (or its quantized form), LoRA's factors, a tied
embedding used as the LM head, VeRA's projections, a mixture's router and experts — costs 2 FLOPs per token and element forward and 2 for the
input gradient; only a trained one costs 2 more for its weight gradient (and a kernel that LoHa, LoKr, OFT or HRA
rebuilds, whose gradient their leaves' come from). So a LoRA step is about 4N FLOPs per token where full fine-tuning
is 6N. A mixture's experts (and their LoRA factors) count k of E: each token passes through k experts, as
the grouped products GPU and TPU run do (XLA:CPU multiplies every row by every expert). The per-step products that rebuild it and their leaves' gradients are not per token and not counted. Attention adds 4·T·heads·head_dim per
token and layer forward and twice that backward. Recomputation under remat is not counted
(MFU's convention), nor elementwise work.
"""
from __future__ import annotations

import math

from jpeft import tree as T
from jpeft.models.config import ModelConfig
from jpeft.peft import quant
from jpeft.peft.base import is_expert_weight
from jpeft.peft.registry import REBUILT_WEIGHTS
from jpeft.peft.trainable_tokens import INPUT_EMBEDDINGS

MATMUL_LEAVES = ("kernel", "weight", "lora_a", "lora_b", "vera_a", "vera_b")


def train_step_flops(cfg: ModelConfig, params, mask, tokens: int, seq_len: int) -> float:
    """FLOPs of a train step over `tokens` tokens in sequences of `seq_len`, for the tree `params`
    whose trained leaves `mask` marks."""
    trained, total = T.flatten(mask), 0
    for module, leaves in T.modules(params).items():
        sizes = {name: math.prod(leaves[name].shape) for name in MATMUL_LEAVES if name in leaves}
        if quant.is_quantized(leaves):
            sizes["kernel"] = quant.num_elements(leaves)
        if cfg.tie_word_embeddings and module.rpartition("/")[2] in INPUT_EMBEDDINGS:
            sizes["embedding"] = math.prod(leaves["embedding"].shape)  # the LM head
        gradient = {name for name in sizes if trained.get(f"{module}/{name}", False)}
        if any(m.present(leaves) for m in REBUILT_WEIGHTS):
            gradient.add("kernel")
        share = cfg.experts_per_token / cfg.num_experts if is_expert_weight(module, leaves) else 1
        total += share * sum((6 if name in gradient else 4) * n for name, n in sizes.items())
    attention = 12 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return float(tokens * (total + attention))
