"""LLaMA-Adapter on GPT-2 as PEFT's adaption prompt computes it for model_type gpt2 (peft 0.21,
AdaptedAttentionGPT), both ways against PeftModel: logits of padded batches, greedy tokens, zero gates.

What PEFT does there (the first test pins it with an independent computation): the prompt goes through the
layer's fused c_attn (bias included) and its key and value thirds are split into heads; the queries are
the layer's own (c_attn's first third of its input); the gated softmax result is added to the
attention module's output, after c_proj, without passing through c_proj. The prompt sees no mask, so padding
changes nothing of it. Only the top `adapter_layers` attention modules are wrapped.
"""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from conftest import GPT2, make_hf_model, save_hf_model
from test_gpt2_virtual import IDS, MASK, VALID, assert_greedy_as_peft, ours, torch_base

LEN, LAYERS = 4, 2
GATE = "transformer/h/attn/adaption_gate"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Three layers (two adapted); weights N(0, 0.2²): at GPT-2's 0.02 the tiny tied head only ever repeats
    the last token, so greedy decoding would compare nothing."""
    model = make_hf_model("gpt2", **GPT2, num_hidden_layers=3, initializer_range=0.2)
    return save_hf_model(model, tmp_path_factory.mktemp("base") / "gpt2")


def peft_model_with_random_gates(path):
    """PEFT's adaption prompt with its prompts as initialised (N(0, 1)) and gates N(0, 1) instead of 0."""
    torch.manual_seed(0)
    model = peft.get_peft_model(torch_base(path), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=LEN,
                                                                            adapter_layers=LAYERS)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.normal_()
    return model


def theirs(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def with_random_gates(params, key):
    flat = T.flatten(params)
    flat[GATE] = jax.random.normal(key, flat[GATE].shape)
    return T.unflatten(flat)


def test_what_peft_computes_on_gpt2(base):
    """PeftModel's logits are GPT-2's with gate·softmax(q·kᵀ/√d)·v added to each adapted attention output,
    k and v the prompt's c_attn thirds (bias included), q the layer's own; the same through c_proj is not."""
    peft_model = peft_model_with_random_gates(base)
    gpt2 = torch_base(base)
    heads, dim = gpt2.config.n_head, gpt2.config.n_embd // gpt2.config.n_head
    adapted = {i: peft_model.base_model.model.transformer.h[i].attn for i in (1, 2)}

    def logits(through_c_proj: bool):
        def hook(layer):
            def add(attn, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                q = attn.c_attn(x).split(attn.split_size, dim=2)[0]
                _, k, v = attn.c_attn(adapted[layer].adaption_prompt).split(attn.split_size, dim=2)
                q, k, v = (a.view(a.shape[0], -1, heads, dim).transpose(1, 2) for a in (q, k, v))
                probs = adapted[layer].adaption_gate * torch.softmax(q @ k.transpose(2, 3) / dim ** 0.5, -1)
                delta = (probs @ v).transpose(1, 2).reshape(*x.shape)
                return (output[0] + (attn.c_proj(delta) if through_c_proj else delta), *output[1:])
            return add

        handles = [gpt2.transformer.h[i].attn.register_forward_hook(hook(i), with_kwargs=True) for i in adapted]
        try:
            return theirs(gpt2)
        finally:
            for h in handles:
                h.remove()

    reference = theirs(peft_model)
    assert np.abs(reference - theirs(torch_base(base)))[VALID].max() > 1e-2
    np.testing.assert_allclose(logits(False)[VALID], reference[VALID], atol=1e-5, rtol=0)
    assert not np.allclose(logits(True)[VALID], reference[VALID], atol=1e-3)


def test_peft_written_adapter_gives_peft_logits(tmp_path, base):
    peft_model = peft_model_with_random_gates(base)
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert np.asarray(T.flatten(adapted)["transformer/h/attn/adaption_layers"]).tolist() == [0, 1, 1]
    assert np.abs(ours(model, adapted) - ours(model, params))[VALID].max() > 1e-2
    np.testing.assert_allclose(ours(model, adapted)[VALID], theirs(peft_model)[VALID], atol=2e-4, rtol=0)


def test_jpeft_written_adapter_gives_the_same_logits_in_peft(tmp_path, base):
    """PEFT counts the same trainable parameters, reads the dir (target_modules `attn`) with jpeft's logits,
    and the dir reloads in jpeft."""
    model, params = jpeft.from_pretrained(base)
    adapted = with_random_gates(jpeft.LlamaAdapter(LEN, LAYERS).init(jax.random.key(1), params), jax.random.key(2))
    fresh = peft.get_peft_model(torch_base(base), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=LEN,
                                                                            adapter_layers=LAYERS))
    assert jpeft.count_parameters(adapted)[0] == fresh.get_nb_trainable_parameters()[0] == LAYERS * (LEN * 32 + 1)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(base), str(tmp_path / "adapter")).eval()
    assert peft_model.peft_config["default"].target_modules == "attn"
    np.testing.assert_allclose(theirs(peft_model)[VALID], ours(model, adapted)[VALID], atol=2e-4, rtol=0)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(ours(model, reloaded), ours(model, adapted), atol=1e-6, rtol=0)


def test_greedy_generation_is_token_identical_to_peft(tmp_path, base):
    """jpeft's KV-cache generate (the shorter prompt left-padded) against greedy decoding through PeftModel's
    forward pass on each prompt alone."""
    peft_model = peft_model_with_random_gates(base)
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert_greedy_as_peft(model, params, adapted, peft_model)


def test_zero_gates_leave_the_model_unchanged_and_still_learn(base):
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.LlamaAdapter(LEN, LAYERS).init(jax.random.key(0), params)
    np.testing.assert_allclose(ours(model, adapted), ours(model, params), atol=1e-6, rtol=0)
    trainable, frozen = T.partition(adapted, jpeft.trainable_mask(adapted))
    grads = jax.grad(lambda tr: model.apply({"params": T.combine(tr, frozen)}, jnp.asarray(IDS)).std())(trainable)
    gate = np.asarray(T.flatten(grads)[GATE])[:, 0]
    assert gate[0] == 0 and np.all(gate[1:] != 0)  # only the top two layers are adapted
