"""Full fine-tuning as a method: no new leaves, every leaf trainable."""
import jax


class Full:
    def init(self, key, params):
        del key
        return params

    def mask(self, params):
        return jax.tree.map(lambda _: True, params)

    def __repr__(self):
        return "Full()"
