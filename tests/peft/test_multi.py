"""Several named adapters on one base: one per call, one per row of a batch, weighted combinations."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from conftest import jit_logits, make_hf_model, make_t5, save_hf_model
from test_peft_parity import perturb

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (3, 10)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch_model = make_hf_model("llama")
    path = save_hf_model(torch_model, tmp_path_factory.mktemp("base"))
    model, params = jpeft.from_pretrained(path)
    one = perturb(jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj"], dropout=0.05).init(jax.random.key(0),
                                                                                               params),
                  ("lora_b",), jax.random.key(1))
    two = perturb(jpeft.LoRA(rank=2, alpha=6, targets=["v_proj", "down_proj", "lm_head"]).init(jax.random.key(2),
                                                                                             params),
                  ("lora_b",), jax.random.key(3))
    three = perturb(jpeft.LoRA(rank=4, alpha=4, targets=["q_proj", "down_proj"]).init(
        jax.random.key(4), params), ("lora_b",), jax.random.key(5))
    tree = jpeft.add_adapter(jpeft.add_adapter(jpeft.add_adapter(params, "one", one), "two", two), "three", three)
    return torch_model, model, params, {"one": one, "two": two, "three": three}, tree


def logits(model, params, ids=IDS):
    return jit_logits(model, params, ids)


def test_use_adapter_gives_each_adapter_alone(setup):
    _, model, _, single, tree = setup
    for name, adapted in single.items():
        np.testing.assert_array_equal(logits(model, jpeft.use_adapter(tree, name)), logits(model, adapted))
    with pytest.raises(jpeft.JpeftError, match="no adapter named 'four'"):
        jpeft.use_adapter(tree, "four")


def test_mixed_batch_rows_equal_single_adapter_runs(setup):
    _, model, _, single, tree = setup
    names = ["one", "two", "three"]
    ids = np.array([2, 0, 1])
    routed = jax.jit(lambda t, i: model.apply({"params": jpeft.route(t, names, i)}, IDS))(tree, ids)
    for row, which in enumerate(ids):
        alone = logits(model, single[names[which]], IDS[row:row + 1])
        np.testing.assert_allclose(np.asarray(routed)[row], alone[0], atol=2e-5, rtol=0)
    assert len({float(np.asarray(routed)[r].sum()) for r in range(3)}) == 3


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_adapter_matches_peft(setup, tmp_path, combination):
    _, model, _, single, tree = setup
    torch_model = make_hf_model("llama")  # PEFT wraps the model in place: a fresh copy per test
    names = ["one", "three"] if combination == "linear" else ["one", "two"]
    weights = [0.7, -0.4]
    combined = jpeft.use_adapter(jpeft.add_weighted_adapter(tree, names, weights, "mix", combination), "mix")
    rates = [np.ravel(v) for p, v in T.flatten(combined).items() if p.endswith("lora_dropout")]
    assert rates and set(np.concatenate(rates)) == {np.float32(0.05)}  # the first adapter's, as PEFT keeps its config
    for name in names:
        jpeft.save_adapter(str(tmp_path / name), single[name])
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / names[0], adapter_name=names[0])
    peft_model.load_adapter(tmp_path / names[1], adapter_name=names[1])
    peft_model.add_weighted_adapter(names, weights, "mix", combination_type=combination)
    peft_model.set_adapter("mix")
    with torch.no_grad():
        reference = peft_model.eval()(torch.tensor(np.asarray(IDS))).logits.numpy()
    np.testing.assert_allclose(logits(model, combined), reference, atol=2e-4, rtol=0)
    if combination == "cat":  # cat is exact: W + Σ wᵢ·ΔWᵢ
        plain = T.flatten(setup[2])
        merged = [T.flatten(jpeft.merge(jpeft.use_adapter(tree, n))) for n in names]
        mixed = T.flatten(jpeft.merge(combined))
        assert mixed.keys() == plain.keys()
        for path in plain:
            want = plain[path] + sum(w * (m[path] - plain[path]) for w, m in zip(weights, merged))
            np.testing.assert_allclose(np.asarray(mixed[path]), np.asarray(want), atol=1e-5, err_msg=path)


def test_route_refuses_t5_position_biases(tmp_path):
    """A stack's position-bias table is read once for the whole batch: per-row adapters cannot apply there."""
    _, params = jpeft.from_pretrained(make_t5(tmp_path / "t5")[1])
    adapted = jpeft.LoRA(rank=2, alpha=4, targets=["relative_attention_bias"]).init(jax.random.key(0), params)
    tree = jpeft.add_adapter(params, "bias", adapted)
    with pytest.raises(jpeft.JpeftError, match="relative_attention_bias is adapted"):
        jpeft.route(tree, ["bias"], [0, 0])


def test_a_container_is_not_a_model_tree_and_route_ids_index_names(setup, tmp_path):
    *_, tree = setup
    import optax
    for call, what in ((lambda: jpeft.merge(tree), "merge"),
                       (lambda: jpeft.save_adapter(str(tmp_path / "a"), tree), "save_adapter"),
                       # every stored adapter would be trained (and decayed) at once
                       (lambda: jpeft.freeze(optax.adamw(1e-2), tree), "freeze"),
                       (lambda: jpeft.count_parameters(tree), "count_parameters")):
        with pytest.raises(jpeft.JpeftError, match=f"{what}: this tree holds named adapters .*use_adapter"):
            call()
    with pytest.raises(jpeft.JpeftError, match="adapter_ids must index names \\(0..1\\)"):
        jpeft.route(tree, ["one", "two"], [0, 7, -1])


def test_weighted_ia3_adapters_match_peft(setup, tmp_path):
    """Σ wᵢ·lᵢ per module, a module only one adapter scales taking only its term, as PEFT's IA3 combines them."""
    _, model, params, _, _ = setup
    first = perturb(jpeft.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]).init(None, params),
                    ("ia3_in", "ia3_out"), jax.random.key(6))
    second = perturb(jpeft.IA3(targets=["v_proj", "down_proj"], feedforward=["down_proj"]).init(None, params),
                     ("ia3_in", "ia3_out"), jax.random.key(7))
    tree = jpeft.add_adapter(jpeft.add_adapter(params, "first", first), "second", second)
    combined = jpeft.use_adapter(jpeft.add_weighted_adapter(tree, ["first", "second"], [0.7, 0.4], "mix"), "mix")
    for name, adapted in (("first", first), ("second", second)):
        jpeft.save_adapter(str(tmp_path / name), adapted)
    peft_model = peft.PeftModel.from_pretrained(make_hf_model("llama"), tmp_path / "first", adapter_name="first")
    peft_model.load_adapter(tmp_path / "second", adapter_name="second")
    peft_model.add_weighted_adapter(["first", "second"], [0.7, 0.4], "mix")
    peft_model.set_adapter("mix")
    with torch.no_grad():
        reference = peft_model.eval()(torch.tensor(np.asarray(IDS))).logits.numpy()
    np.testing.assert_allclose(logits(model, combined), reference, atol=2e-4, rtol=0)


def test_weighted_combinations_take_lora_adapters_only(setup):
    _, _, params, _, tree = setup
    ia3 = jpeft.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]).init(None, params)
    with pytest.raises(jpeft.JpeftError, match="combines LoRA adapters; 'ia3' holds ia3_in, ia3_out"):
        jpeft.add_weighted_adapter(jpeft.add_adapter(tree, "ia3", ia3), ["one", "ia3"], [0.5, 0.5], "mix")


def test_weighted_combination_edges_follow_peft(setup):
    """linear takes adapters whose ranks agree module by module (rank_pattern); the result has the first adapter's
    dropout on every module; a head or a non-LoRA adapter is refused where it cannot be kept or routed."""
    _, model, params, single, tree = setup
    patterned = [jpeft.LoRA(rank=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}).init(jax.random.key(i),
                                                                                                 params)
                 for i in (6, 7)]
    tree = jpeft.add_adapter(jpeft.add_adapter(tree, "p1", patterned[0]), "p2", patterned[1])
    jpeft.add_weighted_adapter(tree, ["p1", "p2"], [0.5, 0.5], "lin", combination="linear")
    mix = jpeft.use_adapter(jpeft.add_weighted_adapter(tree, ["two", "one"], [1.0, 1.0], "mix", combination="cat"),
                            "mix")
    assert not any(T.leaf_name(p) == "lora_dropout" for p in T.flatten(mix))  # "two" has none, so none at all
    head = jpeft.Classifier(num_labels=3).init(jax.random.key(8), params)
    with pytest.raises(jpeft.JpeftError, match="holds a classification head"):
        jpeft.add_adapter(tree, "cls", head)
    prompt = jpeft.PromptTuning(4).init(jax.random.key(9), params)
    with pytest.raises(jpeft.JpeftError, match="soft_prompt.*plain LoRA adapters only"):
        jpeft.route(jpeft.add_adapter(tree, "prompt", prompt), ["one", "prompt"], [0, 1, 0])


def test_a_tree_whose_base_weights_changed_is_not_stored_as_an_adapter(setup, tmp_path):
    """A named adapter keeps its own leaves (and biases): a fully fine-tuned tree, or T5's position-bias table that
    LoRA's bias='all' trains, would lose those changes silently; refused naming them."""
    _, _, params, single, _ = setup
    tuned = T.unflatten({p: v * 1.01 if p.endswith("down_proj/kernel") else v
                         for p, v in T.flatten(single["one"]).items()})
    with pytest.raises(jpeft.JpeftError, match="'tuned' changed base weights .*model/layers/mlp/down_proj/kernel"):
        jpeft.add_adapter(params, "tuned", tuned)
    _, t5 = jpeft.from_pretrained(make_t5(tmp_path, "flan-t5")[1])
    lora = jpeft.LoRA(rank=2, targets=["q", "v"], bias="all")
    adapted = lora.init(jax.random.key(0), t5)
    mask = T.flatten(lora.mask(adapted))
    trained = T.unflatten({p: v + 0.5 if mask[p] else v for p, v in T.flatten(adapted).items()})
    with pytest.raises(jpeft.JpeftError, match="changed base weights .*relative_attention_bias/embedding"):
        jpeft.add_adapter(t5, "t5", trained)
