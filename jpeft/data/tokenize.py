"""Rows -> token sequences with the tokens the loss covers, through templates; as `Examples`.

Every example is built as one sequence of at most `seq_len + 1` tokens, shifted into next-token
rows by jpeft.data.examples (one padded row each, or packed). Supervised rows: prompt (with the
tokenizer's special tokens, e.g. BOS) + target + EOS, loss on the target and EOS only. Text rows:
text (with special tokens) + EOS, loss everywhere. Padding is on the right with the pad token (EOS
when there is none). Classification rows are the text alone, with one label per row (`labels` [N]).

Templates use `str.format_map` over the row (`{dialogue}`; literal braces as `{{ }}`); there
is no escape processing of their own: write a newline as a real newline (YAML `"\\n"` in
double quotes or a block scalar).
"""
import dataclasses
import logging
import string
from collections.abc import Iterable, Sequence

import numpy as np

from jpeft.data.examples import Examples, next_token_examples
from jpeft.errors import ConfigError, DataError

logger = logging.getLogger("jpeft.data")


def template_fields(template: str) -> list[str]:
    """The fields a template fills: columns (`dialogue`) or values inside them (`translation[en]`)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"template {template!r} is malformed ({e}); name columns like "
                          "{dialogue} and write literal braces as {{ }}") from None
    if any(not column(f) or column(f).isdigit() for f in fields):
        raise ConfigError(f"template {template!r} has a positional placeholder; name a column "
                          "instead, e.g. {dialogue}")
    return list(dict.fromkeys(fields))


def template_columns(template: str) -> list[str]:
    """The row columns a template reads, to check them once before rendering every row."""
    return list(dict.fromkeys(map(column, template_fields(template))))


def column(field: str) -> str:
    """The column a template field reads (`translation` of `translation[en]`)."""
    return field.split(".")[0].split("[")[0]


Templates = str | Sequence[str]  # one template for every row, or one per row (a template set's phrasings)


def render_all(templates: Templates, rows: Sequence[dict]) -> list[str]:
    """Each row filled into its template."""
    if isinstance(templates, str):
        return [render(templates, r) for r in rows]
    if len(templates) != len(rows):
        raise ValueError(f"{len(templates)} templates for {len(rows)} rows")
    return [render(t, r) for t, r in zip(templates, rows)]


def render(template: str, row: dict) -> str:
    """The template filled from one row."""
    try:
        return template.format_map(row)
    except KeyError as e:
        raise DataError(f"template {template!r} names column {e}, which the data does not have; "
                        f"available columns: {', '.join(row)}") from None
    except (ValueError, IndexError) as e:
        raise ConfigError(f"template {template!r} is malformed ({e}); name columns like "
                          "{dialogue} and write literal braces as {{ }}") from None


def tokenize_supervised(rows: Iterable[dict], tokenizer, prompt: Templates, target: Templates,
                        seq_len: int, pack: bool = False, report: bool = True) -> Examples:
    """Loss on target + EOS only; over-long rows lose prompt tokens from the left (see `_fit`).

    pack=True puts several examples in each row (see `Examples`): the same predictions and
    losses as one padded row per example, with far less padding. report=False: no truncation
    warning (rows already tokenized and reported once, in another layout).
    """
    rows = list(rows)
    prompt_texts, target_texts = render_all(prompt, rows), render_all(target, rows)
    prompts = _encode(tokenizer, prompt_texts, special=True, open_end=True)
    targets = _targets_in_context(tokenizer, prompt_texts, target_texts, prompts)
    eos = _eos_id(tokenizer)
    seqs, masks = [], []
    for p, t in zip(prompts, targets):
        p, t = _fit(p, t + [eos], seq_len + 1, _head_len(p, tokenizer))
        seqs.append(p + t)
        masks.append([0] * len(p) + [1] * len(t))
    n_truncated = sum(len(p) + len(t) + 1 > seq_len + 1 for p, t in zip(prompts, targets))
    if report:
        _log_truncation(n_truncated, len(rows), f"seq_len={seq_len}",
                        "prompt cut from the left, targets beyond seq_len // 2 cut on the right")
    kept = sum(map(sum, masks))
    return dataclasses.replace(next_token_examples(seqs, masks, seq_len, pad_id(tokenizer), pack, n_truncated),
                               prompt_tokens_lost=sum(map(len, prompts)) - (sum(map(len, seqs)) - kept),
                               target_tokens_lost=sum(len(t) + 1 for t in targets) - kept)


def _targets_in_context(tokenizer, prompts: list[str], targets: list[str], prompt_ids) -> list[list[int]]:
    """Each target's ids as the tokenizer reads it after its prompt: the ids of prompt + target past the prompt's
    own ids, where those begin them (a prompt ending at a token boundary; SentencePiece then adds no word-start
    space the text lacks, and byte-level BPE merges as in the text), as tokenizing the whole text gives them.
    Where a token spans the boundary (a prompt ending in a space before a word), the target is read alone, so
    the prompt keeps the ids it has when a prompt is decoded from."""
    whole = _encode(tokenizer, [p + t for p, t in zip(prompts, targets)], special=True, open_end=True)
    alone = _encode(tokenizer, targets, special=False)
    return [w[len(p):] if w[:len(p)] == p else a for w, p, a in zip(whole, prompt_ids, alone)]


def tokenize_seq2seq(rows: Iterable[dict], tokenizer, prompt: Templates, target: Templates, seq_len: int,
                     start_id: int) -> Examples:
    """Encoder input: the prompt (with the tokenizer's special tokens), cut on the right to seq_len but
    keeping a final EOS; decoder: the start token + target, predicting target + EOS (loss on all of
    it), a target cut to seq_len ending with EOS too (as `tokenizer(text_target=..., truncation=True)` cuts it).
    Inputs and targets are padded to the longest one, in multiples of 16 (at most seq_len)."""
    rows = list(rows)
    prompts = _encode(tokenizer, render_all(prompt, rows), special=True)
    eos = _eos_id(tokenizer)
    targets = [t + [eos] for t in _encode(tokenizer, render_all(target, rows), special=False)]
    longest = lambda seqs: min(seq_len, -(-max(map(len, seqs), default=1) // 16) * 16)  # noqa: E731
    target_len, width = longest(targets), longest(prompts)
    cut = [p if len(p) <= width else p[:width - 1] + [eos] if p[-1:] == [eos] else p[:width] for p in prompts]
    n_truncated = sum(len(p) > width or len(t) > target_len for p, t in zip(prompts, targets))
    _log_truncation(n_truncated, len(rows), f"seq_len={seq_len}", "prompts and targets cut on the right")
    pad = pad_id(tokenizer)
    ids, labels = np.full((len(rows), width), pad, np.int32), np.full((len(rows), target_len), pad, np.int32)
    mask, loss = np.zeros(ids.shape, np.int32), np.zeros(labels.shape, np.float32)
    for i, (p, t) in enumerate(zip(cut, targets)):
        t = t if len(t) <= target_len else t[:target_len - 1] + [eos]
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
        labels[i, :len(t)], loss[i, :len(t)] = t, 1.0
    decoder = np.concatenate([np.full((len(rows), 1), start_id, np.int32), labels[:, :-1]], axis=1)
    return Examples(ids, labels, loss, mask, decoder_input_ids=decoder, n_truncated=n_truncated,
                    prompt_tokens_lost=sum(len(p) - len(c) for p, c in zip(prompts, cut)),
                    target_tokens_lost=sum(max(len(t) - target_len, 0) for t in targets))


def tokenize_text(rows: Iterable[dict], tokenizer, text: str, seq_len: int,
                  pack: bool = True) -> Examples:
    """Language modelling on whole texts.

    pack=True concatenates all rows (each + EOS) into one stream and cuts it into windows of
    seq_len + 1 tokens overlapping by one, so every next-token pair is trained exactly once;
    the last partial window is dropped (its token count is logged). Attention spans row
    boundaries. pack=False pads each row instead, cutting long rows on the right.
    """
    eos = _eos_id(tokenizer)
    ids = [x + [eos] for x in _encode(tokenizer, render_all(text, rows), special=True, open_end=True)]
    if not pack:
        n_truncated = sum(len(x) > seq_len + 1 for x in ids)
        _log_truncation(n_truncated, len(ids), f"seq_len={seq_len}", "cut on the right")
        cut = [x[:seq_len + 1] for x in ids]
        return dataclasses.replace(
            next_token_examples(cut, [[1] * len(x) for x in cut], seq_len, pad_id(tokenizer), False, n_truncated),
            target_tokens_lost=sum(len(x) - len(c) for x, c in zip(ids, cut)))
    stream = np.fromiter((t for x in ids for t in x), dtype=np.int32)
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise DataError(f"the data holds {len(stream)} tokens, fewer than one window of "
                        f"seq_len + 1 = {seq_len + 1}; add data or lower train.seq_len")
    windows = stream[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)]
    logger.info("packed %d rows (%d tokens) into %d windows of %d tokens; dropped the last "
                "%d tokens", len(ids), len(stream), n, seq_len, len(stream) - 1 - n * seq_len)
    ones = np.ones((n, seq_len), np.int32)
    return Examples(windows[:, :-1].copy(), windows[:, 1:].copy(), ones.astype(np.float32), ones,
                    target_tokens_lost=len(stream) - 1 - n * seq_len)


def tokenize_classification(rows: Iterable[dict], tokenizer, text: str, seq_len: int, labels) -> Examples:
    """The rendered `text` of each row (with special tokens, e.g. BOS) and its class id `labels[i]`.

    Over-long rows are cut from the left keeping BOS, as prompts are (the end, where a last-token
    classifier reads, stays); rows are right-padded to the longest one, at most `seq_len` tokens.
    """
    rows = list(rows)
    ids = _encode(tokenizer, render_all(text, rows), special=True)
    empty = next((i for i, x in enumerate(ids) if not x), None)
    if empty is not None:
        raise DataError(f"row {empty + 1}: the text {text!r} renders to no tokens; a classifier needs at least one")
    cut = [_keep_end(x, seq_len, _head_len(x, tokenizer)) for x in ids]
    n_truncated = sum(len(x) > seq_len for x in ids)
    _log_truncation(n_truncated, len(rows), f"seq_len={seq_len}", "cut from the left")
    width = max(len(x) for x in cut)
    input_ids = np.full((len(cut), width), pad_id(tokenizer), np.int32)
    for i, x in enumerate(cut):
        input_ids[i, :len(x)] = x
    attention = (np.arange(width)[None, :] < np.array([len(x) for x in cut])[:, None]).astype(np.int32)
    return Examples(input_ids, np.asarray(labels, np.int32), np.ones(len(cut), np.float32), attention,
                    n_truncated=n_truncated, prompt_tokens_lost=sum(len(x) - len(c) for x, c in zip(ids, cut)))


def check_last_not_pad(examples: Examples, tokenizer, path: str) -> None:
    """HF's sequence classifiers pool the last token that is not the pad token; a row ending in the pad
    token would be read elsewhere by them than by jpeft (which goes by the attention mask)."""
    last = examples.input_ids[np.arange(len(examples)), examples.attention_mask.sum(axis=1) - 1]
    bad = np.flatnonzero(last == pad_id(tokenizer))
    if bad.size:
        raise DataError(f"data file '{path}' row {bad[0] + 1} ({bad.size} rows in all) ends with token id "
                        f"{last[bad[0]]}, the pad token (or EOS standing in for it); HF's last-token pooling "
                        "skips it, so an exported classifier would read another token: give the tokenizer a "
                        "distinct pad_token, or end the data.prompt template with other text")


def encode_prompts(rows: Iterable[dict], tokenizer, prompt: Templates, max_len: int | None,
                   continued: bool = True) -> list[list[int]]:
    """Prompt ids for generation, cut from the left (keeping BOS) to at most max_len tokens (None: uncut).
    `continued`: the new tokens follow the prompt (a decoder's), so it ends without an appended EOS; an
    encoder's input keeps it."""
    rows = list(rows)
    prompts = _encode(tokenizer, render_all(prompt, rows), special=True, open_end=continued)
    if max_len is None:
        return prompts
    out = [_keep_end(p, max_len, _head_len(p, tokenizer)) for p in prompts]
    _log_truncation(sum(len(p) > max_len for p in prompts), len(rows), f"{max_len} prompt tokens",
                    "cut from the left")
    return out


def _encode(tokenizer, texts: list[str], special: bool, open_end: bool = False) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's special tokens where `special` (one BOS, also where the text
    starts with it); `open_end`: the text goes
    on (a prompt before its target or new tokens, a text before the EOS appended here), so an EOS the
    tokenizer appends itself (`add_eos_token`) is dropped."""
    if not texts:
        return []
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    bos = tokenizer.bos_token_id
    if special and bos is not None:  # a template that writes BOS itself ("<s>[INST] ...") gets no second one
        ids = [x[1:] if x[:2] == [bos, bos] else x for x in ids]
    if special and open_end and _appends_eos(tokenizer):
        ids = [x[:-1] if x[-1:] == [tokenizer.eos_token_id] else x for x in ids]
    return ids


def _appends_eos(tokenizer) -> bool:
    plain, special = (tokenizer("a", add_special_tokens=s)["input_ids"][-1:] for s in (False, True))
    return tokenizer.eos_token_id is not None and special == [tokenizer.eos_token_id] != plain


def _head_len(ids: list[int], tokenizer) -> int:
    """1 if the ids start with BOS (kept when the prompt is cut), else 0."""
    return int(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)


def _keep_end(ids: list[int], limit: int, head: int) -> list[int]:
    """The first `head` ids plus as many of the last ids as fit in `limit`."""
    if len(ids) <= limit:
        return ids
    return ids[:head] + ids[len(ids) - (limit - head):]


def _fit(prompt: list[int], target: list[int], limit: int, head: int) -> tuple[list, list]:
    """Fit prompt + target into `limit` tokens.

    A target longer than half the budget is cut on the right (losing its EOS: it did not end
    there) just enough, but never below half; the prompt then gives up tokens from the left,
    keeping its special head (BOS), so the end of the prompt stays next to the target.
    """
    if len(prompt) + len(target) <= limit:
        return prompt, target
    keep_target = min(len(target), max((limit - 1) // 2, limit - len(prompt)), limit - head)
    target = target[:keep_target]
    return _keep_end(prompt, limit - len(target), head), target


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set eos_token in the checkpoint's "
                        "tokenizer_config.json")
    return tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def _log_truncation(n_truncated: int, n_rows: int, limit: str, how: str) -> None:
    if n_truncated:
        logger.warning("%d of %d rows did not fit %s and were truncated (%s)", n_truncated,
                       n_rows, limit, how)
    else:
        logger.info("tokenized %d rows, all fit %s", n_rows, limit)
