"""Bottleneck adapters: a small down-project, nonlinearity, up-project MLP where a block's output
joins the residual stream.

    houlsby  (Houlsby et al. 2019):  h ← h + up(act(down(h)))      after attention and after the MLP
    pfeiffer (Pfeiffer et al. 2020): h ← h + up(act(down(h)))      after the MLP only
    parallel (He et al. 2022):       h ← h + s·up(act(down(x)))    beside the MLP; x is its normalised input

Every layer stack gets them: a decoder's (`model/layers`, GPT-2's `transformer/h`, OPT's `model/decoder/layers`) and
both of T5's (`encoder/block`, `decoder/block`), where "attention" is the block's self-attention and "mlp" its FF. T5's
decoder cross-attention gets none: that is AdapterHub's placement for T5 (its bottleneck configs default to
`cross_adapter=False`), and the Houlsby paper's two adapters per layer sit after attention and after the FF.

with down(z) = z·W_down + b_down (D → size) and up likewise (size → D). W_down ~ N(0, 0.02²) (BERT's
init, adapter-transformers' default); b_down, W_up and b_up start at zero, so the model is unchanged
at init. The adapters are nonlinear, so they cannot be merged into the base weights.

Leaves, in `<stack>/attention_adapter` and `<stack>/mlp_adapter` (stacked like the layers):
`adapter_down` [L, D, size], `adapter_down_bias` [L, size], `adapter_up` [L, size, D], `adapter_up_bias`
[L, D] (trained); `adapter_activation` [L] (int32, its index in `jpeft.models.layers.ACTIVATIONS`) and,
for parallel adapters only, `adapter_parallel_scale` [L] (s), both metadata: the hooks see only the
tree, so the tree says how to apply it. Parameters per adapted block: 2·D·size + size + D.

Adapter directory (PEFT has no bottleneck adapters; this is jpeft's own, in PEFT's style):
`adapter_config.json` holds `"peft_type": "BOTTLENECK"`, `"task_type": "CAUSAL_LM"`, `kind`, `size`,
`activation`, `scale` and `base_model_name_or_path` (`task_type` SEQ_2_SEQ_LM for T5); `adapter_model.safetensors`
holds, for each adapted block and layer i, `base_model.model.<stack>.{i}.{attention,mlp}_adapter.{down,up}.{weight,bias}`
(<stack>: `model.layers`, `transformer.h`, `model.decoder.layers`, `encoder.block`, `decoder.block`) in
torch.nn.Linear's layout (out × in): `down.weight` [size, D], `down.bias` [size], `up.weight` [D, size], `up.bias` [D].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import Method, layer_names
from jpeft.products import matmul

KINDS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",), "parallel": ("mlp",)}  # kind -> blocks adapted
SUBMODULES = {"attention": "attention_adapter", "mlp": "mlp_adapter"}  # block -> its adapter's module in a layer
# The norm before each family's attention block, under its layer stack (Llama-like, GPT-2, T5, OPT, MPT): its scale
# [layers, D] gives the stack's depth and residual width.
BLOCK_NORMS = ("input_layernorm", "ln_1", "layer_0/layer_norm", "self_attn_layer_norm", "norm_1")
# trained leaf -> its tensor in the adapter file; `.T` converts both ways (a bias's transpose is itself)
FILE_NAMES = {"adapter_down": "down.weight", "adapter_down_bias": "down.bias",
              "adapter_up": "up.weight", "adapter_up_bias": "up.bias"}


def activations() -> dict:
    """jpeft.models.layers.ACTIVATIONS, imported on use: that module imports the insertion points,
    which import the registry, which imports this module."""
    from jpeft.models.layers import ACTIVATIONS
    return ACTIVATIONS


class Bottleneck(Method):
    """Bottleneck adapters of `kind` "houlsby", "pfeiffer" or "parallel" with `size` hidden units and
    `activation` (a key of jpeft.models.layers.ACTIVATIONS); `scale` is a parallel adapter's s."""
    name = "bottleneck"
    peft_type = "BOTTLENECK"
    trainable = tuple(FILE_NAMES)
    metadata = ("adapter_activation", "adapter_parallel_scale")
    axes = {"adapter_down": ("lead", "embed", None), "adapter_down_bias": ("lead", None),
            "adapter_up": ("lead", None, "embed"), "adapter_up_bias": ("lead", "embed"),
            "adapter_activation": ("lead",), "adapter_parallel_scale": ("lead",)}

    def __init__(self, kind: str = "houlsby", size: int = 64, activation: str = "relu", scale: float = 1.0):
        if kind not in KINDS:
            raise JpeftError(f"bottleneck kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if size < 1:
            raise JpeftError(f"bottleneck size must be >= 1, got {size}")
        if activation not in activations():
            raise JpeftError(f"bottleneck activation must be one of {', '.join(activations())}, got {activation!r}")
        if kind != "parallel" and scale != 1.0:
            raise JpeftError(f"bottleneck scale={scale} applies to parallel adapters only; {kind} adapters add "
                             "their output unscaled (use kind='parallel', or scale=1)")
        self.kind, self.size, self.activation, self.scale = kind, int(size), activation, float(scale)

    def __repr__(self):
        return f"Bottleneck(kind={self.kind!r}, size={self.size}, activation={self.activation!r}, scale={self.scale})"

    @classmethod
    def present(cls, leaves: dict) -> bool:
        """Also True on a decoder layer's leaves: they hold the adapter modules its residual hook reads."""
        return super().present(leaves) or any(m in leaves for m in SUBMODULES.values())

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        raise JpeftError("bottleneck adapters cannot be merged into the base weights: the nonlinearity between "
                         "their projections has no equivalent in W; save them with save_adapter and apply them "
                         "with load_adapter")

    def init(self, key, params):
        grouped = T.modules(params)
        stacks = layer_stacks(grouped)
        if not stacks:
            raise JpeftError("bottleneck adapters need a stack of transformer layers (model/layers, transformer/h, "
                             "model/decoder/layers, encoder/block, decoder/block) with its norms")
        if any(_adapter_module(path) for path in grouped):
            raise JpeftError("this tree already holds bottleneck adapters; initialise from the base tree")
        flat = T.flatten(params)
        places = [(stack, block) for stack in stacks for block in KINDS[self.kind]]
        for (stack, block), k in zip(places, jax.random.split(key, len(places))):
            down = 0.02 * jax.random.normal(k, (*stacks[stack], self.size), jnp.float32)
            for leaf, value in self.module_leaves(down).items():
                flat[f"{stack}/{SUBMODULES[block]}/{leaf}"] = value
        return T.unflatten(flat)

    def module_leaves(self, down) -> dict:
        """One adapter module's leaves around its down-projection [L, D, size]; what else is trained starts at zero."""
        num_layers, hidden, size = down.shape
        leaves = {"adapter_down": down, "adapter_down_bias": jnp.zeros((num_layers, size), jnp.float32),
                  "adapter_up": jnp.zeros((num_layers, size, hidden), jnp.float32),
                  "adapter_up_bias": jnp.zeros((num_layers, hidden), jnp.float32),
                  "adapter_activation": jnp.full((num_layers,), list(activations()).index(self.activation), jnp.int32)}
        if self.kind == "parallel":
            leaves["adapter_parallel_scale"] = jnp.full((num_layers,), self.scale, jnp.float32)
        return leaves

    @staticmethod
    def residual(leaves, h, where, x):
        adapter = leaves.get(SUBMODULES.get(where))  # none at T5's cross-attention (see the module's docstring)
        if adapter is None:
            return h
        parallel = "adapter_parallel_scale" in adapter
        z = matmul(x if parallel else h, adapter["adapter_down"]) + adapter["adapter_down_bias"].astype(h.dtype)
        # the activation is a (per-layer, traced) leaf, so it is chosen at run time
        z = jax.lax.switch(adapter["adapter_activation"], tuple(activations().values()), z)
        out = matmul(z, adapter["adapter_up"]) + adapter["adapter_up_bias"].astype(h.dtype)
        return h + (out * adapter["adapter_parallel_scale"].astype(h.dtype) if parallel else out)


def layer_stacks(grouped: dict) -> dict[str, tuple[int, int]]:
    """{layer stack path: (layers, residual width)} of a grouped tree: each stack a block norm sits in."""
    found = {}
    for path, leaves in grouped.items():
        for norm in BLOCK_NORMS:
            stack = path.removesuffix("/" + norm)
            if stack != path and T.leaf_name(stack) in T.STACKS and "scale" in leaves:
                found[stack] = tuple(int(d) for d in np.shape(leaves["scale"]))
    return found


def _adapter_module(path: str) -> bool:
    return T.leaf_name(path) in SUBMODULES.values()


def settings(modules: dict) -> dict:
    """kind, size, activation and scale as an adapted tree's leaves encode them (`from_peft` inverts it)."""
    blocks = {T.leaf_name(path) for path in modules}
    mlp = next(leaves for path, leaves in modules.items() if T.leaf_name(path) == "mlp_adapter")  # every kind has it
    parallel = "adapter_parallel_scale" in mlp
    index = {int(i) for leaves in modules.values() for i in np.asarray(leaves["adapter_activation"])}
    scale = {float(s) for s in np.asarray(mlp["adapter_parallel_scale"])} if parallel else {1.0}
    if len(index) != 1 or len(scale) != 1:
        raise AdapterError("bottleneck adapters with different activations or scales per layer cannot be saved; "
                           "the adapter directory holds one of each")
    kind = "parallel" if parallel else "houlsby" if "attention_adapter" in blocks else "pfeiffer"
    return {"kind": kind, "size": int(np.shape(mlp["adapter_down"])[-1]),
            "activation": list(activations())[index.pop()], "scale": scale.pop()}


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """Each layer's projections as torch.nn.Linear tensors, and the settings that say how they apply."""
    tensors = {}
    for path, leaves in modules.items():
        for leaf, suffix in FILE_NAMES.items():
            stack = np.asarray(leaves[leaf], np.float32)
            for name, layer in zip(layer_names(path, len(stack)), stack):
                tensors[f"{name}.{suffix}"] = layer.T
    return tensors, settings(modules)


def from_peft(config: dict, tensors, modules: dict) -> dict:
    try:
        method = Bottleneck(config["kind"], config["size"], config["activation"], config["scale"])
    except JpeftError as e:
        raise AdapterError(f"adapter_config.json: {e}") from None
    grouped = T.modules(method.init(jax.random.key(0), T.from_modules(modules)))
    for path in filter(_adapter_module, list(grouped)):
        leaves = dict(grouped[path])
        for leaf, suffix in FILE_NAMES.items():
            stack = np.array(leaves[leaf])
            for i, name in enumerate(layer_names(path, len(stack))):
                key = f"{name}.{suffix}"
                got = tensors.take(key)
                tensors.fits(key, got.shape, stack[i].T.shape)
                stack[i] = got.T
            leaves[leaf] = jnp.asarray(stack)
        grouped[path] = leaves
    return grouped
