"""Token sequences -> fixed-shape next-token rows (`Examples`), one padded row each or packed, and batches.

A sequence of n + 1 tokens gives n predictions: position t reads token t and predicts token t + 1
(`labels`), and `loss_mask` says whether that prediction counts. Packing places several
examples best-fit decreasing into rows of seq_len predictions, each shifted on its own (no label
crosses examples), numbered in `attention_mask`, with `positions` restarting at 0 for each.
"""
import bisect
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from jpeft.errors import DataError

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

    def longest(self) -> int:
        """Tokens of the longest example (an encoder-decoder's: of its encoder input)."""
        if self.positions is not None:
            return int(np.max(np.where(self.attention_mask > 0, self.positions, -1), initial=-1)) + 1
        return int(np.max(np.sum(self.attention_mask > 0, axis=-1), initial=0))

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
        raise DataError(f"only {n} rows for batches of {batch_size}; add data or lower the batch size")
    per_epoch = n // batch_size
    epoch, offset = divmod(start_step, per_epoch)
    arrays = examples.arrays()
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(n)
        for i in range(offset, per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size][rows]
            yield {name: a[index] for name, a in arrays.items()}
        epoch, offset = epoch + 1, 0
