"""Training: train state, jitted steps, optimizers and schedules, the loop, checkpoints, metrics.

``train(model=..., data=..., ...)`` and ``evaluate(model, data, ...)`` are the Python API
behind ``jaxconv train`` and ``jaxconv eval``. Names are imported lazily, so that
``jaxconv --help`` does not pay for orbax and grain.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "jaxconv.train.checkpoint": ("CheckpointError", "Checkpoints"),
    "jaxconv.train.losses": ("AUX_LOSS_WEIGHTS", "cross_entropy", "model_loss", "register_aux_weights"),
    "jaxconv.train.loop": ("TrainConfig", "TrainingDiverged", "TrainResult", "evaluate", "evaluate_on",
                           "setup_model", "train"),
    "jaxconv.train.optim": ("OptimConfig", "make_optimizer", "make_schedule"),
    "jaxconv.train.state": ("TrainState", "init_state"),
    "jaxconv.train.step": ("make_eval_step", "make_train_step", "make_train_steps", "train_step_fn"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'jaxconv.train' has no attribute {name!r}")


__all__ = sorted(_WHERE)
