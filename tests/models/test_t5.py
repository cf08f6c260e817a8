"""T5 v1.0, T5 v1.1 / FLAN-T5, mT5, UMT5: logits equal transformers' T5ForConditionalGeneration (MT5's, UMT5's),
checkpoints round-trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jpeft
from conftest import make_t5
from jpeft.models.t5 import relative_buckets

CASES = {"t5-v1.0": ("t5-v1.0", False), "flan-t5": ("flan-t5", False), "flan-t5-own-head": ("flan-t5", True),
         "mt5": ("mt5", False), "mt5-own-head": ("mt5", True),  # mT5: never scaled, its hub files' own head
         "umt5-own-head": ("umt5", True)}  # UMT5: each block's own position-bias table


def rows(encoder_len=11, decoder_len=7, seed=0):
    rng = np.random.RandomState(seed)
    ids, dec = rng.randint(2, 97, (2, encoder_len)), rng.randint(2, 97, (2, decoder_len))
    mask = np.ones_like(ids)
    mask[1, encoder_len - 3:] = 0  # the second row's encoder input is padded
    return ids, dec, mask


def torch_logits(model, ids, dec, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def jax_logits(model, params, ids, dec, mask):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    ref, model_dir = make_t5(tmp_path, *CASES[case])
    model, params = jpeft.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings is not CASES[case][1]
    batch = rows()
    np.testing.assert_allclose(jax_logits(model, params, *batch), torch_logits(ref, *batch), atol=2e-4, rtol=0)


def test_a_tied_files_exact_copy_of_the_embedding_is_the_tied_head(tmp_path):
    """T5 v1.0 converted with every tensor name kept: its lm_head.weight is shared.weight again, and transformers
    ties the two into one matrix; so does jpeft (full fine-tuning trains one table, a merge reaches both)."""
    from safetensors.numpy import load_file, save_file
    _, model_dir = make_t5(tmp_path, "t5-v1.0")
    weights = load_file(f"{model_dir}/model.safetensors")
    save_file({**weights, "lm_head.weight": weights["shared.weight"].copy()}, f"{model_dir}/model.safetensors",
              metadata={"format": "pt"})
    ref = transformers.T5ForConditionalGeneration.from_pretrained(model_dir)
    assert ref.lm_head.weight.data_ptr() == ref.shared.weight.data_ptr()
    model, params = jpeft.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings and "lm_head" not in params
    batch = rows()
    np.testing.assert_allclose(jax_logits(model, params, *batch), torch_logits(ref.eval(), *batch), atol=2e-4, rtol=0)


def test_decoder_rows_longer_than_an_attention_block_match_transformers(tmp_path):
    ref, model_dir = make_t5(tmp_path, "flan-t5")
    model, params = jpeft.from_pretrained(model_dir)
    batch = rows(encoder_len=20, decoder_len=150)  # causal query blocks of 128, each with its bias slice
    np.testing.assert_allclose(jax_logits(model, params, *batch), torch_logits(ref, *batch), atol=2e-4, rtol=0)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_are_transformers_buckets(bidirectional):
    relative = np.arange(-300, 300)[None, :]
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.tensor(relative), bidirectional, 32, 128).numpy()
    np.testing.assert_array_equal(np.asarray(relative_buckets(jnp.asarray(relative), bidirectional, 32, 128)), want)


@pytest.mark.parametrize("case", ["t5-v1.0", "flan-t5-own-head", "mt5-own-head", "umt5-own-head"])
def test_save_pretrained_loads_in_transformers(case, tmp_path):
    model, params = jpeft.from_pretrained(make_t5(tmp_path / "in", *CASES[case])[1])
    params = jax.tree.map(lambda x: x * 1.01, params)  # not the file it came from
    jpeft.save_pretrained(str(tmp_path / "out"), model, params)
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == {"mt5": "MT5", "umt5": "UMT5"}.get(case.split("-")[0], "T5") + \
        "ForConditionalGeneration"
    batch = rows(seed=1)
    np.testing.assert_allclose(torch_logits(reloaded, *batch), jax_logits(model, params, *batch), atol=2e-4, rtol=0)



def hf_generate(ref, prompts, new, eos):
    """transformers' greedy generate (encoder input left-padded, as jpeft pads), cut before the first EOS."""
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new if eos is None else 0, eos_token_id=eos, pad_token_id=0)
    rows = out[:, 1:].tolist()  # after the decoder start token
    return [row[:row.index(eos)] if eos in row else row for row in rows]


@pytest.mark.parametrize("case", ["t5-v1.0", "flan-t5-own-head", "mt5", "umt5-own-head"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    """Encoder once, decoder self- and cross-attention from the cache: the same tokens as transformers."""
    from jpeft.generate import generate
    # transformers' generate sizes its cache by the encoder's depth, so here both stacks have 2 blocks
    ref, model_dir = make_t5(tmp_path, *CASES[case], num_decoder_layers=2)
    model, params = jpeft.from_pretrained(model_dir)
    prompts = [[5, 17, 33, 8, 61], [12, 40, 3, 77, 9, 26, 50, 14, 88], [70, 2, 45]]
    unstopped = hf_generate(ref, prompts, 12, None)
    assert generate(model, params, prompts, 12, eos_token_id=None) == unstopped
    eos = unstopped[1][4]  # a token greedy decoding emits, so stopping is exercised
    assert generate(model, params, prompts, 12, eos_token_id=eos) == hf_generate(ref, prompts, 12, eos)


def test_the_encoder_reads_prompts_longer_than_n_positions(tmp_path):
    """Relative positions have no end: as transformers does, T5 encodes a prompt past `n_positions` (a
    decoder-only model's limit), and evaluation does not cut it to make room for the new tokens."""
    from jpeft.evaluate import predict
    from jpeft.generate import generate
    ref, model_dir = make_t5(tmp_path, "flan-t5", num_decoder_layers=2, n_positions=16)
    model, params = jpeft.from_pretrained(model_dir)
    prompts = [list(range(3, 30)), [5, 17, 33]]
    assert generate(model, params, prompts, 6, eos_token_id=None) == hf_generate(ref, prompts, 6, None)

    class Words:  # token i is the word f"w{i}"
        bos_token_id, eos_token_id, pad_token_id = None, 1, 0
        __call__ = lambda self, texts, add_special_tokens: {"input_ids": [[int(w[1:]) for w in t.split()] for t in texts]}
        batch_decode = lambda self, rows, skip_special_tokens: [" ".join(f"w{t}" for t in r) for r in rows]
    rows = [{"p": " ".join(f"w{t}" for t in prompts[0])}]
    [expected] = hf_generate(ref, prompts[:1], 12, 1)
    assert predict(model, params, Words(), rows, "{p}", 12) == [" ".join(f"w{t}" for t in expected)]


def test_a_soft_prompt_meets_the_encoders_input_without_pads_between(tmp_path):
    """generate right-pads an encoder's input: left pads would sit between the soft prompt and the text and shift
    T5's relative positions (1.0 logits off before). Each row of a batch decodes as its prompt alone does,
    token by token through the forward pass."""
    from jpeft.generate import generate
    # FLAN-T5's 32 buckets up to distance 128: pads between prompt and text move them into other buckets
    _, model_dir = make_t5(tmp_path, "flan-t5", num_decoder_layers=2, relative_attention_num_buckets=32,
                           relative_attention_max_distance=128)
    model, params = jpeft.from_pretrained(model_dir)
    prompted = jpeft.PromptTuning(4).init(jax.random.key(0), params)
    prompts = [[5, 17, 33, 8, 61, 1], [12, 40, 3]]
    got = generate(model, prompted, prompts, 8, eos_token_id=None)
    # the decoder is causal: its input right-padded to one length, position i's logits are those of decoded[:i + 1]
    forward = jax.jit(lambda ids, decoded: model.apply({"params": prompted}, ids, decoded))
    for prompt, tokens in zip(prompts, got):
        decoded = [model.config.decoder_start_token_id] + [0] * 8
        for i in range(8):
            logits = forward(jnp.asarray([prompt]), jnp.asarray([decoded]))
            decoded[i + 1] = int(jnp.argmax(logits[0, i]))
        assert tokens == decoded[1:]
