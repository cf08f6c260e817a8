"""The multi-host start: explicit `dist.*` keys, discovery on clusters, nothing on a plain machine."""
import jax

from jpeft.parallel import distributed


def test_explicit_discovered_or_single(monkeypatch):
    calls, settings = [], {}
    monkeypatch.setattr(jax.config, "update", lambda key, value: settings.update({key: value}))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    distributed.initialize()  # a plain machine: one process, nothing to join
    assert calls == []
    distributed.initialize("10.0.0.1:8476", 2, 1)
    assert calls == [(("10.0.0.1:8476",), {"num_processes": 2, "process_id": 1})]
    assert settings == {"jax_cpu_collectives_implementation": "gloo"}  # CPU processes need collectives
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a SLURM step of 4 tasks: JAX discovers the job
    distributed.initialize()
    assert calls[-1] == ((), {})


def test_second_call_is_a_no_op(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    distributed.initialize("10.0.0.1:8476", 2, 0)
