"""Prefix tuning on T5 as PEFT's SEQ_2_SEQ_LM does it, both ways against PeftModel: logits of padded
batches and greedy tokens.

What PEFT 0.21 computes (tests below check it through the logits): its prefixes reach the decoder's
self-attention only, as past key values (none in the encoder or cross-attention); it stores
`num_layers` blocks (the encoder's depth by default) and decoder layer j reads block 2j mod
num_layers. The reference for decoding is greedy decoding through PeftModel's forward pass:
PeftModel.generate drops the prefix with its KV cache (transformers 5 keeps the `cache` that
generate built over PEFT's `past_key_values`) and, with use_cache=False, has it at the first step only.
"""
import jax
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft.generate import generate
from conftest import jit_logits, make_t5

N = 3
rng = np.random.RandomState(0)
IDS, DEC = rng.randint(2, 97, (2, 9)), rng.randint(2, 97, (2, 6))
MASK, DEC_MASK = np.ones_like(IDS), np.ones_like(DEC)
MASK[1, 6:] = 0  # HF pads T5 inputs on the right
DEC_MASK[1, 4:] = 0
# (base sizes, PEFT's num_layers, projection): layers that share a block (PEFT's default num_layers, the
# encoder's depth), and a decoder deeper than the encoder, which PEFT runs only with num_layers set to its depth.
CASES = {"shared-blocks": (dict(num_decoder_layers=2), None, None),
         "deeper-decoder-projected": (dict(), 3, 8)}


def base(tmp_path, sizes):
    return make_t5(tmp_path / "base", "flan-t5", own_head=True, **sizes)  # an own head: greedy tokens vary


def ours(model, params):
    return jit_logits(model, params, IDS, DEC, MASK, DEC_MASK)


def theirs(peft_model):
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                          decoder_input_ids=torch.tensor(DEC), decoder_attention_mask=torch.tensor(DEC_MASK)
                          ).logits.numpy()


def assert_same_logits(model, params, peft_model):
    valid = DEC_MASK.astype(bool)  # a padded decoder query's logits are never used
    np.testing.assert_allclose(ours(model, params)[valid], theirs(peft_model)[valid], atol=2e-4, rtol=0)


def assert_same_greedy_tokens(model, params, peft_model, new=8):
    """jpeft's KV-cache generate (one row left-padded) against greedy decoding through PeftModel's forward."""
    prompts = [IDS[0].tolist(), IDS[1, :6].tolist()]
    got = generate(model, params, prompts, new, eos_token_id=None)
    for prompt, tokens in zip(prompts, got):
        sequence = [model.config.decoder_start_token_id]
        with torch.no_grad():
            for _ in range(new):
                logits = peft_model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([sequence])).logits
                sequence.append(int(logits[0, -1].argmax()))
        assert tokens == sequence[1:]


@pytest.mark.parametrize("case", CASES)
def test_peft_written_prefix_gives_peft_logits_and_tokens(tmp_path, case):
    sizes, num_layers, projection = CASES[case]
    ref, model_dir = base(tmp_path, sizes)
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, num_layers=num_layers,
                                     prefix_projection=projection is not None, encoder_hidden_size=projection or 32)
    peft_model = peft.get_peft_model(ref, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(model_dir)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert np.abs(ours(model, adapted) - ours(model, params)).max() > 1e-2
    assert_same_logits(model, adapted, peft_model)
    assert_same_greedy_tokens(model, adapted, peft_model)


# Two decoder layers reading one block; the projection's MLP; attention narrower than d_model (FLAN-T5-small's
# 6 heads of 64 beside d_model 512), where PEFT's default token_dim (d_model) does not fit and jpeft writes heads·d_kv.
TO_PEFT = {"shared-blocks": (dict(num_decoder_layers=2), None), "projected": (dict(num_decoder_layers=2), 8),
           "narrow-attention": (dict(num_decoder_layers=2, d_kv=6), None)}


@pytest.mark.parametrize("case", TO_PEFT)
def test_jpeft_written_prefix_gives_the_same_logits_and_tokens_in_peft(tmp_path, case):
    """Trained blocks tied as PEFT ties them: PEFT loads the dir with jpeft's logits and tokens, counts
    the same trainable parameters, and the dir reloads in jpeft."""
    sizes, projection = TO_PEFT[case]
    ref, model_dir = base(tmp_path, sizes)
    model, params = jpeft.from_pretrained(model_dir)
    adapted = jpeft.PrefixTuning(N, projection=projection).init(jax.random.key(0), params)  # N(0, 1), random MLP
    attention = adapted["decoder"]["block"]["layer_0"]["SelfAttention"]
    assert "prefix_layers" in attention and "prefix_k" not in adapted["encoder"]["block"]["layer_0"]["SelfAttention"]
    width = ref.config.num_heads * ref.config.d_kv
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, token_dim=width,
                                     prefix_projection=projection is not None, encoder_hidden_size=projection or width)
    fresh = peft.get_peft_model(make_t5(tmp_path / "fresh", "flan-t5", **sizes)[0], config)
    assert jpeft.count_parameters(adapted)[0] == fresh.get_nb_trainable_parameters()[0]
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].num_transformer_submodules == 2
    assert_same_logits(model, adapted, peft_model)
    assert_same_greedy_tokens(model, adapted, peft_model)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(ours(model, reloaded), ours(model, adapted), atol=1e-5, rtol=0)


def test_blocks_a_deeper_decoder_would_miss_are_refused(tmp_path):
    _, shallow = jpeft.from_pretrained(make_t5(tmp_path / "shallow", "flan-t5", num_decoder_layers=2)[1])
    jpeft.save_adapter(str(tmp_path / "adapter"), jpeft.PrefixTuning(N).init(jax.random.key(0), shallow))
    _, deeper = jpeft.from_pretrained(make_t5(tmp_path / "deeper", "flan-t5")[1])  # 3 decoder layers
    with pytest.raises(jpeft.AdapterError, match="num_layers=2 blocks but the decoder has 3 layers.*num_layers >= 3"):
        jpeft.load_adapter(str(tmp_path / "adapter"), deeper)
