"""Every method PEFT has, both ways against PyTorch PEFT: same logits from the same adapter dir (on T5:
test_t5_peft_parity.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from jpeft.peft.base import module_layers
from jpeft.peft.multi import ADAPTER_LEAVES
from conftest import (FAMILIES, edit_adapter_config, family_targets, jit_logits, make_hf_model, perturb,
                      save_hf_model)

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def jax_logits(model, params):
    return jit_logits(model, params, IDS)


def perturb_torch(model, names, scale):
    """The same for a PeftModel: random values added to its parameters whose names contain one of `names`."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(name in n for name in names):
                p.add_(scale * torch.randn_like(p))


PEFT_CONFIGS = {
    "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                            init_lora_weights=False),
    "layers": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                              init_lora_weights=False),
    "layers-pattern": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                      layers_pattern="layers", init_lora_weights=False),
    "regex-layer": peft.LoraConfig(r=2, lora_alpha=6, target_modules=r"model\.layers\.0\.self_attn\.(k|o)_proj",
                                   init_lora_weights=False),
    # a whole module name is adapted whatever layers_to_transform says (PEFT's rule): q_proj of layer 0 too
    "exact-name-beside-layers": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["model.layers.0.self_attn.q_proj",
                                                                                   "v_proj"],
                                                layers_to_transform=[1], init_lora_weights=False),
    "embed-head": peft.LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"],
                                  init_lora_weights=False),
    # the magnitude per embedding dimension, over the vocabulary
    "dora-embed": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True,
                                  init_lora_weights=False),
    "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    # PEFT saves the targeted head's base weight beside its ia3_l
    "ia3-head": peft.IA3Config(target_modules=["v_proj", "lm_head"], feedforward_modules=[]),
    # one shared pair sliced for layers of three shapes; the head's base weight saved beside its vectors
    "vera-head": peft.VeraConfig(r=4, target_modules=["v_proj", "down_proj", "lm_head"]),
    # random B2 (init_weights=False), an alpha of its own; the head's base weight saved beside its factors
    "loha-head": peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj", "lm_head"], init_weights=False),
    # rank-2 W₂ products beside a whole one (the head's prime 97-wide output: 1·97); random W₁ (init_weights=False)
    "lokr-head": peft.LoKrConfig(r=2, alpha=6, target_modules=["q_proj", "down_proj", "lm_head"], init_weights=False),
    # W₁ a product too, widths split 4·n
    "lokr-decompose": peft.LoKrConfig(r=1, alpha=3, target_modules=["v_proj", "up_proj"], decompose_both=True,
                                      decompose_factor=4, init_weights=False),
    # OFT's variants: a block size or count (shared blocks), the exact transform or a short series, the
    # constrained form, sizes PEFT adjusts (6 divides no width here) on a head whose base weight PEFT saves
    "oft": peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "oft-rank-shared": peft.OFTConfig(r=4, oft_block_size=0, target_modules=["v_proj", "up_proj"], block_share=True,
                                      init_weights=False),
    "oft-exact": peft.OFTConfig(oft_block_size=4, target_modules=["q_proj", "down_proj"], use_cayley_neumann=False,
                                init_weights=False),
    "oft-three-terms": peft.OFTConfig(oft_block_size=8, target_modules=["k_proj"], num_cayley_neumann_terms=3,
                                      init_weights=False),
    "oft-constrained": peft.OFTConfig(oft_block_size=8, target_modules=["o_proj", "gate_proj"], coft=True, eps=1e-2,
                                      init_weights=False),
    "oft-adjusted-head": peft.OFTConfig(oft_block_size=6, target_modules=["v_proj", "lm_head"], init_weights=False),
    # HRA: a chain of reflections, the Gram–Schmidt form, an odd rank on the head
    "hra": peft.HRAConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False),
    "hra-gram-schmidt": peft.HRAConfig(r=3, target_modules=["v_proj", "up_proj"], apply_GS=True, init_weights=False),
    "hra-odd-head": peft.HRAConfig(r=5, target_modules=["k_proj", "lm_head"], init_weights=False),
    # exclude_modules, folded into the targets: names and suffixes out of all-linear, a regex out of a list with
    # layers_to_transform, whole stacks out of a method that adapts whole stacks
    "exclude-all-linear": peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                          exclude_modules=["o_proj", "mlp.down_proj", "model.layers.0.mlp.up_proj"],
                                          init_lora_weights=False),
    "exclude-regex-layers": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"],
                                            layers_to_transform=[0, 1], exclude_modules=r".*\.1\.self_attn\.v_proj",
                                            init_lora_weights=False),
    "exclude-ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                  exclude_modules=["k_proj"]),
    "exclude-loha": peft.LoHaConfig(r=2, alpha=4, target_modules="all-linear", exclude_modules=["q_proj", "k_proj",
                                    "v_proj", "o_proj"], init_weights=False),
}


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_written_adapter_loads_with_same_logits(tmp_path, name):
    torch_model = make_hf_model("llama")
    path = save_hf_model(torch_model, tmp_path / "base")
    peft_model = peft.get_peft_model(torch_model, PEFT_CONFIGS[name]).eval()
    # non-trivial values for what PEFT initialises to the identity
    perturb_torch(peft_model, ("ia3_l", "lora_embedding_A", "magnitude", "vera_lambda"), 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(path)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(jax_logits(model, adapted), torch_logits(peft_model), atol=2e-4, rtol=0)
    assert np.abs(jax_logits(model, adapted) - jax_logits(model, params)).max() > 1e-3
    assert jpeft.count_parameters(adapted)[0] == peft_model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("init", ["pissa_niter_16", "loftq", "corda"])
def test_adapters_whose_init_rewrites_the_base_weights_are_refused(tmp_path, init):
    """PEFT rewrites W when it loads these (a randomized SVD, a quantization, a data-driven SVD): loaded as a
    plain LoRA they would be silently off, so they are refused, naming the way to convert them."""
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    jpeft.save_adapter(str(tmp_path / "adapter"), jpeft.LoRA(rank=2, targets=["q_proj"]).init(jax.random.key(0), params))
    edit_adapter_config(tmp_path / "adapter", init_lora_weights=init)
    with pytest.raises(jpeft.AdapterError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        jpeft.load_adapter(str(tmp_path / "adapter"), params)


JPEFT_METHODS = {
    "dora": (jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "o_proj", "up_proj"], use_dora=True),
             ("lora_b", "lora_magnitude")),
    "layers": (jpeft.LoRA(rank=3, alpha=9, targets=["v_proj", "down_proj"], layers=[0]), ("lora_b",)),
    "regex-layer": (jpeft.LoRA(rank=2, alpha=4, targets=r"model\.layers\.1\.mlp\.(gate|up)_proj|lm_head"),
                    ("lora_b",)),
    "embed-head": (jpeft.LoRA(rank=4, alpha=8, targets=["embed_tokens", "lm_head"]), ("lora_a", "lora_b")),
    "dora-embed": (jpeft.LoRA(rank=4, alpha=8, targets=["embed_tokens", "v_proj"], use_dora=True),
                   ("lora_a", "lora_b", "lora_magnitude")),
    "rslora-patterns": (jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "k_proj"], use_rslora=True,
                                   rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 3}), ("lora_b",)),
    "ia3": (jpeft.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]), ("ia3_in", "ia3_out")),
    "vera-all-linear": (jpeft.VeRA(rank=8, targets="all-linear"), ("vera_lambda_d", "vera_lambda_b")),
    "loha-all-linear": (jpeft.LoHa(rank=4, alpha=8, targets="all-linear"), ("hada_w2_b",)),
    "lokr-all-linear": (jpeft.LoKr(rank=2, alpha=8, targets="all-linear"), ("lokr_w1",)),
    "lokr-decompose": (jpeft.LoKr(rank=1, alpha=2, targets=["k_proj", "gate_proj"], decompose_both=True,
                                  decompose_factor=2), ("lokr_w1_a",)),
    "oft-all-linear": (jpeft.OFT(block_size=8, targets="all-linear"), ("oft_R",)),
    "oft-rank-shared": (jpeft.OFT(rank=2, targets=["q_proj", "v_proj", "up_proj", "down_proj"], block_share=True),
                        ("oft_R",)),
    "oft-adjusted-exact": (jpeft.OFT(block_size=5, targets=["q_proj", "down_proj"], use_cayley_neumann=False),
                           ("oft_R",)),  # 5 divides no width: 4 and 8 blocks of 8, as PEFT adjusts it
    "hra-all-linear": (jpeft.HRA(4, targets="all-linear"), ("hra_u",)),
    "hra-gram-schmidt": (jpeft.HRA(2, ["q_proj", "down_proj"], gram_schmidt=True), ("hra_u",)),
}


@pytest.mark.parametrize("name", JPEFT_METHODS)
def test_jpeft_written_adapter_loads_in_peft(tmp_path, name):
    method, random_leaves = JPEFT_METHODS[name]
    torch_model = make_hf_model("llama")
    model, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    adapted = perturb(method.init(jax.random.key(0), params), random_leaves, jax.random.key(1))
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(jax_logits(model, adapted), torch_logits(peft_model), atol=2e-4, rtol=0)
    # ... and back: the directory loads into the same leaves (inactive layers aside)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(jax_logits(model, reloaded), jax_logits(model, adapted), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["pissa", "olora"])
def test_pissa_olora_init_as_peft_and_saved_for_the_original_base(tmp_path, scheme):
    torch_model = make_hf_model("llama")
    path = save_hf_model(torch_model, tmp_path / "base")
    original = {n: p.detach().clone() for n, p in torch_model.named_parameters()}
    targets = ["q_proj", "down_proj", "embed_tokens"]  # the embedding gets PEFT's plain embedding init
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=scheme)
    peft_model = peft.get_peft_model(make_hf_model("llama"), config)  # a copy of the same weights (same seed)
    model, params = jpeft.from_pretrained(path)
    adapted = jpeft.LoRA(rank=4, alpha=8, targets=targets, init=scheme).init(jax.random.key(0), params)
    q = adapted["model"]["layers"]["self_attn"]["q_proj"]
    for i in range(2):
        layer = peft_model.base_model.model.model.layers[i].self_attn.q_proj
        residual = layer.base_layer.weight.detach().numpy().T
        np.testing.assert_allclose(np.asarray(q["kernel"][i]), residual, atol=1e-5)
        product = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
        np.testing.assert_allclose(np.asarray(q["lora_a"][i] @ q["lora_b"][i]), product, atol=1e-5)
    # unchanged model at init; after "training" the saved adapter applies to the ORIGINAL base
    np.testing.assert_allclose(jax_logits(model, adapted), jax_logits(model, params), atol=1e-5)
    trained = perturb(adapted, ("lora_a", "lora_b"), jax.random.key(2), scale=0.05)
    jpeft.save_adapter(str(tmp_path / "adapter"), trained)
    reference = make_hf_model("llama")
    assert all(torch.equal(p, original[n]) for n, p in reference.named_parameters())
    loaded = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(loaded), jax_logits(model, trained), atol=2e-4, rtol=0)
    # PEFT's own unconverted directory (init_lora_weights=scheme): jpeft rewrites W on load as PEFT does
    perturb_torch(peft_model, ("lora_",), 0.02)
    peft_model.save_pretrained(tmp_path / "peft_dir")
    from_peft = jpeft.load_adapter(str(tmp_path / "peft_dir"), params)
    np.testing.assert_allclose(jax_logits(model, from_peft), torch_logits(peft_model.eval()), atol=2e-4, rtol=0)


@pytest.mark.parametrize("family,targets", [("llama", None), ("gemma", ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_bitfit_biases_export_as_an_hf_checkpoint(tmp_path, family, targets):
    """Biases BitFit added where the base has none switch on attention_bias (and Llama's mlp_bias) in config.json."""
    import transformers
    torch_model = make_hf_model(family, **({"head_dim": 8} if family == "gemma" else {}))
    model, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    method = jpeft.BitFit() if targets is None else jpeft.BitFit(targets=targets)
    trained = perturb(method.init(jax.random.key(0), params), ("bias",), jax.random.key(1))
    jpeft.save_pretrained(str(tmp_path / "out"), model, jpeft.merge(trained))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(reloaded), jax_logits(model, trained), atol=2e-4, rtol=0)
    partial = jpeft.BitFit(targets=["q_proj"]).init(jax.random.key(0), params)
    with pytest.raises(jpeft.CheckpointError, match="biases must cover all attention"):
        jpeft.save_pretrained(str(tmp_path / "bad"), model, partial)


def test_biases_a_family_has_no_switch_for_are_named(tmp_path):
    """Qwen3's config.json has attention_bias but no mlp_bias: BitFit's MLP biases cannot go into a checkpoint."""
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("qwen3", **FAMILIES["qwen3"]), tmp_path / "b"))
    with pytest.raises(jpeft.CheckpointError, match="qwen3 has no biases on down_proj, gate_proj, up_proj"):
        jpeft.save_pretrained(str(tmp_path / "out"), model, jpeft.merge(jpeft.BitFit().init(jax.random.key(0), params)))


FAMILY_METHODS = {  # each made with the family's names for Llama's projections (`family_targets`)
    "lora": (lambda names: jpeft.LoRA(rank=4, alpha=8, targets=names(["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"])),
             ("lora_b",)),
    "ia3": (lambda names: jpeft.IA3(targets=names(["k_proj", "v_proj", "down_proj"]), feedforward=names(["down_proj"])),
            ("ia3_in", "ia3_out")),
    # Gemma scales its embeddings (by sqrt(hidden)) after DoRA's rescaling, and ties its head to the bare table
    "dora-embed": (lambda names: jpeft.LoRA(rank=4, alpha=8, targets=names(["embed_tokens"]), use_dora=True),
                   ("lora_a", "lora_b", "lora_magnitude")),
    "vera": (lambda names: jpeft.VeRA(rank=4, targets=names(["q_proj", "o_proj", "up_proj"])),
             ("vera_lambda_d", "vera_lambda_b")),
    "loha": (lambda names: jpeft.LoHa(rank=2, alpha=5, targets=names(["k_proj", "down_proj"])), ("hada_w2_b",)),
}


# the mixtures' adapters on dense projections act on Llama's attention alone: Qwen2-MoE, whose shared expert adds
# dense MLP projections, stands for them here (their experts' LoRA: test_expert_lora.py)
ROUND_TRIP_FAMILIES = [f for f in FAMILIES
                       if f not in ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "granitemoeshared")]


@pytest.mark.parametrize("method", FAMILY_METHODS)
@pytest.mark.parametrize("family", ROUND_TRIP_FAMILIES)
def test_adapter_round_trip_for_each_family(tmp_path, family, method):
    """jpeft -> PEFT -> jpeft for Qwen3, Gemma 1/2/3, Granite, OLMo 2/3 and Phi-3 (its fused projections): the same
    logits on all three."""
    make, random_leaves = FAMILY_METHODS[method]
    init = make(lambda targets: family_targets(family, targets))
    torch_model = make_hf_model(family, **FAMILIES[family])
    model, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    adapted = perturb(init.init(jax.random.key(0), params), random_leaves, jax.random.key(1))
    assert np.abs(jax_logits(model, adapted) - jax_logits(model, params)).max() > 1e-4
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(jax_logits(model, adapted), torch_logits(peft_model), atol=2e-4, rtol=0)
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(jax_logits(model, reloaded), jax_logits(model, adapted), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,targets", [("gpt_neox", ["query_key_value", "dense_4h_to_h"]),
                                            ("phi", ["q_proj", "fc2"])])
def test_lora_gradients_in_a_parallel_block_equal_pefts(tmp_path, family, targets):
    """LoRA in GPT-NeoX's and Phi's parallel blocks (on NeoX's query_key_value, whose output splits by heads; under
    Phi's q/k LayerNorms) and on their MLPs: jpeft's loss and LoRA gradients are PeftModel's."""
    torch_model = make_hf_model(family, **FAMILIES[family])
    model, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    adapted = perturb(jpeft.LoRA(rank=4, alpha=8, targets=targets).init(jax.random.key(0), params), ("lora_b",),
                      jax.random.key(1))
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter", is_trainable=True)
    theirs = peft_model(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss
    theirs.backward()

    def loss(p):
        logits = model.apply({"params": p}, jnp.asarray(IDS))[:, :-1]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), IDS[:, 1:, None], -1).mean()
    ours, grads = jax.value_and_grad(loss)(adapted)
    np.testing.assert_allclose(float(ours), theirs.item(), atol=1e-5, rtol=0)
    grads, compared = T.flatten(grads), 0
    for name, p in peft_model.named_parameters():
        if match := re.fullmatch(r"base_model\.model\.(\w+)\.layers\.(\d+)\.(.+)\.lora_([AB])\.default\.weight", name):
            top, layer, module, factor = match.groups()
            path = f"{top}/layers/{module.replace('.', '/')}/lora_{factor.lower()}"
            np.testing.assert_allclose(np.asarray(grads[path][int(layer)]), p.grad.numpy().T, atol=1e-6, rtol=0)
            compared += 1
    assert compared == 2 * 2 * 2  # A and B of two modules in two layers


GPT2_ADAPTERS = {
    "lora": (jpeft.LoRA(rank=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"]), ("lora_b",)),
    "lora_mlp_c_proj": (jpeft.LoRA(rank=4, alpha=8, targets=["mlp.c_proj"]), ("lora_b",)),  # not attn.c_proj
    "ia3": (jpeft.IA3(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]), ("ia3_in", "ia3_out")),
    "vera": (jpeft.VeRA(rank=4, targets=["c_attn", "c_proj", "c_fc"]), ("vera_lambda_d", "vera_lambda_b")),
}


def peft_adapted(peft_model) -> set[str]:
    """The base modules PEFT wrapped with an adapter layer (their names in the base model)."""
    return {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
            if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer)}


def jpeft_adapted(params) -> set[str]:
    return {name for path, leaves in T.modules(params).items() if ADAPTER_LEAVES & set(leaves)
            for name in module_layers(path, leaves)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_all_linear_adapts_what_peft_adapts(tmp_path, family):
    """PEFT's `all-linear`: every dense layer (GPT-2's Conv1D too), neither embeddings nor the output head;
    as a string or a one-entry list (the command line's `method.targets=all-linear`)."""
    from conftest import GPT2
    torch_model = make_hf_model(family, **(GPT2 if family == "gpt2" else dict(tie_word_embeddings=False)))
    _, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules="all-linear"))
    for targets in ("all-linear", ["all-linear"]):
        adapted = jpeft.LoRA(rank=2, targets=targets).init(jax.random.key(0), params)
        assert jpeft_adapted(adapted) == peft_adapted(peft_model)
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in jpeft_adapted(adapted))


@pytest.mark.parametrize("method", GPT2_ADAPTERS)
def test_gpt2_adapter_round_trip(tmp_path, method):
    """Adapters on GPT-2's Conv1D projections (fused c_attn): jpeft -> PEFT (fan_in_fan_out) -> jpeft, and merge."""
    from conftest import GPT2
    init, random_leaves = GPT2_ADAPTERS[method]
    torch_model = make_hf_model("gpt2", **GPT2)
    model, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    adapted = perturb(init.init(jax.random.key(0), params), random_leaves, jax.random.key(1))
    assert np.abs(jax_logits(model, adapted) - jax_logits(model, params)).max() > 1e-3
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].fan_in_fan_out  # as jpeft wrote it: PEFT would warn otherwise
    assert peft_adapted(peft_model) == jpeft_adapted(adapted)  # target_modules select no other module
    np.testing.assert_allclose(jax_logits(model, adapted), torch_logits(peft_model), atol=2e-4, rtol=0)
    ours = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(jax_logits(model, ours), jax_logits(model, adapted), atol=1e-5, rtol=0)
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(jax_logits(model, reloaded), jax_logits(model, adapted), atol=1e-5, rtol=0)
    np.testing.assert_allclose(jax_logits(model, jpeft.merge(adapted)), jax_logits(model, adapted), atol=1e-4, rtol=0)


def test_exclude_modules_that_leave_nothing_are_refused(tmp_path):
    torch_model = make_hf_model("llama")
    _, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    edit_adapter_config(tmp_path / "a", exclude_modules=["self_attn.q_proj"])
    with pytest.raises(jpeft.AdapterError, match=r"target_modules \['q_proj'\] less exclude_modules "
                                                 r"\['self_attn.q_proj'\] leave no module of this base"):
        jpeft.load_adapter(str(tmp_path / "a"), params)


def test_a_layers_pattern_that_numbers_layers_otherwise_is_refused(tmp_path):
    torch_model = make_hf_model("llama")
    _, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0],
                                                     layers_pattern="layers")).save_pretrained(tmp_path / "a")
    edit_adapter_config(tmp_path / "a", layers_pattern=["blocks"])
    with pytest.raises(jpeft.AdapterError, match=r"layers_pattern \['blocks'\] numbers the layers of model.layers.0"):
        jpeft.load_adapter(str(tmp_path / "a"), params)
