"""`jpeft bench --generate` on a tiny model: both sides decode the same tokens and every reported
field is there (timings are never asserted); the CLI wiring and its errors."""
import argparse
import json

import pytest

from jpeft import bench_generate
from jpeft.bench import add_arguments, main
from jpeft.bench_generate import format_generate_table, run_generate_bench
from jpeft.errors import JpeftError

TINY = dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64)
SIDE_FIELDS = ("tok_s", "call_s", "prefill_s", "first_call_s")


def _parse(options):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(options)


def test_both_sides_decode_the_same_tokens_and_report_every_field():
    pytest.importorskip("torch")
    result = run_generate_bench(**TINY, prompt=8, new_tokens=4, steps=1, timeout=600)
    assert list(result["generate"]) == ["batch_1", "batch_8"]
    for r in result["generate"].values():
        assert r["same_tokens"] is True
        assert {"ratio", "jpeft_compile_s"} <= set(r)
        assert all(f"{side}_{field}" in r for side in ("jpeft", "hf") for field in SIDE_FIELDS)
    s = result["settings"]
    assert s["cpu_flags"] is None or isinstance(s["cpu_flags"], list)
    assert {"dtype", "jax", "torch", "torch_threads", "malloc_env", "new_tokens", "prompt"} <= set(s)
    table = format_generate_table(result)
    assert "transformers" in table and "matmul flags" in table


def test_generate_option_runs_the_generate_bench_with_the_bench_sizes(monkeypatch, capsys):
    seen = {}

    def stand_in(**kwargs):
        seen.update(kwargs)
        return {"generate": {"batch_1": {}}, "settings": {}}

    monkeypatch.setattr(bench_generate, "run_generate_bench", stand_in)
    main(_parse(["--generate", "--json", "--vocab", "64", "--layers", "2", "--dtype", "bfloat16"]))
    assert json.loads(capsys.readouterr().out) == {"generate": {"batch_1": {}}, "settings": {}}
    assert seen["vocab"] == 64 and seen["layers"] == 2 and seen["dtype"] == "bfloat16"


@pytest.mark.parametrize("options,message", [
    (["--generate", "--dtype", "both"], "--dtype 'both'"),
    (["--generate", "--steps", "0"], "--steps"),
    (["--generate", "--against", "hf-peft"], "drop --against"),
])
def test_bad_options_are_jpeft_errors_naming_the_option(options, message):
    with pytest.raises(JpeftError, match=message):
        main(_parse(options))
