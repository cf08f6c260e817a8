"""The JAX settings every jpeft command runs under (jpeft.jax_env): float32 matmuls in float32 and a
persistent compile cache, each unless the user set it; the bench's workers compile cold."""
import os
import subprocess
import sys

import pytest

from jpeft.jax_env import worker_env

SETTINGS = ("JAX_DEFAULT_MATMUL_PRECISION", "JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")


def _run_cli_then(code: str, tmp_path, jax_first: bool = False, **chosen) -> list[str]:
    """Stdout lines of a fresh interpreter that runs a jpeft command (one that fails fast) and then `code`,
    with none of the settings in its environment but `chosen`, and $XDG_CACHE_HOME in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(chosen, XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    script = ("import jax; " if jax_first else "") + (
        "from jpeft.cli import main; assert main(['bench', '--rounds', '0']) == 2; "
        "import os, jax, jax.numpy as jnp; " + code)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


DOT = "print(jax.jit(jnp.dot).lower(jnp.ones((2, 2)), jnp.ones((2, 2))).as_text())"


@pytest.mark.parametrize("chosen, jax_first, want", [
    (None, False, "HIGHEST"),  # float32 in float32: JAX's default would be TF32 on NVIDIA GPUs
    (None, True, "HIGHEST"),  # jax imported before the CLI ran: its config is updated too
    ("tensorfloat32", False, "HIGH"),  # the user's own choice stands
])
def test_the_cli_holds_float32_matmuls_to_float32_unless_the_user_chose(tmp_path, chosen, jax_first, want):
    lines = _run_cli_then("print(os.environ['JAX_DEFAULT_MATMUL_PRECISION']); " + DOT, tmp_path, jax_first,
                          **({"JAX_DEFAULT_MATMUL_PRECISION": chosen} if chosen else {}))
    assert lines[0] == (chosen or "float32")  # what the processes it starts inherit
    assert f"precision = [{want}, {want}]" in "\n".join(lines)


@pytest.mark.parametrize("jax_first", [False, True])
def test_the_cli_keeps_compiled_programs_under_the_user_cache_dir(tmp_path, jax_first):
    _run_cli_then("jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()", tmp_path, jax_first)
    assert os.listdir(tmp_path / "jpeft" / "xla")  # the program compiled after the command is stored


def test_an_empty_cache_dir_turns_the_cache_off(tmp_path):
    lines = _run_cli_then("jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready(); "
                          "print(repr(os.environ['JAX_COMPILATION_CACHE_DIR']))", tmp_path,
                          JAX_COMPILATION_CACHE_DIR="")
    assert lines == ["''"] and not (tmp_path / "jpeft").exists()


def test_a_cache_dir_that_cannot_be_made_leaves_the_cache_off(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # $XDG_CACHE_HOME is a file: no directory can be made below it
    lines = _run_cli_then("import warnings; warnings.simplefilter('error'); "  # jax would warn at each compile
                          "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready(); "
                          "print(repr(os.environ['JAX_COMPILATION_CACHE_DIR']))", blocked)
    assert lines == ["''"]


def test_bench_workers_compile_cold_with_this_checkout_first():
    env = worker_env()
    assert env["JAX_COMPILATION_CACHE_DIR"] == ""  # a worker's first step times a real compile
    assert env["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(os.path.dirname(os.path.abspath(
        sys.modules["jpeft"].__file__)))
