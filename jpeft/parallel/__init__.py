"""Meshes and sharding rules."""
from jpeft.parallel.mesh import RULES, batch_placer, make_mesh, param_shardings

__all__ = ["RULES", "make_mesh", "param_shardings", "batch_placer"]
