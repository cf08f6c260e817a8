"""RoAd: PEFT's three variants both ways, its invariants, counts and refusals."""
import jax
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from conftest import GPT2, check_merges_and_trains, jit_logits, make_hf_model, perturb, save_hf_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
BIASED = dict(attention_bias=True, mlp_bias=True)  # the rotation acts on the output, bias included
TRAINED = ("road_theta", "road_alpha")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = save_hf_model(make_hf_model("llama", **BIASED), tmp_path_factory.mktemp("base"))
    return (path, *jpeft.from_pretrained(path))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_each_variant_equals_pefts_both_ways(base, tmp_path, variant):
    path, model, params = base
    adapted = perturb(jpeft.RoAd(["q_proj", "v_proj", "down_proj"], variant, group_size=8).init(None, params),
                      TRAINED, jax.random.key(1), scale=0.5)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    theirs = peft.PeftModel.from_pretrained(make_hf_model("llama", **BIASED), tmp_path / "adapter").eval()
    np.testing.assert_allclose(jit_logits(model, adapted, IDS), torch_logits(theirs), atol=2e-4, rtol=0)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert all(np.array_equal(T.flatten(reloaded)[p], v) for p, v in T.flatten(adapted).items())
    config = peft.RoadConfig(variant=variant, group_size=16, target_modules=["k_proj", "up_proj"], init_weights=False)
    made = peft.get_peft_model(make_hf_model("llama", **BIASED), config).eval()
    made.save_pretrained(tmp_path / "peft")
    ours = jpeft.load_adapter(str(tmp_path / "peft"), params)
    np.testing.assert_allclose(jit_logits(model, ours, IDS), torch_logits(made), atol=2e-4, rtol=0)


@pytest.mark.parametrize("variant,per_output", [("road_1", 1), ("road_2", 2), ("road_4", 4)])
def test_identity_at_init_merges_trains_and_counts(base, variant, per_output):
    """θ = 0, α = 1 changes nothing; the rotation folds into W and b exactly; PEFT's count: 1, 2 or 4 scalars per
    output of each adapted layer (q_proj 32 and up_proj 64 wide, 2 layers)."""
    _, model, params = base
    adapted = jpeft.RoAd(["q_proj", "up_proj"], variant, group_size=8).init(None, params)
    np.testing.assert_array_equal(jit_logits(model, adapted, IDS), jit_logits(model, params, IDS))
    assert jpeft.count_parameters(adapted)[0] == per_output * 2 * (32 + 64)
    check_merges_and_trains(model, params, perturb(adapted, TRAINED, scale=0.3), IDS)


def test_rotations_alone_keep_each_pairs_length(base):
    """road_1 with α = 1 turns every pair (y_i, y_{i+g/2}) of a group by the pair's one angle: the merged weight's
    columns i and i + g/2 keep the sum of their squares, row by row, while each column changes."""
    _, _, params = base
    adapted = perturb(jpeft.RoAd(["q_proj"], "road_1", group_size=8).init(None, params), ("road_theta",), scale=1.0)
    before = np.asarray(T.modules(params)["model/layers/self_attn/q_proj"]["kernel"]).reshape(2, 32, 4, 2, 4)
    after = np.asarray(T.modules(jpeft.merge(adapted))["model/layers/self_attn/q_proj"]["kernel"]).reshape(before.shape)
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose((after ** 2).sum(-2), (before ** 2).sum(-2), rtol=1e-5)


@pytest.mark.parametrize("options,match", [
    (dict(group_size=12), "its 32 outputs do not split into groups of method.group_size=12"),
    (dict(group_size=5), "group_size 5: a positive even number"),
    (dict(variant="road_3"), "one of road_1, road_2, road_4"),
    (dict(targets=["nothing"]), "match no dense layer"),
])
def test_bad_options_are_refused(base, options, match):
    _, _, params = base
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.RoAd(**{"targets": ["q_proj"], **options}).init(None, params)


def test_gpt2_conv1d_is_refused_as_pefts_road_adapts_linear_layers_only(tmp_path):
    _, params = jpeft.from_pretrained(save_hf_model(make_hf_model("gpt2", **GPT2), tmp_path / "gpt2"))
    with pytest.raises(jpeft.JpeftError, match="it is GPT-2's Conv1D, which PEFT's RoAd does not adapt"):
        jpeft.RoAd(["c_attn"], group_size=8).init(None, params)


def test_t5_round_trip_with_pefts_logits(tmp_path):
    """RoAd on T5's q and v (PEFT's default there) in encoder and decoder, both ways."""
    from conftest import make_t5
    torch_model, path = make_t5(tmp_path / "t5")
    model, params = jpeft.from_pretrained(path)
    adapted = perturb(jpeft.RoAd(["q", "v"], "road_4", group_size=8).init(None, params), TRAINED, scale=0.5)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    theirs = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor(IDS), decoder_input_ids=torch.tensor(IDS[:, :4])).logits.numpy()
    np.testing.assert_allclose(jit_logits(model, adapted, IDS, IDS[:, :4]), want, atol=2e-4, rtol=0)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_array_equal(jit_logits(model, reloaded, IDS, IDS[:, :4]),
                                  jit_logits(model, adapted, IDS, IDS[:, :4]))


def test_layers_of_two_variants_are_not_written_as_one_peft_adapter(base, tmp_path):
    _, _, params = base
    mixed = jpeft.RoAd(["v_proj"], "road_2", 8).init(None, jpeft.RoAd(["q_proj"], "road_1", 8).init(None, params))
    with pytest.raises(jpeft.AdapterError, match=r"different variants or group sizes \(\[\('road_1', 8\), "
                                                 r"\('road_2', 8\)\]\) cannot be one PEFT adapter"):
        jpeft.save_adapter(str(tmp_path / "adapter"), mixed)


def test_all_linear_adapts_what_pefts_road_adapts(base):
    _, _, params = base
    adapted = jpeft.RoAd("all-linear", group_size=8).init(None, params)
    ours = {p.split("/")[-2] for p in T.flatten(adapted) if p.endswith("/road_theta")}
    config = peft.RoadConfig(group_size=8, target_modules="all-linear")
    made = peft.get_peft_model(make_hf_model("llama", **BIASED), config)
    theirs = {name.rpartition(".")[2] for name, module in made.named_modules() if hasattr(module, "road_theta")}
    assert ours == theirs == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
