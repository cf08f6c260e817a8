"""`jpeft train` with every method name: it learns, exports, and the export loads back."""
import json

import jax
import numpy as np
import pytest

import jpeft
from jpeft import tree as T
from jpeft.config import load_config
from jpeft.errors import ConfigError
from jpeft.train import trainer
from conftest import family_run, jit_logits, read_metrics, run_config

RUNS = {
    "dora-pissa-layers": ["method.name=lora", "method.use_dora=true", "method.init=pissa", "method.layers=[1]",
                          "method.targets=[q_proj,down_proj]"],
    "lora-plus-embed": ["method.name=lora", "method.lr_ratio=8", "method.targets=[embed_tokens,v_proj]"],
    "qlora": ["method.name=qlora", "method.quant=nf4", "method.double_quant=true"],
    "ia3": ["method.name=ia3"],
    "vera-dropout": ["method.name=vera", "method.targets=all-linear", "method.dropout=0.1"],
    "loha": ["method.name=loha", "method.targets=[q_proj,v_proj,down_proj]"],
    "lokr-decompose-both": ["method.name=lokr", "method.rank=1", "method.decompose_both=true",
                            "method.targets=[q_proj,v_proj,down_proj]"],
    "oft-shared-exact": ["method.name=oft", "method.block_size=8", "method.block_share=true",
                         "method.use_cayley_neumann=false", "method.targets=[q_proj,down_proj]"],
    "hra-gram-schmidt": ["method.name=hra", "method.rank=3", "method.gram_schmidt=true",
                         "method.targets=[v_proj,up_proj]"],
    "road-2": ["method.name=road", "method.variant=road_2", "method.group_size=16", "method.targets=[v_proj,up_proj]"],
    "lora-new-tokens": ["method.name=lora", "method.trainable_token_indices=[10,11,12]"],
    "trainable-tokens": ["method.name=trainable_tokens", f"method.token_indices=[{','.join(map(str, range(10, 60)))}]"],
    "bitfit": ["method.name=bitfit"],
    "norm": ["method.name=norm"],
    "bottleneck-parallel": ["method.name=bottleneck", "method.kind=parallel", "method.size=8", "method.scale=4"],
    "prompt-from-text": ["method.name=prompt", "method.num_virtual_tokens=4", "method.init_text=Summarize briefly"],
    "p-tuning": ["method.name=p_tuning", "method.num_virtual_tokens=4", "method.projection=16"],
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
    assert np.abs(np.asarray(model.apply({"params": adapted}, ids) - jit_logits(model, base, ids))).max() > 1e-4


def test_lora_bias_trains_the_adapted_modules_biases_and_exports_them(tiny_run, tmp_path):
    """method.bias=lora_only on Qwen2 (q/k/v biases): q_proj's biases train and reach the dir (as PEFT's
    `base_layer.bias`), k_proj's stay the base's bit for bit."""
    run = family_run(tiny_run, tmp_path, "qwen2")
    trainer.train(run_config(run, tmp_path, "train.steps=3", "train.lr=3e-2", "method.name=lora",
                             "method.targets=[q_proj]", "method.bias=lora_only"), progress=False)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["bias"] == "lora_only"
    _, base = jpeft.from_pretrained(run["model"])
    adapted, base = T.flatten(jpeft.load_adapter(str(tmp_path / "adapter"), base)), T.flatten(base)
    bias = "model/layers/self_attn/{}/bias".format
    assert np.abs(np.asarray(adapted[bias("q_proj")] - base[bias("q_proj")])).max() > 1e-4
    np.testing.assert_array_equal(adapted[bias("k_proj")], base[bias("k_proj")])


def test_method_options_are_checked(caplog):
    load_config(None, ["method.name=ia3", "method.rank=4"])
    assert "method.rank: not options of method.name=ia3 (its options: feedforward, modules_to_save, targets); ignored" in caplog.text
    load_config(None, ["method.name=full", "method.modules_to_save=[lm_head]"])
    assert "method.modules_to_save: not options of method.name=full (its options: none); ignored" in caplog.text
    with pytest.raises(ConfigError, match="method.init.*one of peft, gaussian, pissa, olora"):
        load_config(None, ["method.init=svd"])
    cfg = load_config(None, ["method.name=lora", r"method.targets=model\.layers\.0\..*_proj"])
    assert cfg.method.targets == r"model\.layers\.0\..*_proj"  # a string with regex characters stays a regex


def test_an_unset_rank_or_alpha_is_the_methods_own_default():
    """PEFT's defaults: LoRA's r=8, VeRA's r=256, LoHa's and LoKr's alpha=8 (a shared config default would give VeRA
    LoRA's rank and LoHa LoRA's alpha, jpeft's 16)."""
    lora = trainer.build_method(load_config(None, ["method.name=lora"]))
    assert (lora.rank, lora.alpha) == (8, 16.0)
    assert trainer.build_method(load_config(None, ["method.name=vera"])).rank == 256
    loha = trainer.build_method(load_config(None, ["method.name=loha"]))
    assert (loha.rank, loha.alpha) == (8, 8.0)
    lokr = trainer.build_method(load_config(None, ["method.name=lokr", "method.decompose_factor=4"]))
    assert (lokr.rank, lokr.alpha, lokr.decompose_both, lokr.decompose_factor) == (8, 8.0, False, 4)
    vera = trainer.build_method(load_config(None, ["method.name=vera", "method.rank=16", "method.d_initial=0.2"]))
    assert vera.rank == 16 and vera.d_initial == 0.2


@pytest.mark.parametrize("family", ["t5", "gpt2", "phi3"])
@pytest.mark.parametrize("name", ["lora", "ia3", "bitfit"])
def test_unset_targets_default_to_the_familys_own_projection_names(tmp_path, family, name):
    """PEFT's defaults for T5 and GPT-2, Phi-3's fused projections in Llama's stead (Llama's q_proj, v_proj ...
    would match none of their layers)."""
    from conftest import GPT2, make_hf_model, make_t5, save_hf_model
    path = make_t5(tmp_path)[1] if family == "t5" else save_hf_model(
        make_hf_model(family, **(GPT2 if family == "gpt2" else {})), tmp_path)
    method = trainer.build_method(load_config(None, [f"model.path={path}", f"method.name={name}"]))
    _, params = jpeft.from_pretrained(path)
    adapted = method.init(jax.random.key(0), params)
    trained = {p for p, on in T.flatten(method.mask(adapted)).items() if on}
    want = {"t5": {"lora": "/q/", "ia3": "/wo/", "bitfit": "/wi_1/"},
            "gpt2": {"lora": "/c_attn/", "ia3": "mlp/c_proj/", "bitfit": "/c_fc/"},
            "phi3": {"lora": "/qkv_proj/", "ia3": "/down_proj/", "bitfit": "/gate_up_proj/"}}[family][name]
    assert any(want in p for p in trained), sorted(trained)
    if name == "ia3":  # the feed-forward module's vector scales its input
        assert any(want in p and p.endswith("ia3_in") for p in trained)


def test_ia3_defaults_to_pefts_query_scaling_on_qwen_and_gemma(tmp_path):
    from conftest import FAMILIES, make_hf_model, save_hf_model
    path = save_hf_model(make_hf_model("qwen3", **FAMILIES["qwen3"]), tmp_path)
    method = trainer.build_method(load_config(None, [f"model.path={path}", "method.name=ia3"]))
    assert method.targets == ("q_proj", "v_proj", "down_proj") and method.feedforward == ("down_proj",)
