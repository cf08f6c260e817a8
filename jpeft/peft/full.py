"""Full fine-tuning as a method: no new leaves, every leaf trainable."""
import jax

from jpeft.peft.base import Method


class Full(Method):
    name = "full"

    def mask(self, params):
        return jax.tree.map(lambda _: True, params)

    def __repr__(self):
        return "Full()"
