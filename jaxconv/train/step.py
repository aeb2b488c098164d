"""The jitted train and eval steps.

``make_train_step`` returns ``step(state, metrics, images, labels) -> (state, metrics)``,
jitted with the state and the metric sums donated; ``make_train_steps`` the same for
several steps in one call (one ``lax.scan`` over k batches). Inputs arrive sharded over the mesh's
``'data'`` axis and the state is replicated, so under ``jax.jit`` the gradients, the
loss and the BatchNorm statistics are global-batch quantities automatically. Metrics
accumulate on the device; the host fetches them every N steps. A non-finite loss leaves
the state as it was and is counted in ``metrics['nonfinite']`` (with the first bad step),
so the loop can stop with the last good state.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxconv.train.losses import model_loss
from jaxconv.train.state import TrainState


def zero_metrics() -> dict:
    return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
            "count": jnp.zeros((), jnp.float32), "nonfinite": jnp.zeros((), jnp.int32),
            "first_bad_step": jnp.full((), -1, jnp.int32)}


def train_step_fn(model, tx: optax.GradientTransformation, model_name: str, *,
                  label_smoothing: float = 0.0, compute_dtype=jnp.float32) -> Callable:
    """The un-jitted step (for composing); see :func:`make_train_step`."""

    def step(state: TrainState, metrics: dict, images: jax.Array, labels: jax.Array):
        rng = jax.random.fold_in(state.rng, state.step)
        x = images.astype(compute_dtype)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            outputs, updated = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": rng})
            loss, logits = model_loss(model_name, outputs, labels, label_smoothing)
            return loss, (logits, updated.get("batch_stats", state.batch_stats))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        ok = jnp.isfinite(loss)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        n = jnp.float32(labels.shape[0])
        correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        metrics = {
            "loss_sum": metrics["loss_sum"] + jnp.where(ok, loss * n, 0.0),
            "correct": metrics["correct"] + jnp.where(ok, correct, 0.0),
            "count": metrics["count"] + jnp.where(ok, n, 0.0),
            "nonfinite": metrics["nonfinite"] + (~ok).astype(jnp.int32),
            "first_bad_step": jnp.where((metrics["first_bad_step"] < 0) & ~ok, state.step + 1,
                                        metrics["first_bad_step"]),
        }
        return new, metrics

    return step


def make_train_step(model, tx, model_name: str, mesh: jax.sharding.Mesh, *, label_smoothing: float = 0.0,
                    compute_dtype=jnp.float32) -> Callable:
    """``step(state, metrics, images, labels)`` jitted over ``mesh``: state and metrics
    replicated and donated, images and labels sharded on the batch axis."""
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    fn = train_step_fn(model, tx, model_name, label_smoothing=label_smoothing, compute_dtype=compute_dtype)
    return jax.jit(fn, in_shardings=(replicated, replicated, data, data),
                   out_shardings=(replicated, replicated), donate_argnums=(0, 1))


def make_train_steps(model, tx, model_name: str, mesh: jax.sharding.Mesh, steps: int, *,
                     label_smoothing: float = 0.0, compute_dtype=jnp.float32) -> Callable:
    """``steps(state, metrics, images, labels)``: ``steps`` train steps in one jitted call,
    where ``images`` and ``labels`` are tuples of ``steps`` batches, each sharded as
    :func:`make_train_step`'s. The batches are stacked on the device and the step runs as
    one ``lax.scan`` over them: the same steps as calling the one-step function on each
    batch in turn (equal to float rounding: XLA may fuse the scan's body differently).

    Why: XLA gives a call's buffers from ``malloc`` and frees them after it, and on Linux
    every call pays the kernel's page faults on them again (module docstring of
    :mod:`jaxconv.runtime`). Inside one call the scan reuses the same buffers for every
    step, so k steps fault them in once: on the 2-core CPU, train steps at batch 32, one
    step a call against four, DenseNet-121 6331 -> 4999 ms, ResNet-50 6546 -> 5981 ms;
    LeNet5 at batch 256, eight a call, 8.3-8.5 -> 7.6-7.8 ms (``BENCHMARKS.md``)."""
    if steps < 1:
        raise ValueError(f"steps per call must be at least 1, got {steps}")
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    fn = train_step_fn(model, tx, model_name, label_smoothing=label_smoothing, compute_dtype=compute_dtype)

    def many(state, metrics, images, labels):
        def body(carry, batch):
            return fn(*carry, *batch), None

        (state, metrics), _ = jax.lax.scan(body, (state, metrics), (jnp.stack(images), jnp.stack(labels)))
        return state, metrics

    jitted = jax.jit(many, in_shardings=(replicated, replicated, (data,) * steps, (data,) * steps),
                     out_shardings=(replicated, replicated), donate_argnums=(0, 1))

    def call(state, metrics, images, labels):
        if len(images) != steps or len(labels) != steps:
            raise ValueError(f"expected {steps} batches of images and labels, got {len(images)} and {len(labels)}")
        return jitted(state, metrics, tuple(images), tuple(labels))

    return call


def zero_eval_sums() -> dict:
    return {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "top1", "top5", "count")}


def make_eval_step(model, mesh: jax.sharding.Mesh, *, compute_dtype=jnp.float32, topk: int = 5) -> Callable:
    """``step(variables, sums, images, labels, weights) -> sums``: weighted sums of the
    loss, top-1 and top-k hits. ``images`` (N, H, W, C), or (N, crops, H, W, C) for
    multi-crop evaluation (the softmax is averaged over the crops)."""
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))

    def step(variables, sums, images, labels, weights):
        crops = images.shape[1] if images.ndim == 5 else 1
        x = images.reshape((-1,) + images.shape[-3:]).astype(compute_dtype)
        logits = model.apply(variables, x, train=False)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        if crops > 1:
            logp = jax.nn.logsumexp(logp.reshape(labels.shape[0], crops, -1), axis=1) - jnp.log(crops)
        k = min(topk, logp.shape[-1])
        _, top = jax.lax.top_k(logp, k)
        hit1 = (top[:, 0] == labels).astype(jnp.float32)
        hitk = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
        nll = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
        return {"loss_sum": sums["loss_sum"] + jnp.sum(weights * nll),
                "top1": sums["top1"] + jnp.sum(weights * hit1),
                "top5": sums["top5"] + jnp.sum(weights * hitk),
                "count": sums["count"] + jnp.sum(weights)}

    return jax.jit(step, in_shardings=(replicated, replicated, data, data, data), out_shardings=replicated,
                   donate_argnums=(1,))
