"""Every way a checkpoint dir can be wrong gives a jpeft error naming the file and the fix."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft
from conftest import FAMILIES, make_hf_model
from jpeft.models.config import ModelConfig


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    from pathlib import Path
    return Path(tiny_llama[1])


def test_missing_dir(tmp_path):
    with pytest.raises(jpeft.CheckpointError, match="nope: no such model directory"):
        jpeft.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(jpeft.CheckpointError, match="file: is a file, not a model directory"):
        jpeft.from_pretrained(str(tmp_path / "file"))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(jpeft.CheckpointError, match="config.json: not found"):
        jpeft.from_pretrained(str(ckpt))


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(jpeft.CheckpointError, match="no model.safetensors.*found PyTorch .bin"):
        jpeft.from_pretrained(str(ckpt))


def test_corrupted_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(jpeft.CheckpointError, match="model.safetensors: unreadable safetensors"):
        jpeft.from_pretrained(str(ckpt))


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="rwkv")
    with pytest.raises(jpeft.CheckpointError, match="model_type 'rwkv' is not supported; jpeft supports llama"):
        jpeft.from_pretrained(str(ckpt))


def test_a_field_the_familys_config_computes_is_an_error_naming_it(ckpt):
    """A Llama config.json relabelled Falcon keeps its head_dim, which Falcon's config derives and cannot take."""
    edit_config(ckpt, model_type="falcon", head_dim=8)
    with pytest.raises(jpeft.CheckpointError, match="transformers does not accept this falcon config .*head_dim"):
        jpeft.from_pretrained(str(ckpt))


def test_a_field_of_the_wrong_type_is_an_error_naming_it(ckpt):
    """transformers' configs check their fields' types (a strict dataclass's error: not a ValueError or TypeError)."""
    edit_config(ckpt, hidden_size="32")
    with pytest.raises(jpeft.CheckpointError, match="transformers does not accept this llama config .*hidden_size"):
        jpeft.from_pretrained(str(ckpt))


@pytest.mark.parametrize("changes,message", [
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope type 'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                           "long_factor": [2.0] * 8}), "longrope's short_factor has 8 entries; the heads rotate 4"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor 0.5 is not supported"),
    (dict(hidden_act="swish2"), "hidden_act 'swish2' is not supported"),
    (dict(num_hidden_layers=3), r"weight 'model.layers.2.*' is missing"),
    (dict(hidden_size=48), "has shape .* config.json implies"),
])
def test_config_jpeft_cannot_honour(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(jpeft.CheckpointError, match=message):
        jpeft.from_pretrained(str(ckpt))


def test_bad_dtype(ckpt):
    with pytest.raises(jpeft.CheckpointError, match="dtype 'float16' is not supported"):
        jpeft.from_pretrained(str(ckpt), dtype="float16")


def test_a_quantized_checkpoint_is_refused(ckpt):
    """bitsandbytes/FP8 files hold integer or float8 codes beside scales: read as weights they are garbage."""
    edit_config(ckpt, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(jpeft.CheckpointError, match=r"quantization_config \(quant_method bitsandbytes\).*float "
                                                    "weights only"):
        jpeft.from_pretrained(str(ckpt))


def test_integer_weights_are_refused(ckpt):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = np.round(tensors[name] * 100).astype(np.int8)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(jpeft.CheckpointError, match=f"weight '{name}' is stored as I8, not as floats"):
        jpeft.from_pretrained(str(ckpt))


@pytest.mark.parametrize("model_type,text", [("gemma3", "gemma3_text"), ("mistral3", "ministral3")])
def test_a_multimodal_checkpoint_is_refused_naming_its_text_model(model_type, text):
    """Gemma 3 4B+ and Ministral 3 come as image-text models; jpeft reads their text model alone."""
    import transformers
    config = transformers.AutoConfig.for_model(model_type, text_config=transformers.AutoConfig.for_model(text))
    hf = dict(config.to_dict(), architectures=[f"{type(config).__name__[:-6]}ForConditionalGeneration"])
    with pytest.raises(jpeft.CheckpointError, match=f"a multimodal {model_type} checkpoint .*ForConditionalGeneration.*"
                                                    f"model_type {text}\): load the text model"):
        ModelConfig.from_hf(hf)


# config.json switches jpeft does not run, each refused naming it (and the file loading with it off)
@pytest.mark.parametrize("model_type", ["gemma", "gemma3_text"])
def test_bidirectional_attention_is_refused(model_type):
    hf = dict(make_hf_model(model_type, head_dim=8).config.to_dict(), use_bidirectional_attention=True)
    with pytest.raises(jpeft.CheckpointError, match="use_bidirectional_attention is true"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("model_type,switch,match", [
    ("stablelm", dict(qk_layernorm=True), r"qk_layernorm is True \(a LayerNorm module per head"),
    ("stablelm", dict(hidden_dropout=0.1), r"hidden_dropout is 0.1 \(dropout on the MLP's output alone"),
    ("phi", dict(tie_word_embeddings=True), r"tie_word_embeddings is True \(a head tied to the token embedding"),
    ("gptj", dict(tie_word_embeddings=True), r"tie_word_embeddings is True \(a head tied to the token embedding"),
    ("codegen", dict(tie_word_embeddings=True), r"tie_word_embeddings is True \(a head tied to the token embedding"),
    ("opt", dict(layerdrop=0.1), r"layerdrop is 0.1 \(skipping whole layers at random, in training"),
    ("bloom", dict(apply_residual_connection_post_layernorm=True),
     r"apply_residual_connection_post_layernorm is True \(each block's residual taken after its norm"),
    ("falcon", dict(hidden_dropout=0.1), r"hidden_dropout is 0.1 \(dropout over the sum of attention's and the MLP's"),
])
def test_switches_jpeft_does_not_run_are_refused(model_type, switch, match):
    hf = dict(make_hf_model(model_type, **FAMILIES[model_type]).config.to_dict(), **switch)
    with pytest.raises(jpeft.CheckpointError, match=f"config.json: {match}.*which jpeft does not run"):
        ModelConfig.from_hf(hf)
    ModelConfig.from_hf({**hf, **{k: type(v)() for k, v in switch.items()}})  # off (False, 0.0), the file loads


def test_blooms_exact_tensor_parallel_slices_are_refused():
    """slow_but_exact sums BLOOM's output projections in pretraining_tp slices without their biases; with one slice
    (bloom-560m's) it changes nothing, and the file loads."""
    hf = dict(make_hf_model("bloom", **FAMILIES["bloom"]).config.to_dict(), slow_but_exact=True, pretraining_tp=4)
    with pytest.raises(jpeft.CheckpointError, match="slow_but_exact with pretraining_tp 4"):
        ModelConfig.from_hf(hf)
    ModelConfig.from_hf({**hf, "pretraining_tp": 1})


@pytest.mark.parametrize("switches,match", [
    (dict(new_decoder_architecture=True, parallel_attn=False), "new_decoder_architecture with parallel_attn false"),
    (dict(parallel_attn=False, attention_dropout=0.1), r"attention_dropout 0.1 with parallel_attn false"),
])
def test_falcon_switches_its_model_runs_otherwise_are_refused(switches, match):
    hf = dict(make_hf_model("falcon", **FAMILIES["falcon"]).config.to_dict(), **switches)
    with pytest.raises(jpeft.CheckpointError, match=match):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("switch", [dict(attn_config=dict(attn_type="multiquery_attention")),
                                    dict(attn_config=dict(qk_ln=True)), dict(attn_config=dict(prefix_lm=True)),
                                    dict(attn_config=dict(attn_uses_sequence_id=True)),
                                    dict(attn_config=dict(alibi=False)), dict(attn_config=dict(alibi_bias_max=16)),
                                    dict(no_bias=False), dict(expansion_ratio=2), dict(logit_scale=0.5)])
def test_mpt_switches_its_transformers_model_ignores_are_refused(switch):
    """transformers' MPT builds the same model whatever these say; a file that sets them describes another."""
    (field, value), = switch.items()
    if field == "attn_config":
        (field, value), = value.items()
        switch = dict(attn_config=dict(make_hf_model("mpt", **FAMILIES["mpt"]).config.attn_config.to_dict(),
                                       **{field: value}))
    hf = dict(make_hf_model("mpt", **FAMILIES["mpt"]).config.to_dict(), **switch)
    with pytest.raises(jpeft.CheckpointError, match=f"{field} is {value!r}, which transformers' MPT does not run"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("family", ["gptj", "codegen"])
def test_a_gptj_rotary_dim_past_its_head_is_refused(family):
    """transformers' GPT-J and CodeGen would fail mid-forward on it (their sin and cos are wider than the head)."""
    hf = dict(make_hf_model(family, num_key_value_heads=None, rotary_dim=4).config.to_dict(), rotary_dim=16)
    with pytest.raises(jpeft.CheckpointError, match="rotary_dim must be between 1 and the head size 8, got 16"):
        ModelConfig.from_hf(hf)
