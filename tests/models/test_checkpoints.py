"""Checkpoint directories both ways: sharded and prefix-less files as transformers reads them, tied and untied
heads, what `save_pretrained` writes (one dtype, one file) read back by transformers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jpeft
from conftest import FAMILIES, GPT2, jit_logits, make_hf_model, save_hf_model
from test_parity import torch_logits


def test_sharded_safetensors_load(tmp_path):
    ref_model = make_hf_model("llama")
    path = save_hf_model(ref_model, tmp_path, max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    model, params = jpeft.from_pretrained(path)
    ids = np.arange(8)[None] % 97
    np.testing.assert_allclose(jit_logits(model, params, ids),
                               torch_logits(ref_model, ids), atol=2e-4, rtol=0)
    # Saved over, the dir holds one model.safetensors: the old shards would be read back (as they were) otherwise.
    other = jax.tree.map(lambda x: -x, params)
    jpeft.save_pretrained(path, model, other)
    assert sorted(f for f in os.listdir(path) if "safetensors" in f) == ["model.safetensors"]
    reread = jpeft.from_pretrained(path)[1]
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), reread, other)))


@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("gpt2", GPT2)])
def test_a_base_model_checkpoint_without_the_prefix_loads(model_type, overrides, tmp_path):
    """Weights saved from the base model (`LlamaModel`; GPT-2 as the hub holds it, with its old attention
    buffers) are named without `model.` / `transformer.`; transformers adds it on load, and so does jpeft."""
    ref_model = make_hf_model(model_type, tie_word_embeddings=True, **overrides)
    path = save_hf_model(ref_model, tmp_path / "src")
    file = os.path.join(path, "model.safetensors")
    tensors = {name.split(".", 1)[1]: value for name, value in load_file(file).items() if name != "lm_head.weight"}
    if model_type == "gpt2":
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    save_file(tensors, file, metadata={"format": "pt"})
    model, params = jpeft.from_pretrained(path)
    ids = np.random.RandomState(4).randint(0, 97, (2, 9))
    np.testing.assert_allclose(jit_logits(model, params, ids),
                               torch_logits(ref_model, ids), atol=2e-4, rtol=0)


@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("qwen2", dict(tie_word_embeddings=True)),
                                                 ("gpt2", GPT2), ("mpt", FAMILIES["mpt"]),
                                                 ("exaone", FAMILIES["exaone"])])
def test_save_pretrained_loads_in_transformers(model_type, overrides, tmp_path):
    """... under the names the family's files use (EXAONE 3's GPT-2-like ones, as transformers saves them)."""
    ref_model = make_hf_model(model_type, **overrides)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path / "src"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    jpeft.save_pretrained(str(tmp_path / "out"), model, params, tokenizer_from=str(tmp_path / "src"))
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_file(tmp_path / "src" /
                                                                                  "model.safetensors"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.random.RandomState(2).randint(0, 97, (2, 9))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(ref_model, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type,overrides", [("qwen2", {}), ("gpt2", GPT2)])
def test_a_tied_config_with_its_own_head_in_the_file_loads_untied(model_type, overrides, tmp_path):
    """config.json ties the head, but the weights hold an lm_head.weight that differs from the embedding:
    transformers then uses that head (and warns), and so does jpeft, which saves the model untied. An
    lm_head.weight equal to the embedding leaves the model tied."""
    path = save_hf_model(make_hf_model(model_type, tie_word_embeddings=True, **overrides), tmp_path / "src")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    embedding = next(k for k in tensors if k.endswith(("embed_tokens.weight", "wte.weight")))
    save_file({**tensors, "lm_head.weight": tensors[embedding]}, file, metadata={"format": "pt"})
    assert "lm_head" not in jpeft.from_pretrained(path)[1]
    head = np.random.RandomState(0).randn(*tensors[embedding].shape).astype(np.float32)
    save_file({**tensors, "lm_head.weight": head}, file, metadata={"format": "pt"})
    model, params = jpeft.from_pretrained(path)
    ids = np.random.RandomState(1).randint(0, 97, (2, 9))
    theirs = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), ids)
    np.testing.assert_allclose(jit_logits(model, params, ids), theirs, atol=2e-4,
                               rtol=0)
    jpeft.save_pretrained(str(tmp_path / "out"), model, params)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(torch_logits(reloaded, ids), theirs, atol=1e-6, rtol=0)


def test_a_checkpoint_is_written_in_one_dtype_that_config_json_names(tmp_path, caplog):
    """transformers loads a checkpoint in config.json's one dtype: a float32 leaf (a trained norm, a merge) on a
    bf16 base is written as what the rest is, with a warning, unless dtype= says otherwise."""
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "src"), dtype="bfloat16")
    params = {**params, "model": {**params["model"], "norm": {"scale": params["model"]["norm"]["scale"].astype(
        jnp.float32) + 1e-3}}}
    for out, dtype, stored in (("default", None, "BF16"), ("wide", "float32", "F32")):
        caplog.clear()
        jpeft.save_pretrained(str(tmp_path / out), model, params, dtype=dtype)
        with safe_open(str(tmp_path / out / "model.safetensors"), "np") as f:
            assert {f.get_slice(name).get_dtype() for name in f.keys()} == {stored}
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["dtype"] == {"BF16": "bfloat16", "F32": "float32"}[stored]
        assert ("32 float32 parameters rounded to bfloat16" in caplog.text) == (dtype is None)


def test_bfloat16_load(tmp_path):
    ref_model = make_hf_model("llama")
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path), dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids = np.random.RandomState(3).randint(0, 97, (1, 8))
    out = jit_logits(model, params, ids)
    ref = torch_logits(ref_model, ids)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_the_abstract_tree_is_traced_once_per_config_and_handed_out_as_copies(tmp_path):
    """`abstract_params` caches one trace per model config: equal configs share it, another config gets its own,
    and a caller that edits its tree leaves the next caller's whole."""
    from jpeft.models.hf import abstract_params
    from jpeft import tree as T
    model, _ = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "a"))
    wider, _ = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", intermediate_size=96), tmp_path / "b"))
    first = abstract_params(model)
    del first["lm_head"]
    again = T.flatten(abstract_params(jpeft.from_pretrained(str(tmp_path / "a"))[0]))
    assert "lm_head/kernel" in again and again["model/layers/mlp/up_proj/kernel"].value.shape == (2, 32, 64)
    assert T.flatten(abstract_params(wider))["model/layers/mlp/up_proj/kernel"].value.shape == (2, 32, 96)
