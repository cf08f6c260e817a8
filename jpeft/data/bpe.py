"""A small byte-level BPE tokenizer trained on the demo's own data.

The demo trains a model from scratch, so it needs a tokenizer that fits the corpus rather
than a pretrained one. Byte-level BPE encodes any text (no unknown token) and decodes it
back exactly. Ids: ``<s>`` (BOS) = 0, ``</s>`` (EOS) = 1, ``<pad>`` = 2, then the 256
byte symbols and the learned merges, then the extra tokens (e.g. DialogSum speaker tags).
"""
from __future__ import annotations

import re
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jpeft.errors import ConfigError, DataError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
_TAG = re.compile(r"#[A-Za-z]+\d*#")


def speaker_tags(texts: Iterable[str]) -> list[str]:
    """The distinct ``#Word#`` tags (``#Person1#``...) in texts, to keep each one a single token."""
    return sorted({tag for text in texts for tag in _TAG.findall(text)})


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        special_tokens: list[str] = ()) -> PreTrainedTokenizerFast:
    """Train on texts; ``len(tokenizer) <= vocab_size`` counting BOS/EOS/pad and special_tokens.

    special_tokens are added as ordinary (not special) single tokens, so
    ``decode(..., skip_special_tokens=True)`` keeps speaker tags in generated summaries.
    Encoding with ``add_special_tokens=True`` prepends BOS; EOS is left to the caller.
    """
    extra = list(dict.fromkeys(special_tokens))
    base = [BOS, EOS, PAD]
    n_merged = vocab_size - len(extra)
    if n_merged < len(base) + 256:
        raise ConfigError(f"tokenizer vocab_size {vocab_size} is too small: byte-level BPE needs "
                          f"at least {len(base) + 256 + len(extra)} here; raise it")
    texts = list(texts)
    if not any(texts):
        raise DataError("no text to train the tokenizer on; check the training data file has rows")
    # Train on the pieces between extra tokens, as encoding will see them, so no merges are
    # spent on the tags themselves.
    split = re.compile("|".join(map(re.escape, extra))) if extra else None
    pieces = (p for t in texts for p in (split.split(t) if split else [t]))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(pieces, trainers.BpeTrainer(
        vocab_size=n_merged, special_tokens=base, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    # No clean-up: it would rewrite DialogSum's " ' " spacing and break decode(encode(x)) == x.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False)
