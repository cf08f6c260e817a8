"""Prompt and prefix tuning on GPT-2 as PEFT's CAUSAL_LM methods do them, both ways against PeftModel: logits
of padded batches and greedy tokens.

What peft 0.21 with transformers 5 computes on GPT-2 (the first test pins it): prompt tuning prepends the
soft prompt to `inputs_embeds`, and GPT2Model adds the learned positions 0..n+T-1 to the whole sequence, so
the virtual tokens get positions 0..n-1 and the real tokens n..; prefix tuning passes the prefixes as n
past keys/values per head (after c_attn's split), so GPT2Model counts the real tokens' positions from n.
PEFT prepends n ones to the attention mask either way. Without `position_ids` GPT-2 numbers padded rows by
slot, pads included, in transformers and in jpeft alike.
"""
import jax
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import jpeft
from jpeft import tree as T
from jpeft.generate import generate
from conftest import GPT2, jit_logits, make_hf_model, save_hf_model

N = 3
IDS = np.random.RandomState(0).randint(0, 97, (3, 7))
MASK = np.ones_like(IDS)
MASK[1, :2] = 0  # left padding
MASK[2, 5:] = 0  # right padding
VALID = MASK.astype(bool)  # a pad position's logits are never used
PEFT_CONFIGS = {"prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
                "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                             encoder_hidden_size=8),
                "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
                "prefix-projected": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                                    prefix_projection=True, encoder_hidden_size=8)}
METHODS = {"prompt": lambda: jpeft.PromptTuning(N), "p_tuning": lambda: jpeft.PTuning(N, projection=8),
           "prefix": lambda: jpeft.PrefixTuning(N),
           "prefix-projected": lambda: jpeft.PrefixTuning(N, projection=8)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Weights N(0, 0.2²): at GPT-2's 0.02 the tiny tied head only ever repeats the last token."""
    return save_hf_model(make_hf_model("gpt2", **GPT2, initializer_range=0.2), tmp_path_factory.mktemp("base") / "gpt2")


def torch_base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def randomised(peft_model):
    """PEFT's prompt encoder N(0, 1) throughout (its projection's linear layers too, so no part is near zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
    return peft_model


def theirs(peft_model, name):
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    return logits[:, N:] if name in ("prompt", "p_tuning") else logits  # PEFT returns a soft prompt's positions too


def ours(model, params):
    return jit_logits(model, params, IDS, MASK)


def assert_same_logits(model, params, peft_model, name):
    np.testing.assert_allclose(ours(model, params)[VALID], theirs(peft_model, name)[VALID], atol=2e-4, rtol=0)


def test_what_peft_computes_on_gpt2(base):
    """PeftModel's logits are GPT-2's with the soft prompt's embeddings first at positions 0..n-1 (prompt
    tuning), or with the prefix as n past keys/values per head and the real tokens at positions n..
    (prefix tuning); numbering the real tokens from 0 instead changes them."""
    mask = torch.cat([torch.ones(len(IDS), N, dtype=torch.long), torch.tensor(MASK)], 1)
    ids, t = torch.tensor(IDS), IDS.shape[1]
    prompt = randomised(peft.get_peft_model(torch_base(base), PEFT_CONFIGS["prompt"]()).eval())
    prefix = randomised(peft.get_peft_model(torch_base(base), PEFT_CONFIGS["prefix"]()).eval())
    gpt2 = torch_base(base)
    cfg = gpt2.config
    with torch.no_grad():
        soft = prompt.prompt_encoder["default"].embedding.weight
        embeds = torch.cat([soft.expand(len(IDS), -1, -1), gpt2.transformer.wte(ids)], 1)
        restarted = torch.cat([torch.arange(N), torch.arange(t)])[None]  # what PEFT does not do
        for positions, same in ((torch.arange(N + t)[None], True), (restarted, False)):
            logits = gpt2(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, N:]
            assert np.allclose(logits[VALID], theirs(prompt, "prompt")[VALID], atol=1e-5) == same

        # PEFT's [n, layers·2·D] rows: layer l's keys are block 2l, its values block 2l+1, each split into heads
        blocks = prefix.prompt_encoder["default"].embedding.weight.view(N, 2 * cfg.n_layer, cfg.n_head, -1)
        for positions, same in ((N + torch.arange(t)[None], True), (torch.arange(t)[None], False)):
            cache = DynamicCache(config=cfg)
            for layer in range(cfg.n_layer):
                k, v = (blocks[:, 2 * layer + i].transpose(0, 1)[None].expand(len(IDS), -1, -1, -1) for i in (0, 1))
                cache.update(k.contiguous(), v.contiguous(), layer)
            logits = gpt2(input_ids=ids, attention_mask=mask, cache=cache, position_ids=positions).logits
            assert np.allclose(logits[VALID], theirs(prefix, "prefix")[VALID], atol=1e-5) == same


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_written_adapter_gives_peft_logits(tmp_path, base, name):
    peft_model = randomised(peft.get_peft_model(torch_base(base), PEFT_CONFIGS[name]()).eval())
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert np.abs(ours(model, adapted) - ours(model, params))[VALID].max() > 1e-2
    assert_same_logits(model, adapted, peft_model, name)


@pytest.mark.parametrize("name", METHODS)
def test_jpeft_written_adapter_gives_the_same_logits_in_peft(tmp_path, base, name):
    """Random prompts/prefixes (PEFT's N(0, 1) init): PEFT counts the same trainable parameters, loads the
    dir with jpeft's logits (a projection's prefixes folded), and the dir reloads in jpeft."""
    model, params = jpeft.from_pretrained(base)
    adapted = METHODS[name]().init(jax.random.key(1), params)
    if name == "prompt":  # drawn from the embedding table: scaled up, so a misplaced position shows
        flat = T.flatten(adapted)
        flat["transformer/wte/soft_prompt"] = 20 * flat["transformer/wte/soft_prompt"]
        adapted = T.unflatten(flat)
    fresh = peft.get_peft_model(torch_base(base), PEFT_CONFIGS[name]())
    assert jpeft.count_parameters(adapted)[0] == fresh.get_nb_trainable_parameters()[0]
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(base), str(tmp_path / "adapter")).eval()
    assert_same_logits(model, adapted, peft_model, name.split("-")[0])
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(ours(model, reloaded), ours(model, adapted), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_greedy_generation_is_token_identical_to_peft(tmp_path, base, name):
    """jpeft's KV-cache generate (the shorter prompt left-padded, its positions counted from its first token)
    against greedy decoding through PeftModel's forward pass on each prompt alone (PeftModel.generate with its
    cache does not decode these correctly with peft 0.21 and transformers 5: see the README)."""
    peft_model = randomised(peft.get_peft_model(torch_base(base), PEFT_CONFIGS[name]()).eval())
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert_greedy_as_peft(model, params, adapted, peft_model)


def assert_greedy_as_peft(model, params, adapted, peft_model, steps: int = 10):
    """jpeft's greedy tokens for a full and a shorter (left-padded) prompt are those of greedy decoding through
    PeftModel's forward pass on each prompt alone, and differ from the base's."""
    prompts = [IDS[0].tolist(), IDS[1, 3:].tolist()]
    got = generate(model, adapted, prompts, max_new_tokens=steps, eos_token_id=None)
    for prompt, tokens in zip(prompts, got):
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(steps):
                sequence.append(int(peft_model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
        assert tokens == sequence[len(prompt):]
    assert got != generate(model, params, prompts, max_new_tokens=steps, eos_token_id=None)  # the adapter matters
