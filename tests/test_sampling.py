"""Sampling: seeded, its top-k and nucleus filters as transformers' warpers (at every step, at the nucleus edge,
for large logits), each row's draw independent of how the prompts are batched."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from conftest import jit_logits
from jpeft.generate import generate
from test_generate import NEW, PROMPTS


def test_sampling_is_seeded_and_filtered(sharp_llama):
    model, params = sharp_llama
    greedy = generate(model, params, PROMPTS, NEW, eos_token_id=None)
    sample = lambda seed, **kw: generate(model, params, PROMPTS, NEW, None, temperature=1.0, seed=seed, **kw)
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(3, top_k=1) == greedy
    assert sample(3, top_p=1e-6) == greedy

    # First token of 64 copies of one prompt: always among the top 3, yet not always the same.
    prompt = PROMPTS[1]
    logits = jit_logits(model, params, np.array([prompt]))[0, -1]
    top3 = set(np.argsort(-logits)[:3].tolist())
    first = [row[0] for row in generate(model, params, [prompt] * 64, 1, None, temperature=2.0, top_k=3)]
    assert set(first) <= top3 and len(set(first)) > 1
    # top_p: only the smallest set of most likely tokens whose probability reaches p.
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[:np.searchsorted(np.cumsum(probs[order]), 0.2) + 1].tolist())
    first = [row[0] for row in generate(model, params, [prompt] * 64, 1, None, temperature=1.0, top_p=0.2)]
    assert set(first) <= nucleus


def test_every_sampled_token_is_among_the_top_k(sharp_llama):
    """At every step, not only the first: each token is one of the k most likely after its prefix."""
    model, params = sharp_llama
    prompt, k = PROMPTS[0], 3
    rows = generate(model, params, [prompt] * 16, 6, None, temperature=3.0, top_k=k, top_p=0.95, seed=1)
    logits = jit_logits(model, params, np.array([prompt + row for row in rows]))
    for row, row_logits in zip(rows, logits):
        for i, token in enumerate(row):
            assert token in np.argsort(-row_logits[len(prompt) - 1 + i])[:k]
    assert len({tuple(row) for row in rows}) > 1  # it does sample
    greedy = generate(model, params, PROMPTS, NEW, eos_token_id=None)
    assert all(generate(model, params, PROMPTS, NEW, None, temperature=5.0, top_k=1, seed=s) == greedy
               for s in range(3))
    vocab = model.config.vocab_size  # a top_k beyond the vocabulary ranks the whole vocabulary
    assert (generate(model, params, PROMPTS, NEW, None, temperature=1.0, top_k=vocab + 50)
            == generate(model, params, PROMPTS, NEW, None, temperature=1.0, top_k=vocab))


@pytest.mark.parametrize("logits,top_k,temperature,top_p", [
    ([[3, 2, 1, 1, 1, 0]], 3, 1.0, 1.0),  # ties with the k-th are kept
    ([[3, 2, 1, 1, 1, 0]], 3, 1.0, 0.9),  # ... and the nucleus takes as many of them as it needs
    ([[3, 2, 1, 1, 1, 0]], 0, 1.0, 0.8),
    (np.round(np.random.RandomState(0).normal(size=(4, 50)), 1), 5, 0.7, 0.9),
    (np.round(np.random.RandomState(1).normal(size=(4, 50)), 0), 4, 1.0, 0.95),
    (np.round(np.random.RandomState(2).normal(size=(4, 50)), 1), 0, 1.3, 0.5),
    (np.round(np.random.RandomState(3).normal(size=(4, 50)), 1), 10, 2.0, 1.0),
])
def test_sampling_distribution_is_transformers_warpers(logits, top_k, temperature, top_p):
    """softmax of the warped logits = transformers' Temperature -> TopK -> TopP warpers', up to which of
    equally likely tokens the nucleus keeps (compared sorted)."""
    from transformers.generation import logits_process as lp

    from jpeft.generate import _candidates, warp
    logits = np.asarray(logits, np.float32)
    ref = lp.TemperatureLogitsWarper(temperature)(None, torch.tensor(logits))
    for warper, used in ((lp.TopKLogitsWarper(max(top_k, 1)), top_k), (lp.TopPLogitsWarper(top_p), top_p < 1)):
        ref = warper(None, ref) if used else ref
    ref = torch.softmax(ref, -1).numpy()
    got = np.asarray(jax.nn.softmax(warp(jnp.asarray(logits), _candidates(temperature, top_k, top_p, logits.shape[1]),
                                         jnp.float32(temperature), jnp.float32(top_p)), -1))
    np.testing.assert_allclose(np.sort(got, -1), np.sort(ref, -1), atol=1e-6)


@pytest.mark.parametrize("logits,top_p,kept", [
    ([[0, 0, 0, 0]], 0.25, [3]),  # equally likely tokens at the nucleus edge: the highest ids stay, as
    ([[2, 2, 1, 0, 2, 0, 0]], 0.5, [1, 4]),  # torch's ascending sort leaves them in rows this short
])
def test_nucleus_edge_is_transformers(logits, top_p, kept):
    from transformers.generation import logits_process as lp

    from jpeft.generate import warp
    logits = np.asarray(logits, np.float32)
    ref = lp.TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
    got = np.asarray(warp(jnp.asarray(logits), logits.shape[1], jnp.float32(1.0), jnp.float32(top_p)))
    assert np.flatnonzero(np.isfinite(ref[0])).tolist() == kept == np.flatnonzero(np.isfinite(got[0])).tolist()


@pytest.mark.parametrize("gap", [0.3, 1.0])
def test_nucleus_mass_of_large_logits_is_exact(gap):
    """Scaled logits near 3000 (a low temperature): the nucleus is summed from the maximum, so a top_p 3e-6 either
    side of the top token's probability keeps one token or two, as float64 says."""
    from jpeft.generate import warp
    logits = np.array([[3000.0, 3000.0 - gap, 2990.0]], np.float32)
    top = 1 / np.exp(np.logaddexp.reduce(logits[0].astype(np.float64) - logits[0, 0]))
    for eps, kept in ((3e-6, 2), (-3e-6, 1)):
        got = warp(jnp.asarray(logits), 3, jnp.float32(1.0), jnp.float32(top + eps))
        assert int(np.isfinite(np.asarray(got)).sum()) == kept


def test_sampled_rows_do_not_depend_on_batching(sharp_llama):
    """Each row's key comes from the seed and its index among all prompts, not its place in a batch."""
    from jpeft.generate import generate_text
    model, params = sharp_llama
    tokenizer = type("T", (), {"eos_token_id": None, "pad_token_id": 0,
                               "batch_decode": lambda self, rows, **_: [str(r) for r in rows]})()
    prompts = [PROMPTS[1]] * 6
    by_2, by_6 = (generate_text(model, params, tokenizer, prompts, NEW, batch_size=b, temperature=1.0, seed=3)
                  for b in (2, 6))
    assert by_2 == by_6 and len(set(by_6)) > 1
    for bad in (dict(temperature=float("nan")), dict(temperature=1.0, top_k=2.5)):
        with pytest.raises(jpeft.JpeftError, match="finite temperature >= 0, an integer top_k"):
            generate(model, params, PROMPTS, NEW, None, **bad)
