"""The parity protocol: does a jaxconv model compute what the torch model computes?

This is the *reference* tool and the only place that touches PyTorch; it imports torch
when called (install the ``test`` extra: ``pip install 'jaxconv[test]'``), never when
the package is imported. The tests, ``jaxconv parity`` and ``scripts/demo`` use it.

The protocol (``shared/DESIGN.md``):

1. Build the torch model with random weights: every bias and every BatchNorm's weight
   and bias randomised, and BatchNorm running statistics calibrated to real activation
   statistics (reset, ``momentum=None``, a few train-mode passes on random inputs
   without gradients, dropout and stochastic depth off, momentum restored, eval).
   Purely random statistics make deep nets explode and hide mistakes; zero biases
   would hide a dropped bias.
2. float64 mapping check: torch in double against jaxconv under ``jax_enable_x64`` with
   ``dtype=param_dtype=float64``: ``max|d| / max|ref|`` on the logits and on every
   intermediate whose module exists on both sides (a sigmoid gate's error against the
   larger of its output's scale and the error its input can carry through it: see
   ``torch_output_and_intermediates``). A mapping mistake shows at ~1e-1; an exact port
   at ~1e-12.
3. float32 check: ``err(jaxconv32 vs torch64) <= 4 * err(torch32 vs torch64) + 1e-6``.
4. The same in train mode (batch statistics and updated running statistics) and for
   the gradients of a cross-entropy loss.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv.convert import from_torchvision
from jaxconv.registry import get_model, model_info

F64_TOLERANCE = 1e-9


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("the parity check needs PyTorch and torchvision as the reference: "
                          "pip install 'jaxconv[test]'") from None
    return torch


def rel_err(value, ref, floor: float = 0.0) -> float:
    """max|value - ref| / max(max|ref|, floor), computed in float64.

    ``floor`` keeps a reference that is zero up to rounding (the gradient of a
    convolution bias that a BatchNorm follows) from turning noise into a large ratio."""
    value, ref = np.asarray(value, np.float64), np.asarray(ref, np.float64)
    if value.shape != ref.shape:
        raise ValueError(f"shape mismatch: {value.shape} vs reference {ref.shape}")
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, floor)
    return float(np.max(np.abs(value - ref)) / (scale if scale > 0 else 1.0)) if ref.size else 0.0


def torchvision_model(name: str, num_classes: int | None = None, **kwargs):
    """torchvision's model for jaxconv's ``name``, with random weights (no download)."""
    import torchvision

    info = model_info(name)
    if info.torchvision is None:
        raise ValueError(f"{name} has no torchvision counterpart; build the torch reference yourself")
    torch = _torch()
    with torch.random.fork_rng(devices=[]):      # the same random weights every time
        torch.manual_seed(0)
        return torchvision.models.get_model(info.torchvision, weights=None,
                                            num_classes=num_classes or info.num_classes, **kwargs)


def randomize(torch_model, seed: int = 0) -> None:
    """Random biases everywhere, and random BatchNorm weights and biases."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
            elif getattr(module, "bias", None) is not None and isinstance(module.bias, torch.nn.Parameter):
                module.bias.copy_((torch.rand(module.bias.shape, generator=gen) - 0.5) * 0.2)


def _switch_off_randomness(torch_model) -> None:
    """Dropout of any kind and torchvision's StochasticDepth to eval mode (the identity):
    in train mode they draw from torch's global random state."""
    import torchvision

    torch = _torch()
    for m in torch_model.modules():
        if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth)):
            m.eval()


def calibrate_batchnorm(torch_model, input_shape_nchw: tuple[int, ...], passes: int = 3,
                        seed: int = 0) -> None:
    """Set every BatchNorm's running statistics to the statistics of real activations."""
    torch = _torch()
    norms = [m for m in torch_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        torch_model.eval()
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator().manual_seed(seed + 1)
    dtype = next(torch_model.parameters()).dtype
    torch_model.train()
    # Dropout and stochastic depth off: the statistics are those of the network that eval
    # runs, and they do not depend on torch's global random state (which the tests that
    # ran before in the same process would decide).
    _switch_off_randomness(torch_model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(passes):
            torch_model(torch.randn(input_shape_nchw, generator=gen).to(dtype))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    torch_model.eval()


def prepare_reference(torch_model, calibration_shape_nchw, seed: int = 0):
    """Randomise and calibrate ``torch_model`` in place, then make it float64; returns it.

    The calibration runs in float32 (torch's float64 convolutions on a CPU are several
    times slower); the statistics it leaves are simply the reference's buffers."""
    torch_model.float()
    randomize(torch_model, seed)
    calibrate_batchnorm(torch_model, calibration_shape_nchw, seed=seed)
    return torch_model.double()


def _state_dict(torch_model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in torch_model.state_dict().items()}


def _to_nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _logits(out):
    """The main logits of a torch or jaxconv output (a tensor, or a tuple/namedtuple)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "logits"):
        return out.logits
    return out


# The largest slope of each bounded gate the ported models use (squeeze-and-excitation).
GATE_SLOPES = {"Sigmoid": 0.25}


def torch_intermediates(torch_model, x_nchw, names) -> dict[str, np.ndarray]:
    """Outputs of the named torch modules (NHWC for 4-d maps); modules called more than
    once in a pass are left out (their output is ambiguous)."""
    return torch_output_and_intermediates(torch_model, x_nchw, names)[1]


def torch_output_and_intermediates(torch_model, x_nchw, names):
    """``(the model's output, torch_intermediates(...), gate_scales)`` from one forward
    pass. ``gate_scales`` maps each named gate (a module in :data:`GATE_SLOPES`) to its
    largest slope times its input's largest magnitude: the scale of the error its input's
    rounding can carry through it. A gate's output is at most 1 while its input's rounding
    grows with the input's magnitude, so measured against its own largest value alone a
    gate fed by large inputs shows that rounding amplified (EfficientNet-V2-L's last gate,
    64x64: its input 1.5e-11 of its scale from torch, its output 1.1e-9 of 1)."""
    torch = _torch()
    modules = dict(torch_model.named_modules())
    seen: dict[str, list] = {}
    gate_scales: dict[str, float] = {}
    hooks = []
    for name in names:
        if name in modules:
            slope = next((v for k, v in GATE_SLOPES.items() if isinstance(modules[name], getattr(torch.nn, k))),
                         None)

            def hook(module, args, output, name=name, slope=slope):
                if isinstance(output, torch.Tensor):
                    seen.setdefault(name, []).append(output.detach().clone())
                    if slope is not None:
                        gate_scales[name] = slope * float(args[0].detach().abs().max())
            hooks.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            output = torch_model(x_nchw)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, values in seen.items():
        if len(values) == 1:
            v = values[0].numpy()
            out[name] = v.transpose(0, 2, 3, 1) if v.ndim == 4 else v
    return output, out, {name: gate_scales[name] for name in out if name in gate_scales}


@dataclass
class ParityResult:
    name: str
    size: tuple[int, int]
    f64_logits: float
    f64_intermediates: dict[str, float] = field(default_factory=dict)
    f32_jax: float | None = None      # err(jaxconv32 vs torch64)
    f32_torch: float | None = None    # err(torch32 vs torch64)

    @property
    def f32_bound(self) -> float:
        return 4 * self.f32_torch + 1e-6

    @property
    def worst_intermediate(self) -> tuple[str, float]:
        if not self.f64_intermediates:
            return ("-", 0.0)
        return max(self.f64_intermediates.items(), key=lambda kv: kv[1])

    @property
    def ok(self) -> bool:
        f64 = max(self.f64_logits, self.worst_intermediate[1]) <= F64_TOLERANCE
        return f64 and (self.f32_jax is None or self.f32_jax <= self.f32_bound)

    def line(self) -> str:
        where, worst = self.worst_intermediate
        text = (f"{self.name:<18} {self.size[0]:>4}x{self.size[1]:<4} f64 logits {self.f64_logits:.1e}  "
                f"worst of {len(self.f64_intermediates)} layers {worst:.1e} ({where})")
        if self.f32_jax is not None:
            text += (f"  f32 jaxconv {self.f32_jax:.1e} vs torch32 {self.f32_torch:.1e} "
                     f"(bound {self.f32_bound:.1e})")
        return text + ("  ok" if self.ok else "  FAIL")


def compile_all(lowered: list) -> list:
    """Compile ``lowered`` programs two at a time (XLA releases the GIL while it compiles).

    With XLA's default options: lowering LLVM's optimisation level shortens a compile but
    runs float64 convolutions (which XLA:CPU emits as loops) several times slower, a net
    loss (ResNet-50 at 224: 31 s against 56 s; a VGG11-BN gradient: minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda program: program.compile(), lowered))


def _flat_to_torch(ours: np.ndarray, flatten_linears) -> np.ndarray:
    """A flattened NHWC map in torch's CHW order, for comparing a flatten's output."""
    flat_sizes = {int(np.prod(chw)): chw for chw in flatten_linears.values()}
    if ours.ndim == 2 and ours.shape[1] in flat_sizes:
        c, hh, ww = flat_sizes[ours.shape[1]]
        return ours.reshape(-1, hh, ww, c).transpose(0, 3, 1, 2).reshape(ours.shape[0], -1)
    return ours


def check_eval(name: str, torch_model, size, batch: int = 2, seed: int = 0,
               float32: bool = True, intermediates: bool = True, overrides: dict | None = None):
    """Eval-mode parity of jaxconv ``name`` against a *prepared* float64 ``torch_model``
    on a fresh random NHWC batch of ``size``: the float64 mapping check (logits and
    named intermediates) and, if ``float32``, the float32 rounding check.

    ``size`` is ``(h, w)`` (returns one :class:`ParityResult`) or a list of sizes
    (returns a list; the weights are converted once and every program is compiled
    before any runs, two at a time)."""
    torch = _torch()
    from jaxconv.summary import output_and_intermediates

    sizes = [tuple(size)] if isinstance(size[0], int) else [tuple(s) for s in size]
    info = model_info(name)
    overrides = dict(overrides or {})
    num_classes = overrides.pop("num_classes", None)
    channels = overrides.get("in_channels", info.input_size[2])
    torch_model.eval()
    # float64 inputs that float32 holds exactly: the float64 reference serves both checks
    xs = [np.random.default_rng(seed + 7 + i).standard_normal((batch, h, w, channels))
          .astype(np.float32).astype(np.float64) for i, (h, w) in enumerate(sizes)]
    with jax.enable_x64(True):
        model64 = get_model(name, num_classes=num_classes, dtype=jnp.float64, param_dtype=jnp.float64,
                            **overrides)
        variables64 = from_torchvision(name, _state_dict(torch_model), num_classes=num_classes, **overrides)
        if intermediates:   # the logits come out of the same program as the intermediates
            pass64 = jax.jit(lambda v, x: output_and_intermediates(model64, v, x)[::-1])
        else:
            pass64 = jax.jit(lambda v, x: ({}, model64.apply(v, x)))
        lowered = [pass64.lower(variables64, jnp.asarray(x)) for x in xs]
    if float32:
        model32 = get_model(name, num_classes=num_classes, **overrides)
        variables32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables64)
        apply32 = jax.jit(model32.apply)
        lowered += [apply32.lower(variables32, jnp.asarray(x, jnp.float32)) for x in xs]
    programs = compile_all(lowered)
    results = []
    torch_name = info.mapping.torch_name
    with jax.enable_x64(True):
        for (h, w), x, program in zip(sizes, xs, programs):
            mine, out64 = program(variables64, jnp.asarray(x))
            names = {torch_name(tuple(p.split("/"))): p for p in mine}
            ref64, theirs, gate_scales = torch_output_and_intermediates(
                torch_model, torch.from_numpy(_to_nchw(x)), names)
            ref64 = _logits(ref64).numpy()
            inter = {}
            if mine:
                for tname, value in theirs.items():
                    ours = _flat_to_torch(np.asarray(mine[names[tname]]), info.mapping.flatten_linears)
                    if ours.shape == value.shape:
                        inter[tname] = rel_err(ours, value, floor=gate_scales.get(tname, 0.0))
            result = ParityResult(name, (h, w), rel_err(np.asarray(_logits(out64)), ref64), inter)
            result.reference = ref64
            results.append(result)
    del variables64
    if float32:
        torch32 = copy.deepcopy(torch_model).float().eval()
        for result, x, program in zip(results, xs, programs[len(xs):]):
            x32 = x.astype(np.float32)
            with torch.no_grad():
                out_t32 = _logits(torch32(torch.from_numpy(_to_nchw(x32)))).numpy()
            out_j32 = np.asarray(_logits(program(variables32, jnp.asarray(x32))))
            # the reference: torch64 on the same (float32-exact) input
            result.f32_jax = rel_err(out_j32, result.reference)
            result.f32_torch = rel_err(out_t32, result.reference)
    return results[0] if isinstance(size[0], int) else results


def _without_dropout(name: str, overrides: dict | None) -> dict:
    """``overrides`` with dropout and stochastic depth at 0 where the model has them."""
    from jaxconv.registry import _options

    overrides = dict(overrides or {})
    options = _options(model_info(name).build)
    for option in ("dropout", "stochastic_depth_prob"):
        if option in options:
            overrides.setdefault(option, 0.0)
    return overrides


def _grad_errors(grads, expected) -> dict[str, float]:
    """Per-parameter relative errors (keyed ``grad:<path>``). A gradient that is zero up
    to rounding (a conv bias before a train-mode BatchNorm) is measured against a
    thousandth of the largest gradient."""
    flat_mine = jax.tree_util.tree_flatten_with_path(grads)[0]
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    if len(flat_mine) != len(flat_ref):
        raise AssertionError(f"{len(flat_mine)} gradients, torch has {len(flat_ref)}")
    floor = 1e-3 * max(float(np.max(np.abs(g))) for g in flat_ref.values())
    return {"grad:" + "/".join(p.key for p in path): rel_err(g, flat_ref[path], floor)
            for path, g in flat_mine}


def check_train(name: str, torch_model, size: tuple[int, int], batch: int = 4, seed: int = 0,
                overrides: dict | None = None, grads: bool = False) -> dict[str, float]:
    """Train-mode parity in float64: one forward pass in train mode on the same batch.

    Dropout and stochastic depth are switched off on both sides (``dropout=0.0`` and
    ``stochastic_depth_prob=0.0`` on the jaxconv model where it has them; torch's modules
    in eval mode).
    Returns errors for the logits (and auxiliary outputs, as ``aux_i``) and the worst
    relative error over the updated running statistics (``running_stats``). With
    ``grads=True`` the same compiled program also differentiates the cross-entropy of
    the logits against random labels: ``loss`` and one ``grad:<path>`` entry per
    parameter, against torch autograd after the layout transpose.
    """
    torch = _torch()
    info = model_info(name)
    overrides = _without_dropout(name, overrides)
    reference = copy.deepcopy(torch_model).double()
    channels = overrides.get("in_channels", info.input_size[2])
    rng = np.random.default_rng(seed + 11)
    x = rng.standard_normal((batch, *size, channels))
    num_classes = overrides.pop("num_classes", None)
    labels = rng.integers(0, num_classes or info.num_classes, batch)
    before = _state_dict(reference)
    reference.train()
    _switch_off_randomness(reference)
    with torch.set_grad_enabled(grads):
        ref_out = reference(torch.from_numpy(_to_nchw(x)))
        if grads:
            loss = torch.nn.functional.cross_entropy(_logits(ref_out), torch.from_numpy(labels))
            loss.backward()
    after = _state_dict(reference)
    ref_list = [o.detach() for o in (ref_out if isinstance(ref_out, (tuple, list)) else [ref_out])]
    with jax.enable_x64(True):
        model = get_model(name, num_classes=num_classes, dtype=jnp.float64, param_dtype=jnp.float64,
                          **overrides)
        variables = from_torchvision(name, before, num_classes=num_classes, **overrides)
        expected = from_torchvision(name, after, num_classes=num_classes, **overrides)
        rest = {k: v for k, v in variables.items() if k != "params"}

        def loss_fn(params, x):
            out, updates = model.apply({"params": params, **rest}, x, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.key(0)})
            logits = _logits(out)
            onehot = jax.nn.one_hot(jnp.asarray(labels), logits.shape[-1], dtype=logits.dtype)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), (out, updates)

        if grads:
            step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        else:
            step = jax.jit(lambda p, x: (loss_fn(p, x), None))
        program = step.lower(variables["params"], jnp.asarray(x)).compile()
        (value, (out, updates)), g = program(variables["params"], jnp.asarray(x))
        out_list = list(out) if isinstance(out, (tuple, list)) else [out]
        errors = {"logits": rel_err(out_list[0], ref_list[0].numpy())}
        for i, (a, b) in enumerate(zip(out_list[1:], ref_list[1:]), start=1):
            if a is not None and b is not None:
                errors[f"aux_{i}"] = rel_err(a, b.numpy())
        stats = jax.tree.leaves(updates.get("batch_stats", {}))
        wanted = jax.tree.leaves(expected.get("batch_stats", {}))
        if len(stats) != len(wanted):
            raise AssertionError(f"{len(stats)} updated statistics, torch has {len(wanted)}")
        errors["running_stats"] = max((rel_err(a, b) for a, b in zip(stats, wanted)), default=0.0)
        if grads:
            # a parameter the loss does not reach (GoogLeNet's auxiliary heads: the loss is
            # the logits' cross-entropy) has no torch gradient; JAX's is zero
            torch_grads = dict(before, **{k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy()
                                          for k, p in reference.named_parameters()})
            expected_grads = from_torchvision(name, torch_grads, num_classes=num_classes, **overrides)["params"]
            errors["loss"] = rel_err(value, loss.item())
            errors.update(_grad_errors(g, expected_grads))
    return errors


def check_grads(name: str, torch_model, size: tuple[int, int], batch: int = 4, seed: int = 0,
                overrides: dict | None = None) -> dict[str, float]:
    """Gradient parity in float64: d(cross-entropy)/d(every parameter) in train mode
    against torch autograd, after the layout transpose (:func:`check_train` with
    ``grads=True``). Returns ``'loss'`` and the relative error per parameter
    (``grad:<path>``)."""
    errors = check_train(name, torch_model, size, batch, seed, overrides, grads=True)
    return {k: v for k, v in errors.items() if k == "loss" or k.startswith("grad:")}
