"""Next-token rows: batching and packing's bin filling (tokenized rows: test_tokenize.py)."""
import itertools

import numpy as np
import pytest

from jpeft.data import Examples, batches
from jpeft.data.examples import _best_fit
from jpeft.errors import DataError


def examples(n, seq_len=3):
    ids = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    return Examples(ids, ids + 1, np.ones((n, seq_len), np.float32), np.ones_like(ids))


def test_batches_deterministic_and_cover_each_epoch():
    ex = examples(10)
    a = list(itertools.islice(batches(ex, 3, seed=1), 7))
    b = list(itertools.islice(batches(ex, 3, seed=1), 7))
    c = list(itertools.islice(batches(ex, 3, seed=2), 7))
    assert all(x["input_ids"].shape == (3, 3) for x in a)
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c))
    rows = np.concatenate([x["input_ids"][:, 0] for x in a[:3]]) // 3
    assert len(set(rows.tolist())) == 9  # one epoch: 3 batches, no repeats
    assert set(a[0]) == {"input_ids", "labels", "loss_mask", "attention_mask"}


def test_batches_resume_equals_skipping():
    ex = examples(10)
    full = list(itertools.islice(batches(ex, 3, seed=0), 8))
    resumed = list(itertools.islice(batches(ex, 3, seed=0, start_step=5), 3))
    for x, y in zip(full[5:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_need_enough_examples():
    with pytest.raises(DataError, match="only 2 rows for batches of 3; add data or lower the batch size"):
        next(batches(examples(2), 3, seed=0))


def test_best_fit_fills_rows_without_overflow():
    lengths = list(np.random.default_rng(0).integers(1, 50, 200))
    bins = _best_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 64) * 1.1  # within 10% of the bound: best fit packs tightly
    assert bins == _best_fit(lengths, 64)
