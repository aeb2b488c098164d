"""The train state: a pytree of arrays, nothing else.

``TrainState(step, params, batch_stats, opt_state, rng)``; the model and the optimizer
stay outside (they are static: closed over by the jitted step), so the state can be
donated, sharded, checkpointed and compared leaf by leaf. The per-step rng is
``fold_in(rng, step)``, so the state carries one key and never needs splitting.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any         # {} for models without BatchNorm
    opt_state: Any
    rng: jax.Array           # a raw uint32[2] key for dropout / stochastic depth

    def variables(self) -> dict:
        """The model's variables, ``{'params', 'batch_stats'}`` (the latter when present)."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def init_state(model, tx: optax.GradientTransformation, seed: int, input_shape: tuple[int, ...],
               dtype=jnp.float32) -> TrainState:
    """A fresh state for ``model`` with inputs of ``input_shape`` (H, W, C). Initialises in
    train mode so auxiliary heads that only run in training get their parameters. Call it
    under ``jax.jit`` (with ``out_shardings``) to build the state directly on the devices.

    The initial values are always drawn in float32 and then cast to the model's
    ``param_dtype``: a float64 model starts from exactly the float32 model's values, so
    a float64 run is the float32 run without float32 rounding (for exact checks)."""
    key = jax.random.PRNGKey(seed)
    k_params, k_dropout, k_train = jax.random.split(key, 3)
    param_dtype = getattr(model, "param_dtype", jnp.float32)
    init_model = model
    if param_dtype != jnp.float32:
        init_model = model.clone(dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.zeros((2, *input_shape), jnp.float32 if init_model is not model else dtype)
    variables = init_model.init({"params": k_params, "dropout": k_dropout}, x, train=True)
    if init_model is not model:
        variables = jax.tree.map(lambda v: v.astype(param_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v,
                                 variables)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=k_train)
