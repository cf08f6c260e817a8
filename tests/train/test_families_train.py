"""`jpeft train` on each family beyond Llama: a few steps lower the loss, and the result exports."""
import numpy as np
import pytest
from transformers import AutoTokenizer

import jpeft
from conftest import FAMILIES, make_hf_model, read_metrics, run_config, save_hf_model
from jpeft.train import trainer


@pytest.mark.parametrize("family,method", [("qwen3", "lora"), ("gemma2", "full"), ("gemma3_text", "full")])
def test_a_few_steps_lower_the_loss(tiny_run, tmp_path, family, method):
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    base = save_hf_model(make_hf_model(family, **FAMILIES[family], vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512),
                         tmp_path / "base")
    tokenizer.save_pretrained(base)
    trainer.train(run_config({**tiny_run, "model": base}, tmp_path / "run", f"method.name={method}",
                             "train.lr=3e-2" if method == "full" else "train.lr=1e-1",
                             "train.steps=8"), progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    model, params = jpeft.from_pretrained(base)
    tuned = (jpeft.from_pretrained(str(tmp_path / "run" / "model"))[1] if method == "full"
             else jpeft.load_adapter(str(tmp_path / "run" / "adapter"), params))
    ids = np.arange(1, 20)[None]
    assert np.abs(np.asarray(model.apply({"params": tuned}, ids) - model.apply({"params": params}, ids))).max() > 1e-3
