"""Optimizers and learning-rate schedules (optax).

``make_schedule`` builds constant / step / cosine schedules with an optional linear
warmup; ``make_optimizer`` builds SGD (momentum or Nesterov, torch-style coupled weight
decay) or AdamW (decoupled), with gradient clipping and the choice to leave BatchNorm
and bias parameters (every parameter with fewer than two dimensions) out of the decay.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import optax

OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    decay_bn_bias: bool = False            # False: no decay on BatchNorm and bias parameters
    b1: float = 0.9
    b2: float = 0.999
    schedule: str = "cosine"
    warmup_steps: int = 0
    milestones: tuple[int, ...] = field(default=())   # step schedule: steps where lr *= gamma
    gamma: float = 0.1
    min_lr: float = 0.0
    clip_norm: float | None = None


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose from {', '.join(SCHEDULES)}")
    warm = max(int(cfg.warmup_steps), 0)
    main_steps = max(total_steps - warm, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "step":
        bounds = {int(m) - warm: cfg.gamma for m in sorted(cfg.milestones) if int(m) > warm}
        main = optax.piecewise_constant_schedule(cfg.lr, bounds)
    else:
        alpha = cfg.min_lr / cfg.lr if cfg.lr else 0.0
        main = optax.cosine_decay_schedule(cfg.lr, main_steps, alpha=alpha)
    if not warm:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), main], [warm])


def decay_mask(params):
    """True for parameters that take weight decay: kernels (ndim >= 2), not biases/BatchNorm."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation and its learning-rate schedule."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    schedule = make_schedule(cfg, total_steps)
    mask = None if cfg.decay_bn_bias else decay_mask
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.optimizer in ("sgd", "nesterov"):
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.optimizer == "nesterov"))
    else:
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*parts), schedule
