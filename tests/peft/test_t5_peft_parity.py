"""PEFT's adapters on FLAN-T5 (encoder and decoder, cross-attention, position-bias tables, soft prompts before the
encoder input), both ways against PyTorch PEFT: the same logits from the same adapter dir."""
import jax
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from jpeft.generate import generate
from jpeft.peft.base import layer_names
from conftest import jit_logits, make_t5, perturb
from test_peft_parity import jpeft_adapted, peft_adapted, perturb_torch


def t5_logits(model, params, ids, dec):
    return jit_logits(model, params, ids, dec)


def torch_t5_logits(model, ids, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits.numpy()


T5_ADAPTERS = {  # PEFT's module names for T5
    "lora": (jpeft.LoRA(rank=4, alpha=8, targets=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]), ("lora_b",)),
    "ia3": (jpeft.IA3(targets=["k", "v", "wo"], feedforward=["wo"]), ("ia3_in", "ia3_out")),
    "lora_self_attention_q": (jpeft.LoRA(rank=4, alpha=8, targets=["SelfAttention.q"]), ("lora_b",)),  # not EncDec
    # each stack's position-bias table, an embedding PEFT adapts (A starts at zero there)
    "lora_position_bias": (jpeft.LoRA(rank=4, alpha=8, targets=["relative_attention_bias", "q"]),
                           ("lora_a", "lora_b")),
    "vera": (jpeft.VeRA(rank=4, targets=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]), ("vera_lambda_d", "vera_lambda_b")),
    "loha": (jpeft.LoHa(rank=2, alpha=3, targets=["q", "v", "wi_1", "wo"]), ("hada_w2_b",)),
    "lokr": (jpeft.LoKr(rank=2, alpha=3, targets=["k", "o", "wi_0", "wo"]), ("lokr_w1",)),
    "oft": (jpeft.OFT(block_size=8, targets=["q", "v", "wi_1", "wo"]), ("oft_R",)),
    "hra": (jpeft.HRA(3, ["k", "o", "wi_0", "wo"], gram_schmidt=True), ("hra_u",)),
}


@pytest.mark.parametrize("variant,method", [("flan-t5", method) for method in T5_ADAPTERS]
                         + [("mt5", "lora"), ("umt5", "lora_position_bias")])
def test_t5_adapter_round_trip(tmp_path, variant, method):
    """jpeft -> PEFT -> jpeft on FLAN-T5 (and mT5, UMT5's position tables in every block): the same logits on all
    three, adapters on encoder and decoder."""
    init, random_leaves = T5_ADAPTERS[method]
    ref, model_dir = make_t5(tmp_path / "base", variant)
    model, params = jpeft.from_pretrained(model_dir)
    adapted = perturb(init.init(jax.random.key(0), params), random_leaves, jax.random.key(1))
    rng = np.random.RandomState(0)
    batch = rng.randint(2, 97, (2, 11)), rng.randint(2, 97, (2, 7))
    assert np.abs(t5_logits(model, adapted, *batch) - t5_logits(model, params, *batch)).max() > 1e-4
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    names = peft_adapted(peft_model)
    assert names == jpeft_adapted(adapted)  # target_modules select no other module
    assert any(n.startswith("encoder.") for n in names) and any(n.startswith("decoder.") for n in names)
    assert any("EncDecAttention" in n for n in names) == (method != "lora_self_attention_q")
    np.testing.assert_allclose(t5_logits(model, adapted, *batch), torch_t5_logits(peft_model, *batch), atol=2e-4,
                               rtol=0)
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(t5_logits(model, reloaded, *batch), t5_logits(model, adapted, *batch), atol=1e-5,
                               rtol=0)
    merged = jpeft.merge(adapted)
    np.testing.assert_allclose(t5_logits(model, merged, *batch), t5_logits(model, adapted, *batch), atol=1e-4, rtol=0)


def test_ia3_feedforward_entries_are_plain_name_endings_as_in_peft(tmp_path):
    """PEFT reads a feedforward_modules list entry as a plain ending, not a dotted suffix: on T5 "o" makes
    `DenseReluDense.wo` feed-forward too (its ia3_l scales the input)."""
    ref, model_dir = make_t5(tmp_path / "base", "flan-t5")
    targets, feedforward = r".*(SelfAttention\.(k|v|o)|wo)", ["o"]
    peft_model = peft.get_peft_model(ref, peft.IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=targets,
                                                         feedforward_modules=feedforward)).eval()
    perturb_torch(peft_model, ("ia3_l",), 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(model_dir)
    loaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    rng = np.random.RandomState(0)
    batch = rng.randint(2, 97, (2, 11)), rng.randint(2, 97, (2, 7))
    np.testing.assert_allclose(t5_logits(model, loaded, *batch), torch_t5_logits(peft_model, *batch), atol=2e-4,
                               rtol=0)
    peft_inputs = {n.removeprefix("base_model.model.").removesuffix(".ia3_l.default")
                   for n, p in peft_model.named_parameters() if "ia3_l" in n and p.shape[0] == 1}
    ours = jpeft.IA3(targets, feedforward).init(None, params)
    assert {n for path, leaves in T.modules(ours).items() if "ia3_in" in leaves
            for n in layer_names(path, np.shape(leaves["ia3_in"])[0])} == peft_inputs


@pytest.mark.parametrize("method", [jpeft.PromptTuning(num_virtual_tokens=3), jpeft.PTuning(3, projection=8)],
                         ids=lambda m: m.name)
def test_t5_prompt_tuning_round_trip(tmp_path, method):
    """Soft prompts (P-tuning's encoded one too) before T5's encoder input, as PEFT's SEQ_2_SEQ_LM prompt tuning:
    padded batches give PEFT's logits and greedy tokens, and the adapter survives jpeft -> PEFT -> jpeft."""
    ref, model_dir = make_t5(tmp_path / "base", "flan-t5", num_decoder_layers=2)  # HF generates only at equal depths
    model, params = jpeft.from_pretrained(model_dir)
    adapted = method.init(jax.random.key(0), params)
    rng = np.random.RandomState(0)
    ids, dec = rng.randint(2, 97, (2, 11)), rng.randint(2, 97, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # HF pads T5 inputs on the right

    def ours(p):
        return jit_logits(model, p, ids, dec, mask)

    assert np.abs(ours(adapted) - ours(params)).max() > 1e-3
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].num_transformer_submodules == 2
    assert peft_model.peft_config["default"].peft_type == method.peft_type
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(ours(adapted), theirs, atol=2e-4, rtol=0)
    prompt = [list(ids[0])]
    with torch.no_grad():  # PEFT's own generate fails on seq2seq prompt tuning: feed HF its encoder input
        soft = peft_model.get_prompt(batch_size=1)[:, :3]
        embeds = torch.cat([soft, ref.get_input_embeddings()(torch.tensor(prompt))], dim=1)
        expected = ref.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False, eos_token_id=None)
    got = generate(model, adapted, prompt, 6, eos_token_id=None)[0]
    assert got == expected[0, 1:].tolist()  # HF's output starts with the decoder start token
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    # P-tuning's file holds its prompt as encoded outside the compiled model: float32 rounding apart
    np.testing.assert_allclose(ours(reloaded), ours(adapted), atol=1e-6 if method.name == "prompt" else 3e-5, rtol=0)
