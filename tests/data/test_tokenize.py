import json
import logging

import numpy as np
import pytest

from jpeft.data import Examples, encode_prompts, render, template_columns, tokenize_supervised, tokenize_text
from jpeft.errors import ConfigError, DataError

ROWS = [{"dialogue": "a cat sat on the mat", "summary": "cat sat"},
        {"dialogue": "hello world", "summary": "we go out today"}]
PROMPT, TARGET = "summarize the dialogue : {dialogue}", "{summary}"


def masked_text(tok, ex, i):
    return tok.decode(ex.labels[i][ex.loss_mask[i] == 1])


def test_supervised_mask_covers_target_and_eos(tokenizer):
    ex = tokenize_supervised(ROWS, tokenizer, PROMPT, TARGET, seq_len=16)
    assert ex.input_ids.shape == ex.labels.shape == ex.loss_mask.shape == (2, 16)
    assert (ex.input_ids.dtype, ex.labels.dtype, ex.loss_mask.dtype, ex.attention_mask.dtype) == \
        (np.int32, np.int32, np.float32, np.int32)
    for i, row in enumerate(ROWS):
        assert masked_text(tokenizer, ex, i) == row["summary"] + " </s>"
        n = 1 + len(f"summarize the dialogue : {row['dialogue']} {row['summary']}".split()) + 1
        assert ex.attention_mask[i].sum() == n  # EOS is an input too (its label is padding)
        assert ex.input_ids[i, 0] == tokenizer.bos_token_id
        assert ex.input_ids[i, n - 1] == tokenizer.eos_token_id
        assert (ex.input_ids[i, n:] == tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(ex.labels[:, :-1], ex.input_ids[:, 1:])  # shifted by one
    assert ex.n_truncated == 0


def test_supervised_left_truncation_keeps_bos_and_prompt_end(tokenizer, caplog):
    rows = [{"dialogue": "a cat sat on the mat and then the dog ran to the park", "summary": "cat sat"},
            ROWS[1]]
    with caplog.at_level(logging.WARNING, logger="jpeft.data"):
        ex = tokenize_supervised(rows, tokenizer, PROMPT, TARGET, seq_len=11)
    assert ex.n_truncated == 1
    assert "1 of 2 rows" in caplog.text
    seq = list(ex.input_ids[0]) + [ex.labels[0, -1]]
    assert seq[0] == tokenizer.bos_token_id
    assert tokenizer.decode(seq[1:]) == "and then the dog ran to the park cat sat </s>"
    assert masked_text(tokenizer, ex, 0) == "cat sat </s>"


def test_long_target_cut_on_the_right_to_half(tokenizer):
    rows = [{"dialogue": "hello", "summary": "a cat sat on the mat and then the dog ran home"}]
    ex = tokenize_supervised(rows, tokenizer, PROMPT, TARGET, seq_len=8)
    assert ex.n_truncated == 1
    assert masked_text(tokenizer, ex, 0) == "a cat sat on"  # seq_len // 2 tokens, no EOS
    assert tokenizer.decode(ex.input_ids[0]) == "<s> the dialogue : hello a cat sat"


def test_pad_falls_back_to_eos(tokenizer_without_pad):
    tok = tokenizer_without_pad
    ex = tokenize_supervised(ROWS[:1], tok, PROMPT, TARGET, seq_len=16)
    assert ex.input_ids[0, -1] == tok.eos_token_id


def test_text_packing_shapes_and_windows(tokenizer):
    rows = [{"t": "a cat sat"}, {"t": "hello world it is sunny today"}, {"t": "we go out"}]
    ex = tokenize_text(rows, tokenizer, "{t}", seq_len=4)
    stream = [i for r in rows for i in tokenizer(r["t"])["input_ids"] + [tokenizer.eos_token_id]]
    n = (len(stream) - 1) // 4
    assert ex.input_ids.shape == (n, 4) and len(ex) == n
    assert ex.loss_mask.all() and ex.attention_mask.all()
    flat = np.concatenate([ex.input_ids.ravel(), ex.labels[-1:, -1]])
    assert flat.tolist() == stream[:n * 4 + 1]  # every next-token pair trained once
    np.testing.assert_array_equal(ex.labels[:-1, -1], ex.input_ids[1:, 0])


def test_text_unpacked_pads_and_cuts(tokenizer):
    rows = [{"t": "a cat"}, {"t": "hello world it is sunny today we go out"}]
    ex = tokenize_text(rows, tokenizer, "{t}", seq_len=6, pack=False)
    assert ex.input_ids.shape == (2, 6) and ex.n_truncated == 1
    assert tokenizer.decode(ex.labels[0][ex.loss_mask[0] == 1]) == "a cat </s>"
    assert ex.loss_mask[1].all()


def test_text_too_short_to_pack(tokenizer):
    with pytest.raises(DataError, match="seq_len"):
        tokenize_text([{"t": "a cat"}], tokenizer, "{t}", seq_len=64)


def test_encode_prompts_left_truncates(tokenizer):
    ids = encode_prompts(ROWS, tokenizer, PROMPT, max_len=5)
    assert tokenizer.decode(ids[0]) == "<s> sat on the mat"
    assert tokenizer.decode(ids[1]) == "<s> dialogue : hello world"


def test_a_tokenizer_that_appends_eos_leaves_one_eos_per_example():
    """With `<s> $A </s>` (add_eos_token) the prompt does not carry its EOS into the target, a text ends
    with one EOS, a decoder's generation prompt ends without one and an encoder's input keeps it."""
    from conftest import make_tokenizer
    tok = make_tokenizer(eos=True)
    ex = tokenize_supervised(ROWS[:1], tok, PROMPT, TARGET, seq_len=16)
    assert tok.decode(ex.input_ids[0][ex.attention_mask[0] == 1]) == \
        "<s> summarize the dialogue : a cat sat on the mat cat sat </s>"
    assert masked_text(tok, ex, 0) == "cat sat </s>"
    text = tokenize_text([{"t": "a cat sat"}], tok, "{t}", seq_len=8, pack=False)
    assert tok.decode(text.labels[0][text.loss_mask[0] == 1]) == "a cat sat </s>"
    assert tok.decode(encode_prompts(ROWS[1:], tok, "{dialogue}", None)[0]) == "<s> hello world"
    assert tok.decode(encode_prompts(ROWS[1:], tok, "{dialogue}", None, continued=False)[0]) == "<s> hello world </s>"
    assert tok.decode(encode_prompts(ROWS[1:], tok, "<s> {dialogue}", None)[0]) == "<s> hello world"  # one BOS


def test_seq2seq_prompts_end_with_the_tokenizers_one_eos():
    """T5's tokenizer appends EOS: an encoder input that fits keeps that one EOS (as tokenizer(prompt) has it),
    and one cut to fit ends with EOS again."""
    from conftest import make_tokenizer
    from jpeft.data import tokenize_seq2seq
    tok = make_tokenizer(bos=False, eos=True)
    rows = [{"p": "hello world", "t": "a cat"}, {"p": "we go out " * 8, "t": "home " + "the dog ran " * 6}]
    ex = tokenize_seq2seq(rows, tok, "{p}", "{t}", seq_len=16, start_id=0)
    first = ex.input_ids[0][ex.attention_mask[0] == 1].tolist()
    assert first == tok("hello world")["input_ids"] and tok.decode(first) == "hello world </s>"
    assert ex.input_ids[1][-1] == tok.eos_token_id and ex.attention_mask[1].all()
    assert ex.prompt_tokens_lost == len(tok(rows[1]["p"])["input_ids"]) - 16
    # a target cut to fit still ends with EOS, as the tokenizer's own truncation leaves it
    assert ex.labels[1].tolist() == tok(text_target=rows[1]["t"], max_length=16, truncation=True)["input_ids"]
    assert ex.labels[0][ex.loss_mask[0] == 1].tolist() == tok(text_target="a cat")["input_ids"]


def test_render_and_template_columns():
    assert render("Q: {a}\n{b}", {"a": "x", "b": "y", "c": "z"}) == "Q: x\ny"
    assert template_columns("{a} and {b} {{literal}} {a}") == ["a", "b"]
    with pytest.raises(DataError, match="available columns: a"):
        render("{missing}", {"a": "x"})
    with pytest.raises(ConfigError, match="malformed"):
        template_columns("{a")
    with pytest.raises(ConfigError, match="positional"):
        template_columns("{} text")


PACK_ROWS = [{"dialogue": d, "summary": s} for d, s in [
    ("a cat sat on the mat", "cat sat"), ("hello world", "we go out today"), ("it is sunny", "sunny"),
    ("the dog ran to the park and then home", "dog ran home"), ("we go out", "out")]]


def test_packing_keeps_every_example_whole_and_apart(tokenizer):
    plain = tokenize_supervised(PACK_ROWS, tokenizer, PROMPT, TARGET, seq_len=24)
    packed = tokenize_supervised(PACK_ROWS, tokenizer, PROMPT, TARGET, seq_len=24, pack=True)
    assert len(packed) < len(plain) and packed.input_ids.shape[1] == 24
    segments = [(r, s) for r in range(len(packed)) for s in range(1, packed.attention_mask[r].max() + 1)]
    assert len(segments) == len(PACK_ROWS)
    found = []
    for r, s in segments:
        at = packed.attention_mask[r] == s
        np.testing.assert_array_equal(packed.positions[r][at], np.arange(at.sum()))  # restart per example
        found.append((tokenizer.decode(packed.input_ids[r][at]), tokenizer.decode(packed.labels[r][at]),
                      tokenizer.decode(packed.labels[r][at & (packed.loss_mask[r] == 1)])))
    want = []
    for i in range(len(plain)):
        at = np.flatnonzero(plain.attention_mask[i])[:-1]  # the final EOS is an input only unpacked: it predicts padding
        want.append((tokenizer.decode(plain.input_ids[i][at]), tokenizer.decode(plain.labels[i][at]),
                     masked_text(tokenizer, plain, i)))
    assert sorted(found) == sorted(want)  # the same inputs, labels and loss tokens, example by example
    assert (packed.loss_mask[packed.attention_mask == 0] == 0).all()
    assert packed.loss_mask.sum() == plain.loss_mask.sum()


def test_loss_index_lists_every_loss_position_once(tokenizer):
    ex = tokenize_supervised(PACK_ROWS, tokenizer, PROMPT, TARGET, seq_len=40).with_loss_index(multiple=4)
    k = ex.loss_index.shape[1]
    assert k % 4 == 0 and k < 40 and ex.loss_index.dtype == np.int32
    for i in range(len(ex)):
        index = ex.loss_index[i]
        assert len(set(index)) == k
        np.testing.assert_array_equal(np.sort(index[:int(ex.loss_mask[i].sum())]), np.flatnonzero(ex.loss_mask[i]))
    assert tokenize_text(PACK_ROWS, tokenizer, "{dialogue}", 4).with_loss_index().loss_index is None  # all loss
    rows = Examples(ex.input_ids, np.zeros(len(ex), np.int32), np.ones(len(ex), np.float32), ex.attention_mask)
    assert rows.with_loss_index().loss_index is None  # a classifier's one label per row


def sentencepiece_like():
    """A Llama-2-like tokenizer (Metaspace BPE: a word-start "▁" on the text's first word, BOS added), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    corpus = ["Hello there, the cat sat on the mat.", "Summary: The cat sat.", "Say hello: hello world"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def test_a_target_is_tokenized_as_it_reads_after_its_prompt():
    """SentencePiece marks a text's first word with "▁": a target tokenized alone would train a space the text
    lacks ("Summary:\n The"). Where the prompt ends at a token boundary the row is the whole text's tokens;
    where a token would span it (a prompt ending in a space) the prompt keeps the ids it has at inference."""
    tok = sentencepiece_like()
    for prompt, target in (("Hello there\nSummary:\n", "The cat sat."), ("Say hello:", "hello")):
        ex = tokenize_supervised([{"p": prompt, "t": target}], tok, "{p}", "{t}", seq_len=64)
        whole, prompt_ids = tok(prompt + target)["input_ids"] + [tok.eos_token_id], tok(prompt)["input_ids"]
        trained = ex.labels[0][ex.loss_mask[0] == 1].tolist()
        assert ex.input_ids[0, :len(prompt_ids)].tolist() + trained == whole
        assert tok.decode(trained) == target + "</s>"
    spaced = tokenize_supervised([{"p": "Summary: ", "t": "The cat sat."}], tok, "{p}", "{t}", seq_len=64)
    prompt_ids = tok("Summary: ")["input_ids"]
    assert spaced.input_ids[0, :len(prompt_ids)].tolist() == prompt_ids
