"""What every method shares: the protocol a method implements, and PEFT's target matching.

A method is one class. Its instances carry the user's options (`init`, `mask`); its
class-level parts are what the rest of jpeft reads from any tree, method unknown:

- `trainable` / `metadata` / `stored`: the leaf names it adds beside a weight (trained;
  describing it, never trained or counted; frozen data that replaces the weight).
- hooks named after insertion points (`weight`, `dense_input`, `dense_delta`,
  `dense_output`, `embed_delta`, `attention_kv`, `residual`, `norm_output`), pure functions
  of one module's leaves, called by `jpeft.peft.sites` whenever the module holds the
  method's leaves;
- `merge(leaves)`: the module's leaves with the method folded into the weight;
- `axes[leaf]`: its leaves' logical axes in terms of the weight's (`lead`, `in`, `out`);
- `heads`: top-level modules it adds whole (a classification head), every leaf trained but metadata;
- `scope`: why a family whose model lacks an insertion point the method needs cannot take it (the
  error `sites.require` raises says it).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft.quant import EXPERT_LEAVES, expert_codes, is_quantized, logical_shape


class Method:
    name = ""
    trainable: tuple[str, ...] = ()
    metadata: tuple[str, ...] = ()
    stored: tuple[str, ...] = ()
    axes: dict[str, tuple[str | None, ...]] = {}
    heads: tuple[str, ...] = ()
    scope: str = ""

    @classmethod
    def present(cls, leaves: dict) -> bool:
        return any(n in leaves for n in (*cls.trainable, *cls.stored))

    @classmethod
    def present_in(cls, tree) -> bool:
        """Does any module of the tree hold this method's leaves?"""
        return any(cls.present(leaves) for leaves in T.modules(tree).values())

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        raise JpeftError(f"{cls.__name__} cannot be merged into the base weights; save it as an adapter instead")

    @classmethod
    def count(cls, leaves: dict, name: str) -> int:
        """Scalars of one of its leaves that count as parameters (PEFT's formula)."""
        return int(np.size(leaves[name]))

    def init(self, key, params):
        return params

    def mask(self, params):
        """Bool tree: True exactly on the leaves this method trains."""
        return T.named(params, self.trainable)


class RebuiltWeight(Method):
    """A method whose `weight` hook builds the whole weight from the kernel and its trained leaves in every call
    (LoHa, LoKr, OFT, HRA), on whole layer stacks of Linear weights (`linear_stacks`): `init_module(key, path,
    leaves)` adds its leaves to one module; merging keeps the rebuilt weight."""

    def init(self, key, params):
        grouped = T.modules(params)
        refuse_tied_head(self.targets, grouped)
        chosen = linear_stacks(self, grouped)
        for path, k in zip(chosen, jax.random.split(key, len(chosen))):
            refuse_second_init(self, path, grouped[path], self.trainable)
            grouped[path] = self.init_module(k, path, grouped[path])
        return T.from_modules(grouped)

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        out = {k: v for k, v in leaves.items() if k not in cls.trainable + cls.metadata}
        out["kernel"] = cls.weight(leaves).astype(leaves["kernel"].dtype)
        return out


def dropped_input(x, rate, rng, stream: int):
    """PEFT's adapter dropout on a dense layer's input, inverted as torch's in training; `stream` gives each
    method a mask of its own."""
    keep = jax.random.bernoulli(jax.random.fold_in(rng, stream), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def refuse_second_init(method, path: str, leaves: dict, names) -> None:
    """A module holding the method's leaves already keeps them: a second `init` would silently replace a
    trained adapter (load_adapter refuses an adapted tree likewise)."""
    if any(name in leaves for name in names):
        raise JpeftError(f"{hf_module(path)} already holds a {type(method).__name__} adapter; a second init would "
                         "replace it: keep several with jpeft.add_adapter, or jpeft.merge the first")


def linear_uniform(key, shape, fan_in: int):
    """torch.nn.Linear's default init (and PEFT's LoRA A): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


# Modules outside the scanned stack whose HF home is one block of it (T5 keeps a stack's
# position-bias table in block 0's self-attention).
HF_HOMES = {f"{stack}.relative_attention_bias": f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
            for stack in ("encoder", "decoder")}


# PEFT's shorthand target: every dense layer (Linear, GPT-2's Conv1D) but the output layers.
ALL_LINEAR = "all-linear"
OUTPUT_LAYERS = ("lm_head", "score", "classifier")

# GPT-2's projections: HF Conv1D modules, weights stored [in, out] (PEFT adapts them with fan_in_fan_out).
CONV1D = ("c_attn", "c_proj", "c_fc")


def is_conv1d(module_path: str) -> bool:
    """Is this module one of GPT-2's Conv1Ds: `CONV1D` under its `transformer`? (StarCoder2's `model` names nn.Linear
    layers c_fc and c_proj.)"""
    return module_path.split("/", 1)[0] == "transformer" and module_path.rpartition("/")[2] in CONV1D


def dense_layers(grouped: dict) -> str:
    """The dense layers of a grouped tree by HF name, for errors that say which targets there are."""
    return ", ".join(sorted(hf_module(p) for p, leaves in grouped.items() if "kernel" in leaves))


def hf_module(module_path: str) -> str:
    """'model/layers/self_attn/q_proj' -> 'model.layers.self_attn.q_proj' (stacked name, no index).

    Tree paths spell HF module names; flax names a list's submodules `layer_0` where torch says `layer.0`.
    """
    name = re.sub(r"(?<![^.])layer_(\d+)(?![^.])", r"layer.\1", module_path.replace("/", "."))
    return HF_HOMES.get(name, name)


def layer_names(module_path: str, num_layers: int) -> list[str]:
    """The HF module name of each layer a (possibly stacked) module stands for."""
    name = hf_module(module_path)
    if T.is_stacked(module_path + "/leaf"):
        stack = next(s for s in module_path.split("/") if s in T.STACKS)
        return [name.replace(f".{stack}.", f".{stack}.{i}.", 1) for i in range(num_layers)]
    return [name]


def matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a list entry is a module name or its dotted suffix; a string is a full regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def whole_stacks(method, grouped: dict, refusal) -> list[str]:
    """The dense modules a method that adapts whole layer stacks picks by its `targets` (`all-linear`: all but
    the output head). `refusal(path, leaves)` says why a picked module cannot take the method (a quantized
    weight, an embedding, ...) or gives None; a module picked in some layers only is refused too."""
    name, targets = type(method).__name__, method.targets
    found = []
    for path, leaves in grouped.items():
        if weight_name(leaves) is None and not is_quantized(leaves):
            continue
        picked = picked_layers(path, leaves, targets)
        if not any(picked):
            continue
        if why := refusal(path, leaves):
            raise JpeftError(f"{name} targets {targets!r} pick {hf_module(path)}, but {why}")
        if not all(picked):
            raise JpeftError(f"{name} targets {targets!r} pick only some layers of {hf_module(path)}; {name} adapts "
                             "whole layer stacks (use LoRA for layer selection)")
        found.append(path)
    if not found:
        raise JpeftError(f"{name} targets {targets!r} match no dense layer; the dense layers: {dense_layers(grouped)}")
    return found


def target_option(targets: Sequence[str] | str) -> tuple[str, ...] | str:
    """A method's `targets` as it keeps them: a regex string, `all-linear` (also as the one-entry list the
    command line gives), or a tuple of names."""
    targets = targets if isinstance(targets, str) else tuple(targets)
    return ALL_LINEAR if targets == (ALL_LINEAR,) else targets


def linear_stacks(method, grouped: dict) -> list[str]:
    """`whole_stacks` of float Linear weights: what PEFT's LoHa, LoKr and OFT adapt (no embedding, no GPT-2
    Conv1D, no quantized weight)."""
    name = type(method).__name__

    def refusal(path, leaves):
        if is_quantized(leaves):
            return f"its weight is quantized: {name} adapts float weights"
        if "kernel" not in leaves:
            return f"it is an embedding: jpeft's {name} adapts Linear layers"
        if is_conv1d(path):
            return f"it is GPT-2's Conv1D, which PEFT's {name} does not adapt"
    return whole_stacks(method, grouped, refusal)


def refuse_tied_head(targets, grouped: dict, error=JpeftError) -> None:
    """Refuse a target naming `lm_head` where the tree has none of its own (its output layer is the token
    embedding, tie_word_embeddings): PEFT wraps the tied head as a module apart, which jpeft does not, so it
    would be skipped silently."""
    if "lm_head" not in grouped and matches("lm_head", targets):
        raise error(f"targets {targets!r} name lm_head, but this model's output layer is its token embedding "
                    "(tie_word_embeddings), which jpeft does not adapt apart from the embedding as PEFT does; "
                    "drop lm_head from the targets")


def module_names(grouped: dict) -> list[str]:
    """The HF module name of every layer of every module of a grouped tree (`T.modules`)."""
    return [name for path, leaves in grouped.items() for name in module_layers(path, leaves)]


def exact_targets(adapted, names, selects=matches) -> list[str]:
    """PEFT target_modules entries that select exactly the `adapted` modules among `names`: for each,
    its shortest dotted suffix that `selects` no other module. A bare last name where it is unambiguous
    (`q_proj`); where not, a longer one (GPT-2's `mlp.c_proj`, not its `attn.c_proj` too), else the
    whole name."""
    adapted = set(adapted)
    others, found = [n for n in names if n not in adapted], {}

    def exact(suffix: str) -> bool:
        if suffix not in found:
            found[suffix] = not any(selects(other, [suffix]) for other in others)
        return found[suffix]

    return sorted({next(s for s in (".".join(name.split(".")[-k:]) for k in range(1, name.count(".") + 2))
                        if exact(s)) for name in adapted})


def layer_index(name: str) -> int | None:
    found = re.search(rf"\.(?:{'|'.join(T.STACKS)})\.(\d+)\.", name + ".")
    return int(found.group(1)) if found else None


def targeted_layers(module_path: str, num_layers: int, targets, layers: Sequence[int] | None = None) -> list[bool]:
    """Per layer of a module: does PEFT's matching (with `layers_to_transform`) pick it? A list entry that is
    the module's whole name picks it whatever the layers, as in PEFT."""
    picked = []
    for name in layer_names(module_path, num_layers):
        index = layer_index(name)
        exact = not isinstance(targets, str) and name in targets
        picked.append(exact or matches(name, targets) and (layers is None or (index is not None and index in layers)))
    return picked


def picked_layers(path: str, leaves: dict, targets, layers: Sequence[int] | None = None) -> list[bool]:
    """`targeted_layers` of a module, with PEFT's `all-linear` shorthand: every dense layer (a Linear or GPT-2
    Conv1D weight, float or quantized) but the output head."""
    count = len(module_layers(path, leaves))
    if targets != ALL_LINEAR:
        return targeted_layers(path, count, targets, layers)
    dense = "kernel" in leaves or is_quantized(leaves)
    if not dense or path.rpartition("/")[2] in OUTPUT_LAYERS:
        return [False] * count
    return targeted_layers(path, count, ".*", layers)


def without_excluded(config: dict, grouped: dict, error=JpeftError) -> dict:
    """An adapter config with PEFT's `exclude_modules` folded into its `target_modules`: an exact regex over the
    per-layer names the targets pick (`all-linear`: every dense layer but the output head; `layers_to_transform`
    where the targets are a list, as in PEFT) less those the exclusion matches, which PEFT tests as it tests
    targets. Every method's reader then takes the config as it is."""
    exclude, targets = config.get("exclude_modules"), config.get("target_modules")
    if not exclude or targets is None:
        return config
    layers = config.get("layers_to_transform")
    if isinstance(targets, str) and targets != ALL_LINEAR:  # PEFT applies layers to a list of targets only
        layers = None
    elif isinstance(layers, int):
        layers = [layers]
    picked = []
    for path, leaves in grouped.items():
        chosen = picked_layers(path, leaves, targets, layers)
        picked += [name for name, c in zip(module_layers(path, leaves), chosen) if c and not matches(name, exclude)]
    if not picked:
        raise error(f"target_modules {targets!r} less exclude_modules {exclude!r} leave no module of this base")
    return {**config, "target_modules": "(" + "|".join(re.escape(n) for n in picked) + ")",
            "layers_to_transform": None, "exclude_modules": None}


# a mixture's stacked expert weights, in the order transformers registers them (PEFT nests its wrappers by it)
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
# the modules transformers 4 split each into (Mixtral's w1/w3/w2): PEFT 0.22+ still reads a LoRA target of theirs as
# the fused weight, so a bare `up_proj` beside Qwen2-MoE's experts would name their gate_up_proj too
EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj", "w1", "w3"), "down_proj": ("w2",)}


def is_expert_weight(path: str, leaves: dict) -> bool:
    """Is this module a mixture's stacked expert weight (`sites.experts`: `.../experts/gate_up_proj/weight`, or
    QLoRA's quantized leaves in its place)?"""
    return any(n in leaves for n in ("weight", *EXPERT_LEAVES)) and in_experts(path)


def in_experts(path: str) -> bool:
    """Is `path` a module of a mixture's experts module (`.../experts/gate_up_proj`)?"""
    return path.rpartition("/")[0].endswith("experts")


def expert_shape(leaves: dict) -> tuple[int, ...]:
    """The shape [..., E, out, in] of a stacked expert weight, float or quantized."""
    if "weight" in leaves:
        return tuple(leaves["weight"].shape)
    *lead, d_in, d_out = logical_shape(expert_codes(leaves))
    return (*lead, d_out, d_in)


def weight_name(leaves: dict) -> str | None:
    """The leaf a dense or embedding method modifies ('kernel' or 'embedding'), if the module has one."""
    return next((n for n in ("kernel", "embedding") if n in leaves), None)


def saved_base_weight(tensors, name: str, leaves: dict) -> dict:
    """{'kernel' or 'embedding': the weight} where a PEFT file holds module `name`'s base weight (PEFT saves a
    targeted embedding or LM head whole), else {}."""
    key = f"{name}.base_layer.weight"
    if key not in tensors.left:
        return {}
    weight = weight_name(leaves)
    got = tensors.take(key)
    got = got if weight == "embedding" else got.T
    tensors.fits(key, got.shape, leaves[weight].shape)
    return {weight: jnp.asarray(got, leaves[weight].dtype)}


def leading(path: str, array) -> tuple[int, ...]:
    """The stacked-layer dims of a module's weight: (num_layers,) under `layers`, else ()."""
    return tuple(np.shape(array)[:1]) if T.is_stacked(path + "/leaf") else ()


def module_layers(path: str, leaves: dict) -> list[str]:
    """`layer_names` of a module, its layers counted on any of its leaves (all share the stacked axis)."""
    lead = leading(path, next(iter(leaves.values())))
    return layer_names(path, lead[0] if lead else 1)


def layer_rows(path: str, value) -> np.ndarray:
    """A writable float32 copy of a module's leaf with one row per layer, in `layer_names`' order (a leading
    axis of one where the module is not stacked): the layout adapter files are written from and read into."""
    rows = np.array(value, np.float32)
    return rows if T.is_stacked(path + "/leaf") else rows[None]


def from_layer_rows(path: str, rows, dtype=jnp.float32):
    """`layer_rows` back in the leaf's own layout."""
    return jnp.asarray(rows if T.is_stacked(path + "/leaf") else rows[0], dtype)


# An attention module's q, k, v and o projections, as each family names them (Llama-like, T5), or its fused
# q/k/v projection and o (GPT-2's c_attn [D, 3·D] and c_proj, Phi-3's qkv_proj and o_proj, GPT-NeoX's
# query_key_value, by heads, and dense, MPT's Wqkv and out_proj, CodeGen's qkv_proj and out_proj); Phi's o is `dense`,
# GPT-J's `out_proj`.
ATTENTION_PROJECTIONS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "dense"),
                         ("q_proj", "k_proj", "v_proj", "out_proj"),
                         ("q", "k", "v", "o"), ("c_attn", "c_proj"), ("qkv_proj", "o_proj"), ("qkv_proj", "out_proj"),
                         ("query_key_value", "dense"), ("Wqkv", "out_proj"))


def attention_modules(grouped: dict) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """{attention module path: (stacked-layer dims, hidden size, kv_heads·head_dim)} of a grouped tree
    (`T.modules`): the parents of q, k, v and o projections (`ATTENTION_PROJECTIONS`) with plain kernels."""
    found = {}
    for path, leaves in grouped.items():
        parent, _, name = path.rpartition("/")
        for *qkv, out in ATTENTION_PROJECTIONS:
            projections = [grouped.get(f"{parent}/{p}", {}) for p in qkv]
            if name == out and all("kernel" in p for p in (leaves, *projections)):
                q = projections[0]["kernel"]
                if len(qkv) == 1:  # q, k and v side by side in one kernel; q as wide as o's input
                    width = (int(np.shape(q)[-1]) - query_width(leaves)) // 2
                else:
                    width = int(np.shape(projections[1]["kernel"])[-1])
                found[parent] = (leading(path, leaves["kernel"]), int(np.shape(q)[-2]), width)
    if not found:
        raise JpeftError("this method needs attention modules with plain q, k, v and o projection kernels "
                         "(a quantized base cannot carry it)")
    return found


def query_width(out_projection: dict) -> int:
    """All query heads' width: the attention output projection's input (every family's o reads one row per query
    head and dimension)."""
    return int(np.shape(out_projection["kernel"])[-2])
