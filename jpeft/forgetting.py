"""Catastrophic forgetting: what a fine-tune lost of what its base could do, scored on probe files.

A probe is a data file (anything `jpeft.data.load_rows` reads) of one of two shapes:
- `text` rows, scored by perplexity: exp of the token-weighted mean NLL over every token of
  each text, tokenized as jpeft's language-modelling rows (special tokens + text + EOS), each
  row on its own, cut to `seq_len` tokens;
- `prompt` and `target` rows (a task), scored by ROUGE-L of greedy outputs, or by exact-match
  accuracy (`FILE:accuracy`), or by the perplexity of the target given the prompt
  (`FILE:perplexity`). A file with both shapes is a task.

The base and the fine-tuned model are scored alike; the change is `(tuned - base) / base`, so
forgetting shows as a rise in perplexity and as a fall in ROUGE-L or accuracy.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Sequence

from jpeft.errors import CheckpointError, ConfigError, DataError, JpeftError

DEFAULT_METRIC = {"text": "perplexity", "task": "rougeL"}
METRICS = ("perplexity", "rougeL", "accuracy")
COLUMNS = {"text": ("text",), "task": ("prompt", "target")}
MAX_SEQ_LEN = 1024  # the default cut: the model's positions, at most this many
WIDTH_MULTIPLE = 64  # rows are padded to the longest probe row in these steps, so probes share compiled code
KEY_PREFIX = "forget_"  # metrics keys: forget_<probe name>_<metric> (tuned), _base and _change
FORMATS = {"perplexity": ".2f", "rougeL": ".4f", "accuracy": ".4f", "change": "+.1%"}


@dataclasses.dataclass(frozen=True)
class Probe:
    """A probe file's rows (only the columns scored), its kind (text | task) and its metric."""
    path: str  # as given, without a :metric suffix
    kind: str
    metric: str
    rows: tuple[dict, ...]

    @property
    def name(self) -> str:
        """The file's stem as a metrics-key word: what `record` calls this probe."""
        return re.sub(r"\W+", "_", os.path.splitext(os.path.basename(self.path.rstrip("/\\")))[0]).strip("_")


def read_probe(spec: str, limit: int = 0) -> Probe:
    """`FILE` or `FILE:METRIC` as a Probe of the file's first `limit` rows (0: all); its kind from its columns."""
    path, metric = _split(spec)
    if not os.path.exists(path):
        raise DataError(f"probe file '{path}' not found; give a data file (JSONL, JSON, CSV, parquet or a datasets "
                        f"dir), optionally as FILE:METRIC with METRIC one of {', '.join(METRICS)}")
    from jpeft.data import check_columns, load_rows
    rows = load_rows(path)
    kind = next((k for k in ("task", "text") if set(COLUMNS[k]) <= set(rows.column_names)), None)
    if kind is None:
        raise DataError(f"probe file '{path}' has columns {', '.join(rows.column_names)}; a probe needs a 'text' "
                        "column (scored by perplexity) or 'prompt' and 'target' columns (scored by ROUGE-L of "
                        "greedy outputs, or FILE:accuracy, FILE:perplexity)")
    metric = metric or DEFAULT_METRIC[kind]
    if kind == "text" and metric != "perplexity":
        raise DataError(f"probe '{spec}': a file of 'text' rows is scored by perplexity only; {metric} needs "
                        "'prompt' and 'target' columns")
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    check_columns(rows, path, COLUMNS[kind])
    return Probe(path, kind, metric, tuple(rows.select_columns(list(COLUMNS[kind])).to_list()))


def read_probes(specs: Sequence[str], where: str, limit: int = 0) -> list[Probe]:
    """Every probe of a list, or the first error prefixed with `where` the list came from (a config key or
    an option). Two probes may not share a name: the report and the metrics keys tell them apart by it."""
    try:
        probes = [read_probe(spec, limit) for spec in specs]
    except JpeftError as e:
        raise type(e)(f"{where}: {e}") from None
    seen: dict[str, Probe] = {}
    for probe in probes:
        other = seen.setdefault(probe.name, probe)
        if other is not probe:
            what = (f"'{probe.path}' is given twice" if other.path == probe.path
                    else f"'{other.path}' and '{probe.path}' share the name '{probe.name}'")
            raise ConfigError(f"{where}: {what}; each probe is reported and logged ({KEY_PREFIX}{probe.name}_*) "
                              "under its file name: give each file its own name (a copy, to score one file two ways)")
    return probes


def score(model, params, tokenizer, probe: Probe, seq_len: int | None = None, batch_size: int = 16,
          max_new_tokens: int = 64) -> float:
    """The probe's metric for one parameter tree: perplexity (texts cut to `seq_len`, default the model's
    positions up to 1024), or ROUGE-L / accuracy of greedy outputs of at most `max_new_tokens`."""
    if probe.metric == "perplexity":
        from jpeft.train.trainer import mean_nll
        return math.exp(mean_nll(_eval_step(model), params, _examples(model, tokenizer, probe, seq_len), batch_size))
    from jpeft.evaluate import accuracy, predict, text_metrics
    predictions = predict(model, params, tokenizer, probe.rows, "{prompt}", max_new_tokens, batch_size)
    targets = [row["target"] for row in probe.rows]
    if probe.metric == "accuracy":
        return accuracy(predictions, targets)
    return text_metrics(predictions, targets)["rougeL"]


def relative_change(base: float, tuned: float) -> float | None:
    """(tuned - base) / base; None where the base scores 0 (a change relative to nothing is undefined)."""
    return None if base == 0 else (tuned - base) / base


def report(model, base_params, tuned_params, tokenizer, probes: Sequence[Probe], **options) -> dict:
    """`{"probes": {path: {"metric", "base", "tuned", "change"}}}`; `options` go to `score`."""
    entries = {}
    for probe in probes:
        base, tuned = (score(model, params, tokenizer, probe, **options) for params in (base_params, tuned_params))
        entries[probe.path] = {"metric": probe.metric, "base": base, "tuned": tuned,
                               "change": relative_change(base, tuned)}
    return {"probes": entries}


def record(probes: Sequence[Probe], base: Sequence[float], tuned: Sequence[float]) -> dict:
    """Flat numeric metrics keys per probe (metrics.jsonl, TensorBoard, summary.json): `forget_<name>_<metric>`
    (tuned), `forget_<name>_base` and `forget_<name>_change` (left out where it is undefined)."""
    out = {}
    for probe, b, t in zip(probes, base, tuned, strict=True):
        key = KEY_PREFIX + probe.name
        out.update({f"{key}_{probe.metric}": t, f"{key}_base": b})
        if (change := relative_change(b, t)) is not None:
            out[f"{key}_change"] = change
    return out


def format_report(result: dict) -> str:
    """The report as an aligned table: probe, metric, base, tuned, change."""
    lines = [("probe", "metric", "base", "tuned", "change")]
    for path, e in result["probes"].items():
        lines.append((path, e["metric"], format(e["base"], FORMATS[e["metric"]]),
                      format(e["tuned"], FORMATS[e["metric"]]),
                      "-" if e["change"] is None else format(e["change"], FORMATS["change"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
                     for line in lines)


def tuned_params(base_params, adapter: str | None = None, finetuned: str | None = None, dtype: str | None = None):
    """The fine-tuned tree: an adapter dir on the base, or a fully fine-tuned HF dir of the base's shapes."""
    if (adapter is None) == (finetuned is None):
        raise ConfigError("give the fine-tuned model one way: an adapter dir on the base (--adapter) or a fully "
                          f"fine-tuned model dir (--finetuned); {'both were' if adapter else 'neither was'} given")
    if adapter is not None:
        from jpeft.peft.hf_format import load_adapter
        return load_adapter(adapter, base_params)
    import numpy as np

    from jpeft import tree as T
    from jpeft.models.hf import from_pretrained
    params = from_pretrained(finetuned, dtype=dtype)[1]
    shapes, base_shapes = ({p: np.shape(v) for p, v in T.flatten(t).items()} for t in (params, base_params))
    if shapes != base_shapes:
        path = next(p for p in sorted(set(shapes) | set(base_shapes)) if shapes.get(p) != base_shapes.get(p))
        raise CheckpointError(f"--finetuned {finetuned}: not a fine-tune of the base model ({path}: "
                              f"{shapes.get(path, 'absent')} there, {base_shapes.get(path, 'absent')} in the base); "
                              "give the model it was fine-tuned from as --model")
    return params


def _split(spec: str) -> tuple[str, str | None]:
    """(path, metric or None): a `:metric` suffix is split off only when it names a metric."""
    path, sep, metric = spec.rpartition(":")
    return (path, metric) if sep and metric in METRICS else (spec, None)


@functools.lru_cache(maxsize=8)
def _eval_step(model):
    """One compiled loss per model, kept across calls: the trainer scores its probes at every evaluation."""
    from jpeft.train.step import make_eval_step
    return make_eval_step(model)


def _examples(model, tokenizer, probe: Probe, seq_len: int | None):
    """The probe's rows as unpacked examples: every token of a text counts, or the target (+ EOS) of a task."""
    from jpeft.data import tokenize_seq2seq, tokenize_supervised, tokenize_text
    cfg = model.config
    seq_len = seq_len or min(cfg.max_position_embeddings, MAX_SEQ_LEN)
    if cfg.learned_positions:  # no position past GPT-2's or OPT's table
        seq_len = min(seq_len, cfg.max_position_embeddings)
    if cfg.is_encoder_decoder:
        if probe.kind == "text":
            raise ConfigError(f"probe '{probe.path}': {cfg.model_type} is an encoder-decoder and has no perplexity "
                              "of a lone text; give it 'prompt' and 'target' rows (FILE:perplexity is the "
                              "target's given the prompt)")
        return tokenize_seq2seq(probe.rows, tokenizer, "{prompt}", "{target}", seq_len, cfg.decoder_start_token_id)
    if probe.kind == "text":
        examples = tokenize_text(probe.rows, tokenizer, "{text}", seq_len, pack=False)
    else:
        examples = tokenize_supervised(probe.rows, tokenizer, "{prompt}", "{target}", seq_len)
    # unpacked rows come padded to seq_len: cut them to the longest, so short texts do not pay for seq_len
    longest = int(examples.attention_mask.sum(axis=1).max())
    width = min(examples.input_ids.shape[1], -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
    return dataclasses.replace(examples, **{k: v[:, :width] for k, v in examples.arrays().items()})
