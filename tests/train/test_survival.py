"""Runs survive what pods do to them: preemption, kills mid-save, a new mesh; and refuse what would
silently corrupt them: changed inputs on resume, non-finite losses."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from jpeft.errors import ConfigError, TrainingError
from jpeft.train import checkpoint, trainer
from conftest import read_metrics, run_config

TESTS = os.path.dirname(os.path.dirname(__file__))


def signal_at(monkeypatch, step_number: int, signum=signal.SIGTERM):
    """Make the run receive `signum` while it computes step `step_number`."""
    real = trainer.make_train_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, frozen, batch):
            if int(state["step"]) == step_number - 1:
                os.kill(os.getpid(), signum)
            return step(state, frozen, batch)
        return wrapped
    monkeypatch.setattr(trainer, "make_train_step", make)
    return lambda: monkeypatch.setattr(trainer, "make_train_step", real)


RESUME_ON_8 = textwrap.dedent("""
    import os, sys, json, logging
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r})
    from jpeft.train import trainer
    from conftest import run_config
    trainer.train(run_config(json.loads({run!r}), {out!r}, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
                  progress=False)
""")


def test_saved_on_one_mesh_resumes_on_another(tiny_run, tmp_path, monkeypatch):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    trainer.train(run_config(tiny_run, straight), progress=False)
    restore = signal_at(monkeypatch, 3)
    assert trainer.train(run_config(tiny_run, moved), progress=False)["stopped"] == "SIGTERM"
    restore()
    run = json.dumps({k: str(v) for k, v in tiny_run.items()})
    script = RESUME_ON_8.format(tests=TESTS, run=run, out=str(moved))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr and "from step 3" in result.stderr
    a, b = read_metrics(straight), read_metrics(moved)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(moved / "adapter" / "adapter_model.safetensors")
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], rtol=1e-4, atol=1e-6, err_msg=key)


KILLED_IN_SAVE = textwrap.dedent("""
    import os, sys, json, signal
    sys.path.insert(0, {tests!r})
    from jpeft.train import checkpoint, trainer
    from conftest import run_config
    real = checkpoint.save
    def save_then_die(mngr, step, state, fingerprint):
        real(mngr, step, state, fingerprint)
        if step == 4:  # the write is under way in orbax's background thread: die once its temporary dir is there
            where = os.path.join({out!r}, "checkpoints")
            while not any("tmp" in e for e in os.listdir(where)) and "4" not in os.listdir(where):
                pass
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save = save_then_die
    trainer.train(run_config(json.loads({run!r}), {out!r}, "train.save_every=2"), progress=False)
""")


def test_killed_during_a_save_resumes_from_a_complete_checkpoint(tiny_run, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    trainer.train(run_config(tiny_run, straight, "train.save_every=2"), progress=False)
    run = json.dumps({k: str(v) for k, v in tiny_run.items()})
    result = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE.format(tests=TESTS, run=run, out=str(killed))],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    entries = os.listdir(killed / "checkpoints")
    [partial] = [killed / "checkpoints" / e for e in entries if "tmp" in e]  # the half-written step 4 is there
    shutil.copytree(partial, killed / "checkpoints" / partial.name.replace("4", "8", 1))  # as if a step the run
    # will not save again had been cut short too. Neither is taken as the latest (a read-only manager: the run's
    # own starts removing them as it opens, in the background)
    assert ocp.CheckpointManager(killed / "checkpoints", options=ocp.CheckpointManagerOptions(
        read_only=True)).latest_step() == 2
    trainer.train(run_config(tiny_run, killed, "train.save_every=2"), progress=False)
    assert not any("tmp" in e for e in os.listdir(killed / "checkpoints"))  # the resumed run removed both
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("change", ["data", "config", "weights", "model config", "tokenizer"])
def test_resume_refuses_changed_inputs_and_names_them(tiny_run, tmp_path, monkeypatch, change):
    run = dict(tiny_run)
    run["train"] = str(shutil.copy(tiny_run["train"], tmp_path / "train.jsonl"))
    run["model"] = str(shutil.copytree(tiny_run["model"], tmp_path / "base"))
    out = tmp_path / "run"
    restore = signal_at(monkeypatch, 2)
    trainer.train(run_config(run, out), progress=False)
    restore()
    extra = ()
    if change == "data":
        with open(run["train"], "a") as f:
            f.write(open(run["train"]).readline())
        named = "data:" + run["train"]
    elif change == "config":
        extra, named = ("train.lr=1e-3",), "train.lr"
    elif change in ("model config", "tokenizer"):
        name = "config.json" if change == "model config" else "tokenizer_config.json"
        path = os.path.join(run["model"], name)
        edited = {**json.load(open(path)), **({"rms_norm_eps": 0.5} if name == "config.json" else {"x": 1})}
        with open(path, "w") as f:
            json.dump(edited, f)
        named = "model:" + name
    else:
        weights = os.path.join(run["model"], "model.safetensors")
        with open(weights, "r+b") as f:  # flip bytes in the middle of the tensor data
            f.seek(os.path.getsize(weights) // 2)
            f.write(b"\x00\x01\x02\x03" * 4096)
        named = "weights:model.safetensors"
    with pytest.raises(ConfigError, match="other inputs") as e:
        trainer.train(run_config(run, out, *extra), progress=False)
    assert named in str(e.value) and "step 2" in str(e.value)


def test_logging_and_mesh_keys_may_change_on_resume(tiny_run, tmp_path, monkeypatch):
    restore = signal_at(monkeypatch, 2)
    trainer.train(run_config(tiny_run, tmp_path), progress=False)
    restore()
    record = trainer.train(run_config(tiny_run, tmp_path, "train.log_every=3", "train.keep_checkpoints=1",
                                      "mesh.data=1"), progress=False)
    assert record["step"] == 6 and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 6]
    assert checkpoint.manager(str(tmp_path)).all_steps() == [6]


def test_a_key_added_later_at_its_default_does_not_orphan_a_checkpoint(tmp_path):
    """A checkpoint from a jpeft without `method.new_key` resumes while the key keeps its default."""
    mngr = checkpoint.manager(str(tmp_path))
    state = {"step": np.zeros((), np.int32)}
    checkpoint.save(mngr, 1, state, {"train.lr": "0.1"})
    mngr.wait_until_finished()
    defaults = {"method.new_key": "8", "train.lr": "0.0002"}
    assert checkpoint.restore_latest(mngr, state, {"train.lr": "0.1", "method.new_key": "8"}, defaults) is not None
    # ... and one made before the model's own files were fingerprinted resumes too
    assert checkpoint.restore_latest(mngr, state, {"train.lr": "0.1", "model:config.json": "d1"}, defaults) is not None
    with pytest.raises(ConfigError, match=r"method.new_key: '8' -> '4'"):
        checkpoint.restore_latest(mngr, state, {"train.lr": "0.1", "method.new_key": "4"}, defaults)


def test_non_finite_loss_stops_naming_the_step_or_is_skipped(tiny_run, tmp_path):
    blowup = ("train.lr=1e38", "train.warmup=0")  # step 1's update overflows the weights
    with pytest.raises(TrainingError, match=r"step 2: loss nan") as e:
        trainer.train(run_config(tiny_run, tmp_path / "stop", *blowup), progress=False)
    assert "train.on_nonfinite=skip" in str(e.value)
    assert not (tmp_path / "stop" / "adapter").exists()
    record = trainer.train(run_config(tiny_run, tmp_path / "skip", *blowup, "train.on_nonfinite=skip"),
                           progress=False)
    rows = read_metrics(tmp_path / "skip")
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 1, 2, 3, 4, 5] and record["skipped_steps"] == 5
    assert np.isfinite(rows[0]["loss"]) and not np.isfinite(rows[1]["loss"])
    # the logged rate is the one the last applied update used: skipped steps do not move the schedule
    assert [r["lr"] for r in rows] == [pytest.approx(1e38)] * 6


def test_eval_runs_on_its_own_schedule(tiny_run, tmp_path):
    """eval_every does not need to be a multiple of log_every: both schedules are honoured."""
    trainer.train(run_config(tiny_run, tmp_path, "train.log_every=4", "train.eval_every=3"), progress=False)
    rows = read_metrics(tmp_path)
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(3, True), (4, False), (6, True)]


def watch_steps(monkeypatch, watch):
    """Call watch(batch, metrics) after each of the trainer's steps (packed batches hold segment ids)."""
    real = trainer.make_train_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)

        def watched(state, frozen, batch):
            state, out = step(state, frozen, batch)
            watch(batch, out)
            return state, out
        return watched
    monkeypatch.setattr(trainer, "make_train_step", make)


def test_logged_loss_is_the_mean_since_the_last_log(tiny_run, tmp_path, monkeypatch):
    """As transformers' Trainer logs it: the record at step 4 averages steps 1-4, the last one steps 5-6."""
    losses = []
    watch_steps(monkeypatch, lambda batch, out: losses.append(float(out["loss"])))
    trainer.train(run_config(tiny_run, tmp_path, "train.log_every=4", "data.eval=null"), progress=False)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 6] and len(losses) == 6
    np.testing.assert_allclose([r["loss"] for r in rows], [np.mean(losses[:4]), np.mean(losses[4:])], rtol=1e-6)


def test_tokens_per_s_counts_real_tokens_only(tiny_run, tmp_path, monkeypatch):
    """Padding is not throughput: the counted tokens are the attention-mask ones of the batches trained."""
    seen = []
    watch_steps(monkeypatch, lambda batch, out: seen.append(int((np.asarray(batch["attention_mask"]) > 0).sum())))
    times = iter(np.arange(0.0, 100.0, 0.5))  # every clock reading of the trainer advances 0.5 s
    monkeypatch.setattr(trainer, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: float(next(times)))}))
    trainer.train(run_config(tiny_run, tmp_path, "train.log_every=2", "data.eval=null", "train.seq_len=512"),
                  progress=False)
    rows = read_metrics(tmp_path)
    assert all(s < 4 * 512 for s in seen)  # the batches do hold padding
    for i, r in enumerate(rows):
        assert r["tokens_per_s"] == pytest.approx((seen[2 * i] + seen[2 * i + 1]) / 0.5)
