"""`jpeft bench --sft` on a tiny model and a 30-row DialogSum slice: both sides report, and train on
exactly the same target tokens and held-out rows; the CLI passes its options; bad input fails clearly.
Nothing timed is asserted beyond being positive."""
import argparse
import json
import math

import numpy as np
import pytest
from conftest import dialogsum_rows

from jpeft import bench_sft
from jpeft.bench import add_arguments, main
from jpeft.bench_sft import _rows, _tokenize, format_sft_table, run_sft_bench
from jpeft.bench_sft_torch import collate, in_order, target_tokens
from jpeft.errors import ConfigError, DataError, JpeftError

# vocab 1000: the BPE learns enough merges on 24 rows that 512-token rows hold 1-3 examples
TINY = dict(vocab=1000, hidden=32, layers=2, heads=2, kv_heads=2, mlp=64, batch=2, seq=512, steps=3, warmup=1,
            held_out=6)


def _write(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("sft") / "rows.jsonl", dialogsum_rows(30))


@pytest.fixture(scope="module")
def result(sample):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    return run_sft_bench(sample, **TINY, timeout=600)


def test_both_sides_report_on_the_same_data(result):
    r, s = result["sft"], result["settings"]
    for key in ("jpeft_target_tok_s", "hf_peft_target_tok_s", "ratio", "jpeft_s_to_loss", "hf_peft_s_to_loss"):
        assert math.isfinite(r[key]) and r[key] >= 0
    assert r["ratio"] == pytest.approx(r["jpeft_target_tok_s"] / r["hf_peft_target_tok_s"])
    jp, hf = r["jpeft"], r["hf_peft"]
    assert jp["target_tokens_per_epoch"] == hf["target_tokens_per_epoch"] > 0
    assert jp["examples_per_epoch"] == hf["examples_per_epoch"] == hf["rows_per_epoch"] == s["train_rows"] == 24
    assert jp["rows_per_epoch"] < hf["rows_per_epoch"]  # packed
    # one checkpoint, LoRA B = 0 and the same held-out rows: the same loss before training
    assert jp["evals"][0]["loss"] == pytest.approx(hf["evals"][0]["loss"], rel=1e-4)
    assert r["target_loss"] == max(jp["final_loss"], hf["final_loss"])
    for side in (jp, hf):
        assert [e["step"] for e in side["evals"]] == [0, 1, 2, 3] and len(side["step_s"]) == 3
        assert all(math.isfinite(e["loss"]) for e in side["evals"])
        assert 0 <= side["padding_fraction"] < 1
    assert hf["examples_per_step"] == TINY["batch"]
    # jpeft packs a step's examples into fewer rows: the rows that hold `batch` examples on average
    per_row = jp["examples_per_epoch"] / jp["rows_per_epoch"]
    assert jp["rows_per_step"] == max(1, round(TINY["batch"] / per_row)) < TINY["batch"]
    assert jp["token_slots_per_step"] == jp["rows_per_step"] * TINY["seq"]
    assert s["malloc_env"]["MALLOC_ARENA_MAX"] == "4" and isinstance(s["cpu_flags"], list)
    assert s["held_out_rows"] == 6 and s["tokenizer_size"] <= TINY["vocab"]
    table = format_sft_table(result)
    assert "hf-peft" in table and "target tok/s" in table


def test_the_padded_collator_hands_hf_the_packed_rows_target_tokens(sample):
    train, test = _rows(sample, 6)
    data = _tokenize(sample, train, test, 1000, 512, 2)
    packed, rows = data["jpeft"], data["hf_peft"]
    seen = np.take_along_axis(packed.labels, packed.loss_index, axis=1)[
        np.take_along_axis(packed.loss_mask, packed.loss_index, axis=1) > 0]
    batches = list(in_order(rows, 5))
    hf = np.concatenate([b["labels"][:, 1:][b["labels"][:, 1:] != -100] for b in batches])
    assert sorted(seen) == sorted(hf) and len(hf) == sum(target_tokens(b) for b in batches) == packed.loss_mask.sum()
    one = collate({k: v[:1] for k, v in rows.arrays().items()})  # the whole sequence, no padding
    n = int(rows.attention_mask[0].sum())
    assert one["input_ids"].shape == (1, n + 1) and one["attention_mask"].all()
    assert (one["input_ids"][0, 1:] == rows.labels[0, :n]).all()


def test_cli_passes_the_options_and_prints_json(monkeypatch, capsys, result, sample):
    seen = {}
    monkeypatch.setattr(bench_sft, "run_sft_bench", lambda path, **kw: seen.update(kw, path=path) or result)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    main(parser.parse_args(["--sft", sample, "--json", "--seq", "512", "--steps", "7", "--dtype", "bfloat16"]))
    assert json.loads(capsys.readouterr().out)["sft"]["ratio"] == result["sft"]["ratio"]
    assert seen["path"] == sample and (seen["seq"], seen["steps"], seen["dtype"]) == (512, 7, "bfloat16")
    with pytest.raises(JpeftError, match="--load"):
        main(parser.parse_args(["--sft", sample, "--load"]))


@pytest.mark.parametrize("change, error, match", [
    (dict(path="missing.jsonl"), DataError, "not found"),
    (dict(held_out=30), DataError, "30 rows"),
    (dict(batch=30), DataError, "fewer than --batch 30"),
    (dict(dtype="both"), JpeftError, "--dtype"),
    (dict(steps=1), JpeftError, "--warmup"),
    (dict(vocab=100), ConfigError, "--vocab 100"),
])
def test_bad_input_fails_before_training(sample, change, error, match):
    args = {**TINY, "path": sample, **change}
    with pytest.raises(error, match=match):
        run_sft_bench(**args)


def test_rows_without_a_summary_are_refused(tmp_path):
    path = _write(tmp_path / "rows.jsonl", [{"dialogue": r["dialogue"]} for r in dialogsum_rows(10)])
    with pytest.raises(DataError, match="no column 'summary'"):
        run_sft_bench(path, **TINY)


def test_truncated_training_rows_are_reported_once(sample, caplog):
    """The training rows are tokenized twice (packed for jpeft, padded for HF PEFT): one warning."""
    import logging
    train, test = _rows(sample, 6)
    with caplog.at_level(logging.WARNING, logger="jpeft.data"):
        _tokenize(sample, train, test, 1000, 64, 2)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 2 and f"of {len(train)} rows" in warnings[0] and f"of {len(test)} rows" in warnings[1]
