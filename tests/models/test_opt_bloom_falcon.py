"""OPT, BLOOM, Falcon and MPT beyond the parity cases every family has: OPT's, BLOOM's and MPT's positions, which are
not RoPE's (a learned table, ALiBi's biases), counted over the attention mask; PEFT's virtual tokens before them (and
before Falcon's multi-query keys); OPT-350m's projected embeddings under PEFT's `all-linear`; a run config's defaults;
each against transformers and PEFT. (Their classifier heads: tests/peft/test_classifier.py.)"""
import jax
import numpy as np
import peft
import pytest
import torch

import jpeft
from conftest import FAMILIES, OPT_350M, jit_logits, make_hf_model, perturb, save_hf_model

LAYOUTS = {"opt": ("opt", FAMILIES["opt"]), "opt-350m": ("opt", OPT_350M), "bloom": ("bloom", FAMILIES["bloom"]),
           "mpt": ("mpt", FAMILIES["mpt"])}  # MPT counts by slot: the same scores up to a row's constant
IDS = np.random.RandomState(0).randint(3, 97, (3, 10))
MASK = np.ones_like(IDS)
MASK[1, :4] = 0  # left padding: transformers' OPT and BLOOM start the row's positions at its first token
MASK[2, 7:] = 0  # right padding


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_rows_count_their_positions_over_the_mask(tmp_path, layout):
    ref = make_hf_model(LAYOUTS[layout][0], **LAYOUTS[layout][1], initializer_range=0.2)
    model, params = jpeft.from_pretrained(save_hf_model(ref, tmp_path))
    ours, theirs = jit_logits(model, params, IDS, MASK), torch_logits(ref, IDS, MASK)
    real = MASK.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=2e-5, rtol=0)
    if layout.startswith("opt"):  # by slot instead, the left-padded row's positions would be 4 off: guards the above
        by_slot = jit_logits(model, params, IDS, MASK, np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape))
        assert np.abs(by_slot[1, 4:] - theirs[1, 4:]).max() > 1e-3


def test_opt_350m_all_linear_lora_adapts_its_projections_as_peft_does(tmp_path):
    """PEFT's `all-linear` on OPT-350m takes project_in and project_out too; the adapter goes both ways."""
    ref = make_hf_model("opt", **OPT_350M)
    model, params = jpeft.from_pretrained(save_hf_model(ref, tmp_path / "base"))
    adapted = perturb(jpeft.LoRA(rank=2, alpha=4, targets="all-linear").init(jax.random.key(0), params), ("lora_b",),
                      jax.random.key(1))
    adapted_modules = {path.rsplit("/", 2)[-2] for path in jpeft.tree.flatten(adapted) if path.endswith("/lora_a")}
    assert adapted_modules == {"project_in", "project_out", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    reference = peft.get_peft_model(make_hf_model("opt", **OPT_350M), peft.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = lambda m: {n.rsplit(".", 1)[-1] for n, module in m.named_modules()
                         if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert wrapped(reference) == wrapped(peft_model) == adapted_modules
    ours = jit_logits(model, adapted, IDS)
    np.testing.assert_allclose(ours, torch_logits(peft_model, IDS), atol=2e-4, rtol=0)
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(jit_logits(model, reloaded, IDS), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["opt", "bloom", "falcon", "mpt"])
@pytest.mark.parametrize("config,trained", [
    (lambda **dims: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **dims), 4),  # positions 0..3
    (lambda **dims: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **dims), 0),  # tokens' at 4
])
def test_peft_virtual_tokens_sit_before_the_tokens_positions(tmp_path, family, config, trained):
    """PEFT's soft prompt gets positions of its own (OPT's added to it; BLOOM's embedding norm over it too); after a
    prefix the tokens' positions start past it: jpeft reads PEFT's adapter with PeftModel's logits, and writes one
    PEFT reads with jpeft's."""
    ref = make_hf_model(family, **FAMILIES[family], initializer_range=0.2)
    path = save_hf_model(ref, tmp_path / "base")
    # PEFT finds no head count in MPT's config (n_heads): a PEFT user gives the sizes
    dims = dict(num_layers=2, token_dim=32, num_attention_heads=4) if family == "mpt" else {}
    peft_model = peft.get_peft_model(ref, config(**dims)).eval()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(path)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    ours = jit_logits(model, adapted, IDS)
    np.testing.assert_allclose(ours, torch_logits(peft_model, IDS)[:, trained:], atol=2e-4, rtol=0)
    assert np.abs(ours - jit_logits(model, params, IDS)).max() > 1e-3
    changed = perturb(adapted, ("soft_prompt", "prefix_k", "prefix_v"), jax.random.key(3), 0.5)  # not PEFT's values
    jpeft.save_adapter(str(tmp_path / "ours"), changed)
    theirs = peft.PeftConfig.from_pretrained(tmp_path / "ours")  # PEFT fills the sizes jpeft leaves null ...
    theirs.__dict__.update(dims)  # ... save MPT's, as the PEFT user gives them
    peft_model = peft.PeftModel.from_pretrained(make_hf_model(family, **FAMILIES[family], initializer_range=0.2),
                                                tmp_path / "ours", config=theirs).eval()
    np.testing.assert_allclose(torch_logits(peft_model, IDS)[:, trained:], jit_logits(model, changed, IDS), atol=2e-4,
                               rtol=0)


@pytest.mark.parametrize("family", ["opt", "bloom", "falcon", "mpt", "codegen"])
def test_a_run_configs_unset_targets_are_pefts(tmp_path, family):
    """LoRA's and IA3's (peft.utils.constants): OPT's q_proj and v_proj, and q_proj, k_proj and fc2; BLOOM's
    query_key_value, and it with mlp.dense_4h_to_h; MPT's Wqkv and CodeGen's qkv_proj, and Llama's IA3 (PEFT has none
    for either) by their names."""
    from peft.utils import constants
    from jpeft.config import load_config
    from jpeft.train.build import build_method
    path = save_hf_model(make_hf_model(family, **FAMILIES[family]), tmp_path / "base")
    lora = build_method(load_config(None, ["method.name=lora", f"model.path={path}"]))
    assert list(lora.targets) == constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[family]
    ia3 = build_method(load_config(None, ["method.name=ia3", f"model.path={path}"]))
    llama = {"mpt": (["Wqkv", "down_proj"], ["down_proj"]),  # k_proj, v_proj, down_proj
             "codegen": (["qkv_proj", "fc_out"], ["fc_out"])}.get(family, (None, None))
    assert list(ia3.targets) == constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(family, llama[0])
    assert list(ia3.feedforward) == constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(family,
                                                                                                        llama[1])
