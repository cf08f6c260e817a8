"""LoKr's shapes, invariants and refusals (its logits against PEFT both ways on Llama and T5: test_peft_parity.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from peft.tuners.lokr.layer import factorization as peft_factorization

import jpeft
from jpeft import tree as T
from jpeft.peft.lokr import factorization
from conftest import check_merges_and_trains, edit_adapter_config, jit_logits, make_hf_model, perturb, save_hf_model

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 10)))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # [in, out]: [32, 32], [32, 16], [32, 64], [64, 32]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch_model = make_hf_model("llama")
    return torch_model, *jpeft.from_pretrained(save_hf_model(torch_model, tmp_path_factory.mktemp("base")))


def test_widths_split_as_pefts_factorization():
    for factor in (-1, 0, 1, 2, 3, 4, 7, 16, 100):
        for width in (*range(1, 400), 1408, 4096, 11008, 14336, 32000, 151936):
            assert factorization(width, factor) == peft_factorization(width, factor), (width, factor)


@pytest.mark.parametrize("options", [dict(r=8), dict(r=2), dict(r=1, decompose_both=True),
                                     dict(r=2, decompose_both=True, decompose_factor=4),
                                     dict(r=3, decompose_factor=3)], ids=str)
def test_factors_have_pefts_shapes_and_count(base, options):
    """Which factors are whole and which rank-r products, and how each width splits, follow PEFT's rules for
    every rank and option; the parameter count is PEFT's."""
    torch_model, _, params = base
    peft_model = peft.get_peft_model(make_hf_model("llama"), peft.LoKrConfig(target_modules=TARGETS, **options))
    want = {n.removeprefix("base_model.model.").replace(".default", ""): tuple(p.shape[::-1])
            for n, p in peft_model.named_parameters() if "lokr_" in n}
    method = jpeft.LoKr(options["r"], 8, TARGETS, options.get("decompose_both", False),
                        options.get("decompose_factor", -1))
    adapted = method.init(jax.random.key(0), params)
    got = {}
    for path, leaves in T.modules(adapted).items():
        names = jpeft.peft.base.module_layers(path, leaves)
        got |= {f"{name}.{leaf}": value.shape[1:] for leaf, value in leaves.items() if leaf in method.trainable
                for name in names}
    assert got == want
    assert jpeft.count_parameters(adapted)[0] == peft_model.get_nb_trainable_parameters()[0]


def test_init_leaves_the_model_unchanged_with_pefts_bounds(base):
    _, model, params = base
    adapted = jpeft.LoKr(rank=2, alpha=4, targets=TARGETS).init(jax.random.key(0), params)
    np.testing.assert_array_equal(jit_logits(model, adapted, IDS), jit_logits(model, params, IDS))
    down = T.modules(adapted)["model/layers/mlp/down_proj"]  # in 64 = 8·8, out 32 = 4·8
    assert down["lokr_w1"].shape == (2, 8, 4) and down["lokr_w2_b"].shape == (2, 8, 2)
    np.testing.assert_array_equal(down["lokr_w1"], 0)
    np.testing.assert_array_equal(down["lokr_scale"], np.float32(4 / 2))
    np.testing.assert_array_equal(down["lokr_rank"], 2)
    # kaiming-uniform (a=√5) on torch's [out_k, r] and [r, in_n]: U(±1/√r) and U(±1/√in_n)
    for leaf, bound in (("lokr_w2_a", 2 ** -0.5), ("lokr_w2_b", 8 ** -0.5)):
        assert 0.8 * bound < np.abs(down[leaf]).max() <= bound, leaf


def test_delta_is_the_scaled_kronecker_product_and_merges(base):
    _, model, params = base
    method = jpeft.LoKr(rank=1, alpha=3, targets=TARGETS, decompose_both=True)
    adapted = perturb(method.init(jax.random.key(0), params), jpeft.LoKr.trainable, scale=0.3)
    leaves = {k: np.asarray(v[1], np.float64) for k, v in T.modules(adapted)["model/layers/mlp/up_proj"].items()}
    w1, w2 = leaves["lokr_w1_b"] @ leaves["lokr_w1_a"], leaves["lokr_w2_b"] @ leaves["lokr_w2_a"]
    up = T.modules(jpeft.merge(adapted))["model/layers/mlp/up_proj"]["kernel"][1]
    np.testing.assert_allclose(np.asarray(up) - leaves["kernel"], 3.0 * np.kron(w1, w2), atol=1e-6, rtol=0)
    trained = {T.leaf_name(p) for p, on in T.flatten(jpeft.trainable_mask(adapted)).items() if on}
    assert trained == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    check_merges_and_trains(model, params, adapted, IDS)


@pytest.mark.parametrize("options", [dict(rank=2, decompose_factor=2), dict(rank=1, decompose_both=True)], ids=str)
def test_save_writes_the_options_that_rebuild_the_same_factors(base, tmp_path, options):
    _, model, params = base
    adapted = perturb(jpeft.LoKr(targets=TARGETS, alpha=5, **options).init(jax.random.key(0), params), jpeft.LoKr.trainable, scale=0.3)
    jpeft.save_adapter(str(tmp_path), adapted)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["alpha"]) == (options["rank"], 5)
    assert config["decompose_both"] == options.get("decompose_both", False)
    assert config["decompose_factor"] == options.get("decompose_factor", -1)
    loaded = jpeft.load_adapter(str(tmp_path), params)
    np.testing.assert_array_equal(jit_logits(model, loaded, IDS), jit_logits(model, adapted, IDS))


@pytest.mark.parametrize("field,value,match", [
    ("r", 8, "down_proj holds lokr_w1, lokr_w2_a, lokr_w2_b, where its config .*rank=8.* makes lokr_w1, lokr_w2$"),
    ("decompose_factor", 2, r"down_proj.lokr_w1' has shape \(4, 8\).*expected \(2, 2\)"),
    ("alpha_pattern", {"q_proj": 2}, "LoKr adapters with alpha_pattern are not supported"),
])
def test_adapters_whose_config_does_not_fit_their_tensors_are_refused(base, tmp_path, field, value, match):
    _, _, params = base
    jpeft.save_adapter(str(tmp_path), jpeft.LoKr(rank=2, targets=TARGETS).init(jax.random.key(0), params))
    edit_adapter_config(tmp_path, **{field: value})
    with pytest.raises(jpeft.AdapterError, match=match):
        jpeft.load_adapter(str(tmp_path), params)


@pytest.mark.parametrize("options,match", [
    (dict(targets=["embed_tokens", "q_proj"]), "pick model.embed_tokens, but it is an embedding: jpeft's LoKr adapts Linear"),
    (dict(targets=r"model\.layers\.1\.mlp\.up_proj"), "pick only some layers of model.layers.mlp.up_proj"),
    (dict(rank=0), "LoKr rank must be >= 1"),
])
def test_bad_options_are_refused(base, options, match):
    _, _, params = base
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.LoKr(**options).init(jax.random.key(0), params)
