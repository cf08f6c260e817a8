"""LoRA on a mixture's stacked expert weights (PEFT's `target_parameters`): PEFT's logits and files both ways, the
invariants of any LoRA, a training run whose adapter PEFT loads, and what PEFT refuses there too."""
import json

import jax
import numpy as np
import peft
import pytest
import torch

import jpeft
from conftest import FAMILIES, jit_logits, make_hf_model, perturb, read_metrics, run_config, save_hf_model
from jpeft import tree as T
from jpeft.train import trainer

IDS = np.random.RandomState(0).randint(0, 97, (2, 12))
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def logits(model, params):
    return jit_logits(model, params, IDS)


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def base(family, path):
    torch_model = make_hf_model(family, **FAMILIES[family])
    return (torch_model, *jpeft.from_pretrained(save_hf_model(torch_model, path)))


@pytest.mark.parametrize("family,targets,parameters", [
    ("mixtral", ["q_proj"], BOTH),  # both weights of one experts module: PEFT nests gate_up_proj's under down_proj's
    ("qwen3_moe", [], ["experts.down_proj"]),  # parameters alone, by a shorter suffix
    ("qwen2_moe", ["up_proj"], ["gate_up_proj"]),  # beside the shared expert's dense up_proj
    ("gpt_oss", ["q_proj", "o_proj"], BOTH),  # weights PEFT wraps as [E, in, out], jpeft holds as [E, out, in]
    ("granitemoe", ["v_proj"], ["experts.gate_up_proj", "experts.down_proj"]),  # in block_sparse_moe
    ("granitemoeshared", ["input_linear", "output_linear"], ["experts.down_proj"]),  # + its dense shared_mlp
])
def test_jpeft_peft_jpeft_give_the_same_logits(tmp_path, family, targets, parameters):
    torch_model, model, params = base(family, tmp_path / "base")
    method = jpeft.LoRA(rank=2, alpha=6, targets=targets, target_parameters=parameters)
    adapted = perturb(method.init(jax.random.key(0), params), ("lora_b",), jax.random.key(1))
    assert np.abs(logits(model, adapted) - logits(model, params)).max() > 1e-2
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(f"{model.config.moe_name}.experts.{p.rpartition('.')[2]}"
                                                 for p in parameters)
    # PEFT 0.22 reads a bare gate_proj or up_proj beside fused experts as their gate_up_proj too
    assert not {"gate_proj", "up_proj"} & set(config["target_modules"] or ())
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(logits(model, adapted), torch_logits(peft_model), atol=2e-4, rtol=0)
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(logits(model, reloaded), logits(model, adapted), atol=1e-6, rtol=0)


def test_an_adapter_peft_made_loads_with_peft_logits(tmp_path):
    torch_model, model, params = base("mixtral", tmp_path / "base")
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj"], target_parameters=BOTH,
                             rank_pattern={"down_proj": 2}, init_lora_weights=False)
    peft_model = peft.get_peft_model(torch_model, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert T.flatten(loaded)["model/layers/mlp/experts/down_proj/lora_a"].shape == (2, 4, 64, 2)
    np.testing.assert_allclose(logits(model, loaded), torch_logits(peft_model), atol=2e-4, rtol=0)


def test_zero_init_changes_nothing_merges_exactly_and_counts_r_times_experts_widths(tmp_path):
    _, model, params = base("olmoe", tmp_path / "base")
    method = jpeft.LoRA(rank=4, targets=[], target_parameters=BOTH)
    adapted = method.init(jax.random.key(0), params)
    np.testing.assert_array_equal(logits(model, adapted), logits(model, params))
    trained = perturb(adapted, ("lora_b",), jax.random.key(1))
    merged = jpeft.merge(trained)
    assert set(T.flatten(merged)) == set(T.flatten(params))
    np.testing.assert_allclose(logits(model, merged), logits(model, trained), atol=1e-5, rtol=0)
    cfg = model.config  # per layer and expert: r·(D + 2I) on gate_up_proj, r·(I + D) on down_proj
    per_layer = cfg.num_experts * 4 * ((cfg.hidden_size + 2 * cfg.intermediate_size)
                                       + (cfg.intermediate_size + cfg.hidden_size))
    assert jpeft.count_parameters(trained, method.mask(trained))[0] == cfg.num_layers * per_layer


def trained_experts(tiny_run, tmp_path, *overrides) -> str:
    """A tiny Mixtral with the run's tokenizer after 8 steps of LoRA on both expert weights (+ `overrides`), whose
    loss must fall; its base dir (the run's in tmp_path / "run")."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    path = save_hf_model(make_hf_model("mixtral", **FAMILIES["mixtral"], vocab_size=len(tokenizer),
                                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512),
                         tmp_path / "base")
    tokenizer.save_pretrained(path)
    trainer.train(run_config({**tiny_run, "model": path}, tmp_path / "run", "method.name=lora", "method.targets=[]",
                             f"method.target_parameters=[{','.join(BOTH)}]", "train.lr=5e-2", "train.steps=8",
                             *overrides), progress=False)
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    # with the routers' loss in training, the steps log it apart too (unweighted, as transformers' aux_loss)
    assert all(("aux_loss" in r) == ("model.router_aux_loss_coef=0.01" in overrides) for r in records)
    assert all(0 < r["aux_loss"] <= 4 for r in records if "aux_loss" in r), records  # E · Σ f·P of 4 experts
    return path


def test_a_run_trains_the_experts_lora_alone_and_peft_loads_its_adapter(tiny_run, tmp_path):
    """`method.target_parameters` in a run config (with the routers' load-balancing loss): the loss falls, the
    experts' base weights never move, and the exported adapter gives PEFT's logits."""
    from transformers import AutoModelForCausalLM
    path = trained_experts(tiny_run, tmp_path, "model.router_aux_loss_coef=0.01")
    model, params = jpeft.from_pretrained(path)
    tuned = jpeft.load_adapter(str(tmp_path / "run" / "adapter"), params)
    assert {p.rsplit("/", 2)[-2] for p in T.flatten(tuned) if "lora" in p} == {"gate_up_proj", "down_proj"}
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path),
                                                str(tmp_path / "run" / "adapter")).eval()
    ids = np.arange(1, 20)[None]
    ours = jit_logits(model, tuned, ids)
    with torch.no_grad():
        np.testing.assert_allclose(ours, peft_model(torch.tensor(ids)).logits.numpy(), atol=2e-4, rtol=0)
    assert np.abs(ours - jit_logits(model, params, ids)).max() > 1e-3


def test_a_qlora_run_on_quantized_experts_trains_their_lora(tiny_run, tmp_path):
    """`method.expert_quant` in a run config: the experts' LoRA trains over NF4 stacks, and the adapter it
    saves is a plain PEFT LoRA on the experts (it loads onto the float base)."""
    path = trained_experts(tiny_run, tmp_path, "method.name=qlora", "method.expert_quant=nf4")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_parameters"] == BOTH[::-1]
    model, params = jpeft.from_pretrained(path)
    tuned = jpeft.load_adapter(str(tmp_path / "run" / "adapter"), params)
    assert np.abs(jit_logits(model, tuned, IDS) - jit_logits(model, params, IDS)).max() > 1e-3


@pytest.mark.parametrize("options,match", [
    (dict(dropout=0.1), "takes no dropout"),
    (dict(use_dora=True), "takes no DoRA"),
    (dict(init="pissa"), "takes no init 'pissa'"),
    (dict(layers=[0]), "takes no layers"),
])
def test_what_peft_has_no_parameter_lora_for_is_refused(options, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.LoRA(target_parameters=BOTH, **options)


def test_parameters_that_are_no_expert_weight_are_named(tmp_path):
    _, _, params = base("mixtral", tmp_path / "moe")
    with pytest.raises(jpeft.JpeftError, match="match no expert weight; available: model.layers.mlp.experts.down_proj"):
        jpeft.LoRA(targets=[], target_parameters=["mlp.gate.weight"]).init(jax.random.key(0), params)
    dense = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "dense"))[1]
    with pytest.raises(jpeft.JpeftError, match="the model has no experts"):
        jpeft.LoRA(target_parameters=BOTH).init(jax.random.key(0), dense)
    adapter = tmp_path / "adapter"
    peft.get_peft_model(make_hf_model("mixtral", **FAMILIES["mixtral"]),
                        peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=BOTH)).save_pretrained(adapter)
    with pytest.raises(jpeft.AdapterError, match="match no expert weight of the base"):
        jpeft.load_adapter(str(adapter), dense)
