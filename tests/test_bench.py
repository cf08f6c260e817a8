"""`jpeft bench` end to end on a tiny model: --against hf-peft (both sides run, count alike,
compare), qlora, and --load (both ways of loading onto 8 fake devices load the same values)."""
import argparse

import pytest

from jpeft.bench import add_arguments, format_table, main, run_bench
from jpeft.bench_load import format_load_table, run_load_bench
from jpeft.errors import JpeftError

TINY = dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=4, mlp=128, batch=2, seq=32, steps=1, warmup=1)


def test_against_hf_peft_reports_both_sides_and_their_ratio():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    result = run_bench(**TINY, against="hf-peft", timeout=300)
    for mode in ("lora", "full"):
        r = result[mode]
        assert r["jpeft_tok_s"] > 0 and r["hf_peft_tok_s"] > 0
        assert r["ratio"] == pytest.approx(r["jpeft_tok_s"] / r["hf_peft_tok_s"])
        assert r["trainable_params"] == r["hf_peft_trainable_params"]
        assert r["total_params"] == r["hf_peft_total_params"]
        assert r["compile_s"] > 0 and r["peak_rss_mb"] > 0
    assert result["lora"]["trainable_params"] < result["full"]["trainable_params"] == result["full"]["total_params"]
    assert result["settings"]["malloc_env"]["MALLOC_ARENA_MAX"] == "1"
    assert "hf-peft tok/s" in format_table(result)


def test_load_with_against_is_a_jpeft_error():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(JpeftError, match="--load measures loading only"):
        main(parser.parse_args(["--load", "--against", "hf-peft"]))


def test_unknown_mode_is_a_jpeft_error():
    with pytest.raises(JpeftError, match="unknown modes"):
        run_bench(**TINY, modes=("lora", "ia3"))


def test_qlora_mode_stores_the_frozen_base_in_a_fraction_of_bf16():
    result = run_bench(**TINY, modes=("lora", "qlora"), dtype="bfloat16", timeout=300)
    lora, qlora = result["lora"], result["qlora"]
    assert qlora["trainable_params"] == lora["trainable_params"] and qlora["total_params"] == lora["total_params"]
    assert qlora["frozen_mb"] < 0.5 * lora["frozen_mb"]  # layers in NF4; the embedding stays bf16
    assert "frozen MB" in format_table(result)


def test_load_bench_loads_the_same_values_both_ways_and_sharded_costs_no_more():
    size = {k: TINY[k] for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "mlp")}
    result = run_load_bench(**size, timeout=300)
    r = result["load"]
    whole, sharded = r["whole_then_shard"], r["sharded_from_birth"]
    assert {"lm_head/kernel", "model/embed_tokens/embedding", "model/norm/scale"} <= set(whole["checksum"])
    assert all(whole["checksum"].values())
    assert whole["checksum"] == sharded["checksum"]  # exactly: same values, same places, same shards
    assert 0 < r["device_share_mb"] < r["checkpoint_mb"]
    for w in (whole, sharded):
        assert w["peak_rss_mb"] > r["baseline_rss_mb"] > 0 and w["peak_anon_mb"] > 0 and w["load_s"] > 0
        assert w["load_mb"] == pytest.approx(w["peak_rss_mb"] - r["baseline_rss_mb"])
    # Measured on this model: ~48 MB sharded vs ~78 MB whole, each stable to ~2 MB.
    assert sharded["load_mb"] <= whole["load_mb"] + 16
    assert r["ratio"] == pytest.approx(sharded["load_mb"] / whole["load_mb"])
    s = result["settings"]
    assert len(s["devices"]) == 8 and s["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert s["malloc_env"]["MALLOC_ARENA_MAX"] == "1"
    assert "sharded_from_birth" in format_load_table(result)
