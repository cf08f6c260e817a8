"""Meshes and sharding rules."""
from jpeft.parallel.mesh import RULES, batch_sharding, make_mesh, param_shardings

__all__ = ["RULES", "make_mesh", "param_shardings", "batch_sharding"]
