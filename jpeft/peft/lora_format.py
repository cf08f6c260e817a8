"""LoRA's HF PEFT adapter-dir mapping, both ways (`to_peft` / `from_peft`; the math is lora.py's).

Dense modules and embeddings: PEFT's `lora_A.weight` [r, in] / `lora_B.weight` [out, r] (an embedding's
`lora_embedding_A` / `_B`) per layer, against jpeft's stacked `lora_a` [..., in, r] / `lora_b` [..., r, out];
`rank_pattern`, `alpha_pattern` and `layers_to_transform` say where they differ. A mixture's stacked experts
(`target_parameters`): PEFT holds one Linear pair for all of a weight's experts, A [E·r, in] by expert then rank,
B [out, r·E] by rank then expert; jpeft one pair per expert, `lora_a` [..., E, in, r] and `lora_b` [..., E, r, out].
PEFT wraps the experts module once per adapted weight, so the second weight's pair sits one `base_layer` further in.
"""
from __future__ import annotations

import collections
import re

import jax
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError
from jpeft.peft import trainable_tokens
from jpeft.peft.base import (EXPERT_PARTS, EXPERT_WEIGHTS, exact_targets, from_layer_rows, is_conv1d,
                             is_expert_weight, layer_index, layer_rows, module_layers, module_names, refuse_tied_head,
                             saved_base_weight)
from jpeft.peft.lora import LoRA
from jpeft.peft.trainable_tokens import TrainableTokens

# init_lora_weights values of a PEFT adapter jpeft loads: those that leave the base weights as they are (A and B
# come from the file), and PiSSA's and OLoRA's exact rewrites, which jpeft repeats
PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal", "lora_ga", "pissa", "olora")


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT tensors and config fields for the LoRA `modules` of a grouped `tree` (`T.modules`); PiSSA/OLoRA converted back: [A | A₀], [B | -B₀] at twice the rank, so the adapter
    applies to the original base. Trainable token rows beside it go as its `trainable_token_indices`."""
    tensors, entries, dropouts, dora, active = {}, {}, {0.0}, False, {}
    experts = {p: leaves for p, leaves in modules.items() if is_expert_weight(p, leaves)}
    modules = {p: leaves for p, leaves in modules.items() if p not in experts}
    parameters = _experts_to_peft(experts, tensors)
    for path, leaves in modules.items():
        a, b = np.asarray(leaves["lora_a"], np.float32), np.asarray(leaves["lora_b"], np.float32)
        if "lora_init_a" in leaves:
            a = np.concatenate([a, np.asarray(leaves["lora_init_a"])], axis=-1)
            b = np.concatenate([b, -np.asarray(leaves["lora_init_b"])], axis=-2)
        a, b, scale = layer_rows(path, a), layer_rows(path, b), layer_rows(path, leaves["lora_scale"])
        magnitude = layer_rows(path, leaves["lora_magnitude"]) if "lora_magnitude" in leaves else None
        rank, embedding = a.shape[-1], "embedding" in leaves
        dropouts.add(float(np.max(leaves.get("lora_dropout", 0.0))))
        for i, name in enumerate(module_layers(path, leaves)):
            if scale[i] == 0:
                continue
            if embedding:
                tensors[f"{name}.lora_embedding_A"], tensors[f"{name}.lora_embedding_B"] = a[i].T, b[i].T
            else:
                tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a[i].T, b[i].T
            if magnitude is not None:
                tensors[f"{name}.lora_magnitude_vector"] = magnitude[i]
                dora = True
            entries[name] = (rank, float(scale[i]) * rank)
            active.setdefault(path, []).append(i)
    ranks = {**entries, **parameters}
    rank = collections.Counter(r for r, _ in ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(al for _, al in ranks.values()).most_common(1)[0][0]
    layer_sets = {tuple(v) for v in active.values()}
    whole = all(len(v) == len(module_layers(p, modules[p])) for p, v in active.items())
    config = {"r": rank, "lora_alpha": alpha, "lora_dropout": max(dropouts), "use_dora": dora,
              "rank_pattern": {n: r for n, (r, _) in ranks.items() if r != rank},
              "alpha_pattern": {n: al for n, (_, al) in ranks.items() if al != alpha},
              "bias": "none", "fan_in_fan_out": any(map(is_conv1d, active)), "inference_mode": True,
              "init_lora_weights": True,
              "modules_to_save": None, "use_rslora": False, "layers_to_transform": None}
    stacked_only = all(T.is_stacked(p + "/leaf") for p in active)
    names = peft_names(tree)
    if parameters:  # by their names within a layer, as PEFT's target_parameters name them
        config["target_parameters"] = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in parameters})
    if not entries:
        config["target_modules"] = None
    elif whole:
        config["target_modules"] = exact_targets(entries, names)
    elif len(layer_sets) == 1 and stacked_only:
        layers = layer_sets.pop()
        config["target_modules"] = exact_targets(entries, [n for n in names if layer_index(n) in layers])
        config["layers_to_transform"] = list(layers)
    else:  # an exact regex over the adapted per-layer names
        config["target_modules"] = "(" + "|".join(re.escape(n) for n in sorted(entries)) + ")"
    if tokens := {p: m for p, m in tree.items() if TrainableTokens.present(m)}:
        rows, config["trainable_token_indices"] = trainable_tokens.lora_tensors(tokens)
        tensors.update(rows)
    return tensors, config


def peft_names(tree: dict) -> list[str]:
    """Every module name of the base, with the names PEFT also reads as a fused expert weight (`EXPERT_PARTS`), so
    that the targets written select in PEFT what they select in jpeft (Qwen2-MoE's `shared_expert.up_proj`)."""
    return module_names(tree) + [f"{name.rpartition('.')[0]}.{part}" for path, leaves in tree.items()
                                 if is_expert_weight(path, leaves) for name in module_layers(path, leaves)
                                 for part in EXPERT_PARTS.get(path.rpartition("/")[2], ())]


def from_peft(config: dict, tensors, modules: dict) -> dict:
    """The tree's modules with LoRA leaves read from a PEFT state dict (`tensors.take(key)`)."""
    layers = config.get("layers_to_transform")
    init = config.get("init_lora_weights", True)
    if init == "mica":
        raise AdapterError("init_lora_weights='mica' cannot be honoured by jpeft, and PEFT cannot convert it to a "
                           "plain LoRA either; retrain with another init")
    if init not in PEFT_INITS:
        raise AdapterError(f"init_lora_weights={init!r}: PEFT rewrites the base weights with it when it loads the "
                           "adapter, which jpeft cannot reproduce; save it from PEFT with "
                           "path_initial_model_for_weight_conversion (a plain LoRA of the original base) and load that")
    targets = config.get("target_modules")
    method = LoRA(int(config["r"]), float(config["lora_alpha"]), () if targets is None else targets,
                  dropout=float(config.get("lora_dropout") or 0.0),
                  init=init if init in ("pissa", "olora") else "peft", use_rslora=bool(config.get("use_rslora")),
                  use_dora=bool(config.get("use_dora")), layers=[layers] if isinstance(layers, int) else layers,
                  rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"),
                  target_parameters=config.get("target_parameters"))
    refuse_tied_head(method.targets, modules, AdapterError)
    if layers is not None and config.get("layers_pattern"):
        _refuse_other_layer_counts(config["layers_pattern"], modules)
    out = {**modules, **_experts_from_peft(method, tensors, modules)}
    for path, leaves in modules.items():
        picked = method.targeted(path, leaves)
        if not any(picked):
            continue
        adapted = method.init_module(jax.random.key(0), path, leaves, picked)  # then filled from the file
        embedding = "embedding" in leaves
        keys = {"lora_a": "lora_embedding_A" if embedding else "lora_A.weight",
                "lora_b": "lora_embedding_B" if embedding else "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
        per_layer = {leaf: layer_rows(path, adapted[leaf]) for leaf in keys if leaf in adapted}
        for i, name in enumerate(module_layers(path, leaves)):
            for leaf in per_layer if picked[i] else ():
                got = tensors.take(f"{name}.{keys[leaf]}")
                got = got if leaf == "lora_magnitude" else got.T
                tensors.fits(f"{name}.{keys[leaf]}", got.shape, per_layer[leaf][i].shape)
                per_layer[leaf][i] = got
            adapted.update(saved_base_weight(tensors, name, leaves))
        out[path] = {**adapted, **{leaf: from_layer_rows(path, v) for leaf, v in per_layer.items()}}
    if all(out[p] is modules[p] for p in modules):
        raise AdapterError(f"target_modules {config['target_modules']!r} match no module of the base model; "
                           f"its modules: {method.available(modules)}")
    if token_indices := config.get("trainable_token_indices"):
        out = trainable_tokens.read_lora_tensors(token_indices, tensors, out)
    return biases_from_peft(tensors, out) if config.get("bias", "none") != "none" else out


def biases_to_peft(modules: dict, trained: dict) -> dict:
    """PEFT's tensors of the base biases a LoRA's `bias` trains (`trained`: a flat mask of them, `LoRA.trained_biases`):
    each layer's under its module's name, or under its `base_layer` where LoRA wraps that layer, as PEFT saves them."""
    from jpeft.models.hf import hf_layout, hf_names  # models import the peft package
    tensors = {}
    for path in (p for p, on in trained.items() if on):
        module, leaf = path.rpartition("/")[::2]
        leaves = modules[module]
        rows = layer_rows(module, leaves[leaf])
        wrapped = layer_rows(module, leaves["lora_scale"]) != 0 if "lora_a" in leaves else np.zeros(len(rows), bool)
        for name, row, inside in zip(hf_names(path, len(rows)), rows, wrapped):
            tensors[_wrapped_bias(name) if inside else name] = np.ascontiguousarray(hf_layout(path, row))
    return tensors


def biases_from_peft(tensors, modules: dict) -> dict:
    """The tree's modules with each base leaf a PEFT file trained as a bias (`bias` "all" or "lora_only") read from
    it, under the module's name or its `base_layer`'s."""
    from jpeft.models.hf import hf_layout, hf_names
    out = dict(modules)
    for module, leaves in modules.items():
        for leaf, value in leaves.items():
            path = f"{module}/{leaf}"
            if "bias" not in path or leaf in (*LoRA.trainable, *LoRA.metadata):
                continue
            rows = layer_rows(module, value)
            found = False
            for i, name in enumerate(hf_names(path, len(rows))):
                key = next((k for k in (name, _wrapped_bias(name)) if k in tensors.left), None)
                if key is not None:
                    got = hf_layout(path, tensors.take(key))
                    tensors.fits(key, got.shape, rows[i].shape)
                    rows[i], found = got, True
            if found:
                out[module] = {**out[module], leaf: from_layer_rows(module, rows, value.dtype)}
    return out


def _wrapped_bias(name: str) -> str:
    """PEFT's name of a LoRA-wrapped layer's bias: `q_proj.bias` -> `q_proj.base_layer.bias`."""
    head, _, leaf = name.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def _refuse_other_layer_counts(layers_pattern, modules: dict) -> None:
    """PEFT numbers a module's layer by the first `{layers_pattern}.N.` in its name; jpeft by its layer stack's
    index. A pattern that numbers any module otherwise (T5's `layer`, a name this base lacks) is refused."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)

    def peft_index(name: str) -> int | None:
        found = (re.match(rf"(?:^|.*?\.){re.escape(p)}\.(?P<idx>\d+)\.", name) for p in patterns)
        return next((int(m.group("idx")) for m in found if m), None)

    for name in module_names(modules):
        if peft_index(name) != layer_index(name):
            raise AdapterError(f"layers_pattern {layers_pattern!r} numbers the layers of {name} otherwise than its "
                               "layer stack does; jpeft counts layers_to_transform in the stack (re-save the adapter "
                               "with layers_pattern=None)")


def _experts_to_peft(experts: dict, tensors: dict) -> dict:
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


def _experts_from_peft(method, tensors, modules: dict) -> dict:
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
