"""`jpeft bench` end to end on a tiny model: --against hf-peft (both sides run, count alike,
compare, beside each framework's matmul peak), qlora, and --load (both ways of loading onto 8 fake
devices load the same values); the rounds and dtypes' bookkeeping on stand-in workers."""
import argparse

import pytest

from jpeft import bench
from jpeft.bench import add_arguments, format_table, main, run_bench
from jpeft.bench_load import format_load_table, run_load_bench
from jpeft.errors import JpeftError

TINY = dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=4, mlp=128, batch=2, seq=32, steps=1, warmup=1)


def _alternates(order: list, rounds: int, dtypes, modes) -> bool:
    """order is, round after round, each dtype's modes with jpeft then hf-peft."""
    one = [f"{side} {m} {d}" for d in dtypes for m in modes for side in ("jpeft", "hf-peft")]
    return order == one * rounds


def test_against_hf_peft_reports_both_sides_their_ratio_and_roofline():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    result = run_bench(**TINY, against="hf-peft", rounds=1, compile_depths=(2,), timeout=300)
    for mode in ("lora", "full"):
        r = result[mode]
        assert r["dtype"] == "float32"
        assert r["jpeft_tok_s"] > 0 and r["hf_peft_tok_s"] > 0
        assert r["jpeft_tok_s_min"] <= r["jpeft_tok_s"] <= r["jpeft_tok_s_max"]
        assert r["ratio"] == pytest.approx(r["jpeft_tok_s"] / r["hf_peft_tok_s"])
        assert r["trainable_params"] == r["hf_peft_trainable_params"]
        assert r["total_params"] == r["hf_peft_total_params"]
        assert r["compile_s"] > 0 and r["peak_rss_mb"] > 0 and r["hf_peft_first_step_s"] > 0
        assert r["hf_peft_frozen_dtypes"] == (["float32"] if mode == "lora" else [])
        assert r["hf_peft_autocast"] is None
        for side in ("jpeft", "hf_peft"):
            assert r[f"{side}_roofline_fraction"] > 0 and r[f"{side}_roofline_fraction_of_best"] > 0
    assert result["lora"]["trainable_params"] < result["full"]["trainable_params"] == result["full"]["total_params"]
    assert set(result["roofline"]) == {"xla", "torch"}
    for peaks in result["roofline"].values():
        assert set(peaks) == {"float32", "bfloat16"} and all(g > 0 for g in peaks.values())
    assert list(result["compile_s_by_layers"]) == ["2"] and result["compile_s_by_layers"]["2"] > 0
    s = result["settings"]
    assert s["malloc_env"]["MALLOC_ARENA_MAX"] == "4"
    assert _alternates(s["run_order"], 1, ["float32"], ["lora", "full"])
    assert s["cpu_flags"] is None or isinstance(s["cpu_flags"], list)
    table = format_table(result)
    assert "hf-peft" in table and "roofline" in table and "matmul flags" in table


def _stand_ins(monkeypatch, platform: str = "cpu") -> list:
    """Replace both sides' workers with ones that answer at once, each run's tok/s one more than the
    last, as if jax ran on `platform`; returns the list of (side, mode, dtype, torch device) they were
    called with."""
    calls = []

    def jpeft_worker(a, mode, timeout):
        calls.append(("jpeft", mode, a["dtype"], None))
        if mode == "roofline":
            return {"roofline": {"float32": 100.0, "bfloat16": 400.0}, "jax": "j", "platform": platform,
                    "devices": [f"{platform}:0"]}
        if mode == "compile":
            return {"compile_s": 0.1 * a["layers"]}
        return {"tok_s": float(len(calls)), "model_tflop_per_step": 0.5, "peak_tflops": None, "step_s": [1.0],
                "compile_s": 2.0, "loss": 1.0, "peak_rss_mb": float(len(calls)), "frozen_mb": 1.0,
                "peak_device_mb": None if platform == "cpu" else 1000.0 + len(calls),
                "trainable_params": 1, "total_params": 2}

    def hf_worker(args, timeout):
        mode, dtype = args["modes"][0], args.get("dtype", "float32")
        calls.append(("hf-peft", mode, dtype, args["device"]))
        out = {"torch": "t", "threads": 2}
        if mode == "roofline":
            return {**out, "roofline": {"float32": 200.0, "bfloat16": 50.0}}
        return {**out, mode: {"tok_s": float(len(calls)), "step_s": [1.0], "first_step_s": 0.5, "peak_rss_mb": 1.0,
                              "peak_device_mb": None if args["device"] == "cpu" else 2000.0,
                              "trainable_params": 1, "total_params": 2, "trainable_dtypes": ["float32"],
                              "frozen_dtypes": ["bfloat16"], "autocast": "bfloat16"}}

    monkeypatch.setattr(bench, "_run_worker", jpeft_worker)
    monkeypatch.setattr(bench, "run_hf_peft", hf_worker)
    return calls


def test_rounds_alternate_the_sides_and_report_median_min_and_max(monkeypatch):
    calls = _stand_ins(monkeypatch)
    result = run_bench(**TINY, modes=("lora", "full"), dtype="both", rounds=3, against="hf-peft")
    train = [c for c in calls if c[1] in ("lora", "full")]
    assert [" ".join(c[:3]) for c in train] == result["settings"]["run_order"]
    assert _alternates(result["settings"]["run_order"], 3, ["float32", "bfloat16"], ["lora", "full"])
    assert [k for k in result if k not in bench.SUMMARY_KEYS] == ["lora", "full", "lora_bf16", "full_bf16"]
    # after 4 calls for the peaks and compiles, lora float32 ran as calls 5, 13, 21 (jpeft) and 6, 14, 22
    r = result["lora"]
    assert (r["jpeft_tok_s_min"], r["jpeft_tok_s"], r["jpeft_tok_s_max"]) == (5.0, 13.0, 21.0)
    assert (r["hf_peft_tok_s_min"], r["hf_peft_tok_s"], r["hf_peft_tok_s_max"]) == (6.0, 14.0, 22.0)
    assert r["ratio"] == pytest.approx(13 / 14) and r["peak_rss_mb"] == 21.0 and len(r["step_s"]) == 3
    tokens = TINY["batch"] * TINY["seq"]
    assert r["jpeft_roofline_fraction"] == pytest.approx(500 * 13 / tokens / 100)  # GFLOP/s over xla's float32
    assert r["hf_peft_roofline_fraction_of_best"] == pytest.approx(500 * 14 / tokens / 200)  # torch's is faster
    bf16 = result["lora_bf16"]
    assert bf16["dtype"] == "bfloat16" and bf16["jpeft_roofline_fraction_of_best"] == bf16["jpeft_roofline_fraction"]
    assert result["compile_s_by_layers"] == {"4": pytest.approx(0.4), "32": pytest.approx(3.2)}
    assert "lora_bf16" in format_table(result) and "torch.autocast" in format_table(result)


def test_on_a_gpu_the_hf_peft_side_runs_on_cuda_and_memory_is_the_devices(monkeypatch):
    calls = _stand_ins(monkeypatch, platform="gpu")
    result = run_bench(**TINY, modes=("lora",), rounds=2, compile_depths=(), against="hf-peft")
    assert {c[3] for c in calls if c[0] == "hf-peft"} == {"cuda"} and result["settings"]["torch_device"] == "cuda"
    r = result["lora"]
    assert (r["peak_device_mb"], r["hf_peft_peak_device_mb"]) == (1000.0 + 5, 2000.0)  # jpeft's 2nd round: call 5
    table = format_table(result)
    assert " 1005 " in table and " 2000 " in table and "accelerator memory" in table
    # the suite runs as the CLI does: float32 matmuls in float32, and the report says so
    assert result["settings"]["matmul_precision"] == "float32" and "matmul precision float32" in table


def test_without_against_only_jpeft_runs_and_only_xla_is_measured(monkeypatch):
    calls = _stand_ins(monkeypatch)
    result = run_bench(**TINY, modes=("lora",), rounds=2, compile_depths=())
    assert {c[0] for c in calls} == {"jpeft"} and set(result["roofline"]) == {"xla"}
    assert result["compile_s_by_layers"] == {} and "hf_peft_tok_s" not in result["lora"]
    assert "not measured" in format_table(result)


@pytest.mark.parametrize("options, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--compile-depths", "4,x"], "--compile-depths takes layer counts"),
    (["--compile-depths", "0"], "--compile-depths are layer counts"),
    (["--steps", "0"], "sizes and --steps must be >= 1 .* got --steps 0"),
    (["--generate", "--vocab", "0"], "got --vocab 0"),
    (["--sft", "x.jsonl", "--warmup", "-1"], "--warmup >= 0; got --warmup -1"),
    (["--hidden", "64", "--heads", "3"], "--heads must divide --hidden"),
    (["--kv-heads", "3"], "--kv-heads must divide --heads"),
])
def test_bad_options_are_jpeft_errors_naming_the_option(options, message):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(JpeftError, match=message):
        main(parser.parse_args(options))


def test_load_with_against_is_a_jpeft_error():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(JpeftError, match="--load measures jpeft's loading only"):
        main(parser.parse_args(["--load", "--against", "hf-peft"]))


def test_unknown_mode_is_a_jpeft_error():
    with pytest.raises(JpeftError, match="unknown modes"):
        run_bench(**TINY, modes=("lora", "ia3"))


def test_qlora_mode_stores_the_frozen_base_in_a_fraction_of_bf16():
    result = run_bench(**TINY, modes=("lora", "qlora"), dtype="bfloat16", rounds=1, compile_depths=(), timeout=300)
    lora, qlora = result["lora_bf16"], result["qlora_bf16"]
    assert qlora["trainable_params"] == lora["trainable_params"] and qlora["total_params"] == lora["total_params"]
    assert qlora["frozen_mb"] < 0.5 * lora["frozen_mb"]  # layers in NF4; the embedding stays bf16
    assert "frozen MiB" in format_table(result)


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
    assert s["malloc_env"]["MALLOC_ARENA_MAX"] == "4"
    assert "sharded_from_birth" in format_load_table(result)


def test_qlora_load_bench_reads_the_same_codes_either_way():
    """--load --method qlora: a float base quantized after loading and one read straight into its codes end in
    the same QLoRA tree (codes exactly; double quantization's float statistics to a float32 ulp, as XLA sums a
    layer and a stack in different orders)."""
    size = {k: TINY[k] for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "mlp")}
    result = run_load_bench(**size, dtype="bfloat16", method="qlora", rank=4, timeout=300)
    r = result["load"]
    after, read = r["quantize_after_load"]["checksum"], r["quantized_load"]["checksum"]
    codes = "model/layers/self_attn/q_proj/kernel_nf4"
    assert {codes, "model/layers/mlp/down_proj/kernel_absmax_q", "model/layers/self_attn/q_proj/lora_a",
            "model/embed_tokens/embedding"} <= set(read)
    assert "model/layers/mlp/down_proj/kernel" not in read  # every layer weight quantized, not only the targets
    assert set(after) == set(read)
    for path in read:
        if path.endswith(("_offset", "_scale")) and "lora" not in path:
            assert read[path] == pytest.approx(after[path], rel=1e-6), path
        else:
            assert read[path] == after[path], path
    for w in (r["quantize_after_load"], r["quantized_load"]):
        assert w["load_mb"] == pytest.approx(w["peak_rss_mb"] - r["baseline_rss_mb"]) and w["load_s"] > 0
    assert r["ratio"] == pytest.approx(r["quantized_load"]["load_mb"] / r["quantize_after_load"]["load_mb"])
    assert "QLoRA(" in result["settings"]["method"] and "double_quant=True" in result["settings"]["method"]
    assert "quantized_load/quantize_after_load" in format_load_table(result)
    with pytest.raises(JpeftError, match="--method 'ia3'"):
        run_load_bench(**size, method="ia3")
