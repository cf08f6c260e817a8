"""PEFT's tensors of a LoRA on a mixture's stacked experts (`target_parameters`), both ways.

PEFT holds one Linear pair for all of a weight's experts: A [E·r, in] by expert then rank, B [out, r·E] by rank then
expert; jpeft one pair per expert, `lora_a` [..., E, in, r] and `lora_b` [..., E, r, out]. PEFT wraps the experts
module once per adapted weight, so the second weight's pair sits one `base_layer` further in.
"""
from __future__ import annotations

import jax

from jpeft.errors import AdapterError
from jpeft.peft.base import EXPERT_WEIGHTS, from_layer_rows, layer_rows, module_layers


def to_peft(experts: dict, tensors: dict) -> dict:
    """PEFT's tensors of the `experts` modules' LoRA into `tensors`; {parameter name: (rank, alpha)} per adapted
    layer."""
    picked = {path: list(layer_rows(path, leaves["lora_scale"]) != 0) for path, leaves in experts.items()}
    names, entries = _wrapped_names(picked, experts), {}
    for path, leaves in experts.items():
        a, b, scale = (layer_rows(path, leaves[k]) for k in ("lora_a", "lora_b", "lora_scale"))
        for i, name in enumerate(module_layers(path, leaves)):
            if picked[path][i]:
                tensors[f"{names[path, i]}.lora_A.weight"] = a[i].transpose(0, 2, 1).reshape(-1, a.shape[-2])
                tensors[f"{names[path, i]}.lora_B.weight"] = b[i].transpose(2, 1, 0).reshape(b.shape[-1], -1)
                entries[name] = (a.shape[-1], float(scale[i]) * a.shape[-1])
    return entries


def from_peft(method, tensors, modules: dict) -> dict:
    """The expert-weight modules a `LoRA`'s `target_parameters` adapt, with their factors read from PEFT's tensors."""
    picked = {path: picks for path, leaves in modules.items() if any(picks := method.targeted_parameter(path, leaves))}
    if method.target_parameters and not picked:
        raise AdapterError(f"target_parameters {list(method.target_parameters)} match no expert weight of the base "
                           "model (jpeft's LoRA on parameters adapts a mixture's mlp.experts.gate_up_proj and down_proj)")
    names, out = _wrapped_names(picked, modules), {}
    for path, picks in picked.items():
        adapted = method.init_experts(jax.random.key(0), path, modules[path], picks)  # then filled from the file
        a, b = layer_rows(path, adapted["lora_a"]), layer_rows(path, adapted["lora_b"])
        experts, d_in, rank = a.shape[-3:]
        for i in (i for i, p in enumerate(picks) if p):
            got_a, got_b = (tensors.take(f"{names[path, i]}.lora_{f}.weight") for f in "AB")
            tensors.fits(f"{names[path, i]}.lora_A.weight", got_a.shape, (experts * rank, d_in))
            tensors.fits(f"{names[path, i]}.lora_B.weight", got_b.shape, (b.shape[-1], rank * experts))
            a[i] = got_a.reshape(experts, rank, d_in).transpose(0, 2, 1)
            b[i] = got_b.reshape(-1, rank, experts).transpose(2, 1, 0)
        out[path] = {**adapted, "lora_a": from_layer_rows(path, a), "lora_b": from_layer_rows(path, b)}
    return out


def _wrapped_names(picked: dict, modules: dict) -> dict:
    """{(expert weight's path, layer): PEFT's name of its LoRA module}. PEFT wraps the experts module once per
    adapted weight, in the order transformers registers them (`EXPERT_WEIGHTS`): the first is innermost, one
    `base_layer` below each later one (`experts.base_layer.lora_A` for gate_up_proj beside down_proj's
    `experts.lora_A`)."""
    names = {}
    for path, picks in picked.items():
        parent, _, weight = path.rpartition("/")
        for i, name in enumerate(module_layers(path, modules[path])):
            if picks[i]:
                wrapped = [w for w in EXPERT_WEIGHTS if picked.get(f"{parent}/{w}", [False] * len(picks))[i]]
                names[path, i] = name.rpartition(".")[0] + ".base_layer" * (len(wrapped) - 1 - wrapped.index(weight))
    return names
