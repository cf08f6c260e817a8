"""Decoding on a mesh (8 fake CPU devices in a subprocess): each data-parallel device decodes its own rows with
their KV cache, as a train step splits its batch, and the tokens are one device's."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

import jpeft
from conftest import FAMILIES, make_hf_model, save_hf_model
from jpeft.generate import generate

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    import jpeft
    from jpeft import generate as G
    from jpeft.models import layers
    from jpeft.parallel import make_mesh
    sys.path[:0] = [{tests!r}, os.path.join({tests!r}, "parallel")]  # conftest's folder, and this file's
    from test_sharded_generate import PROMPTS, prompted

    meshes, per_device_rows = [], layers.per_device_rows
    def spy(f, rows, shared):  # the mesh a mixture's experts see as decoding is traced
        meshes.append(dict(jax.sharding.get_abstract_mesh().shape))
        return per_device_rows(f, rows, shared)
    layers.per_device_rows = spy
    model, params = jpeft.from_pretrained({mixtral!r}, mesh=make_mesh(2, 2, 2))
    meshes.clear()  # those of tracing the model's init
    tokens = G.generate(model, params, PROMPTS, 6, eos_token_id=None)
    model, params = jpeft.from_pretrained({llama!r}, mesh=make_mesh(2, 2, 2))
    per_row = G.generate(model, prompted(params), PROMPTS, 6, eos_token_id=None)
    # params on a mesh of the user's own (not jpeft's axes) decode as they did: whole rows on each device
    model, params = jpeft.from_pretrained({llama!r})
    other = jax.sharding.NamedSharding(jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,)),
                                       jax.sharding.PartitionSpec())
    elsewhere = G.generate(model, jax.device_put(params, other), PROMPTS, 6, eos_token_id=None)
    # jpeft's axes on a mesh of jax.make_mesh's default Explicit axes: taken as Auto
    model, params = jpeft.from_pretrained({llama!r}, mesh=jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")))
    explicit = G.generate(model, params, PROMPTS, 6, eos_token_id=None)

    # the compiled decoding loop's per-device temporaries, 16 rows on 8 data-parallel devices: as generate places
    # the rows (split) and as it did before (whole on each device)
    mesh = make_mesh(8, 1, 1)
    model, params = jpeft.from_pretrained({llama!r}, mesh=mesh)
    rows = np.ones((16, 32), np.int32)
    loop = lambda ids, mask: G._decoder(model.config.dtype).lower(
        model, 64, None, params, ids, mask, jnp.full((8,), -1, jnp.int32), jnp.float32(1), jnp.float32(1),
        jax.random.key(0), jnp.int32(0)).compile().memory_analysis().temp_size_in_bytes
    whole = loop(jnp.asarray(rows), jnp.asarray(rows))
    with G.activation_sharding(mesh):
        split = loop(G.split_rows(mesh, rows), G.split_rows(mesh, rows))
    print(json.dumps({{"tokens": tokens, "per_row": per_row, "elsewhere": elsewhere, "explicit": explicit, "meshes": meshes, "whole": whole, "split": split}}))
""")

# five rows on a 2x2x2 mesh (4 data-parallel devices): the last row is repeated to fill the eighth slot
PROMPTS = [np.random.RandomState(i).randint(1, 90, 3 + 2 * i).tolist() for i in range(5)]



def prompted(params):
    """Three tasks' soft prompts, one chosen per row (the repeated row takes the last row's)."""
    import jax
    from jpeft.peft import PromptTuning
    from jpeft.peft.prompt import select_task
    return select_task(PromptTuning(num_virtual_tokens=3, tasks=3).init(jax.random.key(1), params), [0, 2, 1, 2, 0])


def test_decoding_on_a_mesh_splits_rows_and_equals_one_device(tmp_path):
    """Mixtral's greedy tokens on a 2x2x2 mesh, and a soft prompt per row (task ids padded with the rows)."""
    mixtral = save_hf_model(make_hf_model("mixtral", **FAMILIES["mixtral"]), tmp_path / "mixtral")
    llama = save_hf_model(make_hf_model("llama"), tmp_path / "llama")
    script = SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)), mixtral=str(mixtral), llama=str(llama))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout.strip().splitlines()[-1])
    model, params = jpeft.from_pretrained(mixtral)
    assert sharded["tokens"] == generate(model, params, PROMPTS, 6, eos_token_id=None)
    model, params = jpeft.from_pretrained(llama)
    assert sharded["per_row"] == generate(model, prompted(params), PROMPTS, 6, eos_token_id=None)
    assert sharded["elsewhere"] == sharded["explicit"] == generate(model, params, PROMPTS, 6, eos_token_id=None)
    # a mixture's experts route each device's own rows, in the prefill and in the decoding steps
    assert sharded["meshes"] and all(m == {"data": 2, "fsdp": 2, "tensor": 2} for m in sharded["meshes"])
    # the KV cache and activations are split eight ways (weights and the loop's own scalars are not)
    assert sharded["split"] < sharded["whole"] / 4, sharded
