"""`jpeft bench --against hf-peft` end to end on a tiny model: both sides run, count alike, compare."""
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from jpeft.bench import format_table, run_bench  # noqa: E402
from jpeft.errors import JpeftError  # noqa: E402

TINY = dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=4, mlp=128, batch=2, seq=32, steps=1, warmup=1)


def test_against_hf_peft_reports_both_sides_and_their_ratio():
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


def test_unknown_mode_is_a_jpeft_error():
    with pytest.raises(JpeftError, match="unknown modes"):
        run_bench(**TINY, modes=("lora", "ia3"))


def test_qlora_mode_stores_the_frozen_base_in_a_fraction_of_bf16():
    result = run_bench(**TINY, modes=("lora", "qlora"), dtype="bfloat16", timeout=300)
    lora, qlora = result["lora"], result["qlora"]
    assert qlora["trainable_params"] == lora["trainable_params"] and qlora["total_params"] == lora["total_params"]
    assert qlora["frozen_mb"] < 0.5 * lora["frozen_mb"]  # layers in NF4; the embedding stays bf16
    assert "frozen MB" in format_table(result)
