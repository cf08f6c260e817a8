"""Rows -> fixed-shape token arrays with next-token labels and a loss mask; batching.

Every example is built as one sequence of `seq_len + 1` tokens and shifted, so position t
reads `input_ids[t]` and predicts `labels[t]` (= token t+1); `loss_mask[t]` says whether that
prediction counts. Supervised rows: prompt (with the tokenizer's special tokens, e.g. BOS) +
target + EOS, loss on the target and EOS only. Text rows: text (with special tokens) + EOS,
loss everywhere. Padding is on the right with the pad token (EOS when there is none).
Classification rows are the text alone, with one label per row (`labels` [N]).

Templates use `str.format_map` over the row (`{dialogue}`; literal braces as `{{ }}`); there
is no escape processing of their own: write a newline as a real newline (YAML `"\\n"` in
double quotes or a block scalar).
"""
import bisect
import dataclasses
import logging
import string
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jpeft.errors import ConfigError, DataError

logger = logging.getLogger("jpeft.data")


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized rows, arrays [N, seq_len]; for classification `labels` and `loss_mask` are [N].

    Packed rows hold several examples: `attention_mask` numbers them 1, 2, ... (0 on padding;
    the model keeps attention within one), and `positions` restart at 0 for each. `loss_index`
    [N, K] lists each row's loss positions first (then others, weight 0), K covering the row
    with the most, so the LM head runs only where there is loss (jpeft.train.step.token_loss).
    """
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, labels[:, t] = token t + 1 (classification: the class id of each row)
    loss_mask: np.ndarray  # float32, 1 where labels[:, t] (classification: labels[i]) counts in the loss
    attention_mask: np.ndarray  # int32, 1 (packed: the example's number) on real input tokens, 0 on padding
    positions: np.ndarray | None = None  # int32, packed rows: each token's position in its example
    loss_index: np.ndarray | None = None  # int32 [N, K], K < seq_len: where the loss positions are
    # An encoder-decoder's rows: input_ids / attention_mask are the encoder's; labels, loss_mask and
    # these decoder inputs (the start token, then the labels shifted right) are [N, target_len].
    decoder_input_ids: np.ndarray | None = None
    task: np.ndarray | None = None  # int32 [N]: a mixture's rows, the task each belongs to
    n_truncated: int = 0  # examples that did not fit and were cut
    prompt_tokens_lost: int = 0  # tokens those cuts removed from prompts (inputs without loss)
    target_tokens_lost: int = 0  # ... and from targets (tokens the loss would have covered)

    def __len__(self) -> int:
        return len(self.input_ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-row arrays a batch carries (those present)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}

    def examples_per_row(self) -> np.ndarray:
        """[N]: how many examples each row holds (a packed row several, any other one)."""
        return np.maximum(self.attention_mask.max(axis=1), 1) if self.positions is not None else np.ones(len(self))

    @staticmethod
    def concatenate(parts: Sequence["Examples"]) -> "Examples":
        """The rows of several tasks' Examples as one, `task` numbering their part. Narrower parts are
        padded with zeros (attention and loss 0); positions count on where a part has none."""
        fields = [f.name for f in dataclasses.fields(Examples)
                  if (isinstance(getattr(parts[0], f.name), np.ndarray) or f.name == "positions") and f.name != "task"]
        merged = {}
        for name in fields:
            arrays = [getattr(p, name) for p in parts]
            if name == "positions":
                if all(a is None for a in arrays):
                    continue
                arrays = [np.broadcast_to(np.arange(p.input_ids.shape[1], dtype=np.int32), p.input_ids.shape)
                          if a is None else a for a, p in zip(arrays, parts)]
            if any(a is None for a in arrays):
                raise ValueError(f"Examples.concatenate: '{name}' is missing from some parts")
            width = max(a.shape[1] for a in arrays) if arrays[0].ndim == 2 else None
            merged[name] = np.concatenate([a if width is None else np.pad(a, [(0, 0), (0, width - a.shape[1])])
                                           for a in arrays])
        merged.pop("loss_index", None)  # widths differ per part: set it anew on the whole
        counts = {k: sum(getattr(p, k) for p in parts) for k in ("n_truncated", "prompt_tokens_lost",
                                                                 "target_tokens_lost")}
        task = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)])
        return Examples(**merged, **counts, task=task)

    def with_loss_index(self, multiple: int = 16) -> "Examples":
        """These rows with `loss_index` set, where it saves LM-head work (K, a multiple of `multiple`
        so similar data shares compiled steps, falls short of seq_len)."""
        if self.loss_mask.ndim != 2:  # one class per row: no token positions to choose
            return self
        k = -(-int((self.loss_mask > 0).sum(axis=1).max(initial=1)) // multiple) * multiple
        if k >= self.loss_mask.shape[1]:
            return self
        order = np.argsort(self.loss_mask <= 0, axis=1, kind="stable")[:, :k].astype(np.int32)
        return dataclasses.replace(self, loss_index=order)


def template_columns(template: str) -> list[str]:
    """The row columns a template reads, to check them once before rendering every row."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"template {template!r} is malformed ({e}); name columns like "
                          "{dialogue} and write literal braces as {{ }}") from None
    columns = [name.split(".")[0].split("[")[0] for name in fields]
    if any(not c or c.isdigit() for c in columns):
        raise ConfigError(f"template {template!r} has a positional placeholder; name a column "
                          "instead, e.g. {dialogue}")
    return list(dict.fromkeys(columns))


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
    prompts = _encode(tokenizer, render_all(prompt, rows), special=True)
    targets = _encode(tokenizer, render_all(target, rows), special=False)
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


def tokenize_seq2seq(rows: Iterable[dict], tokenizer, prompt: Templates, target: Templates, seq_len: int,
                     start_id: int) -> Examples:
    """Encoder input: the prompt (with the tokenizer's special tokens), cut on the right to seq_len but
    keeping a final EOS; decoder: the start token + target, predicting target + EOS (loss on all of
    it). Inputs and targets are padded to the longest one, in multiples of 16 (at most seq_len)."""
    rows = list(rows)
    prompts = _encode(tokenizer, render_all(prompt, rows), special=True)
    eos = _eos_id(tokenizer)
    targets = [t + [eos] for t in _encode(tokenizer, render_all(target, rows), special=False)]
    longest = lambda seqs: min(seq_len, -(-max(map(len, seqs), default=1) // 16) * 16)  # noqa: E731
    target_len, width = longest(targets), longest(prompts)
    cut = [p[:width - 1] + [eos] if p[-1:] == [eos] else p[:width] for p in prompts]
    n_truncated = sum(len(p) > width or len(t) > target_len for p, t in zip(prompts, targets))
    _log_truncation(n_truncated, len(rows), f"seq_len={seq_len}", "prompts and targets cut on the right")
    pad = pad_id(tokenizer)
    ids, labels = np.full((len(rows), width), pad, np.int32), np.full((len(rows), target_len), pad, np.int32)
    mask, loss = np.zeros(ids.shape, np.int32), np.zeros(labels.shape, np.float32)
    for i, (p, t) in enumerate(zip(cut, targets)):
        t = t[:target_len]
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
    ids = [x + [eos] for x in _encode(tokenizer, render_all(text, rows), special=True)]
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


def encode_prompts(rows: Iterable[dict], tokenizer, prompt: Templates, max_len: int) -> list[list[int]]:
    """Prompt ids for generation, cut from the left (keeping BOS) to at most max_len tokens."""
    rows = list(rows)
    prompts = _encode(tokenizer, render_all(prompt, rows), special=True)
    out = [_keep_end(p, max_len, _head_len(p, tokenizer)) for p in prompts]
    _log_truncation(sum(len(p) > max_len for p in prompts), len(rows), f"{max_len} prompt tokens",
                    "cut from the left")
    return out


def batches(examples: Examples, batch_size: int, seed: int, start_step: int = 0,
            rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
    """Endless [batch_size, seq_len] batches, reshuffled each epoch by a rng seeded (seed, epoch).

    Each epoch yields len(examples) // batch_size batches (the remainder differs per epoch, as
    the order does). `start_step` batches are skipped arithmetically, so a resumed run sees
    exactly the batches an uninterrupted run would have. `rows` picks this process's rows of
    every batch: in a multi-host job each host gathers only the examples its devices train on.
    """
    n = len(examples)
    if n < batch_size:
        raise DataError(f"only {n} examples for train.batch_size={batch_size}; add data or "
                        "lower train.batch_size")
    per_epoch = n // batch_size
    epoch, offset = divmod(start_step, per_epoch)
    arrays = examples.arrays()
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(n)
        for i in range(offset, per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size][rows]
            yield {name: a[index] for name, a in arrays.items()}
        epoch, offset = epoch + 1, 0


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]


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


def next_token_examples(seqs: list[list[int]], masks: list[list[int]], seq_len: int, pad: int, pack: bool,
                        n_truncated: int) -> Examples:
    """Sequences of <= seq_len + 1 tokens as next-token Examples, the loss on the labels whose token has
    mask 1 (`masks[i][j]`: token j of sequence i is trained); packed (`_pack_examples`) or one padded row each."""
    return (_pack_examples if pack else _pack_rows)(seqs, masks, seq_len, pad, n_truncated)


def _pack_rows(seqs: list[list[int]], masks: list[list[int]], seq_len: int, pad: int,
               n_truncated: int) -> Examples:
    """Right-pad sequences of <= seq_len + 1 tokens, one per row."""
    n = len(seqs)
    full = np.full((n, seq_len + 1), pad, np.int32)
    counted = np.zeros((n, seq_len + 1), np.float32)
    lengths = np.zeros(n, np.int64)
    for i, (seq, mask) in enumerate(zip(seqs, masks)):
        full[i, :len(seq)] = seq
        counted[i, :len(seq)] = mask
        lengths[i] = len(seq)
    attention = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    return Examples(full[:, :-1].copy(), full[:, 1:].copy(), counted[:, 1:].copy(), attention,
                    n_truncated=n_truncated)


def _pack_examples(seqs: list[list[int]], masks: list[list[int]], seq_len: int, pad: int,
                   n_truncated: int) -> Examples:
    """Sequences of <= seq_len + 1 tokens, each shifted on its own (no label crosses examples),
    placed best-fit decreasing into rows of seq_len predictions."""
    bins = _best_fit([len(s) - 1 for s in seqs], seq_len)
    shape = (len(bins), seq_len)
    ids, labels = np.full(shape, pad, np.int32), np.full(shape, pad, np.int32)
    mask, segments, positions = np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for row, members in enumerate(bins):
        at = 0
        for segment, i in enumerate(members, 1):
            seq, n = seqs[i], len(seqs[i]) - 1
            ids[row, at:at + n], labels[row, at:at + n], mask[row, at:at + n] = seq[:-1], seq[1:], masks[i][1:]
            segments[row, at:at + n], positions[row, at:at + n] = segment, np.arange(n)
            at += n
    real = int((segments > 0).sum())
    logger.info("packed %d examples into %d rows of %d tokens (%.0f%% of slots used)", len(seqs), len(bins),
                seq_len, 100 * real / max(segments.size, 1))
    return Examples(ids, labels, mask, segments, positions, n_truncated=n_truncated)


def _best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity`: longest first, each into the fullest bin it fits
    (best-fit decreasing, deterministic); bins in the order they were opened."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([])
            room, b = capacity, len(bins) - 1
        else:
            room, b = free.pop(at)
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return bins


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
