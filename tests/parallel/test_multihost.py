"""Two processes on 127.0.0.1 (4 fake CPU devices each, gloo collectives) train exactly as one
process with 8 devices: same losses, and process 0 writes a loadable adapter."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from safetensors.numpy import load_file

import jpeft
from test_sharded_train import run_on_fake_devices

TESTS = os.path.dirname(os.path.dirname(__file__))
EXTRA = ["train.steps=4", "train.batch_size=8", "train.log_every=1", "data.eval_limit=2", "data.max_new_tokens=3",
         "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]

WORKER = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    sys.path.insert(0, {tests!r})
    from jpeft.train import trainer
    from conftest import run_config
    extra = json.loads({extra!r}) + ["dist.coordinator=127.0.0.1:{port}", "dist.num_processes=2",
                                     "dist.process_id=" + sys.argv[1]]
    print(json.dumps(trainer.train(run_config(json.loads({run!r}), {out!r}, *extra), progress=False)))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tiny_run, tmp_path):
    run = json.dumps({k: str(v) for k, v in tiny_run.items()})
    script = WORKER.format(tests=TESTS, extra=json.dumps(EXTRA), port=free_port(), run=run,
                           out=str(tmp_path / "two"))
    workers = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    records = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert records[0]["loss"] == records[1]["loss"]  # both processes computed the same global step
    one = run_on_fake_devices(tiny_run, tmp_path / "one", {"one": EXTRA})["losses"]["one"]
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        two = [json.loads(line)["loss"] for line in f]
    np.testing.assert_allclose(two, one, rtol=1e-6)
    assert "eval_rougeL" in records[0]
    # process 0 wrote the adapter, gathered from both hosts' shards; it loads onto the base
    assert sorted(os.listdir(tmp_path / "two" / "adapter")) == sorted(os.listdir(tmp_path / "one" / "one" / "adapter"))
    two_w = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    one_w = load_file(tmp_path / "one" / "one" / "adapter" / "adapter_model.safetensors")
    for key in one_w:
        np.testing.assert_allclose(two_w[key], one_w[key], rtol=1e-5, atol=1e-7, err_msg=key)
    _, base = jpeft.from_pretrained(tiny_run["model"])
    jpeft.load_adapter(str(tmp_path / "two" / "adapter"), base)
