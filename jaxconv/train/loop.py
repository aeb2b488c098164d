"""The training loop and evaluation: ``train(...)`` and ``evaluate(...)``.

``train`` builds the dataset, the model (with ``num_classes`` and, where the model has
the field, ``in_channels`` set from the data), the optimizer, the mesh over every
device of every process, the grain pipeline and the orbax checkpoints, then runs the
jitted step. The host touches device values only every ``log_every`` steps, at epoch
ends and before every checkpoint. Outputs under ``out``: ``checkpoints/``,
``metrics.jsonl``, ``curves.png``, ``variables.npz`` (``save_variables``) and
``config.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxconv.data.augment import EvalTransform, TrainTransform
from jaxconv.data.datasets import Dataset, get_dataset
from jaxconv.data.pipeline import device_prefetch, eval_dataset, steps_per_epoch, train_dataset
from jaxconv.train.checkpoint import Checkpoints, abstract
from jaxconv.train.distributed import data_mesh, is_main, replicate, to_host
from jaxconv.train.metrics import JsonlWriter, ProgressBar, plot_curves
from jaxconv.train.optim import OptimConfig, make_optimizer
from jaxconv.train.state import TrainState, init_state
from jaxconv.train.step import make_eval_step, make_train_step, make_train_steps, zero_eval_sums, zero_metrics

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
# float64 (parameters, statistics and compute; needs jax_enable_x64) is for exact checks:
# it starts from the float32 run's initial values (see init_state), so a float64 run is
# the same run as a float32 one without float32 rounding.


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped with its last good state."""


@dataclass
class TrainConfig:
    model: str = "lenet5"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    data_options: dict = field(default_factory=dict)    # e.g. synthetic: n, size, channels
    epochs: int = 10
    steps: int | None = None              # total optimizer steps (default: epochs x steps per epoch)
    batch_size: int = 128                 # the global batch, split over every device
    optimizer: str = "sgd"                # sgd | nesterov | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    decay_bn_bias: bool = False
    schedule: str = "cosine"              # constant | step | cosine
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = ()    # epochs, for the step schedule
    gamma: float = 0.1
    clip_norm: float | None = None
    label_smoothing: float = 0.0
    augment: str = "none"                 # none | flip | crop-flip | rrc | alexnet
    image_size: tuple[int, int] | None = None
    eval_crop: str = "center"             # center | ten
    eval_every: int = 1                   # epochs between test evaluations (0: only at the end, <0: never)
    dtype: str = "float32"                # compute dtype; parameters and statistics stay float32
                                          # (float64: everything float64, for exact checks)
    seed: int = 0
    out: str = "runs/train"
    checkpoint_every: int | None = None   # steps (default: every epoch); always at the end
    keep: int = 3
    resume: bool = False
    log_every: int = 50
    steps_per_call: int = 1               # train steps per jitted call (k > 1: one lax.scan over k batches,
                                          # make_train_steps; calls end at every log, epoch and checkpoint)
    threads: int = 2
    workers: int = 0
    progress: bool = True
    stop_after: int | None = None         # run at most this many steps now, checkpoint, return
    async_checkpoint: bool = True
    save_variables: bool = True
    plot: bool = True
    quiet: bool = False
    devices: int | None = None            # use the first N devices (single-process runs; default: all)


@dataclass
class TrainResult:
    state: TrainState
    step: int
    history: list[dict]
    test: dict | None
    out: str
    model: Any = None

    def variables(self) -> dict:
        return to_host(self.state.variables())


@dataclass(frozen=True)
class ModelSetup:
    model: Any
    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None
    compute_dtype: Any


@functools.lru_cache(maxsize=16)
def _get_model(name: str, num_classes: int, options: tuple):
    """One module object per (model, classes, options), so that the jitted functions built
    on it below are reused across ``train``/``evaluate`` calls instead of recompiled."""
    from jaxconv.registry import get_model

    return get_model(name, num_classes=num_classes, **dict(options))


@functools.lru_cache(maxsize=8)
def _train_functions(model, model_name: str, optim: OptimConfig, total: int, label_smoothing: float,
                     compute_dtype, mesh, seed: int, input_shape: tuple, steps_per_call: int):
    """``(tx, schedule, init, step, steps)`` for a run (``steps``: ``steps_per_call`` steps a
    call, or None); cached, so an identical run reuses compilations."""
    tx, schedule = make_optimizer(optim, total)
    init = jax.jit(functools.partial(init_state, model, tx, seed, input_shape),
                   out_shardings=NamedSharding(mesh, P()))
    step = make_train_step(model, tx, model_name, mesh, label_smoothing=label_smoothing,
                           compute_dtype=compute_dtype)
    steps = (make_train_steps(model, tx, model_name, mesh, steps_per_call, label_smoothing=label_smoothing,
                              compute_dtype=compute_dtype) if steps_per_call > 1 else None)
    return tx, schedule, init, step, steps


@functools.lru_cache(maxsize=8)
def _eval_function(model, mesh, compute_dtype):
    return make_eval_step(model, mesh, compute_dtype=compute_dtype)


def setup_model(name: str, dataset: Dataset, *, dtype: str = "float32",
                image_size: tuple[int, int] | None = None) -> ModelSetup:
    """The model for ``dataset``: its classes, its channels (``in_channels`` when the model
    has that field), the input size and normalisation."""
    from jaxconv.registry import model_info

    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    info = model_info(name)
    h, w, c = info.input_size
    options: dict[str, Any] = {}
    if dtype == "float64":
        if not jax.config.jax_enable_x64:
            raise ValueError("--dtype float64 needs jax_enable_x64 (JAX_ENABLE_X64=1)")
        options["param_dtype"] = jnp.float64
    if dtype != "float32":
        options["dtype"] = DTYPES[dtype]
    if dataset.channels != c:
        options["in_channels"] = dataset.channels
    try:
        model = _get_model(name, dataset.num_classes, tuple(sorted(options.items())))
    except TypeError as e:
        if "in_channels" in options and "in_channels" in str(e):
            raise ValueError(f"{name} takes {c}-channel input and has no in_channels option; "
                             f"{dataset.name} images have {dataset.channels} channels") from None
        raise
    pre = info.preprocessing
    size = tuple(image_size) if image_size else (dataset.image_size or (pre.crop, pre.crop))
    mean, std = (dataset.mean, dataset.std) if dataset.mean is not None else (pre.mean, pre.std)
    if len(mean) not in (1, dataset.channels):
        raise ValueError(f"{name}'s normalisation has {len(mean)} channels, {dataset.name} images {dataset.channels}")
    resize = None if dataset.image_size == size else int(round(size[0] * pre.resize / pre.crop))
    return ModelSetup(model, name, dataset.num_classes, dataset.channels, size, tuple(mean), tuple(std),
                      resize, DTYPES[dtype])


def _say(cfg, *parts) -> None:
    if not cfg.quiet and is_main():
        print(*parts, flush=True)


def evaluate_on(setup: ModelSetup, variables, dataset: Dataset, mesh, *, batch_size: int = 256,
                crop: str = "center", threads: int = 2, eval_step=None) -> dict:
    """top-1, top-5 and loss of ``variables`` (replicated device arrays) on ``dataset``."""
    batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
    transform = EvalTransform(setup.image_size, setup.mean, setup.std, setup.resize,
                              "ten" if crop in ("ten", "ten-crop") else crop)
    ds, _ = eval_dataset(dataset.source, transform, global_batch=batch_size, threads=threads)
    step = eval_step or _eval_function(setup.model, mesh, setup.compute_dtype)
    sums = jax.jit(zero_eval_sums, out_shardings=NamedSharding(mesh, P()))()
    data = NamedSharding(mesh, P("data"))
    for (images, labels, weights), _ in device_prefetch(iter(ds), data, batch_size):
        sums = step(variables, sums, images, labels, weights)
    s = to_host(sums)
    n = float(s["count"])
    return {"top1": float(s["top1"]) / n, "top5": float(s["top5"]) / n, "loss": float(s["loss_sum"]) / n,
            "count": int(n)}


def evaluate(model: str, data: str = "fashion-mnist", *, weights: str | None = None, variables=None,
             split: str = "test", data_dir: str | None = None, batch_size: int = 256, crop: str = "center",
             dtype: str = "float32", image_size=None, threads: int = 2, data_options=None) -> dict:
    """Evaluate ``variables`` (or the file ``weights``, or the model's default pretrained
    weights) on a dataset split: ``{'top1', 'top5', 'loss', 'count'}``."""
    dataset = get_dataset(data, split, data_dir=data_dir, **(data_options or {}))
    setup = setup_model(model, dataset, dtype=dtype, image_size=image_size)
    if variables is None:
        variables = load_default_weights(model) if weights is None else _load(weights)
    mesh = data_mesh()
    return evaluate_on(setup, replicate(variables, mesh), dataset, mesh, batch_size=batch_size, crop=crop,
                       threads=threads)


def _load(path: str):
    from jaxconv.serialization import load_variables

    return load_variables(path)


def load_default_weights(model: str):
    """The model's default pretrained weights (:func:`jaxconv.load_pretrained`)."""
    from jaxconv.pretrained import load_pretrained

    try:
        return load_pretrained(model)[1]
    except (KeyError, FileNotFoundError) as e:
        reason = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"{reason}; or pass --weights FILE") from None


def _meta(cfg: TrainConfig, setup: ModelSetup) -> dict:
    return {"format": "jaxconv-train", "version": 1, "model": cfg.model, "num_classes": setup.num_classes,
            "in_channels": setup.in_channels, "optimizer": cfg.optimizer, "dtype": cfg.dtype, "data": cfg.data,
            "global_batch": cfg.batch_size, "image_size": list(setup.image_size), "augment": cfg.augment,
            "seed": cfg.seed}


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train ``config.model`` on ``config.data``; keyword arguments override config fields."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if cfg.devices and jax.process_count() > 1:
        raise ValueError("--devices selects devices of a single-process run; multi-process runs use every device")
    if cfg.devices and not 0 < cfg.devices <= jax.device_count():
        raise ValueError(f"--devices {cfg.devices}: this machine has {jax.device_count()} device(s)")
    mesh = data_mesh(jax.devices()[:cfg.devices] if cfg.devices else None)
    if cfg.batch_size % mesh.size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {mesh.size} devices")
    if cfg.steps_per_call < 1:
        raise ValueError(f"--steps-per-call {cfg.steps_per_call}: must be at least 1")
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {jax.process_count()} processes")
    train_ds = get_dataset(cfg.data, "train", data_dir=cfg.data_dir, **cfg.data_options)
    test_ds = get_dataset(cfg.data, "test", data_dir=cfg.data_dir, **cfg.data_options) if cfg.eval_every >= 0 else None
    setup = setup_model(cfg.model, train_ds, dtype=cfg.dtype, image_size=cfg.image_size)
    spe = steps_per_epoch(len(train_ds), cfg.batch_size)
    total = int(cfg.steps or cfg.epochs * spe)
    epochs = math.ceil(total / spe)
    optim = OptimConfig(optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        decay_bn_bias=cfg.decay_bn_bias, schedule=cfg.schedule,
                        warmup_steps=int(round(cfg.warmup_epochs * spe)),
                        milestones=tuple(int(round(m * spe)) for m in cfg.milestones), gamma=cfg.gamma,
                        clip_norm=cfg.clip_norm)
    h, w = setup.image_size
    tx, schedule, make_state, step_fn, steps_fn = _train_functions(
        setup.model, cfg.model, optim, total, cfg.label_smoothing, setup.compute_dtype, mesh, cfg.seed,
        (h, w, setup.in_channels), cfg.steps_per_call)
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    os.makedirs(cfg.out, exist_ok=True)
    ckpt = Checkpoints(os.path.join(cfg.out, "checkpoints"), _meta(cfg, setup), keep=cfg.keep, resume=cfg.resume,
                       async_save=cfg.async_checkpoint)
    state = make_state()
    start, data_state = 0, None
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(abstract(state))
        _say(cfg, f"resuming from step {start} ({ckpt.directory})")
    writer = None
    if is_main():
        writer = JsonlWriter(os.path.join(cfg.out, "metrics.jsonl"), append=cfg.resume)
        with open(os.path.join(cfg.out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(dataclasses.asdict(cfg), devices=mesh.size, processes=jax.process_count(),
                           steps_per_epoch=spe, total_steps=total), f, indent=1)
    transform = TrainTransform(cfg.augment, setup.image_size, setup.mean, setup.std, setup.resize)
    it = iter(train_dataset(train_ds.source, transform, global_batch=cfg.batch_size, num_steps=total,
                            seed=cfg.seed, threads=cfg.threads, workers=cfg.workers))
    if data_state is not None:
        it.set_state(data_state)
    eval_step = _eval_function(setup.model, mesh, setup.compute_dtype) if test_ds else None
    new_metrics = jax.jit(zero_metrics, out_shardings=replicated)
    metrics = new_metrics()
    ckpt_every = cfg.checkpoint_every or spe
    stop = min(total, start + cfg.stop_after) if cfg.stop_after else total
    bar = ProgressBar(spe, epochs, enabled=cfg.progress and is_main() and not cfg.quiet)
    history: list[dict] = []
    test_result = None
    s = start
    t_epoch = t_log = time.perf_counter()
    images_since = 0
    epoch_loss = epoch_correct = epoch_count = 0.0

    def log(record):
        history.append(record)
        if writer:
            writer.write(record)

    def next_stop(s):   # the next step after s at which the host must see the state
        return min(stop, *((s // every + 1) * every for every in (cfg.log_every, spe, ckpt_every)))

    pending: list = []  # batches waiting for a call of steps_fn

    try:
        if s < stop:
            _say(cfg, f"training {cfg.model} on {cfg.data}: {len(train_ds)} images, {spe} steps/epoch, "
                      f"{total} steps, global batch {cfg.batch_size} on {mesh.size} device(s) in "
                      f"{jax.process_count()} process(es), {cfg.dtype}")
        for (images, labels), it_state in device_prefetch(it, data_sharding, cfg.batch_size):
            if s >= stop:
                break
            if steps_fn is None:
                state, metrics = step_fn(state, metrics, images, labels)
                taken = 1
            else:
                pending.append((images, labels))
                if len(pending) < cfg.steps_per_call and s + len(pending) < next_stop(s):
                    continue
                if len(pending) == cfg.steps_per_call:
                    state, metrics = steps_fn(state, metrics, *map(tuple, zip(*pending)))
                else:   # fewer batches than a call takes before a log, an epoch's end or a checkpoint
                    for batch in pending:
                        state, metrics = step_fn(state, metrics, *batch)
                taken, pending = len(pending), []
            s += taken
            images_since += taken * cfg.batch_size
            epoch, in_epoch = divmod(s, spe)
            epoch_end = in_epoch == 0
            save_due = s % ckpt_every == 0 or s == stop
            if s % cfg.log_every == 0 or epoch_end or save_due:
                m = to_host(metrics)
                metrics = new_metrics()
                if int(m["nonfinite"]):
                    ckpt.wait()
                    last = ckpt.latest_step()
                    where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
                             else "no checkpoint had been saved")
                    raise TrainingDiverged(f"the loss became NaN or infinite at step {int(m['first_bad_step'])} "
                                           f"(epoch {int(m['first_bad_step']) // spe + 1}); training stopped, "
                                           f"{where}. Lower the learning rate or add --clip-norm.")
                now = time.perf_counter()
                count = float(m["count"])
                rate = images_since / max(now - t_log, 1e-9)
                t_log, images_since = now, 0
                epoch_loss += float(m["loss_sum"])
                epoch_correct += float(m["correct"])
                epoch_count += count
                rec = {"split": "train", "step": s, "epoch": round(s / spe, 4),
                       "loss": float(m["loss_sum"]) / count, "accuracy": float(m["correct"]) / count,
                       "lr": float(schedule(s - 1)), "images_per_sec": round(rate, 1)}
                log(rec)
                bar.update(epoch + (not epoch_end), spe if epoch_end else in_epoch,
                           f"loss {rec['loss']:.4f} acc {rec['accuracy']:.4f} {rate:.0f} img/s")
            if save_due:
                ckpt.save(s, state, it_state)
            if epoch_end or s == stop:
                elapsed = time.perf_counter() - t_epoch
                line = (f"epoch {math.ceil(s / spe)}/{epochs} step {s}/{total} "
                        f"loss {epoch_loss / max(epoch_count, 1):.4f} acc {epoch_correct / max(epoch_count, 1):.4f} "
                        f"{elapsed:.1f}s")
                final = s == total
                if test_ds is not None and ((cfg.eval_every > 0 and epoch_end and epoch % cfg.eval_every == 0)
                                            or final):
                    test_result = evaluate_on(setup, state.variables(), test_ds, mesh, batch_size=cfg.batch_size,
                                              crop=cfg.eval_crop, threads=cfg.threads, eval_step=eval_step)
                    log({"split": "test", "step": s, "epoch": round(s / spe, 4), "loss": test_result["loss"],
                         "top1": test_result["top1"], "top5": test_result["top5"], "epoch_time": round(elapsed, 2)})
                    line += f" | test top1 {test_result['top1']:.4f} top5 {test_result['top5']:.4f}"
                bar.end_epoch(line) if bar.enabled else _say(cfg, line)
                epoch_loss = epoch_correct = epoch_count = 0.0
                t_epoch = t_log = time.perf_counter()
                images_since = 0
            if s >= stop:
                break
    finally:
        ckpt.close()
        if writer:
            writer.close()
    if is_main():
        if cfg.plot:
            from jaxconv.train.metrics import read_jsonl

            plot_curves(read_jsonl(os.path.join(cfg.out, "metrics.jsonl")), os.path.join(cfg.out, "curves.png"),
                        title=f"{cfg.model} on {cfg.data}")
        if cfg.save_variables and s == total:
            from jaxconv.serialization import save_variables

            path = os.path.join(cfg.out, "variables.npz")
            save_variables(path, to_host(state.variables()), overwrite=cfg.resume)
            _say(cfg, f"saved {path}")
    return TrainResult(state=state, step=s, history=history, test=test_result, out=cfg.out, model=setup.model)
