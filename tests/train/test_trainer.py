"""The training loop: learns, freezes what it must, resumes bit-exactly."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jpeft
from jpeft import tree as T
from jpeft.errors import TrainingError
from jpeft.train import checkpoint, trainer
from conftest import jit_logits, read_metrics, run_config


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_decreases_and_exports(tiny_run, tmp_path, method):
    cfg = run_config(tiny_run, tmp_path, f"method.name={method}", "train.steps=8", "train.grad_accum=2",
                     "data.eval_limit=3", "data.max_new_tokens=4",
                     "method.targets=[q_proj,v_proj,down_proj,lm_head]", "train.lr=3e-2")
    final = trainer.train(cfg, progress=False)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_rougeL", "eval_bleu"} <= final.keys()
    assert rows[-1] == final
    model, base = jpeft.from_pretrained(tiny_run["model"])
    if method == "lora":
        adapted = jpeft.load_adapter(str(tmp_path / "adapter"), base)
        assert (tmp_path / "adapter" / "tokenizer.json").exists()
    else:
        model, adapted = jpeft.from_pretrained(str(tmp_path / "model"))
        assert (tmp_path / "model" / "tokenizer.json").exists()
    ids = np.arange(1, 20)[None]
    assert np.abs(np.asarray(model.apply({"params": adapted}, ids) - jit_logits(model, base, ids))).max() > 1e-3


@pytest.mark.parametrize("method", ["full", "norm"])
def test_base_leaves_trained_in_bf16_start_from_the_float32_checkpoint(tiny_run, tmp_path, method):
    """bf16 compute keeps float32 trainables, as autocast does: a base leaf a method trains is read in float32,
    so a step that changes nothing (lr 0) exports the checkpoint's own values, not their bf16 rounding."""
    trainer.train(run_config(tiny_run, tmp_path, f"method.name={method}", "model.dtype=bfloat16", "train.lr=0",
                             "train.steps=1"), progress=False)
    original = load_file(os.path.join(tiny_run["model"], "model.safetensors"))
    exported = load_file(tmp_path / ("model/model.safetensors" if method == "full" else
                                     "adapter/adapter_model.safetensors"))  # norm tuning: PEFT's LN tuning file
    trained = [k for k in original if method == "full" or k.endswith("norm.weight")]
    assert trained and any(original[k].dtype == np.float32 and not np.array_equal(
        original[k], original[k].astype(jnp.bfloat16).astype(np.float32)) for k in trained)
    for key in trained:
        name = key if method == "full" else f"base_model.model.{key.removesuffix('.weight')}.ln_tuning_layers.weight"
        np.testing.assert_array_equal(exported[name].astype(np.float32), original[key], err_msg=key)


def test_frozen_leaves_bit_identical_and_no_optimizer_state(tiny_run, tmp_path, monkeypatch):
    """What the trainer exports keeps every base leaf bit-identical to a fresh load of the checkpoint."""
    seen = {}
    real_export, real_step = trainer.export, trainer.make_train_step

    def export_spy(cfg, model, method, params, mask):
        seen["params"] = jax.tree.map(np.array, params)
        return real_export(cfg, model, method, params, mask)

    def step_spy(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def wrapped(state, frozen, batch):
            seen.setdefault("init", jax.tree.map(np.array, state["trainable"]))  # before the first update
            seen["state"], out = step(state, frozen, batch)
            return seen["state"], out
        return wrapped

    monkeypatch.setattr(trainer, "export", export_spy)
    monkeypatch.setattr(trainer, "make_train_step", step_spy)
    trainer.train(run_config(tiny_run, tmp_path, "train.steps=3"), progress=False)
    _, base = jpeft.from_pretrained(tiny_run["model"])  # an independent copy of the base weights
    final, base = T.flatten(seen["params"]), T.flatten(base)
    adapter = {p for p in final if T.leaf_name(p) in ("lora_a", "lora_b", "lora_scale")}
    assert set(final) - adapter == set(base)
    for path, value in base.items():
        np.testing.assert_array_equal(final[path], np.asarray(value), err_msg=path)
    factors = {p for p in adapter if T.leaf_name(p) != "lora_scale"}
    assert set(T.flatten(seen["state"]["trainable"])) == factors
    init = T.flatten(seen["init"])
    assert set(init) == factors and any(T.leaf_name(p) == "lora_a" for p in factors)
    for path in factors:  # every adapter factor trained away from its init; B starts at zero
        assert np.any(init[path]) == (T.leaf_name(path) == "lora_a"), path
        assert np.any(final[path] != init[path]), path
    opt_shapes = {np.shape(x) for x in jax.tree.leaves(seen["state"]["opt_state"]) if np.ndim(x) >= 2}
    assert opt_shapes == {np.shape(final[p]) for p in factors}  # optimizer state for the factors only


def test_resume_is_bit_identical(tiny_run, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    trainer.train(run_config(tiny_run, straight, "train.save_every=3", "method.dropout=0.1"), progress=False)

    resumed = tmp_path / "resumed"
    real_save = checkpoint.save

    def crash_after_first_save(mngr, step, state, fingerprint):
        real_save(mngr, step, state, fingerprint)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "save", crash_after_first_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(run_config(tiny_run, resumed, "train.save_every=3", "method.dropout=0.1"), progress=False)
    assert not (resumed / "adapter").exists()
    monkeypatch.setattr(checkpoint, "save", real_save)
    trainer.train(run_config(tiny_run, resumed, "train.save_every=3", "method.dropout=0.1"), progress=False)

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 7))
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(straight)]
    summary = (straight / "summary.json").read_text()
    again = trainer.train(run_config(tiny_run, straight, "train.save_every=3", "method.dropout=0.1"), progress=False)
    assert again == read_metrics(straight)[-1] and again["step"] == 6  # a finished run: its result, nothing trained
    assert (straight / "summary.json").read_text() == summary
    (straight / "summary.json").unlink()  # as if killed during its export, after the last checkpoint
    trainer.train(run_config(tiny_run, straight, "train.save_every=3", "method.dropout=0.1"), progress=False)
    rewritten = json.loads((straight / "summary.json").read_text())
    assert {k: v for k, v in rewritten.items() if k not in ("train_seconds", "peak_rss_bytes")} == \
        {k: v for k, v in json.loads(summary).items() if k not in ("train_seconds", "peak_rss_bytes")}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_step_boundary_and_resumes_exactly(tiny_run, tmp_path, monkeypatch, signum):
    """Preemption (SIGTERM) or Ctrl-C between checkpoints: the run checkpoints the step it is on,
    returns normally, and the same command resumes to the uninterrupted result bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train(run_config(tiny_run, straight), progress=False)
    real = trainer.make_train_step

    def signalled(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, frozen, batch):
            if int(state["step"]) == 3:
                os.kill(os.getpid(), signum)  # arrives mid-step, as preemption does
            return step(state, frozen, batch)
        return wrapped

    monkeypatch.setattr(trainer, "make_train_step", signalled)
    record = trainer.train(run_config(tiny_run, resumed), progress=False)
    assert record["stopped"] == signal.Signals(signum).name and record["step"] == 4
    assert checkpoint.manager(str(resumed)).latest_step() == 4 and not (resumed / "adapter").exists()
    assert signal.getsignal(signum) is not None and signal.getsignal(signum) != signal.SIG_IGN
    monkeypatch.setattr(trainer, "make_train_step", real)
    trainer.train(run_config(tiny_run, resumed), progress=False)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(straight)]


def test_a_second_run_into_the_out_dir_of_a_live_run_is_refused(tiny_run, tmp_path):
    from jpeft.train.lock import out_dir_lock
    with out_dir_lock(str(tmp_path)):  # as a run still going holds it (flock: another open of the file conflicts)
        with pytest.raises(TrainingError, match=f"out_dir of a run still going \\(process {os.getpid()}\\)"):
            trainer.train(run_config(tiny_run, tmp_path, "train.steps=2"), progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
    trainer.train(run_config(tiny_run, tmp_path, "train.steps=2"), progress=False)  # released: the run goes
    assert len(read_metrics(tmp_path)) == 2
