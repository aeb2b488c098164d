"""The input pipeline: grain on the host, sharded per process, prefetched to the devices.

Global batch ``s`` of epoch ``e`` is records ``[s*B, (s+1)*B)`` of that epoch's
shuffle (grain's ``shuffle`` combines the seed with the epoch); process ``p`` of ``P``
loads the contiguous block ``[p*B/P, (p+1)*B/P)`` of it, so the global batch that
``jax.make_array_from_process_local_data`` assembles is the same for any number of
processes -- and is the one a single process would load. Random augmentation draws from
grain's per-record generator, seeded by the record's position in the (epoch-extended)
stream, so it too is independent of the process count and resumable. The last partial
batch of an epoch is dropped when training; evaluation pads it and weights the padding
0.

When the records are in memory (``ArraySource``) and the recipe has a vectorised form
(``TrainTransform.batch``: none, flip, crop-flip at the data's own size), a training
batch is gathered and augmented as one numpy batch rather than record by record (30x
faster): epoch ``e``'s order is then numpy's permutation seeded by ``(seed, e)`` and the
random draws are seeded per global batch, so this path too is deterministic, resumable
and independent of the process count. Evaluation batches of such data (a center crop
at the data's own size: normalisation only) are built the same way.

Loading runs in grain's worker threads (``threads``) or processes (``workers``); the
iterator's state (``get_state``/``set_state``) is the position in this stream and goes
into every checkpoint.
"""
from __future__ import annotations

import collections
from typing import Any, Iterator

import grain
import jax
import numpy as np


class _GlobalBatchOrder(grain.MapDataset):
    """Local record ``j`` of this process -> the parent record it stands for (or padding)."""

    def __init__(self, parent: grain.MapDataset, *, n: int, global_batch: int, steps_per_epoch: int,
                 num_steps: int, process_index: int, process_count: int, pad=None):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
        self._n, self._batch, self._spe, self._steps = n, global_batch, steps_per_epoch, num_steps
        self._local = global_batch // process_count
        self._offset = process_index * self._local
        self._pad = pad

    def __len__(self) -> int:
        return self._steps * self._local

    def __str__(self) -> str:
        return f"GlobalBatchOrder(batch={self._batch}, local={self._local}, offset={self._offset})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, r = divmod(int(index), self._local)
        epoch, s = divmod(step, self._spe)
        i = s * self._batch + self._offset + r
        if i >= self._n:
            return self._pad(self._parent)
        return self._parent[epoch * self._n + i]


def steps_per_epoch(n: int, global_batch: int) -> int:
    if n < global_batch:
        raise ValueError(f"the dataset has {n} records, fewer than one global batch of {global_batch}")
    return n // global_batch


def train_dataset(source, transform, *, global_batch: int, num_steps: int, seed: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  threads: int = 2, workers: int = 0, buffer: int = 4) -> grain.IterDataset:
    """Local training batches ``(images, labels)`` for ``num_steps`` steps over epochs of
    ``len(source) // global_batch`` steps; ``transform(record, rng)`` augments a record."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    n = len(source)
    if _batchable(source, transform):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
        load = _LoadBatch(source, transform, n=n, global_batch=global_batch,
                          steps_per_epoch=steps_per_epoch(n, global_batch), seed=seed,
                          process_index=process_index, process_count=process_count)
        return _to_iter(grain.MapDataset.range(num_steps).map(load), threads, workers, buffer)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).random_map(transform, seed=seed + 1)
    ds = _GlobalBatchOrder(ds, n=n, global_batch=global_batch, steps_per_epoch=steps_per_epoch(n, global_batch),
                           num_steps=num_steps, process_index=process_index, process_count=process_count)
    return _to_iter(ds.batch(global_batch // process_count, drop_remainder=True), threads, workers, buffer)


def _batchable(source, transform) -> bool:
    """In-memory images of the model's size and a recipe with a vectorised form."""
    images = getattr(source, "images", None)
    return (isinstance(images, np.ndarray) and isinstance(getattr(source, "labels", None), np.ndarray)
            and hasattr(transform, "batch") and transform.can_batch(images.shape[1:]))


class _LoadBatch:
    """Local step ``k`` -> this process's slice of global batch ``k``, gathered from the
    in-memory arrays and augmented as one batch (``transform.batch``). Epoch ``e`` reads
    the records in the order of a permutation seeded by ``(seed, e)``; the random draws
    come from a generator seeded by ``(seed + 1, k)`` and are made for the whole global
    batch, so neither depends on the process count. A class, not a closure, so that
    grain's worker processes can pickle it."""

    def __init__(self, source, transform, *, n: int, global_batch: int, steps_per_epoch: int, seed: int,
                 process_index: int, process_count: int):
        if seed < 0:
            raise ValueError(f"the seed must be >= 0, got {seed}")
        self.images, self.labels, self.transform = source.images, source.labels, transform
        self.n, self.batch, self.spe, self.seed = n, global_batch, steps_per_epoch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._orders = {epoch: order, **{e: o for e, o in self._orders.items() if e > epoch - 2}}
        return order

    def __call__(self, k):
        epoch, s = divmod(int(k), self.spe)
        start = s * self.batch + self.offset
        idx = self.order(epoch)[start:start + self.local]
        rng = np.random.default_rng([self.seed + 1, int(k)])
        return self.transform.batch(self.images[idx], rng, self.offset, self.batch), self.labels[idx]


class _LoadEvalBatch:
    """Step ``k`` -> this process's slice of evaluation batch ``k`` (records in order),
    normalised as one batch; positions past the end are zero images of weight 0."""

    def __init__(self, source, transform, *, n: int, global_batch: int, process_index: int, process_count: int):
        self.images, self.labels, self.transform = source.images, source.labels, transform
        self.n, self.batch = n, global_batch
        self.local = global_batch // process_count
        self.offset = process_index * self.local

    def __call__(self, k):
        pos = int(k) * self.batch + self.offset + np.arange(self.local)
        valid = pos < self.n
        idx = np.where(valid, pos, 0)
        images = self.transform.batch(self.images[idx])
        images[~valid] = 0
        return images, np.where(valid, self.labels[idx], 0).astype(np.int32), valid.astype(np.float32)


def _pad_record(parent):
    image = parent[0][0]
    return np.zeros_like(image), np.int32(0), np.float32(0.0)


def _with_weight(record):
    image, label = record
    return image, label, np.float32(1.0)


def eval_dataset(source, transform, *, global_batch: int, process_index: int | None = None,
                 process_count: int | None = None, threads: int = 2, workers: int = 0,
                 buffer: int = 4) -> tuple[grain.IterDataset, int]:
    """Local evaluation batches ``(images, labels, weights)`` covering every record once
    (the last batch padded with weight 0); returns the dataset and its number of steps."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    n = len(source)
    steps = -(-n // global_batch)
    if _batchable(source, transform):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
        load = _LoadEvalBatch(source, transform, n=n, global_batch=global_batch, process_index=process_index,
                              process_count=process_count)
        return _to_iter(grain.MapDataset.range(steps).map(load), threads, workers, buffer), steps
    ds = grain.MapDataset.source(source).map(transform).map(_with_weight)
    ds = _GlobalBatchOrder(ds, n=n, global_batch=global_batch, steps_per_epoch=steps, num_steps=steps,
                           process_index=process_index, process_count=process_count, pad=_pad_record)
    return _to_iter(ds.batch(global_batch // process_count, drop_remainder=True), threads, workers, buffer), steps


def _to_iter(ds: grain.MapDataset, threads: int, workers: int, buffer: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=buffer))
    if workers > 0:
        # grain's worker processes read absl flags (their defaults unless a program parsed them)
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def device_prefetch(iterator, sharding: jax.sharding.Sharding, global_batch: int,
                    size: int = 2) -> Iterator[tuple[tuple[jax.Array, ...], Any]]:
    """Yield ``(global arrays, iterator state after this batch)``, keeping ``size`` batches
    in flight to the devices. Each process contributes its local slice
    (``jax.make_array_from_process_local_data``); the state lets a checkpoint record
    exactly the batches consumed, whatever is still buffered."""
    queue: collections.deque = collections.deque()

    def enqueue() -> bool:
        try:
            local = next(iterator)
        except StopIteration:
            return False
        state = iterator.get_state()
        arrays = tuple(jax.make_array_from_process_local_data(
            sharding, np.asarray(a), (global_batch,) + np.shape(a)[1:]) for a in local)
        queue.append((arrays, state))
        return True

    for _ in range(size):
        if not enqueue():
            break
    while queue:
        item = queue.popleft()
        enqueue()
        yield item
