"""The same train step on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 fake CPU devices."""
import json
import os
import subprocess
import sys
import textwrap

from jpeft.train import trainer
from conftest import read_metrics, run_config

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    sys.path.insert(0, {tests!r})
    from jpeft.train import trainer
    from jpeft.parallel import make_mesh, param_shardings
    from conftest import run_config
    assert len(jax.devices()) == 8
    captured = {{}}
    real = trainer.make_train_step
    def spy(model, optimizer, seed, dropout, state_shardings):
        captured["specs"] = {{"/".join(str(k.key) for k in path): str(s.spec) for path, s in
                             jax.tree_util.tree_flatten_with_path(state_shardings["trainable"])[0]}}
        return real(model, optimizer, seed, dropout, state_shardings)
    trainer.make_train_step = spy
    run = json.loads({run!r})
    trainer.train(run_config(run, {out!r}, "train.fsdp=2", "train.tensor=2", "method.name=full"), progress=False)
    print(json.dumps(captured["specs"]))
""")


def test_sharded_matches_single_device(tiny_run, tmp_path):
    here = os.path.dirname(__file__)
    run = {k: str(v) for k, v in tiny_run.items()}
    script = SCRIPT.format(tests=os.path.dirname(here), run=json.dumps(run), out=str(tmp_path / "sharded"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    specs = json.loads(result.stdout.strip().splitlines()[-1])
    assert "tensor" in specs["model/layers/mlp/gate_proj/kernel"] and "fsdp" in specs["model/layers/mlp/gate_proj/kernel"]
    trainer.train(run_config(tiny_run, tmp_path / "single", "method.name=full"), progress=False)
    sharded, single = read_metrics(tmp_path / "sharded"), read_metrics(tmp_path / "single")
    assert len(sharded) == len(single) == 6
    for a, b in zip(sharded, single):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(b["loss"])), (a, b)
