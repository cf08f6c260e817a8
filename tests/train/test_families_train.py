"""`jpeft train` on each family beyond Llama: a few steps lower the loss, and the result exports; a method a
family cannot take is refused, saying why."""
import numpy as np
import pytest
from transformers import AutoTokenizer

import jpeft
from conftest import FAMILIES, GPT2, jit_logits, make_hf_model, read_metrics, run_config, save_hf_model
from jpeft.train import trainer


GPT2_OPTIONS = {"lora": ("method.targets=[c_attn,c_proj,c_fc]",), "prompt": ("method.num_virtual_tokens=4",),
                "prefix": ("method.num_virtual_tokens=4",), "bottleneck": ("method.size=8",),
                "llama_adapter": ("method.adapter_len=4",)}
PEFT_LOADS = ("prompt", "prefix", "llama_adapter")  # GPT-2 runs whose adapter dir PeftModel reads


@pytest.mark.parametrize("family,method,lr", [("qwen3", "lora", 1e-1), ("phi3", "full", 3e-2), ("olmo2", "full", 3e-2),
                                              ("granite", "full", 3e-2), ("gemma2", "full", 3e-2),
                                              ("gemma3_text", "full", 3e-2), ("mixtral", "full", 3e-2),
                                              ("qwen2_moe", "full", 3e-2), ("gpt_oss", "full", 3e-2),
                                              ("gpt_oss", "lora", 1e-1), ("granitemoe", "full", 3e-2),
                                              ("granitemoeshared", "full", 3e-2), ("olmo", "full", 3e-2),
                                              ("cohere2", "full", 3e-2), ("stablelm", "lora", 1e-1),
                                              ("gpt_neox", "full", 3e-2), ("phi", "full", 3e-2),
                                              ("gptj", "full", 3e-2), ("codegen", "full", 3e-2),
                                              ("opt", "full", 3e-2),
                                              ("bloom", "full", 3e-2), ("falcon", "full", 3e-2),
                                              ("starcoder2", "full", 3e-2), ("mpt", "full", 3e-2),
                                              ("gpt2", "lora", 3e-1),
                                              ("gpt2", "full", 1e-2), ("gpt2", "prompt", 3e-1),
                                              ("gpt2", "prefix", 1.0), ("gpt2", "bottleneck", 3e-2),
                                              ("gpt2", "llama_adapter", 3e-1)])
def test_a_few_steps_lower_the_loss(tiny_run, tmp_path, family, method, lr):
    """... and the export loads: in jpeft with other logits than the base's, and a GPT-2 prompt or prefix
    adapter (or a LLaMA-Adapter one, PEFT's adaption prompt) in PeftModel with jpeft's logits."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    # Virtual tokens and adaption prompts act only through attention, which GPT-2's N(0, 0.02²) init all but mutes
    # (and its tied head at that scale barely moves the logits): weights N(0, 0.2²).
    sizes = {**FAMILIES, "gpt2": {**GPT2, **({"initializer_range": 0.2} if method in PEFT_LOADS else {})}}
    base = save_hf_model(make_hf_model(family, **sizes[family], vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512),
                         tmp_path / "base")
    tokenizer.save_pretrained(base)
    options = GPT2_OPTIONS.get(method, ()) if family == "gpt2" else ()
    # without GPT-2's own dropout, whose noise in 8 steps of a tiny model hides the trend (test_dropout.py covers it)
    trainer.train(run_config({**tiny_run, "model": base}, tmp_path / "run", f"method.name={method}", *options,
                             f"train.lr={lr}", "train.steps=8", "model.dropout=false"), progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    model, params = jpeft.from_pretrained(base)
    tuned = (jpeft.from_pretrained(str(tmp_path / "run" / "model"))[1] if method == "full"
             else jpeft.load_adapter(str(tmp_path / "run" / "adapter"), params))
    ids = np.arange(1, 20)[None]
    logits = jit_logits(model, tuned, ids)
    assert np.abs(logits - jit_logits(model, params, ids)).max() > 1e-3
    if method in PEFT_LOADS:
        import peft
        import torch
        from transformers import AutoModelForCausalLM
        peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                    str(tmp_path / "run" / "adapter")).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(logits, theirs[:, -ids.shape[1]:], atol=2e-4, rtol=0)


T5_RUNS = {"prompt": ("method.num_virtual_tokens=4", "train.lr=3e-1"),  # a soft prompt before the encoder input
           "prefix": ("method.num_virtual_tokens=4", "train.lr=1e-1"),  # keys/values in the decoder's self-attention
           "bottleneck": ("method.size=8", "train.lr=3e-2")}  # after self-attention and FF, both stacks
T5_STEPS = ("train.steps=8", "model.dropout=false",  # T5's own dropout is test_dropout.py's
            "data.eval_limit=2", "data.max_new_tokens=4")


def t5_base(tiny_run, tmp_path) -> dict:
    """`tiny_run` on a tiny FLAN-T5 with the run's tokenizer."""
    from conftest import make_t5
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    _, base = make_t5(tmp_path / "base", "flan-t5", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(base)
    return {**tiny_run, "model": base}


def check_t5_run(base: str, out, method: str) -> None:
    """The loss fell, eval generated, and the export loads with other logits than the base's (a prefix adapter
    in PEFT too, with jpeft's logits)."""
    records = read_metrics(out)
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    assert "eval_rougeL" in records[-1] and "eval_loss" in records[-1]
    model, params = jpeft.from_pretrained(base)
    tuned = (jpeft.from_pretrained(str(out / "model"))[1] if method == "full"
             else jpeft.load_adapter(str(out / "adapter"), params))
    ids = np.arange(1, 20)[None]
    logits = jit_logits(model, tuned, ids, ids[:, :5])
    assert np.abs(logits - jit_logits(model, params, ids, ids[:, :5])).max() > 1e-3
    if method == "prefix":
        import peft
        import torch
        from transformers import T5ForConditionalGeneration
        peft_model = peft.PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base),
                                                    str(out / "adapter")).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(ids[:, :5])).logits
        np.testing.assert_allclose(logits, theirs.numpy(), atol=2e-4, rtol=0)


@pytest.mark.parametrize("method", T5_RUNS)
def test_t5_trains_as_seq2seq(tiny_run, tmp_path, method):
    """Prompt into the encoder, loss on the decoder's target tokens (`check_t5_run`; full fine-tuning and LoRA
    are the seed table's configs below); LLaMA-Adapter, which needs an insertion point T5 lacks, is refused,
    saying why."""
    run = t5_base(tiny_run, tmp_path)
    trainer.train(run_config(run, tmp_path / "run", f"method.name={method}", *T5_RUNS[method], *T5_STEPS),
                  progress=False)
    check_t5_run(run["model"], tmp_path / "run", method)
    with pytest.raises(jpeft.ConfigError, match="llama_adapter.*attention_output insertion point.*PEFT has no "
                                                "adaption prompt for T5"):
        trainer.train(run_config(run, tmp_path / "gates", "method.name=llama_adapter"), progress=False)


@pytest.mark.parametrize("config,lr", [("configs/flan_t5_dialogsum_full.yaml", 1e-2),
                                       ("configs/flan_t5_dialogsum_lora.yaml", 5e-2)])
def test_the_seed_table_configs_run(tiny_run, tmp_path, config, lr):
    """The FLAN-T5 DialogSum configs as shipped, on a tiny T5 and a few rows at a tiny model's learning rate
    (no warmup): the T5 checks of the methods above (`check_t5_run`)."""
    import os

    from jpeft.config import load_config
    run = t5_base(tiny_run, tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, config), [
        f"model.path={run['model']}", f"data.train={run['train']}", f"data.eval={run['eval']}",
        "train.batch_size=4", "train.seq_len=96", f"train.lr={lr}", "train.warmup=0", "train.log_every=1", *T5_STEPS,
        f"out_dir={tmp_path}/run"])
    trainer.train(cfg, progress=False)
    check_t5_run(run["model"], tmp_path / "run", cfg.method.name)


def test_examples_longer_than_learned_positions_are_refused(tiny_run, tmp_path):
    """GPT-2 with 96 positions: rows of 96 tokens fit, 4 virtual tokens before them do not (they would read
    NaN past the position table); the error says which train.seq_len cuts them to fit, and that one trains."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    base = save_hf_model(make_hf_model("gpt2", **GPT2, vocab_size=len(tokenizer), max_position_embeddings=96),
                         tmp_path / "base")
    tokenizer.save_pretrained(base)
    prompt = ("method.name=prompt", "method.num_virtual_tokens=4", "train.steps=2")
    with pytest.raises(jpeft.ConfigError, match="the longest example has 96 tokens after 4 virtual ones, but .* "
                                                "has 96 positions \\(n_positions\\); set train.seq_len=92"):
        trainer.train(run_config({**tiny_run, "model": base}, tmp_path / "run", *prompt), progress=False)
    trainer.train(run_config({**tiny_run, "model": base}, tmp_path / "fits", *prompt, "train.seq_len=92"),
                  progress=False)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "fits"))


def test_norm_tuning_of_norms_that_learn_nothing_is_refused(tiny_run, tmp_path):
    """OLMo 1's LayerNorms have no parameters: norm tuning there would go through its steps changing nothing."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    base = save_hf_model(make_hf_model("olmo", vocab_size=len(tokenizer)), tmp_path / "base")
    tokenizer.save_pretrained(base)
    with pytest.raises(jpeft.ConfigError, match=r"NormTuning\(\) trains no parameter of this model"):
        trainer.train(run_config({**tiny_run, "model": base}, tmp_path / "run", "method.name=norm"), progress=False)


def test_new_tokens_that_leave_no_room_for_a_prompt_are_refused_before_training(tiny_run, tmp_path):
    """The tiny Llama reads 512 positions: a run that would generate 512 new tokens at its evaluations is an
    error at the start, not after its training (as the first ROUGE evaluation would find)."""
    with pytest.raises(jpeft.ConfigError, match="data.max_new_tokens=513 leaves no room for a prompt in .* 512"):
        trainer.train(run_config(tiny_run, tmp_path / "run", "data.eval_limit=2", "data.max_new_tokens=513"),
                      progress=False)
    assert not (tmp_path / "run").exists()


def test_too_few_rows_for_a_step_names_both_keys_and_the_packing(tiny_run, tmp_path):
    with pytest.raises(jpeft.ConfigError, match=r"^\d+ training rows \(packed from 40 examples\) for a step of "
                                                r"train.batch_size × train.grad_accum = 20 × 2 = 40 rows"):
        trainer.train(run_config(tiny_run, tmp_path / "run", "train.batch_size=20", "train.grad_accum=2",
                                 "train.seq_len=512"), progress=False)


def test_gpt2_trains_with_its_own_dropout_unless_turned_off(tiny_run, tmp_path):
    """GPT-2's config.json drops 0.1 of its embeddings, attention and residuals (transformers' defaults), as
    transformers' Trainer does: the train step's loss moves with it; `model.dropout=false` gives the loss of
    the same weights whose config.json sets no dropout."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    hf = make_hf_model("gpt2", **GPT2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       max_position_embeddings=512)
    bases = {}
    for name, rate in (("dropping", 0.1), ("still", 0.0)):
        hf.config.embd_pdrop = hf.config.attn_pdrop = hf.config.resid_pdrop = rate
        bases[name] = save_hf_model(hf, tmp_path / name)
        tokenizer.save_pretrained(bases[name])

    def first_loss(base, *extra):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        trainer.train(run_config({**tiny_run, "model": base}, out, "method.name=full", "train.steps=2", *extra),
                      progress=False)
        return read_metrics(out)[0]["loss"]

    dropped, off, still = first_loss(bases["dropping"]), first_loss(bases["dropping"], "model.dropout=false"), \
        first_loss(bases["still"])
    assert off == still
    assert abs(dropped - off) > 1e-3, (dropped, off)
