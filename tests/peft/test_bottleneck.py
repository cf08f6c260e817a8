"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): the model is unchanged at init, the residual hook
computes each kind's formula at the right block, the tree-wide operations see exactly the adapter
leaves, and the adapter directory round-trips strictly."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.special import erf

import jpeft
from jpeft import tree as T
from jpeft.config import load_config, method_kwargs
from jpeft.errors import ConfigError
from jpeft.models.config import ModelConfig
from jpeft.models.hf import abstract_params
from jpeft.models.llama import CausalLM, init_params
from jpeft.parallel.mesh import logical_axes
from jpeft.peft import BY_NAME, Bottleneck, sites
from jpeft.train.step import token_loss

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
