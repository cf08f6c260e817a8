"""RoPE's cos/sin tables are computed once a call, before the layer scan, not in every layer (their values
against transformers: test_parity.py, every RoPE scaling and Gemma 3's local RoPE)."""
import jax
import jax.numpy as jnp
from jax.extend.core import jaxprs_in_params

import jpeft


def test_rope_tables_are_computed_once_before_the_layer_scan(tiny_llama):
    """cos and sin of the positions are computed before the layer scan, never inside it: there each layer
    recomputed them, XLA fused them into every head's rotation, and the scan stacked them per layer."""
    model, params = jpeft.from_pretrained(tiny_llama[1])
    ids = jnp.zeros((2, 8), jnp.int32)

    def primitives(jaxpr, in_scan=False):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name, in_scan
            for sub in jaxprs_in_params(eqn.params):
                yield from primitives(sub, in_scan or eqn.primitive.name == "scan")

    found = set(primitives(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params).jaxpr))
    assert ("cos", False) in found and ("sin", False) in found
    assert ("cos", True) not in found and ("sin", True) not in found
