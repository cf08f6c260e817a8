"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): the model is unchanged at init, the residual hook
computes each kind's formula at the right block, the tree-wide operations see exactly the adapter
leaves, and the adapter directory round-trips strictly; on GPT-2 and T5 the adapted model is the
transformers model with the adapters hooked in (logits and greedy tokens)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch
from scipy.special import erf

import jpeft
from jpeft import tree as T
from jpeft.config import load_config, method_kwargs
from jpeft.errors import ConfigError
from jpeft.models.config import ModelConfig
from jpeft.models.hf import abstract_params
from jpeft.models.llama import CausalLM, init_params
from jpeft.parallel.mesh import logical_axes
from jpeft.generate import generate
from jpeft.peft import BY_NAME, Bottleneck, sites
from jpeft.train.step import token_loss
from conftest import jit_logits

CFG = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
D, L, SIZE = CFG.hidden_size, CFG.num_layers, 8
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 7)))
KINDS = {"houlsby": ("attention_adapter", "mlp_adapter"), "pfeiffer": ("mlp_adapter",),
         "parallel": ("mlp_adapter",)}
TRAINED = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")
# independent of jpeft.models.layers.ACTIVATIONS, so a wrong dispatch cannot agree with itself
REFERENCE_ACTIVATIONS = {
    "relu": lambda z: np.maximum(z, 0),
    "silu": lambda z: z / (1 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))),
    "gelu_pytorch_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))),
}


MODEL = CausalLM(CFG)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0))


@jax.jit
def logits(params):
    return MODEL.apply({"params": params}, IDS)


def randomised(params, seed=1):
    """Every trained adapter leaf random: zero up-projections would hide any bug in the formula."""
    flat = T.flatten(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    return T.unflatten({p: 0.2 * jax.random.normal(next(keys), v.shape) if T.leaf_name(p) in TRAINED else v
                        for p, v in flat.items()})


def adapted_paths(kind):
    return {f"model/layers/{module}/{leaf}" for module in KINDS[kind] for leaf in TRAINED}


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_is_unchanged_at_init(params, kind):
    adapted = Bottleneck(kind, size=SIZE).init(jax.random.key(1), params)
    np.testing.assert_array_equal(logits(adapted), logits(params))
    down = np.asarray(adapted["model"]["layers"]["mlp_adapter"]["adapter_down"])
    assert down.shape == (L, D, SIZE) and 0.015 < down.std() < 0.025  # the documented N(0, 0.02²)
    assert np.abs(logits(randomised(adapted)) - logits(params)).max() > 1e-2


@pytest.mark.parametrize("kind, activation, scale", [("houlsby", "relu", 1.0), ("pfeiffer", "gelu", 1.0),
                                                     ("parallel", "silu", 4.0),
                                                     ("parallel", "gelu_pytorch_tanh", 0.5)])
def test_residual_hook_computes_each_kinds_formula(params, kind, activation, scale):
    """On one layer's leaves: h + s·up(act(down(input))), the input being h, or x for parallel adapters."""
    tree = randomised(Bottleneck(kind, size=SIZE, activation=activation, scale=scale).init(jax.random.key(1), params))
    layer = jax.tree.map(lambda v: v[1], tree["model"]["layers"])
    rng = np.random.RandomState(0)
    h, x = (jnp.asarray(rng.randn(2, 5, D), jnp.float32) for _ in range(2))
    for where, module in (("attention", "attention_adapter"), ("mlp", "mlp_adapter")):
        got = np.asarray(sites.residual(layer, h, where, x))
        if module not in KINDS[kind]:
            np.testing.assert_array_equal(got, h)
            continue
        a = {k: np.asarray(v) for k, v in layer[module].items()}
        z = REFERENCE_ACTIVATIONS[activation](np.asarray(x if kind == "parallel" else h) @ a["adapter_down"]
                                              + a["adapter_down_bias"])
        np.testing.assert_allclose(got, h + scale * (z @ a["adapter_up"] + a["adapter_up_bias"]), atol=1e-5, rtol=1e-5)


def linear_adapters(params, kind, gain):
    """Adapters of width D that compute gain·h: down = I with a bias that keeps relu's input positive,
    up = gain·I with the bias that cancels it."""
    offset = 10.0
    adapted = Bottleneck(kind, size=D).init(jax.random.key(1), params)
    eye = jnp.broadcast_to(jnp.eye(D), (L, D, D))
    flat = T.flatten(adapted)
    for module in KINDS[kind]:
        flat.update({f"model/layers/{module}/adapter_down": eye,
                     f"model/layers/{module}/adapter_down_bias": jnp.full((L, D), offset),
                     f"model/layers/{module}/adapter_up": gain * eye,
                     f"model/layers/{module}/adapter_up_bias": jnp.full((L, D), -gain * offset)})
    return T.unflatten(flat)


@pytest.mark.parametrize("kind, scaled", [("houlsby", ("self_attn/o_proj", "mlp/down_proj")),
                                          ("pfeiffer", ("mlp/down_proj",))])
def test_sequential_adapters_act_on_the_block_outputs_in_the_model(params, kind, scaled):
    """An adapter computing gain·h is the base model with that block's output projection scaled by 1 + gain."""
    gain = 2.0
    flat = T.flatten(params)
    flat.update({f"model/layers/{p}/kernel": (1 + gain) * flat[f"model/layers/{p}/kernel"] for p in scaled})
    expected = logits(T.unflatten(flat))
    got = logits(linear_adapters(params, kind, gain))
    assert np.abs(expected - logits(params)).max() > 1e-3
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_counts_mask_axes_and_gradients_cover_exactly_the_adapter_leaves(params, kind):
    adapted = randomised(Bottleneck(kind, size=SIZE, scale=1.0).init(jax.random.key(1), params))
    per_block = 2 * D * SIZE + SIZE + D
    expected = len(KINDS[kind]) * L * per_block
    assert jpeft.count_parameters(adapted) == (expected, T.count(params) + expected)
    mask = T.flatten(jpeft.trainable_mask(adapted))
    assert {p for p, m in mask.items() if m} == adapted_paths(kind)
    trainable, frozen = T.partition(adapted, jpeft.trainable_mask(adapted))
    batch = {"input_ids": IDS, "attention_mask": jnp.ones_like(IDS), "labels": jnp.roll(IDS, -1, axis=1),
             "loss_mask": jnp.ones(IDS.shape, jnp.float32)}
    grads = T.flatten(jax.jit(jax.grad(lambda tr: token_loss(MODEL, T.combine(tr, frozen), batch)[0]))(trainable))
    assert set(grads) == adapted_paths(kind)
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads.values())
    axes = logical_axes(adapted, abstract_params(MODEL))
    mlp = "model/layers/mlp_adapter/"
    assert axes[mlp + "adapter_down"] == ("layers", "embed", None)
    assert axes[mlp + "adapter_up"] == ("layers", None, "embed")
    assert axes[mlp + "adapter_down_bias"] == ("layers", None) and axes[mlp + "adapter_up_bias"] == ("layers", "embed")
    assert axes[mlp + "adapter_activation"] == ("layers",)


def test_parallel_scale_is_metadata_neither_trained_nor_counted(params):
    adapted = Bottleneck("parallel", size=SIZE, scale=4.0).init(jax.random.key(1), params)
    np.testing.assert_array_equal(adapted["model"]["layers"]["mlp_adapter"]["adapter_parallel_scale"], [4.0] * L)
    assert not T.flatten(jpeft.trainable_mask(adapted))["model/layers/mlp_adapter/adapter_parallel_scale"]
    assert jpeft.count_parameters(adapted)[0] == L * (2 * D * SIZE + SIZE + D)


METHODS = {"houlsby": Bottleneck("houlsby", size=SIZE, activation="gelu"),
           "pfeiffer": Bottleneck("pfeiffer", size=SIZE),
           "parallel": Bottleneck("parallel", size=SIZE, activation="silu", scale=4.0)}


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_directory_round_trip(params, tmp_path, kind):
    method = METHODS[kind]
    adapted = randomised(method.init(jax.random.key(1), params))
    jpeft.save_adapter(str(tmp_path), adapted, base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "kind": kind, "size": SIZE,
                      "activation": method.activation, "scale": method.scale, "base_model_name_or_path": "tiny-base"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    shapes = {"down.weight": (SIZE, D), "down.bias": (SIZE,), "up.weight": (D, SIZE), "up.bias": (D,)}
    assert {k: v.shape for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.{module}.{name}": shape
        for i in range(L) for module in KINDS[kind] for name, shape in shapes.items()}
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.mlp_adapter.down.weight"],
                                  adapted["model"]["layers"]["mlp_adapter"]["adapter_down"][1].T)  # out × in
    loaded = jpeft.load_adapter(str(tmp_path), params)
    want, got = T.flatten(adapted), T.flatten(loaded)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    np.testing.assert_array_equal(logits(loaded), logits(adapted))


def drop(tensors, config):
    del tensors["base_model.model.model.layers.1.attention_adapter.up.bias"]


def reshape(tensors, config):
    key = "base_model.model.model.layers.0.mlp_adapter.down.weight"
    tensors[key] = tensors[key].T.copy()


def add(tensors, config):
    tensors["base_model.model.model.layers.0.mlp_adapter.side.weight"] = np.zeros((2, 2), np.float32)


def retype(tensors, config):
    config["kind"] = "pfeiffer"  # the attention adapter's tensors are then left over


def unscale(tensors, config):
    config["scale"] = 2.0  # a houlsby adapter has no scale


@pytest.mark.parametrize("tamper, message", [
    (drop, "missing key 'model.layers.1.attention_adapter.up.bias'"),
    (reshape, r"'model.layers.0.mlp_adapter.down.weight' has shape \(32, 8\).*expected \(8, 32\)"),
    (add, "unexpected keys .*model.layers.0.mlp_adapter.side.weight"),
    (retype, "unexpected keys .*attention_adapter"),
    (unscale, "adapter_config.json: bottleneck scale=2.0 applies to parallel adapters only"),
])
def test_a_tampered_adapter_directory_is_refused(params, tmp_path, tamper, message):
    jpeft.save_adapter(str(tmp_path), randomised(METHODS["houlsby"].init(jax.random.key(1), params)))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tamper(tensors, config)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(jpeft.AdapterError, match=message):
        jpeft.load_adapter(str(tmp_path), params)


def test_saving_refuses_what_the_directory_cannot_describe(params, tmp_path):
    """The config holds one activation for all layers; a tree mixing two would be saved wrong."""
    flat = T.flatten(METHODS["pfeiffer"].init(jax.random.key(1), params))
    flat["model/layers/mlp_adapter/adapter_activation"] = jnp.asarray([0, 3], jnp.int32)
    with pytest.raises(jpeft.AdapterError, match="different activations or scales per layer"):
        jpeft.save_adapter(str(tmp_path), T.unflatten(flat))


def test_merge_is_refused(params):
    with pytest.raises(jpeft.JpeftError, match="bottleneck adapters cannot be merged into the base weights"):
        jpeft.merge(Bottleneck("pfeiffer", size=SIZE).init(jax.random.key(1), params))


@pytest.mark.parametrize("options, message", [
    ({"kind": "serial"}, "kind must be one of houlsby, pfeiffer, parallel, got 'serial'"),
    ({"size": 0}, "size must be >= 1"),
    ({"activation": "tanh"}, "activation must be one of .*relu.*, got 'tanh'"),
    ({"kind": "houlsby", "scale": 4.0}, "scale=4.0 applies to parallel adapters only"),
])
def test_bad_options_are_errors(options, message):
    with pytest.raises(jpeft.JpeftError, match=message):
        Bottleneck(**options)


def test_run_config_reaches_the_constructor():
    cfg = load_config(None, ["method.name=bottleneck", "method.kind=parallel", "method.size=16",
                             "method.activation=gelu", "method.scale=4"])
    method = BY_NAME[cfg.method.name](**method_kwargs(cfg.method))
    assert repr(method) == "Bottleneck(kind='parallel', size=16, activation='gelu', scale=4.0)"
    for bad, key in (("method.kind=serial", "method.kind"), ("method.size=0", "method.size")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["method.name=bottleneck", bad])


# GPT-2, T5, OPT and MPT: the same adapters at each family's residual insertion points, checked against the
# transformers model with the adapters added by forward hooks (an independent computation in PyTorch).
FAMILY_KINDS = {"houlsby": ("relu", 1.0), "pfeiffer": ("gelu", 1.0), "parallel": ("silu", 4.0)}  # torch's names too
# family -> {adapter block: the torch submodules whose output it adapts, per layer stack}; T5's cross-attention
# (layer.1.EncDecAttention in the decoder) gets none. OPT's layer holds its MLP's fc1 and fc2 itself: fc2's output is
# the MLP's (a parallel adapter's input, fc1's, is not fc2's: OPT is checked after blocks only); MPT's `ffn` adds the
# residual itself, so its down_proj's output is the MLP's (checked after blocks only too).
HOOKED = {"gpt2": {"transformer/h": {"attention": "attn", "mlp": "mlp"}},
          "opt": {"model/decoder/layers": {"attention": "self_attn", "mlp": "fc2"}},
          "mpt": {"transformer/blocks": {"attention": "attn", "mlp": "ffn.down_proj"}},
          "t5": {f"{stack}/block": {"attention": "layer.0.SelfAttention", "mlp": f"layer.{last}.DenseReluDense"}
                 for stack, last in (("encoder", 1), ("decoder", 2))}}


def family_base(tmp_path, family):
    """(torch model, jpeft model, base params); GPT-2's and OPT's weights N(0, 0.2²), so their greedy tokens vary."""
    from conftest import FAMILIES, GPT2, make_hf_model, make_t5, save_hf_model
    if family != "t5":
        ref = make_hf_model(family, **(GPT2 if family == "gpt2" else FAMILIES[family]), initializer_range=0.2)
        path = save_hf_model(ref, tmp_path / family)
    else:
        ref, path = make_t5(tmp_path / "t5", "flan-t5", own_head=True)
    return (ref, *jpeft.from_pretrained(path))


def family_logits(family, model, params, ids, dec):
    args = (ids, dec) if family == "t5" else (ids,)
    return jit_logits(model, params, *map(jnp.asarray, args))


def hooked(ref, family, params, activation):
    """`ref` with each adapter of `params` added to its block's output by a forward hook, from its own leaves."""
    fn = getattr(torch.nn.functional, activation)
    flat, handles = T.flatten(params), []
    for stack, blocks in HOOKED[family].items():
        scale = flat.get(f"{stack}/mlp_adapter/adapter_parallel_scale")  # parallel: s, and the block's input
        for where, submodule in blocks.items():
            adapter = {n: flat.get(f"{stack}/{where}_adapter/{n}") for n in TRAINED}
            if adapter["adapter_down"] is None:
                continue
            for i, layer in enumerate(ref.get_submodule(stack.replace("/", "."))):
                w = {n: torch.tensor(np.asarray(v[i])) for n, v in adapter.items()}
                s = None if scale is None else float(scale[i])

                def hook(module, inputs, output, w=w, s=s):
                    out = output[0] if isinstance(output, tuple) else output
                    z = fn((out if s is None else inputs[0]) @ w["adapter_down"] + w["adapter_down_bias"])
                    delta = z @ w["adapter_up"] + w["adapter_up_bias"]
                    out = out + (delta if s is None else s * delta)
                    return (out, *output[1:]) if isinstance(output, tuple) else out
                handles.append(layer.get_submodule(submodule).register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("family,kind", [(family, kind) for family in ("gpt2", "t5") for kind in FAMILY_KINDS]
                         + [(family, kind) for family in ("opt", "mpt") for kind in ("houlsby", "pfeiffer")])
def test_family_adapters_equal_the_torch_model_with_hooked_adapters(tmp_path, family, kind):
    """Zero-initialised: the logits are the base's. Random: they are the transformers model's with each adapter
    added where AdapterHub puts it (T5: self-attention and FF of both stacks, no cross-attention), and greedy
    generation (jpeft's KV cache) gives the tokens of greedy decoding through the hooked model."""
    activation, scale = FAMILY_KINDS[kind]
    ref, model, params = family_base(tmp_path, family)
    rng = np.random.RandomState(0)
    ids, dec = rng.randint(2, 97, (2, 9)), rng.randint(2, 97, (2, 5))
    adapted = Bottleneck(kind, size=SIZE, activation=activation, scale=scale).init(jax.random.key(1), params)
    np.testing.assert_array_equal(family_logits(family, model, adapted, ids, dec),
                                  family_logits(family, model, params, ids, dec))
    adapted = randomised(adapted)
    handles = hooked(ref, family, adapted, activation)
    kwargs = {"decoder_input_ids": torch.tensor(dec)} if family == "t5" else {}
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), **kwargs).logits.numpy()
    ours = family_logits(family, model, adapted, ids, dec)
    assert np.abs(ours - family_logits(family, model, params, ids, dec)).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)

    prompt = ids[0].tolist()
    got = generate(model, adapted, [prompt, prompt[4:]], max_new_tokens=6, eos_token_id=None)
    sequence = [model.config.decoder_start_token_id] if family == "t5" else list(prompt)
    start = len(sequence)
    with torch.no_grad():
        for _ in range(6):
            run = ({"input_ids": torch.tensor([prompt]), "decoder_input_ids": torch.tensor([sequence])}
                   if family == "t5" else {"input_ids": torch.tensor([sequence])})
            sequence.append(int(ref(**run).logits[0, -1].argmax()))
    for h in handles:
        h.remove()
    assert got[0] == sequence[start:]
    assert got[1] == generate(model, adapted, [prompt[4:]], max_new_tokens=6, eos_token_id=None)[0]  # padding


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_family_adapter_directory_round_trip(tmp_path, family):
    """Each stack's adapters under its HF name; the directory loads back exactly; merging is refused."""
    _, model, params = family_base(tmp_path, family)
    adapted = randomised(Bottleneck("houlsby", size=SIZE).init(jax.random.key(1), params))
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == ("CAUSAL_LM" if family == "gpt2" else "SEQ_2_SEQ_LM") and config["kind"] == "houlsby"
    stacks = {"gpt2": {"transformer.h": L}, "t5": {"encoder.block": 2, "decoder.block": 3}}[family]
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {
        f"base_model.model.{stack}.{i}.{module}.{name}" for stack, layers in stacks.items() for i in range(layers)
        for module in KINDS["houlsby"] for name in ("down.weight", "down.bias", "up.weight", "up.bias")}
    loaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    want, got = T.flatten(adapted), T.flatten(loaded)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    with pytest.raises(jpeft.JpeftError, match="cannot be merged"):
        jpeft.merge(adapted)
