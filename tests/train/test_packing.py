"""Packed rows: attention never crosses examples, positions restart, and the loss (with the LM head on
loss positions only) equals that of one padded row per example, in value and gradients."""
import jax
import numpy as np
import pytest

import jpeft
from jpeft import tree as T
from jpeft.models.config import ModelConfig
from jpeft.models.llama import CausalLM, init_params
from jpeft.train.step import token_loss

LENGTHS, WIDTH = (5, 7, 3), 20


def tiny(window=None, alibi=None):
    """A tiny Llama; with `alibi` ("bloom"), ALiBi's biases instead of RoPE."""
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=window, tie_word_embeddings=True,
                      alibi=alibi, partial_rotary_factor=0.0 if alibi else 1.0)
    model = CausalLM(cfg)
    return model, init_params(model, jax.random.key(0))


def batches():
    """The three examples packed into one row, and the same as three right-padded rows."""
    rng = np.random.default_rng(0)
    examples = [rng.integers(0, 64, n + 1) for n in LENGTHS]
    packed = {k: np.zeros((1, WIDTH), np.int32) for k in ("input_ids", "labels", "attention_mask", "positions")}
    packed["loss_mask"] = np.zeros((1, WIDTH), np.float32)
    plain = {k: np.zeros((3, WIDTH), v.dtype) for k, v in packed.items() if k != "positions"}
    at = 0
    for i, ex in enumerate(examples):
        n, loss = len(ex) - 1, (np.arange(len(ex) - 1) >= 1).astype(np.float32)  # loss after the first token
        for b, row, start, segment in ((packed, 0, at, i + 1), (plain, i, 0, 1)):
            span = slice(start, start + n)
            b["input_ids"][row, span], b["labels"][row, span] = ex[:-1], ex[1:]
            b["attention_mask"][row, span], b["loss_mask"][row, span] = segment, loss
        packed["positions"][0, at:at + n] = np.arange(n)
        at += n
    return packed, plain


@pytest.mark.parametrize("method", ["none", "prompt", "prefix", "window", "window+prompt", "window+prefix", "alibi",
                                    "alibi+prompt", "alibi+prefix"])
def test_packed_examples_see_only_themselves(method):
    """... and, in a sliding window, as many virtual tokens as alone (not fewer for being packed further on); under
    ALiBi each example's keys are as far from the virtual ones as alone."""
    model, params = tiny(window=4 if method.startswith("window") else None,
                         alibi="bloom" if method.startswith("alibi") else None)
    if method.endswith(("prompt", "prefix")):  # virtual tokens: every packed example sees them, as it would alone
        m = jpeft.PromptTuning(3) if method.endswith("prompt") else jpeft.PrefixTuning(3)
        params = m.init(jax.random.key(1), params)
    packed, plain = batches()
    apply = jax.jit(model.apply)
    together = apply({"params": params}, packed["input_ids"], packed["attention_mask"], packed["positions"])
    alone = apply({"params": params}, plain["input_ids"], plain["attention_mask"])
    at = 0
    for i, n in enumerate(LENGTHS):
        np.testing.assert_allclose(together[0, at:at + n], alone[i, :n], rtol=2e-5, atol=2e-5)
        at += n


def test_packed_loss_and_loss_only_head_equal_padded_rows():
    model, params = tiny()
    params = jpeft.LoRA(rank=2, targets=["q_proj", "v_proj", "embed_tokens"]).init(jax.random.key(1), params)
    params = jax.tree.map(lambda x: x + 0.01 if x.ndim == 2 and x.shape[0] == 2 else x, params)  # nonzero B
    packed, plain = batches()
    k = 16
    indexed = {**packed, "loss_index": np.argsort(packed["loss_mask"] <= 0, axis=1, kind="stable")[:, :k]
               .astype(np.int32)}
    mask = jpeft.LoRA(rank=2, targets=["q_proj", "v_proj", "embed_tokens"]).mask(params)
    trainable, frozen = T.partition(params, mask)

    @jax.jit
    def loss_and_grad(batch):
        f = lambda tr: token_loss(model, T.combine(tr, frozen), batch)
        return jax.value_and_grad(f, has_aux=True)(trainable)

    (want, n_want), g_want = loss_and_grad(plain)
    for batch in (packed, indexed):
        (got, n_got), g_got = loss_and_grad(batch)
        assert float(n_got) == float(n_want) == sum(n - 1 for n in LENGTHS)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_trainer_packs_supervised_rows(tiny_run, tmp_path):
    from conftest import run_config
    from jpeft.train.trainer import load_tokenizer, prepare
    cfg = run_config(tiny_run, tmp_path, "train.seq_len=512")
    tok = load_tokenizer(cfg.model.path)
    packed = prepare(cfg, cfg.data.train, tok)
    plain = prepare(run_config(tiny_run, tmp_path, "train.seq_len=512", "data.packing=false"), cfg.data.train, tok)
    assert packed.positions is not None and len(packed) < len(plain) and packed.loss_index is not None
    assert packed.loss_mask.sum() == plain.loss_mask.sum() and plain.positions is None
