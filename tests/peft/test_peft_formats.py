"""PEFT formats that map onto jpeft methods adding no leaves of their own, or training the base's, both ways against
PyTorch PEFT: LN tuning (jpeft's norm tuning), AdaLoRA (read as the LoRA it computes), LoRA's `bias`."""
import jax
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from conftest import FAMILIES, edit_adapter_config, make_hf_model, make_t5, save_hf_model
from jpeft.peft.hf_format import adapter_mask
from test_peft_parity import IDS, jax_logits, perturb_torch, torch_logits
from test_t5_peft_parity import t5_logits, torch_t5_logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3", "cohere", "stablelm", "gpt_neox", "phi", "gptj",
                                    "codegen", "opt", "bloom", "falcon", "starcoder2", "mpt", "t5"])
def test_norm_tuning_is_pefts_ln_tuning_both_ways(tmp_path, family):
    """PEFT's LN tuning dir, read and written: its default norms per family (a LayerNorm's bias too) trained
    -> the same logits in jpeft; jpeft's norm tuning -> PeftModel -> jpeft."""
    from conftest import GPT2
    if family == "t5":
        fresh = lambda: make_t5(tmp_path / "base", "flan-t5")
        batch = np.random.RandomState(0).randint(2, 97, (2, 11)), np.random.RandomState(1).randint(2, 97, (2, 7))
        ours, theirs = (lambda model, p: t5_logits(model, p, *batch)), (lambda m: torch_t5_logits(m, *batch))
    else:
        overrides = GPT2 if family == "gpt2" else FAMILIES.get(family, {})
        fresh = lambda: (ref := make_hf_model(family, **overrides), save_hf_model(ref, tmp_path / "base"))
        ours, theirs = jax_logits, torch_logits
    ref, path = fresh()
    task = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
    # PEFT has no default norms for Cohere, StableLM, GPT-NeoX, CodeGen, OPT, StarCoder2 and MPT: their blocks' first
    # norm (one in a parallel block; GPT-NeoX's has two) and the final one (OPT's final_layer_norm names the MLP's
    # norm in each layer too)
    targets = {"cohere": ["input_layernorm", "norm"], "stablelm": ["input_layernorm", "norm"],
               "gpt_neox": ["input_layernorm", "final_layer_norm"],
               "opt": ["self_attn_layer_norm", "final_layer_norm"],
               "starcoder2": ["input_layernorm", "norm"], "mpt": ["norm_1", "norm_f"],
               "codegen": ["ln_1", "ln_f"]}.get(family)
    peft_model = peft.get_peft_model(ref, peft.LNTuningConfig(task_type=task, target_modules=targets)).eval()
    perturb_torch(peft_model, ("ln_tuning_layers",), 0.3)
    peft_model.save_pretrained(tmp_path / "from_peft")
    model, params = jpeft.from_pretrained(path)
    loaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(ours(model, loaded), theirs(peft_model), atol=2e-4, rtol=0)
    method = jpeft.NormTuning()
    mask = T.flatten(method.mask(params))
    trained = T.unflatten({p: v * 1.3 if mask[p] else v for p, v in T.flatten(params).items()})
    assert np.abs(ours(model, trained) - ours(model, params)).max() > 1e-3
    jpeft.save_adapter(str(tmp_path / "adapter"), trained, method=method)
    peft_back = peft.PeftModel.from_pretrained(fresh()[0], tmp_path / "adapter").eval()
    np.testing.assert_allclose(theirs(peft_back), ours(model, trained), atol=2e-4, rtol=0)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(ours(model, reloaded), ours(model, trained), atol=1e-6, rtol=0)


def test_adalora_dir_reads_as_the_lora_it_computes(tmp_path):
    """A pruned AdaLoRA dir (PEFT's own training, ranks left differing between layers, one pruned away): the
    same logits as its PeftModel, merged too, and written back as a LoRA dir PEFT reads to the same logits."""
    torch_model = make_hf_model("llama")
    config = peft.AdaLoraConfig(init_r=6, target_r=1, tinit=1, tfinal=1, deltaT=1, total_step=6, lora_alpha=8,
                                target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(torch_model, config)
    optimizer = torch.optim.SGD(peft_model.parameters(), lr=0.5)
    ids = torch.tensor(IDS)
    for step in range(6):  # AdaLoRA's own schedule prunes singular values as it trains
        peft_model(ids, labels=ids).loss.backward()
        peft_model.base_model.update_and_allocate(step)
        optimizer.step()
        optimizer.zero_grad()
    perturb_torch(peft_model, ("lora_",), 0.5)  # six small steps leave the factors near their init
    peft_model.save_pretrained(tmp_path / "adalora")  # the kept rows only
    ranks = sorted(sum(mask) for mask in peft_model.peft_config["default"].rank_pattern.values())
    assert ranks[0] == 0 and ranks[-1] >= 2, ranks  # a module pruned away, and layers of unequal ranks
    peft_model = peft.PeftModel.from_pretrained(make_hf_model("llama"), tmp_path / "adalora").eval()
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    loaded = jpeft.load_adapter(str(tmp_path / "adalora"), params)
    np.testing.assert_allclose(jax_logits(model, loaded), torch_logits(peft_model), atol=2e-4, rtol=0)
    assert np.abs(jax_logits(model, loaded) - jax_logits(model, params)).max() > 1e-3
    np.testing.assert_allclose(jax_logits(model, jpeft.merge(loaded)), jax_logits(model, loaded), atol=1e-5, rtol=0)
    jpeft.save_adapter(str(tmp_path / "lora"), loaded)
    as_lora = peft.PeftModel.from_pretrained(make_hf_model("llama"), tmp_path / "lora").eval()
    assert as_lora.peft_config["default"].peft_type == "LORA"
    np.testing.assert_allclose(torch_logits(as_lora), jax_logits(model, loaded), atol=2e-4, rtol=0)


@pytest.mark.parametrize("family,bias", [("qwen2", "lora_only"), ("qwen2", "all"), ("gpt2", "all")])
def test_lora_bias_trains_the_bases_biases_as_peft_does(tmp_path, family, bias):
    """PEFT's `bias`: "lora_only" trains the adapted modules' biases (saved under their `base_layer`), "all" every
    parameter named a bias (Qwen2's k/v biases beside, GPT-2's LayerNorms' too): jpeft reads PEFT's dir with its
    logits, trains as many parameters, and writes (given the method) a dir PEFT reads with jpeft's logits."""
    from conftest import GPT2
    sizes, targets = (GPT2, ["c_attn"]) if family == "gpt2" else ({}, ["q_proj", "o_proj"])
    ref = make_hf_model(family, **sizes)
    path = save_hf_model(ref, tmp_path / "base")
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=targets, bias=bias,
                                                          fan_in_fan_out=family == "gpt2"))
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.add_(0.3 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "from_peft")
    model, params = jpeft.from_pretrained(path)
    loaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(jax_logits(model, loaded), torch_logits(peft_model), atol=2e-4, rtol=0)
    method = jpeft.LoRA(rank=2, targets=targets, bias=bias)
    mask = T.flatten(method.mask(loaded))
    assert mask == T.flatten(adapter_mask(str(tmp_path / "from_peft"), loaded))  # what resumed training trains
    assert sum(int(np.size(v)) for p, v in T.flatten(loaded).items() if mask[p]) == sum(p.numel() for p in trained)
    changed = T.unflatten({p: v * 1.5 if mask[p] else v for p, v in T.flatten(loaded).items()})
    jpeft.save_adapter(str(tmp_path / "ours"), changed, method=method)
    reread = peft.PeftModel.from_pretrained(make_hf_model(family, **sizes), tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(reread), jax_logits(model, changed), atol=2e-4, rtol=0)
    assert np.abs(jax_logits(model, changed) - jax_logits(model, loaded)).max() > 1e-3


def test_lora_bias_choices_jpeft_cannot_honour_are_refused(tmp_path):
    """A bias mode PEFT lacks; "lora_only" where only some layers of a stack are adapted (PEFT trains those layers'
    biases alone, jpeft a stack's whole); biases beside a mixture's experts; a non-LoRA dir's bias."""
    with pytest.raises(jpeft.JpeftError, match="LoRA bias must be one of none, all, lora_only"):
        jpeft.LoRA(bias="yes")
    with pytest.raises(jpeft.JpeftError, match="bias='lora_only' with layers"):
        jpeft.LoRA(bias="lora_only", layers=[0])
    with pytest.raises(jpeft.JpeftError, match="takes no bias 'all'"):
        jpeft.LoRA(bias="all", target_parameters=["mlp.experts.down_proj"])
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("qwen2"), tmp_path / "base"))
    layer_0 = jpeft.LoRA(targets=r"model\.layers\.0\.self_attn\.q_proj", bias="lora_only")
    with pytest.raises(jpeft.JpeftError, match="q_proj, adapted in only some of its layers"):
        layer_0.mask(layer_0.init(jax.random.key(0), params))
    jpeft.save_adapter(str(tmp_path / "ia3"), jpeft.IA3().init(jax.random.key(0), params))
    edit_adapter_config(tmp_path / "ia3", bias="all")
    with pytest.raises(jpeft.AdapterError, match="bias='all' IA3 adapters are not supported"):
        jpeft.load_adapter(str(tmp_path / "ia3"), params)
