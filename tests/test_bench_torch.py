"""The hf-peft side of `jpeft bench`: runs in its own process, counts parameters as PEFT does, runs
bf16 as a PEFT user would, and times torch.matmul for the roofline."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from jpeft.bench_torch import run_hf_peft  # noqa: E402
from jpeft.errors import JpeftError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 4, "intermediate_size": 128, "batch": 2, "seq": 32,
        "rank": 8, "steps": 1, "warmup": 1}


def test_lora_and_full_report_speed_and_param_counts():
    out = run_hf_peft(TINY, timeout=300)
    assert out["threads"] >= 1 and out["torch"]
    for mode in ("lora", "full"):
        assert out[mode]["tok_s"] > 0
        assert len(out[mode]["step_s"]) == TINY["steps"]
        assert out[mode]["peak_rss_mb"] > 0 and out[mode]["first_step_s"] > 0
        assert out[mode]["trainable_dtypes"] == ["float32"] and out[mode]["autocast"] is None
    # q_proj and v_proj are both hidden -> hidden here (kv heads == heads): A is r x in, B is out x r.
    h, r = TINY["hidden_size"], TINY["rank"]
    assert out["lora"]["trainable_params"] == TINY["num_layers"] * 2 * r * (h + h)
    assert out["full"]["trainable_params"] == out["full"]["total_params"]
    assert out["lora"]["total_params"] == out["full"]["total_params"] + out["lora"]["trainable_params"]


def test_bf16_lora_has_a_bf16_base_and_float32_adapters_full_float32_weights_under_autocast():
    out = run_hf_peft({**TINY, "dtype": "bfloat16"}, timeout=300)
    lora, full = out["lora"], out["full"]
    assert lora["frozen_dtypes"] == ["bfloat16"] and lora["trainable_dtypes"] == ["float32"]
    assert full["frozen_dtypes"] == [] and full["trainable_dtypes"] == ["float32"]
    assert lora["autocast"] == full["autocast"] == "bfloat16"
    assert lora["tok_s"] > 0 and full["tok_s"] > 0


def test_roofline_mode_reports_matmul_gflops_per_dtype():
    out = run_hf_peft({**TINY, "modes": ["roofline"]}, timeout=300)
    assert set(out["roofline"]) == {"float32", "bfloat16"} and all(g > 0 for g in out["roofline"].values())


def test_never_imports_jax():
    code = ("import sys; from jpeft.bench_torch import main; "
            f"main(['--json-args', {json.dumps(json.dumps(TINY))}, '--modes', 'lora']); "
            "assert 'jax' not in sys.modules, "
            "'jax was imported: jpeft/__init__.py (run by -m jpeft.bench_torch) must import it lazily'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(proc.stdout.splitlines()[-1])) == {"lora", "torch", "threads"}


def test_bad_arguments_raise_jpeft_error():
    with pytest.raises(JpeftError, match="unknown keys"):
        run_hf_peft({**TINY, "layers": 2}, timeout=300)
    with pytest.raises(JpeftError, match="dtype 'float16' is not supported"):
        run_hf_peft({**TINY, "dtype": "float16"}, timeout=300)
