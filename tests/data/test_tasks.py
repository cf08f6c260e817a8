"""A run's tasks: mixtures draw each task's share of examples, deterministically and resumably; splits
are disjoint and recorded; every row is accounted for (and data.strict turns a drop into an error)."""
import json

import datasets
import numpy as np
import pytest

from jpeft.config import load_config
from jpeft.data import Examples
from jpeft.data.prepare import prepare_rows, run_data
from jpeft.data.tasks import Task, mixing_rates, mixture_batches, row_shares, run_tasks, split_rows
from jpeft.errors import ConfigError, DataError
from jpeft.train import trainer
from conftest import read_metrics, run_config


def mixture_examples(rows_per_task, examples_per_row):
    """Examples of several tasks with known examples per row (packed rows number their segments)."""
    parts, start = [], 0
    for n, per_row in zip(rows_per_task, examples_per_row):
        segments = np.repeat(np.arange(1, per_row + 1), 4)[None].repeat(n, 0).astype(np.int32)
        ids = np.arange(start, start + n * segments.shape[1], dtype=np.int32).reshape(n, -1)  # every row unique
        start += ids.size
        parts.append(Examples(ids, ids, np.ones(ids.shape, np.float32), segments, np.zeros_like(segments)))
    return Examples.concatenate(parts)


def drawn(examples, rates, steps, batch_size=32, seed=0, start=0):
    stream = mixture_batches(examples, rates, batch_size, seed, start)
    return [next(stream) for _ in range(steps)]


def test_rates_are_weights_or_capped_sizes():
    assert mixing_rates([Task("a", None, 3.0), Task("b", None, 1.0)], [10, 1000]) == pytest.approx([0.75, 0.25])
    proportional = mixing_rates([Task("a", None), Task("b", None, cap=500), Task("c", None)], [100, 10_000, 400])
    assert proportional == pytest.approx(np.array([100, 500, 400]) / 1000)


def test_draws_give_each_task_its_share_of_examples():
    """Over 10k+ draws each task's share of examples is its rate, although their rows hold 1, 3 and 5 examples."""
    examples = mixture_examples([50, 40, 30], [1, 3, 5])
    rates = np.array([0.5, 0.3, 0.2])
    batches = drawn(examples, row_shares(rates, [50, 120, 150], [50, 40, 30]), 400)
    task, per_row = np.concatenate([b["task"] for b in batches]), examples.examples_per_row()
    counts = np.array([per_row[examples.task == t][0] * np.sum(task == t) for t in range(3)])
    assert len(task) >= 10_000
    np.testing.assert_allclose(counts / counts.sum(), rates, atol=0.02)
    for b in batches:  # rows carry their own task's arrays
        rows = [np.flatnonzero((examples.input_ids == r).all(axis=1))[0] for r in b["input_ids"]]
        assert (examples.task[rows] == b["task"]).all()


def test_each_task_runs_through_its_rows_once_per_epoch():
    examples = mixture_examples([5, 7], [1, 1])
    ids = np.concatenate([b["input_ids"][:, 0] for b in drawn(examples, np.array([0.5, 0.5]), 20, batch_size=4)])
    for t, n in ((0, 5), (1, 7)):
        firsts = [i for i in ids if i in set(examples.input_ids[examples.task == t, 0])]
        for epoch in range(len(firsts) // n):
            assert sorted(firsts[epoch * n:(epoch + 1) * n]) == sorted(examples.input_ids[examples.task == t, 0])


def test_a_resumed_stream_draws_what_the_uninterrupted_one_did():
    examples = mixture_examples([9, 13, 4], [2, 1, 3])
    rates = np.array([0.2, 0.5, 0.3])
    whole = drawn(examples, rates, 30, batch_size=8, seed=5)
    resumed = drawn(examples, rates, 13, batch_size=8, seed=5, start=17)
    for a, b in zip(whole[17:], resumed):
        assert all((a[k] == b[k]).all() for k in a)
    other = drawn(examples, rates, 30, batch_size=8, seed=6)
    assert any((a["input_ids"] != b["input_ids"]).any() for a, b in zip(whole, other))


def test_ratio_splits_are_disjoint_complete_and_seeded(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(100)))
    parts = split_rows(str(path), {"train": 0.8, "eval": 0.1, "test": 0.1}, seed=0)
    ids = {part: set(row_ids) for part, (_, row_ids) in parts.items()}
    assert [len(ids[p]) for p in ("train", "eval", "test")] == [80, 10, 10]
    assert not (ids["train"] & ids["eval"] or ids["train"] & ids["test"] or ids["eval"] & ids["test"])
    for part, (rows, row_ids) in parts.items():
        assert [r["i"] for r in rows] == row_ids  # the recorded ids are the rows' own numbers
    assert split_rows(str(path), {"train": 0.8, "eval": 0.1}, seed=0)["eval"][1] == parts["eval"][1]
    assert split_rows(str(path), {"train": 0.8, "eval": 0.1}, seed=1)["eval"][1] != parts["eval"][1]


def test_named_splits_of_a_datasets_dir(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"t": "a"}, {"t": "b"}]),
                          "validation": datasets.Dataset.from_list([{"t": "c"}])}).save_to_disk(tmp_path / "d")
    parts = split_rows(str(tmp_path / "d"), {"train": "train", "eval": "validation"}, seed=0)
    assert [r["t"] for r in parts["eval"][0]] == ["c"] and len(parts["train"][0]) == 2
    with pytest.raises(DataError, match="names split 'test', which .* does not hold"):
        split_rows(str(tmp_path / "d"), {"train": "train", "eval": "test"}, seed=0)


def test_split_and_mixture_config_errors():
    base = ["data.train=x.jsonl", "data.text=t"]
    with pytest.raises(ConfigError, match=r"data.split.*takes the parts train, eval, test"):
        load_config(None, base + ["data.split={train: 0.9, dev: 0.1}"])
    with pytest.raises(ConfigError, match="ratios add up to 1.2"):
        load_config(None, base + ["data.split={train: 0.9, eval: 0.3}"])
    with pytest.raises(ConfigError, match="eval part and data.eval='e.jsonl' is set too"):
        load_config(None, base + ["data.split={train: 0.9, eval: 0.1}", "data.eval=e.jsonl"])
    with pytest.raises(ConfigError, match="data.train.*conflicts with data.mixture"):
        load_config(None, base + ["data.mixture=[{train: a.jsonl, text: t}]"])
    with pytest.raises(ConfigError, match="entry 1 has an unknown key 'wieght' \\(did you mean 'weight'\\?\\)"):
        load_config(None, ["data.mixture=[{train: a.jsonl, text: t}, {train: b.jsonl, text: t, wieght: 2}]"])
    with pytest.raises(ConfigError, match="entry 0: train needs templates"):
        load_config(None, ["data.mixture=[{train: a.jsonl}]"])
    with pytest.raises(ConfigError, match=r"task names must differ, got \['a', 'a'\]"):
        load_config(None, ["data.mixture=[{train: x/a.jsonl, text: t}, {train: y/a.jsonl, text: t}]"])
    with pytest.raises(ConfigError, match="entry 0: weight must be positive"):
        load_config(None, ["data.mixture=[{train: a.jsonl, text: t, weight: 0}]"])
    with pytest.raises(ConfigError, match="gives some entries a weight and not others"):
        load_config(None, ["data.mixture=[{train: a.jsonl, text: t, weight: 1}, {train: b.jsonl, text: t}]"])
    with pytest.raises(ConfigError, match="sets a cap beside weights"):
        load_config(None, ["data.mixture=[{train: a.jsonl, text: t, weight: 1, cap: 5}]"])
    with pytest.raises(ConfigError, match="data.mixture.*must be a list of mappings"):
        load_config(None, ["data.mixture=[a.jsonl]"])
    cfg = load_config(None, ["data.packing=false", "data.mixture=[{train: a.jsonl, text: t, cap: 2}, "
                             "{name: s, train: b.jsonl, template: qa, packing: true}]"])
    tasks = run_tasks(cfg.data)
    assert [(t.name, t.cap, t.data.packing, t.data.template) for t in tasks] == [
        ("a", 2, False, None), ("s", None, True, "qa")]  # entries override the run's data.* keys


def test_rows_are_accounted_for_and_strict_refuses_drops(tokenizer):
    rows = datasets.Dataset.from_list([{"p": "a cat sat", "t": "dog ran"}, {"p": None, "t": "park"},
                                       {"p": "hello world", "t": None}, {"p": "the park", "t": "home"},
                                       {"p": "we go out " * 10, "t": "and then home"}])
    data = load_config(None, ["data.train=x.jsonl", "data.prompt={p}", "data.target=t", "data.packing=false"]).data
    prepared = prepare_rows(data, rows, "x.jsonl", tokenizer, 12)
    full = [tokenizer(r["p"])["input_ids"] + tokenizer(r["t"], add_special_tokens=False)["input_ids"] + [2]
            for r in rows if r["p"] and r["t"]]
    assert prepared.report == {
        "rows_read": 5, "rows_used": 3, "rows_dropped": {"column 'p' missing (null)": 1, "column 't' missing (null)": 1},
        "examples_truncated": 1, "prompt_tokens_lost": sum(max(len(f) - 13, 0) for f in full),  # seq_len + 1 fit
        "target_tokens_lost": 0}  # a target within half the budget is kept whole
    assert prepared.report["prompt_tokens_lost"] == 1 + 30 + 3 + 1 - 13  # BOS, 10 x "we go out", target, EOS
    strict = load_config(None, ["data.train=x.jsonl", "data.prompt={p}", "data.target=t", "data.strict=true"]).data
    with pytest.raises(DataError, match="row 2: column 'p' is missing"):
        prepare_rows(strict, rows, "x.jsonl", tokenizer, 12)


def test_text_rows_follow_data_packing(tokenizer):
    """data.text packed: one stream of texts cut into windows; data.packing=false: a padded row per text."""
    rows = datasets.Dataset.from_list([{"t": "a cat sat on the mat"}, {"t": "hello world"}, {"t": "we go out"}])
    streams = {packing: prepare_rows(load_config(None, ["data.train=x.jsonl", "data.text=t", "data.prompt=null",
                                                        "data.target=null", f"data.packing={packing}"]).data,
                                     rows, "x.jsonl", tokenizer, 8).examples for packing in ("true", "false")}
    assert len(streams["true"]) == 2 and streams["true"].attention_mask.all()
    unpacked = streams["false"]
    assert len(unpacked) == 3 and (unpacked.labels == tokenizer.eos_token_id).sum(axis=1).tolist() == [1, 1, 1]
    assert unpacked.attention_mask.sum(axis=1).tolist() == [8, 4, 5]  # BOS, the text, EOS (an input too)


def test_a_mixed_run_logs_each_task_and_evaluates_on_rows_it_never_trained_on(tiny_run, tmp_path):
    """A summarization task (a template set, its own eval file) mixed with language modelling on a split
    of the dialogues: per-task loss and eval keys, data.json, and a split.json whose eval rows are not
    among the training rows."""
    mixture = json.dumps([
        {"name": "summarize", "train": tiny_run["train"], "eval": tiny_run["eval"], "template": "summarization",
         "columns": {"text": "dialogue"}, "weight": 3},
        {"name": "dialogues", "train": tiny_run["train"], "text": "dialogue", "split": {"train": 0.75, "eval": 0.25},
         "weight": 1}])
    out = tmp_path / "run"
    record = trainer.train(run_config(tiny_run, out, "data.prompt=null", "data.target=null", "data.train=null",
                                      "data.eval=null", f"data.mixture={mixture}", "train.log_every=2",
                                      "data.eval_limit=2", "data.max_new_tokens=4"), progress=False)
    records = read_metrics(out)
    assert any("loss_summarize" in r for r in records) and any("loss_dialogues" in r for r in records)
    for r in records:  # each task's loss is part of the step's: the token-weighted mean of the parts is the whole
        if "loss_summarize" in r and "loss_dialogues" in r:
            assert min(r["loss_summarize"], r["loss_dialogues"]) <= r["loss"] <= max(r["loss_summarize"],
                                                                                     r["loss_dialogues"])
    assert {"eval_summarize_loss", "eval_dialogues_loss", "eval_loss", "eval_summarize_rougeL"} <= record.keys()
    assert "eval_dialogues_rougeL" not in record  # language modelling has no outputs to score
    low, high = sorted((record["eval_summarize_loss"], record["eval_dialogues_loss"]))
    assert low <= record["eval_loss"] <= high
    report = json.loads((out / "data.json").read_text())
    assert set(report) == {"summarize/train", "summarize/eval", "dialogues/train", "dialogues/eval"}
    assert report["dialogues/train"]["rows_read"] == 30 and report["dialogues/eval"]["rows_read"] == 10
    split = json.loads((out / "split.json").read_text())["dialogues"]
    assert not set(split["train"]) & set(split["eval"]) and len(split["train"]) + len(split["eval"]) == 40
    train_rows = [json.loads(line) for line in open(tiny_run["train"])]
    held_out = {train_rows[i]["dialogue"] for i in split["eval"]}
    assert not held_out & {train_rows[i]["dialogue"] for i in split["train"]}


def test_replay_texts_get_their_share_of_the_examples(tiny_run):
    """configs/dialogsum_lora_replay.yaml's 80/20: a replay window of the dialogue stream holds parts of texts
    (each ending in EOS), not one example, yet counted by the texts drawn the replay share is 20%."""
    cfg = load_config("configs/dialogsum_lora_replay.yaml", [f"model.path={tiny_run['model']}", "train.seq_len=256"])
    tokenizer = trainer.load_tokenizer(tiny_run["model"])
    data = run_data(cfg, tokenizer)
    replay = [t.name for t in data.tasks].index("replay")
    per_window = np.mean((data.train.labels == tokenizer.eos_token_id).sum(axis=1)[data.train.task == replay])
    assert abs(per_window - 1) > 0.25  # drawn as one example each, windows would get another share
    counts = np.zeros(2)
    for batch in drawn(data.train, data.draws, 400):
        for t in range(2):
            rows = batch["task"] == t
            counts[t] += (batch["labels"][rows] == tokenizer.eos_token_id).sum() if t == replay else \
                np.maximum(batch["attention_mask"][rows].max(axis=1), 1).sum()
    assert counts[replay] / counts.sum() == pytest.approx(0.2, abs=0.02)


def test_the_replay_config_runs_as_shipped(tiny_run, tmp_path):
    """configs/dialogsum_lora_replay.yaml on a tiny model: both tasks train on the same 90% of the rows and
    evaluate on the other 10%."""
    out = tmp_path / "run"
    cfg = load_config("configs/dialogsum_lora_replay.yaml", [
        f"model.path={tiny_run['model']}", "model.dtype=float32", "train.steps=2", "train.batch_size=4",
        "train.seq_len=128", "train.eval_every=0", "data.eval_limit=1", "data.max_new_tokens=4", f"out_dir={out}"])
    record = trainer.train(cfg, progress=False)
    assert {"eval_summarize_loss", "eval_replay_loss", "eval_summarize_rougeL"} <= record.keys()
    split = json.loads((out / "split.json").read_text())
    assert split["summarize"]["eval"] == split["replay"]["eval"] and len(split["replay"]["eval"]) == 50
    assert not set(split["replay"]["train"]) & set(split["summarize"]["eval"])


def test_concatenated_parts_are_padded_with_nothing_to_attend_or_learn():
    """Parts of different widths (an encoder-decoder's rows are padded per file) become one set of rows whose
    extra columns neither attend nor count; positions count on where a part has none."""
    def part(n, width, target, packed):
        ids = np.full((n, width), 7, np.int32)
        return Examples(ids, np.full((n, target), 5, np.int32), np.ones((n, target), np.float32),
                        np.ones((n, width), np.int32), np.zeros((n, width), np.int32) + 3 if packed else None,
                        decoder_input_ids=np.full((n, target), 9, np.int32), n_truncated=1, target_tokens_lost=2)
    merged = Examples.concatenate([part(2, 4, 3, True), part(3, 6, 5, False)])
    assert merged.input_ids.shape == (5, 6) and merged.labels.shape == merged.decoder_input_ids.shape == (5, 5)
    assert merged.task.tolist() == [0, 0, 1, 1, 1] and merged.n_truncated == 2 and merged.target_tokens_lost == 4
    assert (merged.attention_mask[:2, 4:] == 0).all() and (merged.loss_mask[:2, 3:] == 0).all()
    assert (merged.positions[:2, :4] == 3).all() and merged.positions[2:].tolist() == [list(range(6))] * 3
