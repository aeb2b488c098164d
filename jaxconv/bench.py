"""jaxconv against torchvision, timed side by side: ``python -m jaxconv.bench`` (or
``scripts/bench``). Not a test: it prints ratios, jaxconv / torchvision (> 1 means
jaxconv is faster), with the absolute figures of both sides.

How it measures (the same for every figure):

* both frameworks run in the same process on the same device, on the same weights
  (torchvision's initialisation, converted with ``from_torchvision``) and the same
  random inputs; PyTorch gets the same number of threads as JAX uses (all cores unless
  ``--threads``) and ``OMP_WAIT_POLICY=PASSIVE`` (set here before torch is imported);
* each measurement is warmed up (compilation, autotuning, allocator), then ``--rounds``
  rounds alternate between the two sides (jaxconv first in even rounds, torch first in
  odd ones); a round repeats the call until it has run ``--min-round`` seconds; the
  figure is the median over rounds of the time per call;
* beside each ratio the table gives the range of the ratios within single rounds
  (jaxconv's time against torch's in the same round, both under the same moment's
  load): on a shared host a wide range says how far the ratio can be trusted;
* every call is synchronised: ``block_until_ready`` on JAX's output and
  ``torch.cuda.synchronize()`` on a GPU.

What it measures, per model:

* inference images/s at ``--batch`` sizes (default 1 and 16; 224x224, 28x28 for lenet5);
* train-step images/s: SGD with momentum 0.9, cross-entropy (plus GoogLeNet's two
  auxiliary heads at weight 0.3 on both sides), forward + backward + update, batch
  ``--train-batch`` (32; 256 for lenet5), jitted with the state donated; and jaxconv's
  again with ``--steps-per-call`` K steps in one jitted call (one ``lax.scan`` over K
  different batches, as ``jaxconv train --steps-per-call K`` runs them), against the same
  torch figure: on a CPU a call's buffers are faulted in afresh each call, so K steps a
  call fault them in once;
* with ``--compile``, ``torch.compile``'d PyTorch as a third column (slow to compile);
* achieved GFLOP/s at the largest inference batch and in the train step, from ``jaxconv
  summary``'s MACs (2 FLOPs per MAC; a train step counts the forward, every kernel
  gradient and every input gradient but the first layer's, see :func:`train_macs`),
  against the machine's float32 matmul peak (measured before and after the models, the
  better figure of each side kept); and the "ratio at peak",
  peak / torch's GFLOP/s: the ratio jaxconv would reach running at the matmul peak, so
  that no ratio target above it can be met on that machine;
* the compile time of ResNet-50's train step, in a fresh process with an empty
  persistent cache (cold) and again in a second process (warm, from the cache);
* a whole Fashion-MNIST epoch of LeNet5 (60,000 images, batch 256, data in memory,
  a new permutation per epoch; random data of that shape where the dataset is not
  installed), jaxconv three ways: one jitted ``lax.scan`` over the epoch, a Python loop
  of jitted steps, and ``UNROLL`` steps unrolled per jitted call. (Until jaxconv's
  convolutions were written in XLA:CPU's native order, a while loop's body ran about 3x
  slower than the same ops outside a loop and the unrolled steps won on a CPU; since
  2026-11-26 (``layers._kernel_term``) the scan has won there too in every full run but
  the first, as on a GPU.)

A model that fails (out of memory, say) is reported and left out of the table, the others
still run, and the exit status is 1. ``--json`` is rewritten after every model, so a run
cut short keeps the models it finished.

``--device gpu`` runs both on the first GPU (PyTorch on cuda); ``--dtype bfloat16``
computes in bfloat16 with float32 parameters on both sides (``dtype=jnp.bfloat16``
against ``torch.autocast``). Float32 uses each framework's default matmul/conv
precision (on NVIDIA GPUs both allow TF32 in convolutions).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")          # before torch loads its OpenMP
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # leave torch half of a GPU

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jaxconv  # noqa: E402,I001  (first: malloc, XLA flags and the compilation cache, before any thread starts)

import numpy as np  # noqa: E402

MODELS = ("lenet5", "alexnet", "vgg16", "resnet18", "resnet50", "resnext50_32x4d", "densenet121",
          "googlenet", "efficientnet_b0")
AUX_WEIGHT = 0.3
UNROLL = 8      # train steps per jitted call in the epoch's unrolled variant


# ----------------------------------------------------------------------------- the two sides

def torch_lenet5():
    """LeNet5 in PyTorch, the same layers as jaxconv's (torchvision has none)."""
    import torch
    nn = torch.nn

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
            self.classifier = nn.Sequential(nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                            nn.Linear(84, 10))

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    return LeNet5()


def jax_train_step(model, name: str):
    """``(tx, step)``: SGD with momentum and the un-jitted
    ``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``."""
    import jax
    import optax

    from jaxconv.train.losses import model_loss

    tx = optax.sgd(1e-3, momentum=0.9)
    key = jax.random.key(0)

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": key})
            return model_loss(name, out, y)[0], upd.get("batch_stats", batch_stats)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return tx, step


class Pair:
    """One model on both sides, same weights, on ``device``."""

    def __init__(self, name: str, device: str, dtype: str):
        import jax
        import jax.numpy as jnp
        import torch

        from jaxconv.convert import from_torchvision
        from jaxconv.parity import torchvision_model

        self.name, self.device, self.dtype = name, device, dtype
        torch.manual_seed(0)
        tmodel = torch_lenet5() if name == "lenet5" else torchvision_model(name)
        state = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
        self.tdev = torch.device("cuda" if device == "gpu" else "cpu")
        self.torch = tmodel.to(self.tdev)
        self.jdev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
        jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        self.model = jaxconv.get_model(name, dtype=jdtype)
        self.variables = jax.device_put(from_torchvision(name, state), self.jdev)
        self.input_hw = jaxconv.model_info(name).input_size
        self.autocast = dtype == "bfloat16"

    # inputs ---------------------------------------------------------------------------
    def inputs(self, batch: int, seed: int = 0):
        import jax
        import torch

        h, w, c = self.input_hw
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, h, w, c)).astype(np.float32)
        y = rng.integers(0, 1000 if self.name != "lenet5" else 10, batch).astype(np.int32)
        jx, jy = jax.device_put(x, self.jdev), jax.device_put(y, self.jdev)
        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.tdev)
        ty = torch.from_numpy(y.astype(np.int64)).to(self.tdev)
        return (jx, jy), (tx, ty)

    def sync(self):
        import torch
        if self.tdev.type == "cuda":
            torch.cuda.synchronize()

    def _autocast(self):
        import contextlib

        import torch
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.tdev.type, dtype=torch.bfloat16)

    # inference ------------------------------------------------------------------------
    def jax_infer(self, batch: int):
        import jax
        (x, _), _ = self.inputs(batch)
        fwd = jax.jit(lambda v, x: self.model.apply(v, x))
        return lambda: fwd(self.variables, x).block_until_ready()

    def torch_infer(self, batch: int, compiled: bool = False):
        import torch
        _, (x, _) = self.inputs(batch)
        self.torch.eval()
        module = torch.compile(self.torch) if compiled else self.torch

        def run():
            with torch.inference_mode(), self._autocast():
                module(x)
            self.sync()
        return run

    # training -------------------------------------------------------------------------
    def jax_train(self, batch: int, steps: int = 1):
        """One call: ``steps`` train steps (more than one: a ``lax.scan`` over ``steps``
        different batches stacked on the device)."""
        import jax
        tx, step = jax_train_step(self.model, self.name)
        if steps == 1:
            (x, y), _ = self.inputs(batch)
        else:
            xs, ys = zip(*(self.inputs(batch, seed)[0] for seed in range(steps)))
            x, y = jax.device_put((np.stack(xs), np.stack(ys)), self.jdev)
            one = step

            def step(params, batch_stats, opt_state, xs, ys):
                def body(carry, xy):
                    *carry, loss = one(*carry, *xy)
                    return tuple(carry), loss
                carry, losses = jax.lax.scan(body, (params, batch_stats, opt_state), (xs, ys))
                return (*carry, losses[-1])
        step = jax.jit(step, donate_argnums=(0, 1, 2))
        # copies: the step donates its state
        params = jax.tree.map(lambda a: a.copy(), self.variables["params"])
        state = [params, jax.tree.map(lambda a: a.copy(), self.variables.get("batch_stats", {})), tx.init(params)]

        def run():
            *new, loss = step(*state, x, y)
            state[:] = new
            loss.block_until_ready()
        return run

    def torch_loss(self, out, y):
        import torch
        f = torch.nn.functional.cross_entropy
        if isinstance(out, tuple):       # GoogLeNet's (logits, aux2, aux1) in train mode
            return f(out[0], y) + sum(AUX_WEIGHT * f(a, y) for a in out[1:] if a is not None)
        return f(out, y)

    def torch_train(self, batch: int, compiled: bool = False):
        import torch
        _, (x, y) = self.inputs(batch)
        self.torch.train()
        module = torch.compile(self.torch) if compiled else self.torch
        opt = torch.optim.SGD(self.torch.parameters(), lr=1e-3, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            with self._autocast():
                loss = self.torch_loss(module(x), y)
            loss.backward()
            opt.step()
            self.sync()
        return run


# ----------------------------------------------------------------------------- timing

def interleave_rounds(fns: dict, rounds: int, min_round: float, warmup: int = 2) -> dict:
    """Seconds per call of each zero-argument ``fns[k]`` in each round (a list per key),
    rounds interleaving the keys (in reverse order every other round)."""
    reps = {}
    for k, fn in fns.items():
        t = 0.0
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        reps[k] = max(1, int(min_round / max(t, 1e-6)))
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / reps[k])
    return times


def interleave(fns: dict, rounds: int, min_round: float, warmup: int = 2) -> dict:
    """Median seconds per call of each zero-argument ``fns[k]``, interleaving rounds."""
    return {k: statistics.median(v) for k, v in interleave_rounds(fns, rounds, min_round, warmup).items()}


def figure(times: dict, images: dict) -> dict:
    """Images/s of each side from per-round ``times`` (``images[k]`` images a call), the
    median over rounds; and, under ``"round_ratios"``, every other side's ratio to torch's
    (jaxconv's, torch.compile's) within each round, where both ran under the same
    moment's load of a shared host."""
    out = {k: images[k] / statistics.median(v) for k, v in times.items()}
    out["round_ratios"] = {k: [(images[k] / t) / (images["torch"] / tt) for t, tt in zip(v, times["torch"])]
                           for k, v in times.items() if k != "torch"}
    return out


def model_macs(name: str) -> tuple[int, int]:
    """Multiply-accumulates of one image: its inference (``jaxconv summary``'s per-layer
    counts, of the layers an eval-mode call runs) and its train step (:func:`train_macs`)."""
    from jaxconv.summary import _layer_records
    h, w, c = jaxconv.model_info(name).input_size
    model = jaxconv.get_model(name)
    inference = [m.macs(i, o) for _, _, m, i, o in _layer_records(model, (1, h, w, c), evaluated=True)[0]]
    every_layer = [m.macs(i, o) for _, _, m, i, o in _layer_records(model, (1, h, w, c))[0]]
    return int(sum(inference)), train_macs(every_layer)


def train_macs(layer_macs: list[int]) -> int:
    """Multiply-accumulates of one image's train step, from the forward MACs of every layer
    it runs (GoogLeNet's auxiliary heads included) in order: the forward pass, every
    layer's kernel gradient (as many as its forward) and every layer's input gradient but
    the first's (the image needs none, and neither side computes it)."""
    first = next((v for v in layer_macs if v), 0)
    return 3 * int(sum(layer_macs)) - first


def matmul_peak(device: str, dtype: str) -> dict:
    """GFLOP/s of a large square matmul in JAX, numpy (CPU) and torch: the machine's peak."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 8192 if device == "gpu" else 2048
    flops = 2 * n ** 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    dev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    ja = jax.device_put(jnp.asarray(a, jdt), dev)
    jmm = jax.jit(lambda x: x @ x)
    tdev = torch.device("cuda" if device == "gpu" else "cpu")
    ta = torch.from_numpy(a).to(tdev).to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)

    def tmm():
        ta @ ta
        if tdev.type == "cuda":
            torch.cuda.synchronize()

    fns = {"jax": lambda: jmm(ja).block_until_ready(), "torch": tmm}
    if device == "cpu" and dtype == "float32":
        fns["numpy"] = lambda: a @ a
    t = interleave(fns, rounds=3, min_round=0.5 if device == "cpu" else 0.2, warmup=1)
    return {k: flops / v / 1e9 for k, v in t.items()}


def _add_torch_compile(fns: dict, build, what: str) -> None:
    """Add a torch.compile column to ``fns`` where compiling (and one run) works."""
    try:
        fns["torch_compile"] = build()
        fns["torch_compile"]()
    except Exception as e:  # noqa: BLE001  (torch.compile fails in many ways; report and go on)
        print(f"  torch.compile failed for {what}: {type(e).__name__}: {e}", file=sys.stderr)
        fns.pop("torch_compile", None)


def bench_model(name: str, args) -> dict:
    import jax

    pair = Pair(name, args.device, args.dtype)
    row: dict = {"model": name}
    lenet = name == "lenet5"
    batches = args.batch
    for b in batches:
        fns = {"jax": pair.jax_infer(b), "torch": pair.torch_infer(b)}
        if args.compile:
            _add_torch_compile(fns, lambda: pair.torch_infer(b, compiled=True), f"{name} inference")
        t = interleave_rounds(fns, args.rounds, args.min_round)
        row[f"infer{b}"] = figure(t, {key: b for key in t})
        del fns
    tb = args.lenet_batch if lenet else args.train_batch
    k = args.steps_per_call
    fns = {"jax": pair.jax_train(tb), "torch": pair.torch_train(tb)}
    if k > 1:    # in the same rounds, against the same torch figure
        fns["jax_steps"] = pair.jax_train(tb, k)
    if args.compile:
        _add_torch_compile(fns, lambda: pair.torch_train(tb, compiled=True), f"{name} training")
    t = interleave_rounds(fns, args.rounds, args.min_round)
    row[f"train{tb}"] = figure(t, {key: (k if key == "jax_steps" else 1) * tb for key in t})
    row["train_batch"] = tb
    inference, train = model_macs(name)
    row["gmacs"] = inference / 1e9
    row["train_gmacs"] = train / 1e9
    del fns, pair
    jax.clear_caches()
    return row


# ----------------------------------------------------------------------------- compile time

def compile_probe(name: str, batch: int, device: str) -> dict:
    """Seconds to trace+lower and to compile ``name``'s train step (run in a fresh process)."""
    import jax
    import jax.numpy as jnp

    pair_model = jaxconv.get_model(name)
    h, w, c = jaxconv.model_info(name).input_size
    dev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    tx, step = jax_train_step(pair_model, name)
    step = jax.jit(step, donate_argnums=(0, 1, 2))
    with jax.default_device(dev):
        variables = jax.eval_shape(lambda: pair_model.init(jax.random.key(0), jnp.zeros((1, h, w, c))))
        opt = jax.eval_shape(tx.init, variables["params"])
        x = jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32)
        y = jax.ShapeDtypeStruct((batch,), jnp.int32)
        t0 = time.perf_counter()
        lowered = step.lower(variables["params"], variables.get("batch_stats", {}), opt, x, y)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1}


def compile_times(name: str, batch: int, device: str) -> dict:
    """Cold (empty persistent cache) and warm (second process, same cache) compile times."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="jaxconv-cache-") as cache:
        env = dict(os.environ, JAXCONV_COMPILATION_CACHE=cache)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        for label in ("cold", "warm"):
            proc = subprocess.run([sys.executable, "-m", "jaxconv.bench", "--compile-probe", name,
                                   "--train-batch", str(batch), "--device", device],
                                  env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"compile probe failed:\n{proc.stderr[-2000:]}")
            out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- LeNet5 epoch

def fashion_mnist_arrays(limit: int | None):
    """Fashion-MNIST's training images, normalised float32 NHWC, and labels; random data
    of the same shape where the dataset is not installed."""
    try:
        from jaxconv.data.datasets import fashion_mnist
        ds = fashion_mnist("train")
        images, labels, source = ds.source.images, ds.source.labels, "Fashion-MNIST"
    except (ImportError, OSError):  # no grain (jaxconv.data's pipeline) or no dataset files
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, 60000).astype(np.int32)
        source = "random data of Fashion-MNIST's shape (dataset not installed)"
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = ((images.astype(np.float32) / 255.0 - 0.2860) / 0.3530).astype(np.float32)
    return x, labels.astype(np.int32), source


def epoch_bench(args) -> dict:
    import jax
    import torch

    x, y, source = fashion_mnist_arrays(2048 if args.quick else None)
    batch = args.lenet_batch
    steps = len(y) // batch
    pair = Pair("lenet5", args.device, args.dtype)
    tx, step = jax_train_step(pair.model, "lenet5")
    jx, jy = jax.device_put(x, pair.jdev), jax.device_put(y, pair.jdev)

    def epoch(params, stats, opt, key):
        idx = jax.random.permutation(key, len(y))[:steps * batch].reshape(steps, batch)

        def body(carry, i):
            *state, loss = step(*carry, jx[i], jy[i])
            return tuple(state), loss

        (params, stats, opt), losses = jax.lax.scan(body, (params, stats, opt), idx)
        return params, stats, opt, losses.mean()

    jepoch = jax.jit(epoch, donate_argnums=(0, 1, 2))
    jstep = jax.jit(step, donate_argnums=(0, 1, 2))

    def fresh():
        params = jax.tree.map(lambda a: a.copy(), pair.variables["params"])
        return [params, {}, tx.init(params)]

    def chunk(params, stats, opt, xs, ys):   # UNROLL steps, unrolled in one program
        for i in range(UNROLL):
            params, stats, opt, loss = step(params, stats, opt, xs[i], ys[i])
        return params, stats, opt, loss

    jchunk = jax.jit(chunk, donate_argnums=(0, 1, 2))
    scan_state, loop_state, chunk_state, counter = fresh(), fresh(), fresh(), [0]

    def run_jax_scan():          # the whole epoch in one jitted call
        counter[0] += 1
        *new, loss = jepoch(*scan_state, jax.random.key(counter[0]))
        scan_state[:] = new
        loss.block_until_ready()

    def run_jax_loop():          # one jitted call per step, batches gathered on the device
        counter[0] += 1
        idx = jax.random.permutation(jax.random.key(counter[0]), len(y))[:steps * batch].reshape(steps, batch)
        for i in range(steps):
            *new, loss = jstep(*loop_state, jx[idx[i]], jy[idx[i]])
            loop_state[:] = new
        loss.block_until_ready()

    def run_jax_chunks():        # one jitted call per UNROLL steps, the rest one by one
        counter[0] += 1
        idx = jax.random.permutation(jax.random.key(counter[0]), len(y))[:steps * batch].reshape(steps, batch)
        full = steps // UNROLL * UNROLL
        for i in range(0, full, UNROLL):
            *new, loss = jchunk(*chunk_state, jx[idx[i:i + UNROLL]], jy[idx[i:i + UNROLL]])
            chunk_state[:] = new
        for i in range(full, steps):
            *new, loss = jstep(*chunk_state, jx[idx[i]], jy[idx[i]])
            chunk_state[:] = new
        loss.block_until_ready()

    tx_all = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(pair.tdev)
    ty_all = torch.from_numpy(y.astype(np.int64)).to(pair.tdev)
    tmodel = pair.torch.train()
    opt = torch.optim.SGD(tmodel.parameters(), lr=1e-3, momentum=0.9)

    def run_torch():
        perm = torch.randperm(len(y), device=pair.tdev)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad(set_to_none=True)
            with pair._autocast():
                loss = torch.nn.functional.cross_entropy(tmodel(tx_all[idx]), ty_all[idx])
            loss.backward()
            opt.step()
        pair.sync()

    t = interleave({"jax_scan": run_jax_scan, "jax_loop": run_jax_loop, "jax_unrolled": run_jax_chunks,
                    "torch": run_torch},
                   rounds=min(args.rounds, 3), min_round=0.0, warmup=1)
    return {"source": source, "images": steps * batch, "batch": batch, "seconds": t}


# ----------------------------------------------------------------------------- report

def machine() -> dict:
    import platform

    import jax
    import torch
    import torchvision

    info = {"python": platform.python_version(), "jax": jax.__version__, "flax": __import__("flax").__version__,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "jax_devices": str(jax.devices()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "malloc": " ".join(f"{k}={v}" for k, v in jaxconv.runtime.settings()["malloc"].items()) or "glibc default",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:    # the model name, and the vector extensions: oneDNN and XLA pick kernels by them
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_vector"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                                              if f in flags) or "none of avx2/avx512"
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _ratio(v: dict, key: str = "jax") -> str:
    """``key``'s ratio to torch, and where there were several rounds, the range of its
    ratios within a round: "1.24x (1.10-1.31)"."""
    within = v.get("round_ratios", {}).get(key, [])
    spread = f" ({min(within):.2f}-{max(within):.2f})" if len(within) > 1 else ""
    return f"{v[key] / v['torch']:.2f}x{spread}"


def table(rows: list, args, peak: float) -> list[list[str]]:
    head = ["model"]
    for b in args.batch:
        head += [f"infer b{b} jax/torch img/s", "ratio"]
        if args.compile:
            head += ["vs compile"]
    head += ["train jax/torch img/s", "ratio"] + (["vs compile"] if args.compile else [])
    if args.steps_per_call > 1:
        head += [f"train, {args.steps_per_call} steps a call, jax/torch img/s", "ratio"]
    head += [f"GFLOP/s b{max(args.batch)} jax/torch", "% peak (jax)", "ratio at peak",
             "train GFLOP/s jax/torch", "% peak (jax)", "train ratio at peak"]
    out = [head]
    for r in rows:
        line = [r["model"]]
        for key in [f"infer{b}" for b in args.batch] + [f"train{r['train_batch']}"]:
            v = r[key]
            line += [f"{_fmt(v['jax'])} / {_fmt(v['torch'])}", _ratio(v)]
            if args.compile:
                line += [f"{v['jax'] / v['torch_compile']:.2f}x" if "torch_compile" in v else "n/a"]
        if args.steps_per_call > 1:
            v = r[f"train{r['train_batch']}"]
            line += ([f"{_fmt(v['jax_steps'])} / {_fmt(v['torch'])}", _ratio(v, "jax_steps")]
                     if "jax_steps" in v else ["n/a"] * 2)
        for key, g in ((f"infer{max(args.batch)}", 2 * r["gmacs"]),
                       (f"train{r['train_batch']}", 2 * r["train_gmacs"])):
            v = r[key]
            line += [f"{g * v['jax']:,.0f} / {g * v['torch']:,.0f}", f"{100 * g * v['jax'] / peak:.0f}%",
                     f"{peak / (g * v['torch']):.2f}x"]
        out.append(line)
    return out


def render(cells: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
        lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jaxconv.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="inference batch sizes")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--lenet-batch", type=int, default=256, help="lenet5's train batch (and the epoch's)")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="jaxconv's train figure again with this many steps per jitted call (1: skip)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-round", type=float, default=None, help="seconds per round (default 1 CPU, 0.2 GPU)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as JAX)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile column (slow)")
    p.add_argument("--no-epoch", action="store_true", help="skip the LeNet5 epoch")
    p.add_argument("--no-compile-time", action="store_true", help="skip the compile-time probe")
    p.add_argument("--compile-model", default="resnet50", help="model of the compile-time probe")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: lenet5+resnet18, small batches")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", help="also write every figure to this file (rewritten after every model, "
                                   "'complete': false until the run ends)")
    p.add_argument("--compile-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.compile_probe:
        print(json.dumps(compile_probe(args.compile_probe, args.train_batch, args.device)))
        return 0
    if args.quick:
        args.models = [m for m in args.models if m in ("lenet5", "resnet18")] or ["lenet5"]
        args.batch, args.train_batch, args.lenet_batch = [1, 2], 4, 64
        args.steps_per_call = min(args.steps_per_call, 2)
        args.rounds, args.compile_model = min(args.rounds, 2), "resnet18"
        args.min_round = args.min_round or 0.05
    if args.min_round is None:
        args.min_round = 0.2 if args.device == "gpu" else 1.0

    import torch
    if args.device == "gpu":  # both sides must see one, or no figure would compare like with like
        import jax
        missing = [f"JAX ({', '.join(sorted({d.platform for d in jax.devices()}))} only)"
                   if not any(d.platform == "gpu" for d in jax.devices()) else "",
                   "PyTorch (torch.cuda.is_available() is False)" if not torch.cuda.is_available() else ""]
        if any(missing):
            p.error("--device gpu: no GPU visible to " + " or ".join(m for m in missing if m))
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    info = machine()
    info["torch_threads"] = threads
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    peak = matmul_peak(args.device, args.dtype)
    best = max(peak.values())
    print(f"# {args.dtype} matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()), flush=True)

    rows, failed = [], {}
    result = {"machine": info, "args": vars(args), "matmul_peak_gflops": peak, "rows": rows,
              "failed": failed, "complete": False}
    for name in args.models:
        t0 = time.perf_counter()
        try:
            r = bench_model(name, args)
        except Exception as e:  # noqa: BLE001  (one model failing, e.g. out of GPU memory, leaves the rest)
            failed[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            print(f"# {name} FAILED after {time.perf_counter() - t0:.0f}s: {failed[name]}", flush=True)
        else:
            rows.append(r)
            print(f"# {name} done in {time.perf_counter() - t0:.0f}s: " + ", ".join(
                f"{k} {_fmt(v['jax'])} / {_fmt(v['torch'])} img/s {_ratio(v)}"
                + (f" ({args.steps_per_call} steps a call {_fmt(v['jax_steps'])} img/s "
                   f"{_ratio(v, 'jax_steps')})" if "jax_steps" in v else "")
                for k, v in r.items() if isinstance(v, dict)), flush=True)
        if args.json:  # after every model: a run cut short keeps the models it finished
            _write_json(args.json, result)
    # measured again after the models, each side's better figure kept: a peak measured
    # under a moment's load would make every "% peak" too high and "ratio at peak" too low
    again = matmul_peak(args.device, args.dtype)
    print(f"# {args.dtype} matmul peak GFLOP/s again: " + ", ".join(f"{k} {v:.0f}" for k, v in again.items()),
          flush=True)
    peak = {k: max(v, again[k]) for k, v in peak.items()}
    best = max(peak.values())
    result["matmul_peak_gflops"] = peak

    print()
    print(f"{args.device} {args.dtype}: images/s jaxconv / torchvision (ratio > 1: jaxconv faster); "
          f"train batch {args.train_batch} ({args.lenet_batch} for lenet5); GFLOP/s from MACs x 2 "
          f"(a train step: 3x the forward's, less the first layer's input gradient); peak {best:.0f} GFLOP/s; "
          f"ratio at peak: the ratio jaxconv would reach at that peak (peak / torch's GFLOP/s), "
          f"above which no target can be met")
    print(render(table(rows, args, best), args.markdown))

    if not args.no_compile_time:
        ct = compile_times(args.compile_model, args.lenet_batch if args.compile_model == "lenet5"
                           else args.train_batch, args.device)
        result["compile_time"] = ct
        print(f"\n{args.compile_model} train step (batch {args.train_batch}) jit: "
              f"cold {ct['cold']['lower_s']:.1f}s trace+lower + {ct['cold']['compile_s']:.1f}s compile; "
              f"warm (persistent cache) {ct['warm']['lower_s']:.1f}s + {ct['warm']['compile_s']:.1f}s")
    if not args.no_epoch:
        ep = epoch_bench(args)
        result["lenet5_epoch"] = ep
        s = ep["seconds"]
        print(f"\nLeNet5 epoch ({ep['images']} images of {ep['source']}, batch {ep['batch']}): "
              f"torch {s['torch']:.2f}s; jaxconv as one lax.scan {s['jax_scan']:.2f}s "
              f"({s['torch'] / s['jax_scan']:.2f}x), as a loop of jitted steps {s['jax_loop']:.2f}s "
              f"({s['torch'] / s['jax_loop']:.2f}x), {UNROLL} unrolled steps per call {s['jax_unrolled']:.2f}s "
              f"({s['torch'] / s['jax_unrolled']:.2f}x) (ratio: torch time / jaxconv time)")
    if failed:
        print("\nFAILED (left out of the table): " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    result["complete"] = True
    if args.json:
        _write_json(args.json, result)
    return 1 if failed else 0


def _write_json(path: str, result: dict) -> None:
    """Write ``result`` whole or not at all (a temporary file beside ``path``, then renamed)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
