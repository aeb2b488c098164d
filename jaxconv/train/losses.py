"""Losses: cross-entropy with label smoothing, and auxiliary-classifier losses.

A model whose train-mode output is a tuple ``(logits, aux_1, ..., aux_k)`` (GoogLeNet,
Inception-v3) is trained on ``loss(logits) + sum_i w_i * loss(aux_i)``. The weights are
looked up by model name in ``AUX_LOSS_WEIGHTS`` (torchvision's reference recipe: 0.3 for
each of GoogLeNet's two heads, 0.4 for Inception-v3's one); any other tuple-output model
gets ``DEFAULT_AUX_WEIGHT`` per head. ``register_aux_weights`` adds an entry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

AUX_LOSS_WEIGHTS: dict[str, tuple[float, ...]] = {
    "googlenet": (0.3, 0.3),
    "inception_v3": (0.4,),
}
DEFAULT_AUX_WEIGHT = 0.3


def register_aux_weights(model: str, weights: tuple[float, ...]) -> None:
    AUX_LOSS_WEIGHTS[model] = tuple(float(w) for w in weights)


def aux_weights(model: str, count: int) -> tuple[float, ...]:
    weights = AUX_LOSS_WEIGHTS.get(model, (DEFAULT_AUX_WEIGHT,) * count)
    if len(weights) != count:
        raise ValueError(f"{model} returned {count} auxiliary outputs but AUX_LOSS_WEIGHTS['{model}'] "
                         f"has {len(weights)} weights")
    return weights


def split_outputs(outputs):
    """``(logits, [aux...])`` from a model's output (an array, or a tuple/list whose first
    element is the main logits)."""
    if isinstance(outputs, (tuple, list)):
        return outputs[0], list(outputs[1:])
    if hasattr(outputs, "logits"):   # a namedtuple-like output
        aux = [getattr(outputs, k) for k in ("aux_logits2", "aux_logits1", "aux_logits")
               if getattr(outputs, k, None) is not None]
        return outputs.logits, aux
    return outputs, []


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy in at least float32 (float64 logits stay float64), with
    torch's label smoothing: (1-a) one-hot + a/K."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits, onehot)


def model_loss(model: str, outputs, labels: jax.Array, label_smoothing: float = 0.0):
    """Mean loss over the batch (main + weighted auxiliary) and the main logits."""
    logits, aux = split_outputs(outputs)
    loss = cross_entropy(logits, labels, label_smoothing).mean()
    for w, a in zip(aux_weights(model, len(aux)), aux):
        loss = loss + w * cross_entropy(a, labels, label_smoothing).mean()
    return loss, logits
