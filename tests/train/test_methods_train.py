"""`jpeft train` with every method name: it learns, exports, and the export loads back."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import tree as T
from jpeft.config import load_config
from jpeft.errors import ConfigError
from jpeft.train import trainer
from jpeft.train.optimizer import lora_plus
from conftest import read_metrics, run_config

RUNS = {
    "dora-pissa-layers": ["method.name=lora", "method.use_dora=true", "method.init=pissa", "method.layers=[1]",
                          "method.targets=[q_proj,down_proj]"],
    "lora-plus-embed": ["method.name=lora", "method.lr_ratio=8", "method.targets=[embed_tokens,v_proj]"],
    "qlora": ["method.name=qlora", "method.quant=nf4", "method.double_quant=true"],
    "ia3": ["method.name=ia3"],
    "bitfit": ["method.name=bitfit"],
    "norm": ["method.name=norm"],
    "bottleneck-parallel": ["method.name=bottleneck", "method.kind=parallel", "method.size=8", "method.scale=4"],
    "prompt-from-text": ["method.name=prompt", "method.num_virtual_tokens=4", "method.init_text=Summarize briefly"],
    "prefix-projection": ["method.name=prefix", "method.num_virtual_tokens=4", "method.projection=16"],
    "llama-adapter": ["method.name=llama_adapter", "method.adapter_len=4", "method.adapter_layers=1"],
}


@pytest.mark.parametrize("run", RUNS)
def test_every_method_trains_and_exports(tiny_run, tmp_path, run):
    cfg = run_config(tiny_run, tmp_path, "train.steps=4", "train.lr=3e-2", *RUNS[run])
    trainer.train(cfg, progress=False)
    rows = read_metrics(tmp_path)
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    model, base = jpeft.from_pretrained(tiny_run["model"])
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), base)
    ids = np.arange(1, 20)[None]
    assert np.abs(np.asarray(model.apply({"params": adapted}, ids) - model.apply({"params": base}, ids))).max() > 1e-4


def test_method_options_are_checked(caplog):
    load_config(None, ["method.name=ia3", "method.rank=4"])
    assert "method.rank: not options of method.name=ia3 (its options: feedforward, targets); ignored" in caplog.text
    with pytest.raises(ConfigError, match="method.init.*one of peft, gaussian, pissa, olora"):
        load_config(None, ["method.init=svd"])
    cfg = load_config(None, ["method.name=lora", r"method.targets=model\.layers\.0\..*_proj"])
    assert cfg.method.targets == r"model\.layers\.0\..*_proj"  # a string with regex characters stays a regex


def test_lora_plus_scales_only_b_updates():
    """Adam's first update is ±lr per element, so B's moves exactly `ratio` times further than A's."""
    params = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
    tx = lora_plus(optax.adam(0.1), params, 8.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.abs(updates["q"]["lora_a"]), 0.1, rtol=1e-5)
    np.testing.assert_allclose(np.abs(updates["q"]["lora_b"]), 0.8, rtol=1e-5)
    assert T.count(params) == 14
