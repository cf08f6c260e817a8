"""The demo's BPE tokenizer: exact round trips, single-token speaker tags, BOS/EOS/pad ids."""
import json

import pytest
from transformers import AutoTokenizer

from jpeft.data import DIALOGSUM_SAMPLE
from jpeft.data.bpe import speaker_tags, train_bpe_tokenizer
from jpeft.errors import ConfigError

@pytest.fixture(scope="module")
def rows():
    with open(DIALOGSUM_SAMPLE) as f:
        return [json.loads(line) for line in f][:60]


@pytest.fixture(scope="module")
def tok(rows):
    texts = [r["dialogue"] for r in rows[:40]] + [r["summary"] for r in rows[:40]]
    return train_bpe_tokenizer(texts, 1024, speaker_tags(texts) + ["#Person9#"])


def test_speaker_tags_are_sorted_and_distinct():
    assert speaker_tags(["#Person2#: hi #Person1#", "#Person1#: x # y #", "#Dad#"]) == [
        "#Dad#", "#Person1#", "#Person2#"]


def test_ids_and_size(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert len(tok) <= 1024


def test_tags_are_single_tokens_kept_by_skip_special(tok):
    for tag in ("#Person1#", "#Person2#", "#Person9#"):
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] not in tok.all_special_ids
    summary = "#Person1# thanks #Person2#."
    assert tok.decode(tok(summary)["input_ids"], skip_special_tokens=True) == summary


def test_bos_prepended_only_when_asked(tok):
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok.bos_token_id not in tok("hello", add_special_tokens=False)["input_ids"]


def test_decode_encode_round_trip_on_unseen_text(tok, rows):
    texts = [r["dialogue"] + "\n" + r["summary"] for r in rows[40:]]
    texts.append("  Two  spaces,\n\nnewlines\tand unicode é 日本 #Person3#:#Person4#")
    for text in texts:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_save_load_round_trip(tok, rows, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    assert len(loaded) == len(tok)
    for r in rows:
        assert loaded(r["dialogue"])["input_ids"] == tok(r["dialogue"])["input_ids"]
        assert loaded.decode(loaded(r["summary"])["input_ids"], skip_special_tokens=True) == r["summary"]


def test_too_small_vocab_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe_tokenizer(["hi"], 100, [])
