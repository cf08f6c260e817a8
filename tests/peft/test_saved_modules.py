"""PEFT's modules_to_save: whole modules a dir carries beside its adapter, read, counted, merged and written back,
and trained by jpeft (`jpeft.modules_to_save`, `method.modules_to_save`)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from jpeft.train import trainer
from test_peft_parity import perturb_torch
from conftest import jit_logits, make_hf_model, read_metrics, run_config, save_hf_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
SAVED = ["lm_head", "embed_tokens", "post_attention_layernorm"]  # a kernel, an embedding, a stacked norm


def logits(model, params):
    return jit_logits(model, params, IDS)


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def peft_dir(path, **overrides):
    """A PEFT LoRA dir whose saved modules differ from the base's (as after training them)."""
    peft_model = peft.get_peft_model(make_hf_model("llama", **overrides), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=SAVED, init_lora_weights=False))
    perturb_torch(peft_model, ("modules_to_save",), 0.2)
    peft_model.eval().save_pretrained(path)
    return peft_model


def test_saved_modules_load_count_merge_and_go_back_to_peft(tmp_path):
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    peft_model = peft_dir(tmp_path / "adapter")
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(logits(model, adapted), torch_logits(peft_model), atol=2e-5, rtol=0)
    assert jpeft.count_parameters(adapted)[0] == peft_model.get_nb_trainable_parameters()[0]
    mask = T.flatten(jpeft.trainable_mask(adapted))
    assert mask["lm_head/kernel"] and mask["model/layers/post_attention_layernorm/scale"]
    assert not mask["model/layers/input_layernorm/scale"] and not mask["model/layers/self_attn/q_proj/kernel"]
    jpeft.save_adapter(str(tmp_path / "again"), adapted)
    back = peft.PeftModel.from_pretrained(make_hf_model("llama"), tmp_path / "again").eval()
    assert sorted(back.peft_config["default"].modules_to_save) == sorted(SAVED)
    np.testing.assert_allclose(torch_logits(back), logits(model, adapted), atol=2e-5, rtol=0)
    merged = jpeft.merge(adapted)
    assert set(T.flatten(merged)) == set(T.flatten(params))
    np.testing.assert_allclose(logits(model, merged), logits(model, adapted), atol=2e-5, rtol=0)


def test_what_jpeft_cannot_hold_is_refused(tmp_path):
    _, tied = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", tie_word_embeddings=True), tmp_path / "tied"))
    peft_dir(tmp_path / "adapter")
    with pytest.raises(jpeft.AdapterError, match="ties them \\(tie_word_embeddings\\).*merge_and_unload"):
        jpeft.load_adapter(str(tmp_path / "adapter"), tied)
    _, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    with pytest.raises(jpeft.JpeftError, match="holds modules its dir saved whole"):
        jpeft.add_adapter(params, "saved", adapted)
    with pytest.raises(jpeft.AdapterError, match="only the dir of an adapter in PEFT's layout carries"):
        jpeft.save_adapter(str(tmp_path / "bitfit"), jpeft.BitFit(["q_proj"]).init(None, adapted),
                           method=jpeft.BitFit(["q_proj"]))
    peft_model = peft.get_peft_model(make_hf_model("llama"), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["layers.0.mlp.down_proj"]))
    peft_model.save_pretrained(tmp_path / "one-layer")
    with pytest.raises(jpeft.AdapterError, match="names only some layers of model.layers.mlp.down_proj"):
        jpeft.load_adapter(str(tmp_path / "one-layer"), params)


def test_modules_marked_to_save_train_whole_and_peft_reads_them(tmp_path):
    """Marking changes no output, trains exactly the named weights (PEFT's count for the same config), and the dir
    holds them: PeftModel gives jpeft's logits after the weights moved."""
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    lora = jpeft.LoRA(rank=2, targets=["q_proj"])
    adapted = jpeft.modules_to_save(lora.init(jax.random.key(0), params), SAVED)
    np.testing.assert_array_equal(logits(model, adapted), logits(model, params))
    reference = peft.get_peft_model(make_hf_model("llama"), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=SAVED))
    lora_only = jpeft.count_parameters(lora.init(jax.random.key(0), params))
    assert jpeft.count_parameters(adapted) == (reference.get_nb_trainable_parameters()[0], lora_only[1])
    mask = T.flatten(jpeft.trainable_mask(adapted))
    assert {p for p, trained in mask.items() if trained and "lora" not in p} == {
        "lm_head/kernel", "model/embed_tokens/embedding", "model/layers/post_attention_layernorm/scale"}
    moved = jax.tree.map(lambda x, m: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)) if m else x,
                         adapted, jpeft.trainable_mask(adapted))
    jpeft.save_adapter(str(tmp_path / "adapter"), moved)
    back = peft.PeftModel.from_pretrained(make_hf_model("llama"), tmp_path / "adapter").eval()
    assert sorted(back.peft_config["default"].modules_to_save) == sorted(SAVED)
    np.testing.assert_allclose(torch_logits(back), logits(model, moved), atol=2e-5, rtol=0)


def test_modules_to_save_refuses_what_it_cannot_train(tmp_path):
    _, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    lora = jpeft.LoRA(rank=2, targets=["q_proj", "lm_head"]).init(jax.random.key(0), params)
    with pytest.raises(jpeft.AdapterError, match="lm_head holds adapter leaves \\(lora_a, lora_b, lora_scale\\)"):
        jpeft.modules_to_save(lora, ["lm_head"])
    with pytest.raises(jpeft.AdapterError, match="names no module of this base"):
        jpeft.modules_to_save(params, ["score"])
    _, tied = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", tie_word_embeddings=True), tmp_path / "tied"))
    with pytest.raises(jpeft.AdapterError, match="ties them"):
        jpeft.modules_to_save(tied, ["embed_tokens"])


def test_train_with_modules_to_save(tiny_run, tmp_path):
    """`method.modules_to_save` trains the head whole beside the LoRA: it moves, every other base leaf stays
    bit-identical, the summary counts it, and the dir carries it for PEFT."""
    trainer.train(run_config(tiny_run, tmp_path, "train.steps=3", "method.modules_to_save=[lm_head]"), progress=False)
    assert len(read_metrics(tmp_path)) == 3
    model, base = jpeft.from_pretrained(tiny_run["model"])
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), base)
    changed = {p for p, v in T.flatten(base).items() if not np.array_equal(v, T.flatten(adapted)[p])}
    assert changed == {"lm_head/kernel"}
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["modules_to_save"] == ["lm_head"]
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["trainable_params"] == jpeft.count_parameters(adapted)[0] > base["lm_head"]["kernel"].size


def test_a_run_reads_the_modules_it_trains_whole_in_float32(tmp_path):
    """On a bf16 base the run's mask (`train_mask`) keeps the saved modules' checkpoint values exact."""
    from functools import partial

    from jpeft.train.build import train_mask
    path = save_hf_model(make_hf_model("llama"), tmp_path / "base")
    _, params = jpeft.from_pretrained(path, dtype="bfloat16",
                                      keep_float32=partial(train_mask, jpeft.LoRA(), ["lm_head"]))
    dtypes = {p: str(v.dtype) for p, v in T.flatten(params).items()}
    assert dtypes.pop("lm_head/kernel") == "float32" and set(dtypes.values()) == {"bfloat16"}
