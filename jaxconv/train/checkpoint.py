"""Checkpoints with orbax: the train state and the input iterator's state in one step.

Each checkpoint step is one orbax composite of three items -- ``state`` (the
:class:`TrainState` pytree), ``data`` (the grain iterator's state, JSON) and ``meta``
(what run wrote it: model, optimizer, data, batch...). orbax writes a step into a
temporary directory and renames it when complete, so a process killed mid-save leaves
the previous steps intact (and the half-written one is ignored).

A directory that holds checkpoints is only ever continued (``resume=True``) and only by a
run with the same model, optimizer and data settings; anything else is a clear
:class:`CheckpointError`, never an overwrite.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# settings that must match for a checkpoint to be continued
FINGERPRINT = ("model", "num_classes", "optimizer", "dtype", "data", "global_batch", "image_size",
               "augment", "seed", "in_channels")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used for this run."""


def _is_tmp(name: str) -> bool:
    return "orbax-checkpoint-tmp" in name or name.endswith(".tmp")


class Checkpoints:
    """Save and restore train-state + iterator-state checkpoints in ``directory``."""

    def __init__(self, directory: str, meta: dict[str, Any], *, keep: int = 3, resume: bool = False,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.meta = dict(meta)
        existing = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True),
            item_names=("state", "data", "meta"))
        steps = self.manager.all_steps()
        if not steps:
            others = [n for n in existing if not _is_tmp(n) and not n.startswith("_")]
            stray = [n for n in others if not n.isdigit()]
            if stray:
                raise CheckpointError(f"{self.directory} is not empty and holds no jaxconv checkpoints "
                                      f"(found {', '.join(stray[:5])}); choose an empty or new directory")
            return
        latest = max(steps)
        if not resume:
            raise CheckpointError(f"{self.directory} already holds checkpoints (latest step {latest}); pass "
                                  f"--resume to continue that run, or choose a new directory")
        try:
            saved = self.manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 -- anything unreadable is reported the same way
            raise CheckpointError(f"{self.directory}: step {latest} is not a jaxconv training checkpoint "
                                  f"({type(e).__name__}: {e})") from e
        if not isinstance(saved, dict) or saved.get("format") != "jaxconv-train":
            raise CheckpointError(f"{self.directory}: step {latest} is not a jaxconv training checkpoint")
        diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run {self.meta.get(k)!r}"
                 for k in FINGERPRINT if _norm(saved.get(k)) != _norm(self.meta.get(k))]
        if diffs:
            raise CheckpointError(f"{self.directory} holds checkpoints of a different run ("
                                  + "; ".join(diffs) + "); resume with the same settings or choose a new directory")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, Any, int]:
        """``(state, iterator_state, step)`` from ``step`` (default: the latest)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory} holds no checkpoint to restore")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.directory}: step {step} does not match this run's train state "
                                  f"({e})") from e
        return out["state"], out["data"], step

    def save(self, step: int, state, iterator_state, *, extra: dict | None = None) -> None:
        meta = dict(self.meta, step=int(step), **(extra or {}))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def abstract(state):
    """The shape/dtype/sharding skeleton of ``state`` for :meth:`Checkpoints.restore`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
