"""Meshes, sharding rules and the multi-host start."""
from jpeft.parallel.distributed import initialize
from jpeft.parallel.mesh import (RULES, activation_sharding, batch_sharding, local_rows, make_mesh, param_shardings, place_batch,
                                 state_shardings)

__all__ = ["RULES", "activation_sharding", "initialize", "make_mesh", "param_shardings", "state_shardings", "batch_sharding",
           "local_rows", "place_batch"]
