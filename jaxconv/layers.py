"""Torch-exact building blocks shared by every model family.

Every torch-compatibility trick lives here, once:

* NHWC activations and HWIO kernels; padding is always an explicit symmetric pair
  copied from the torch module (never XLA's ``'SAME'``, which pads (0, 1) on even
  inputs at stride 2), except where a layer asks for TensorFlow's ``'SAME'`` on
  purpose (EfficientNet-Lite, whose weights were trained in TensorFlow).
* ``MaxPool2d`` and ``AvgPool2d`` compute their output size as torch does, including
  ``ceil_mode`` (extra padding at the bottom/right that never wins a max and, for the
  average, is left out of the divisor) and ``count_include_pad``.
* ``AdaptiveAvgPool2d`` uses torch's bins ``[floor(i*H/h), ceil((i+1)*H/h))`` for any
  input size, upsampling when the map is smaller than the target.
* ``BatchNorm2d`` keeps torch's eps per layer, uses ``momentum = 1 - torch's`` and
  updates ``running_var`` with the unbiased batch variance, as torch does.
* Parameters are created with torch's default initialisation unless a model asks for
  another one (torchvision's per-model ``init_weights``).

Every layer takes ``(x, train=False)`` so that models can run a sequence of layers
uniformly (:func:`add_sequence` / :func:`run_sequence`), and knows how to describe
itself the way torch prints a module (:meth:`torch_repr`) and its cost (:meth:`macs`),
which ``jaxconv summary`` uses.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

Dtype = Any
Initializer = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- helpers

def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, (int, np.integer)) for i in v):
        raise ValueError(f"expected an int or a pair of ints, got {v!r}")
    return (int(v[0]), int(v[1]))


def torch_default_kernel_init() -> Initializer:
    """torch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """torch's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kaiming_normal_fan_out() -> Initializer:
    """torch's ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_nhwc(x: jax.Array, channels: int, model: str) -> None:
    """A clear error for input that is not an NHWC batch with ``channels`` channels."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"{model} expects an NHWC batch (N, H, W, {channels}), got shape {shape}")
    if shape[-1] != channels:
        hint = ""
        if shape[1] == channels:
            hint = " (this looks like NCHW: use x.transpose(0, 2, 3, 1))"
        raise ValueError(f"{model} expects {channels} input channels in the last axis of an "
                         f"NHWC batch, got shape {shape}{hint}")


def param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...], dtype: Dtype):
    """``module.param(name, init, shape, dtype)`` with a direct shape check in apply.

    Flax checks an existing parameter by tracing its initializer under ``eval_shape`` on
    every call, about 4 ms a parameter: 8 of the 16 s it took to trace EfficientNet-B7.
    Here the stored value's shape is compared with ``shape`` itself, with an error that
    names the module, the parameter and both shapes."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if tuple(np.shape(value)) != tuple(shape):
            path = "/".join(module.scope.path) or type(module).__name__
            raise ValueError(f"parameter {path}/{name} has shape {tuple(np.shape(value))}; "
                             f"the module needs {tuple(shape)}")
        return value
    return module.param(name, init, shape, dtype)


def _window_output(size: int, kernel: int, stride: int, pad: int, dilation: int = 1,
                   ceil_mode: bool = False, what: str = "layer") -> tuple[int, int]:
    """torch's output size for one spatial dim, and the padding (lo, hi) that XLA needs.

    ``hi`` exceeds ``pad`` only under ``ceil_mode``, where torch lets the last window
    hang over the padded input as long as it starts inside the input or left padding.
    """
    span = dilation * (kernel - 1) + 1
    numer = size + 2 * pad - span + (stride - 1 if ceil_mode else 0)
    if numer < 0:
        raise ValueError(f"{what}: input size {size} is too small for kernel {kernel} "
                         f"with padding {pad} (need at least {span - 2 * pad})")
    out = numer // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    hi = (out - 1) * stride + span - size - pad
    return out, (pad, max(hi, 0) if ceil_mode else pad)


def _padding_pairs(padding, what: str) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    padding = tuple(padding)
    if len(padding) == 2 and all(isinstance(p, (int, np.integer)) for p in padding):
        return ((int(padding[0]),) * 2, (int(padding[1]),) * 2)
    if len(padding) == 2 and all(len(tuple(p)) == 2 for p in padding):
        return tuple(tuple(int(i) for i in p) for p in padding)  # type: ignore[return-value]
    raise ValueError(f"{what}: padding must be an int, (ph, pw), ((top, bottom), (left, right)) "
                     f"or 'SAME', got {padding!r}")


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


# ----------------------------------------------------------------------------- layers

def convolve(x, kernel, stride, padding, dilation=(1, 1), groups: int = 1):
    """torch's convolution on NHWC input with an HWIO kernel (``padding``: explicit pairs or
    'SAME'), through XLA's convolution -- except where XLA:CPU is slow.

    * float64: XLA:CPU has no float64 convolution kernel: it emits loops that run at well
      under a GFLOP/s (minutes for one VGG pass at 224x224), and rewrites a float64
      *grouped* convolution into a dense one with a block-diagonal kernel (``groups`` times
      the work and memory: gigabytes for EfficientNet-B7's depthwise layers). Float64 (the
      parity check's dtype) gathers the kernel's taps instead (im2col: for each (i, j) the
      strided slice of the padded input) and multiplies them with the kernel as one
      (grouped) matrix product, which XLA runs as a float64 GEMM: VGG-16 at 224 in seconds.
      Exact up to float64 rounding; gradients follow by autodiff.
    * float32: jaxconv's convolution primitive (see "float32 convolution" below), lowered
      on CPU to forms XLA:CPU runs well -- tap sums for grouped, depthwise and
      one-input-channel convolutions, XLA's convolution with matrix-product gradients for
      unpadded 1x1 ones, one matrix product against a banded matrix (forward and input
      gradient) for a stride-1 one with few input channels on a narrow input (LeNet5's
      second), XLA's convolution with gradients in XLA:CPU's native order for the rest (a
      strided one's input gradient as stride-1 convolutions, one per phase of the input)
      -- and on other platforms to XLA's convolution and its own gradients.
    """
    kh, kw, cin_group, cout = kernel.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1),
                                      stride, padding)
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    stride, dilation = tuple(stride), tuple(dilation)
    if jnp.dtype(x.dtype) == jnp.float64:
        return _im2col_conv(x, kernel, stride, padding, dilation, groups)
    if jnp.dtype(x.dtype) == jnp.float32:
        return _conv_p.bind(x, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return _xla_conv(x, kernel, stride, padding, dilation, groups)


def _held(a, predicate):
    """``a`` itself, written to memory by a conditional that XLA does not fuse through.

    XLA:CPU copies cheap elementwise producers into every consumer fusion; where a consumer
    reads in transposed order or several consumers read the same value, that recomputation
    costs more than the value's one write. Both branches are the identity (the second one
    in a form XLA does not merge with the first), so ``predicate`` -- any scalar -- decides
    nothing."""
    return lax.cond(predicate, _identity, _negated_twice, a)


def _identity(a):
    return a


def _negated_twice(a):
    return -(-a)


@jax.custom_jvp
def fan_out(x):
    """``x`` itself, for a value that several layers read (a GoogLeNet inception module's input).
    Its gradient is the sum of those layers' gradients; on CPU it leaves through
    :func:`_held`, so the sum is written to memory once.

    XLA:CPU otherwise copies the sum into each fusion that reads it (the BatchNorm
    gradient behind it reads it several times): GoogLeNet's train step at batch 32 took
    3662 ms without, 3071 ms with it (XLA's ``individual_dot`` YNNPACK fusions, jaxconv's
    default). The tangent goes through the same hold, whose transpose holds the gradient,
    so forward mode works as well. Elsewhere it is the identity."""
    return x


@fan_out.defjvp
def _fan_out_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
        return x, dx
    predicate = jnp.isfinite(x.reshape(-1)[0])
    return x, lax.platform_dependent(dx, predicate, cpu=_held, default=_first)


def _first(a, predicate):
    return a


def _im2col_conv(x, kernel, stride, padding, dilation, groups=1):
    """The convolution as the kernel's taps (:func:`_conv_taps`) stacked on the channel axis
    and multiplied with the kernel: one (grouped) matrix product."""
    kh, kw, cin_group, cout = kernel.shape
    n = x.shape[0]
    taps, (oh, ow) = _conv_taps(x, kh, kw, stride, padding, dilation)
    patches = jnp.stack(taps, axis=3).reshape(n, oh, ow, kh * kw, groups, cin_group)
    y = jnp.einsum("nhwtgc,tcgo->nhwgo", patches, kernel.reshape(kh * kw, cin_group, groups, cout // groups))
    return y.reshape(n, oh, ow, cout)


def _banded_rows_conv(x, kernel, padding, dilation, block=None):
    """A stride-1 convolution as one matrix product: each output row, in pieces of ``block``
    output columns (default: the whole row), reads the kh input rows it meets across the
    piece's span (span + block - 1 columns x channels values each), and a banded matrix
    made from the kernel maps them to the piece's block x out values.

    Whole rows, it does (padded width / kw) times im2col's multiply-adds, for a transpose --
    the input's gradient -- that XLA:CPU runs far better: a GEMM and a sum of kh blocks
    shifted by whole rows, each row's width x channels values together, which XLA vectorises.
    im2col's transpose sums kh x kw blocks shifted both ways with a few channels innermost,
    element by element. LeNet5's conv2 input gradient (6 -> 16, 5x5 on 12x12, batch 256,
    2 cores): 1.9 ms as im2col's transpose (2.8 + 0.8 ms inside the train step), 1.2 ms
    this way; torch 1.3. In pieces of a few columns (:func:`_forward_block`) it is the
    forward of such a convolution (see :func:`_is_banded`)."""
    kh, kw, cin, cout = kernel.shape
    dh, dw = dilation
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    n, h, w, _ = xp.shape
    oh, ow = h - (kh - 1) * dh, w - (kw - 1) * dw
    span = (kw - 1) * dw + 1
    block = ow if block is None else block
    pieces, read = ow // block, block - 1 + span       # a piece reads `read` input columns
    # matrix[a, v, c, j, o] = kernel[a, b, c, o] where the piece's input column v = j + b * dw, else 0
    zero = jnp.zeros((), kernel.dtype)
    matrix = jnp.stack([lax.pad(kernel, zero, ((0, 0, 0), (j, read - j - span, dw - 1), (0, 0, 0), (0, 0, 0)))
                        for j in range(block)], axis=3).reshape(kh * read * cin, block * cout)
    rows = jnp.stack([jnp.stack([xp[:, a * dh:a * dh + oh, p * block:p * block + read] for p in range(pieces)], axis=2)
                      for a in range(kh)], axis=3).reshape(n * oh * pieces, kh * read * cin)
    return (rows @ matrix).reshape(n, oh, ow, cout)


def _forward_block(kernel_shape, dilation, out_width: int) -> int:
    """The banded forward's piece: the widest one of at most span - 1 output columns that
    divides the output row, so that the product does less than twice im2col's
    multiply-adds ((block - 1 + span) / span times). LeNet5's conv2 forward (6 -> 16, 5x5 on
    12x12, batch 256) alone, ms: XLA's 1.21-1.95, pieces of 1 / 2 / 4 / 8 (whole rows)
    1.45-1.89 / 0.75-0.93 / 0.90-1.42 / 1.22-1.63."""
    span = (kernel_shape[1] - 1) * dilation[1] + 1
    return max(d for d in range(1, max(span - 1, 1) + 1) if out_width % d == 0)


def _pointwise_dot(x, kernel, stride):
    """An unpadded 1x1 convolution as a matrix product over the channel axis: the input
    term whose transpose is the input's gradient on CPU.

    The forward itself stays XLA's convolution, which XLA:CPU rewrites into an Eigen
    product; written as this product it went to YNNPACK (jaxconv's flag), slower on an
    Intel Cascade Lake host: inference at batch 16, ratio to torch, alternating processes,
    as a product / as the convolution: ResNet-50 1.50 / 1.65x, GoogLeNet 1.76 / 1.98x,
    DenseNet-121 1.47 / 1.64x, EfficientNet-B0 1.55 / 1.66x; on the AMD EPYC host within
    the noise, inference and training (BENCHMARKS.md).

    XLA:CPU does not rewrite the kernel's gradient into a product: that
    stays a convolution with batch and channels swapped, whose operand is a transposed
    copy of the input. When the input is a residual block's output, XLA fuses the copy
    with everything elementwise that produced it -- the BatchNorm affines, adds and ReLUs
    of every earlier block of the stage -- and recomputes that chain in transposed order
    (ResNet-50's gradient at batch 16: 7.1 s against 5.8 s with this dot, whose kernel
    gradient is a GEMM over batch x height x width reading the input as it lies)."""
    if stride != (1, 1):
        x = x[:, ::stride[0], ::stride[1]]
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def _pointwise_kernel_gradient(x, g, stride):
    """The kernel gradient of :func:`_pointwise_dot`: input rows against gradient rows,
    both contracted over their leading (batch x height x width) axis as they lie.

    As the transpose of the dot (a product of the gradient with the input, then transposed),
    it reached XLA:CPU as a product that reads the gradient across, behind a transposed copy
    of it to (out, batch x height x width). A 16 -> 96 1x1 convolution at 112x112, batch 32
    (EfficientNet-B0's expansion), its forward and both gradients behind an elementwise
    producer: 261 -> 71 ms (copy 190 + product 65 -> product 14). Train steps at batch 32,
    two runs each, old -> new: EfficientNet-B0 3174 / 3043 -> 2988 / 3004 ms, ResNet-50 7439
    / 7226 -> 7008 / 6902 ms; DenseNet-121 and GoogLeNet within noise."""
    if stride != (1, 1):
        x = x[:, ::stride[0], ::stride[1]]
    dk = lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
    return dk[None, None]


def _xla_conv(x, kernel, stride, padding, dilation, groups=1):
    return lax.conv_general_dilated(x, kernel, window_strides=stride, padding=padding, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _conv_taps(x, kh, kw, stride, padding, dilation, pad_value=0, pad_each=False):
    """The kernel's taps in row-major order: for each (i, j) the strided slice of the
    input, padded with ``pad_value``, that meets kernel[i, j]; and the output size.

    By default each tap is a slice of the padded input, which XLA writes once. With
    ``pad_each`` it is a strided slice of the input itself padded to the output's size, a
    pad that XLA computes inside the loop that reads the tap: no padded copy of the input
    is written, for selects on every read. That pays where a stride makes each tap read a
    fraction of the input (:func:`_tap_sum`, :func:`_maximum_of_taps`)."""
    (sh, sw), (dh, dw) = stride, dilation
    n, h, w, c = x.shape
    oh = (h + sum(padding[0]) - (kh - 1) * dh - 1) // sh + 1
    ow = (w + sum(padding[1]) - (kw - 1) * dw - 1) // sw + 1
    if not pad_each:
        xp = lax.pad(x, np.array(pad_value, x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
        return [lax.slice(xp, (0, i * dh, j * dw, 0), (n, i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c),
                          (1, sh, sw, 1))
                for i in range(kh) for j in range(kw)], (oh, ow)

    def inside(tap, step, dil, before, size, out):
        # the first and last outputs whose input index step * o + tap * dil - before is in [0, size)
        return max(0, -(-(before - tap * dil) // step)), min(out - 1, (size - 1 + before - tap * dil) // step)

    taps = []
    for i in range(kh):
        first_row, last_row = inside(i, sh, dh, padding[0][0], h, oh)
        for j in range(kw):
            first_col, last_col = inside(j, sw, dw, padding[1][0], w, ow)
            if first_row > last_row or first_col > last_col:     # the tap meets only padding
                taps.append(jnp.full((n, oh, ow, c), pad_value, x.dtype))
                continue
            row, col = sh * first_row + i * dh - padding[0][0], sw * first_col + j * dw - padding[1][0]
            part = lax.slice(x, (0, row, col, 0),
                             (n, row + sh * (last_row - first_row) + 1, col + sw * (last_col - first_col) + 1, c),
                             (1, sh, sw, 1))
            taps.append(lax.pad(part, np.array(pad_value, x.dtype),
                                ((0, 0, 0), (first_row, oh - 1 - last_row, 0), (first_col, ow - 1 - last_col, 0),
                                 (0, 0, 0))))
    return taps, (oh, ow)


# A group with at most this many input channels runs as a tap sum on CPU (see _grouped_forward).
TAP_SUM_MAX_GROUP_CHANNELS = 8
# Groups with more, up to this many, run as XLA's grouped convolution on pairs of groups.
PAIRED_GROUP_MAX_CHANNELS = 16


def _grouped_forward(x, kernel, stride, padding, dilation, groups):
    kh, kw, cin_group, cout = kernel.shape
    if cin_group > TAP_SUM_MAX_GROUP_CHANNELS:
        if cin_group > PAIRED_GROUP_MAX_CHANNELS or groups % 2:
            return _xla_conv(x, kernel, stride, padding, dilation, groups)
        # XLA:CPU's grouped convolution runs a group of 16 channels at well under half the
        # rate of a group of 32 (28 against 76 GFLOP/s at batch 16): half as many groups of
        # twice the channels, with a block-diagonal kernel, take less time for twice the
        # multiply-adds (the added ones by exact zeros, so the sums are the same). Batch 16, ms, XLA's /
        # paired: 14x14x512, 32 groups, 16.5 / 14.2; the same, stride 2 from 28x28, 27.4 /
        # 21.7; 28x28x512 76.6 / 56.6. With 32 channels a group pairing loses (7x7x1024:
        # 5.0 / 8.5). A zero times an infinite or NaN input is NaN, which would reach the
        # other group of the pair, so an input that is not all finite takes XLA's own.
        return lax.cond(jnp.all(jnp.isfinite(x)),
                        lambda a, k: _xla_conv(a, _paired_groups(k, groups), stride, padding, dilation, groups // 2),
                        lambda a, k: _xla_conv(a, k, stride, padding, dilation, groups), x, kernel)
    # The tap sum is a chain of multiplies and adds that XLA, seeing cheap elementwise work,
    # copies into every consumer it fuses with: BatchNorm's reductions, the gradient's pads
    # and transposes (ResNeXt-50's train step took 4.5x longer, EfficientNet-B0's 1.6x). A
    # conditional is a fusion barrier XLA keeps, so the sum is computed once. Its predicate
    # is never false for a finite kernel; the other branch is XLA's convolution, the same
    # function. A one-input-channel layer (LeNet5's first) needs it as well: the max pool
    # after it reads each value in several fusions (its forward, and the first maximum
    # that its gradient needs); without the barrier LeNet5's step took 1.4x as long.
    return lax.cond(jnp.isfinite(kernel[0, 0, 0, 0]),
                    lambda a, k: _tap_sum(a, k, stride, padding, dilation, groups),
                    lambda a, k: _xla_conv(a, k, stride, padding, dilation, groups), x, kernel)


def _paired_groups(kernel, groups):
    """The kernel of the same convolution with ``groups // 2`` groups: each pair of groups
    one group, its kernel block-diagonal (zeros where one group's outputs meet the other
    group's inputs)."""
    kh, kw, cin_group, cout = kernel.shape
    pairs = kernel.reshape(kh, kw, 1, cin_group, groups // 2, 2, cout // groups)
    diagonal = np.eye(2, dtype=bool)[:, None, None, :, None]      # (input half, -, -, output half, -)
    return jnp.where(diagonal, pairs, jnp.zeros((), kernel.dtype)).reshape(kh, kw, 2 * cin_group, cout)


def _tap_sum(x, kernel, stride, padding, dilation, groups):
    kh, kw, cin_group, cout = kernel.shape
    n = x.shape[0]
    cout_group = cout // groups
    # A strided depthwise convolution's taps each pad their own slice. Batch 16, ms, forward /
    # forward and gradient, the padded input's slices against each tap padded: 3x3 stride 2
    # at 112x112x96 (EfficientNet-B0's) 61.0 / 212.0 against 30.8 / 179.7; 5x5 stride 2 at
    # 56x56x144 24.0 / 85.4 against 9.2 / 77.2; 3x3 stride 2 at 28x28x240 2.3 / 29.7 against
    # 2.0 / 17.0; 5x5 stride 2 at 14x14x672 2.2 / 17.2 against 3.0 / 16.8. Not at stride 1,
    # where each tap reads the whole input (3x3 at 56x56x144: 25.1 against 32.8), nor with 8
    # input channels a group (ResNeXt's 3x3 stride 2 at 56x56x256: 68.6 against 73.3), nor
    # with one input channel, where it is level or slower (5x5 stride 2 at 28x28x1 -> 6,
    # batch 256: forward 0.67 against 0.92).
    taps, (oh, ow) = _conv_taps(x, kh, kw, stride, padding, dilation,
                                pad_each=cin_group == 1 and groups > 1 and tuple(stride) != (1, 1))
    weights = kernel.reshape(kh * kw, cin_group, groups, cout_group)
    y = None
    for t, tap in enumerate(taps):
        tap = tap.reshape(n, oh, ow, groups, cin_group)
        for c in range(cin_group):
            term = tap[..., c:c + 1] * weights[t, c]
            y = term if y is None else y + term
    return y.reshape(n, oh, ow, cout)


def _grouped_input_gradient(g, kernel, input_shape, stride, padding, dilation, groups):
    kh, kw, cin_group, cout = kernel.shape
    n, h, w, cin = input_shape
    oh, ow = g.shape[1:3]
    # Input gradient: the transposed convolution, as a stride-1 convolution of the output
    # gradient spread out by the stride (zeros between) and padded so the result is (h, w).
    spans = [d * (k - 1) for k, d in zip((kh, kw), dilation)]
    rests = [size + p[0] + p[1] - span - 1 - (o - 1) * s
             for size, p, span, o, s in zip((h, w), padding, spans, (oh, ow), stride)]
    g_spread = lax.pad(g, jnp.zeros((), g.dtype), (
        (0, 0, 0),
        (spans[0] - padding[0][0], spans[0] - padding[0][1] + rests[0], stride[0] - 1),
        (spans[1] - padding[1][0], spans[1] - padding[1][1] + rests[1], stride[1] - 1),
        (0, 0, 0)))
    return _grouped_forward(g_spread, _transposed_per_group(kernel[::-1, ::-1], groups), (1, 1), ((0, 0), (0, 0)),
                            dilation, groups)


def _transposed_per_group(kernel, groups):
    """The kernel (h, w, a group's in, out) of the transposed convolution: (h, w, a group's
    out, in), each group's block transposed (for one group, in and out swapped)."""
    kh, kw, cin_group, cout = kernel.shape
    return (kernel.reshape(kh, kw, cin_group, groups, cout // groups).transpose(0, 1, 4, 3, 2)
            .reshape(kh, kw, cout // groups, cin_group * groups))


def _grouped_kernel_gradient(x, g, kernel_shape, stride, padding, dilation, groups):
    kh, kw, cin_group, cout = kernel_shape
    n, h, w, cin = x.shape
    # Only the input rows and columns that some kernel offset meets: with a stride, the
    # padded input can end in some that none does, and XLA would compute a (kh + 1) x (kw
    # + 1) result for a kh x kw kernel (EfficientNet-B0's 3x3 stride-2 depthwise layer at
    # 112x112x96: 16 offsets for 9). The high padding is cut to the last row met, or the
    # input cropped where that row lies inside it (or before it). Kernel gradient alone,
    # batch 32, three runs each: that layer 210-224 -> 194-198 ms (its convolution 94 -> 55
    # ms), a 3x3 stride-2 grouped one at 56x56x128, 4 channels a group, 84-92 -> 69-75 ms.
    oh, ow = g.shape[1:3]
    ends = [(k - 1) * d + (o - 1) * s + 1 for k, d, o, s in zip((kh, kw), dilation, (oh, ow), stride)]
    kept = [min(max(end - lo, 0), size) for (lo, _), end, size in zip(padding, ends, (h, w))]
    x = x[:, :kept[0], :kept[1]]
    padding = tuple((min(lo, end), end - min(lo, end) - keep) for (lo, _), end, keep in zip(padding, ends, kept))
    n, h, w, cin = x.shape
    # Kernel gradient: for each group, correlate the input (batch as channels) with the
    # output gradient (batch as input channels); the result's batch axis is the kernel's
    # input channel.
    lhs = (x.reshape(n, h, w, groups, cin_group).transpose(4, 1, 2, 3, 0)
           .reshape(cin_group, h, w, groups * n))
    rhs = g.transpose(1, 2, 0, 3)
    dk = lax.conv_general_dilated(lhs, rhs, window_strides=dilation, padding=padding, rhs_dilation=stride,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    return dk.transpose(1, 2, 0, 3)


# ----------------------------------------------------------------------------- float32 convolution
#
# A float32 convolution is a primitive of jaxconv's own, with a companion primitive for
# each of its two gradients. Each of the three is lowered per platform: on CPU to the forms
# below, elsewhere to XLA's convolution and its transposes. Being bilinear, the three
# transpose into one another, so forward mode, reverse mode and any order of both work;
# under vmap each runs its platform's form in a `lax.platform_dependent`. The platform is
# chosen at lowering, not while tracing: with a `lax.platform_dependent` conditional per
# convolution, autodiff traced, linearised, partially evaluated and transposed both
# branches at every layer (ResNet-50's train step, min of 8: trace 1.02-1.12 -> 0.64-0.70
# s with these primitives, see BENCHMARKS.md).
#
# On CPU:
# * grouped, depthwise and one-input-channel convolutions: XLA:CPU runs these far below
#   its dense convolutions (2-core AVX2, batch 32): ResNeXt-50's 3x3 grouped conv at
#   56x56x128 takes 0.65 s forward and 50 s for the kernel's gradient; a depthwise 3x3 at
#   112x112x96, stride 2, 2.1 s forward and 3.5 s for the input's gradient. Here each pass
#   is a computation XLA does well: the forward is :func:`_grouped_forward`, a sum over
#   taps and a group's input channels where a group has few input channels (one fused
#   loop: 0.10 s and 0.11 s for the two layers above), else XLA's own grouped convolution
#   (on pairs of groups where a group has 9-16 channels); the input gradient is the same
#   forward run on the output gradient (padded) with the flipped kernel
#   (:func:`_grouped_input_gradient`), or with a stride once per phase of the input (each
#   phase with the kernel taps that reach it, :func:`_phased_input_gradient`); the
#   kernel gradient is one grouped convolution of the input with the output gradient as
#   its kernel, batch and channels swapped, so that each group's contraction runs over
#   batch x height x width (:func:`_grouped_kernel_gradient`: 0.36 s instead of 50 s).
# * unpadded 1x1 convolutions: XLA's convolution (an Eigen product) forward; its input
#   gradient is the transpose of a matrix product (:func:`_pointwise_dot`), its kernel
#   gradient the product of the two operands' rows (:func:`_pointwise_kernel_gradient`);
# * other (dense) convolutions: XLA's, with gradients that are the transposes of the terms
#   :func:`_input_term_cpu` and :func:`_kernel_term_cpu` -- except a strided one's input
#   gradient (dilation 1, at least 9 input channels), which is one stride-1 convolution
#   per phase of the input (:func:`_phased_input_gradient`), and the forward of a stride-1
#   one with at most 8 input channels on an input at most 3x the kernel's span wide,
#   which is banded rows in pieces of a few columns (:func:`_is_banded`).
#
# XLA:CPU runs a dense convolution fast only in one dimension order: input (batch, h, w,
# in), kernel (h, w, in, out), output (batch, h, w, out). It puts any other order into that
# one with transposed copies in a program's entry computation, but not inside the body of
# a loop or a conditional, where it runs a slow generic kernel instead: ResNet-18's train
# step (batch 8) as the body of a `lax.scan` took 18.8 s against 0.58 s as a plain jitted
# step. The transposes of a plain NHWC/HWIO convolution are in other orders (the kernel
# gradient contracts over batch, the input gradient reads the kernel with in and out
# swapped). So each term lays its operands out -- with explicit transposes -- such that its
# transpose is a convolution in XLA:CPU's order.

def _is_grouped(kernel_shape, groups) -> bool:
    return groups > 1 or kernel_shape[2] == 1


def _is_pointwise(kernel_shape, padding) -> bool:
    return tuple(kernel_shape[:2]) == (1, 1) and padding == ((0, 0), (0, 0))


def _conv_cpu(x, kernel, *, stride, padding, dilation, groups):
    if _is_grouped(kernel.shape, groups):
        return _grouped_forward(x, kernel, stride, padding, dilation, groups)
    if not _is_pointwise(kernel.shape, padding) and _is_banded(x.shape, kernel.shape, stride, padding, dilation):
        out_height, out_width = _conv_output_shape(x.shape, kernel.shape, stride=stride, padding=padding,
                                                   dilation=dilation, groups=groups)[1:3]
        block = _forward_block(kernel.shape, dilation, out_width)
        if x.shape[0] * out_height * (out_width // block) >= BANDED_FORWARD_MIN_ROWS:
            return _banded_rows_conv(x, kernel, padding, dilation, block)
    return _xla_conv(x, kernel, stride, padding, dilation)


def _conv_default(x, kernel, *, stride, padding, dilation, groups):
    return _xla_conv(x, kernel, stride, padding, dilation, groups)


def _conv_input_gradient_cpu(g, kernel, *, input_shape, **conv):
    if _is_phased(kernel.shape, **conv):
        return _phased_input_gradient(g, kernel, input_shape, conv["stride"], conv["padding"], conv["groups"])
    if _is_grouped(kernel.shape, conv["groups"]):
        return _grouped_input_gradient(g, kernel, input_shape, **conv)
    return _input_gradient(_input_term_cpu, g, kernel, input_shape=input_shape, **conv)


def _conv_kernel_gradient_cpu(x, g, *, kernel_shape, **conv):
    if _is_grouped(kernel_shape, conv["groups"]):
        return _grouped_kernel_gradient(x, g, kernel_shape, **conv)
    if _is_pointwise(kernel_shape, conv["padding"]):
        return _pointwise_kernel_gradient(x, g, conv["stride"])
    return _kernel_gradient(_kernel_term_cpu, x, g, kernel_shape=kernel_shape, **conv)


def _kernel_term_cpu(x, kernel_dot, *, stride, padding, dilation, groups):
    """The convolution as a function of its kernel, whose transpose is the kernel's gradient
    on CPU (a 1x1 unpadded kernel's is :func:`_pointwise_kernel_gradient`). The input is read
    through :func:`_held` and as (in, h, w, batch), the kernel as (in, h, w, out), the
    output as (h, w, batch, out), so that the kernel's gradient is a convolution of the
    input (channels as batch) with the output gradient (batch as input channels). The
    hold's predicate, the input's own first entry, decides nothing (an empty batch needs
    no hold).

    Held, the input is read as it was written: XLA otherwise fuses its producer -- a
    BatchNorm's affine, a ReLU, a residual sum: up to 15 operands -- into the gradient's
    transposed copy of it and recomputes it in transposed order, at up to 15 times the
    copy's own time (DenseNet-121's train step at batch 16 spent 0.56 s in these copies;
    held: 3-13% shorter in four runs, ResNet-18's and GoogLeNet's within the host's noise;
    see BENCHMARKS.md)."""
    if x.size:
        x = _held(x, jnp.isfinite(x[0, 0, 0, 0]))
    y = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), kernel_dot.transpose(2, 0, 1, 3),
                                 window_strides=stride, padding=padding, rhs_dilation=dilation,
                                 dimension_numbers=("CHWN", "IHWO", "HWNC"))
    return y.transpose(2, 0, 1, 3)


# A dense float32 stride-1 convolution with at most this many input channels takes its
# input's gradient from the im2col form on CPU (see _input_term_cpu).
IM2COL_MAX_INPUT_CHANNELS = 8
# ... and where its padded input is at most this many times as wide as the kernel's span, from
# the banded-rows form (see _banded_rows_conv), whose extra multiply-adds grow with the ratio.
BANDED_MAX_WIDTH_RATIO = 3


# ... and its forward too, where that product has at least this many rows (see _is_banded).
BANDED_FORWARD_MIN_ROWS = 32


def _is_banded(x_shape, kernel_shape, stride, padding, dilation) -> bool:
    """A dense float32 convolution whose input gradient (:func:`_input_term_cpu`) and forward
    (:func:`_conv_cpu`) are banded rows on CPU: stride 1, at most
    ``IM2COL_MAX_INPUT_CHANNELS`` input channels, a padded input at most
    ``BANDED_MAX_WIDTH_RATIO`` times the kernel's span wide (LeNet5's conv2).

    The forward is the product in pieces of a few output columns (:func:`_forward_block`):
    XLA's convolution with 6 input channels and 16 output ones ran LeNet5's conv2 forward
    at 40-65 GFLOP/s. LeNet5's epoch as one scan (batch 256), old / new code in alternating
    processes, medians of 5: 1.91, 1.66, 1.70 / 1.59, 1.56, 1.60 s. With fewer than
    ``BANDED_FORWARD_MIN_ROWS`` rows (LeNet5 at batch 1: 16) XLA's convolution stays; LeNet5's
    inference, us a call, XLA's / banded: batch 1 62 / 99, 2 106-116 / 87-89, 16 258-302 /
    279-282, 256 2302-2547 / 1979-1985. Elsewhere XLA's convolution is faster, so it stays: 3
    -> 64 3x3 at 224x224 (batch 16) 97 ms against 123-161 in pieces of 1-8 columns; 8 -> 32
    3x3 at 28x28 (batch 64) 1.8 against 2.7-3.7 ms."""
    padded_width = x_shape[2] + sum(padding[1])
    return (kernel_shape[2] <= IM2COL_MAX_INPUT_CHANNELS and stride == (1, 1)
            and padded_width <= BANDED_MAX_WIDTH_RATIO * ((kernel_shape[1] - 1) * dilation[1] + 1))


def _input_term_cpu(x_dot, kernel, *, stride, padding, dilation, groups):
    """The convolution as a function of its input, whose transpose is the input's gradient
    on CPU. A 1x1 unpadded kernel: :func:`_pointwise_dot`. Otherwise it reads the kernel as
    (h, w, out, in), so that the input's gradient is a convolution with an (h, w, in, out)
    kernel; and for a stride-1 kernel with few input channels, it is the im2col form
    (:func:`_im2col_conv`), whose transpose is one matrix product to kh x kw x cin columns
    and a sum of the kh x kw shifted column blocks. XLA:CPU's input gradient is a
    convolution with cin output channels, slow for small cin. Input gradient alone, XLA's /
    im2col (2 cores): LeNet5's conv2 (6 -> 16, 5x5, batch 256) 4.7 / 2.3 ms (torch 1.8); 3
    -> 64 3x3 at 224x224, batch 16, 134 / 60 ms; 8 -> 32 3x3 at 56x56, batch 32, 8.3 / 6.7
    ms. With 16 input channels XLA's is 2x faster; with a stride, each tap's block is spread
    over the input's size, and XLA's wins (AlexNet's 11x11 stride 4: 78 / 152 ms). The
    im2col form reads the tangent through :func:`_held` (its predicate, the kernel's first
    entry, decides nothing), so that the sum of blocks is written once: XLA fused it into
    LeNet5's 2x2 max-pool gradient, which reads each value four times, and recomputed it
    for each read (train step, batch 256, interleaved: 14.0 -> 13.3 and 11.5 -> 10.5 ms).
    Where the padded input is at most ``BANDED_MAX_WIDTH_RATIO`` times the kernel's span
    wide, the banded-rows form (:func:`_banded_rows_conv`) takes im2col's place: its
    transpose sums kh blocks of whole rows instead of kh x kw blocks of a few channels
    (LeNet5's train step, batch 256: 10.1 -> 7.7 ms in the profiler; in the benchmark, old
    and new processes alternating twice, its train ratio 1.06-1.08x -> 1.31-1.33x and its
    epoch's 1.16x -> 1.48-1.67x)."""
    if _is_pointwise(kernel.shape, padding):
        return _pointwise_dot(x_dot, kernel, stride)
    if kernel.shape[2] <= IM2COL_MAX_INPUT_CHANNELS and stride == (1, 1):
        x_dot = _held(x_dot, jnp.isfinite(kernel[0, 0, 0, 0]))
        if _is_banded(x_dot.shape, kernel.shape, stride, padding, dilation):
            return _banded_rows_conv(x_dot, kernel, padding, dilation)
        return _im2col_conv(x_dot, kernel, stride, padding, dilation)
    return lax.conv_general_dilated(x_dot, kernel.transpose(0, 1, 3, 2), window_strides=stride, padding=padding,
                                    rhs_dilation=dilation, dimension_numbers=("NHWC", "HWOI", "NHWC"))


# A strided float32 convolution without dilation takes its input's gradient from stride x
# stride phases on CPU (see _phased_input_gradient) if it is grouped (or depthwise), or
# dense with at least this many input channels; with fewer, a dense one's phases have too
# few output channels (3 -> 32, 3x3 stride 2 at 224x224, batch 8: XLA's 4 ms, phases 12 ms).
PHASES_MIN_INPUT_CHANNELS = 9


def _is_phased(kernel_shape, *, stride, padding, dilation, groups) -> bool:
    return (stride != (1, 1) and dilation == (1, 1) and not _is_pointwise(kernel_shape, padding)
            and (groups > 1 or kernel_shape[2] >= PHASES_MIN_INPUT_CHANNELS))


def _phase_taps(k: int, s: int, pad_low: int, phase: int, size: int, g_size: int):
    """For the input rows ``phase, phase + s, ...`` of a stride-``s`` convolution: the kernel
    rows that reach them, in the order a stride-1 correlation of the output gradient reads
    them, and that correlation's (low, high) padding; ``None`` where no kernel row does.

    Input row ``s * a + phase`` meets kernel row ``r`` at output row ``a + (pad_low + phase -
    r) / s`` wherever that is a whole number, so the rows ``r`` of one phase are ``s`` apart
    and their output offsets consecutive."""
    rows = [r for r in range(k) if (pad_low + phase - r) % s == 0][::-1]   # offsets ascending
    if not rows:
        return None
    first, last = ((pad_low + phase - r) // s for r in (rows[0], rows[-1]))
    count = len(range(phase, size, s))
    return rows, (-first, count - 1 + last - (g_size - 1))


def _phased_input_gradient(g, kernel, input_shape, stride, padding, groups=1):
    """The input gradient of a strided (dilation-1) convolution as stride x stride stride-1
    convolutions of the output gradient, one per phase of the input -- the rows ``p, p + s,
    ...`` and columns ``q, q + s, ...`` -- each with the kernel taps that reach that phase
    (for 3x3 stride 2: 1, 2, 2 and 4 taps), interleaved into the input's shape. A grouped
    one's phases are grouped forwards (:func:`_grouped_forward`: tap sums or XLA's).

    XLA's input gradient is one convolution of the output gradient spread out by the stride
    (zeros between), and XLA:CPU multiplies the zeros too. Input gradient alone, 2 cores,
    XLA's / phases, ms: ResNet-50's 3x3 stride-2 layers at batch 16, 56x56x128 57-72 / 22,
    28x28x256 23 / 20, 14x14x512 24 / 21; ResNet-18's at batch 32, 56x56x64 <- 128 60 / 32,
    28x28x128 <- 256 37 / 20; Inception-v3's 35x35x288 <- 384 (3x3 stride 2, unpadded) 180
    / 129 (torch's 56x56x64 <- 128: 45 ms). Grouped, at batch 32, the stride-spread
    gradient's forward / phases: ResNeXt-50's 3x3 layers at 56x56x256 (8 channels a group)
    177 / 85, 28x28x512 (16) 114 / 84, 14x14x1024 (32) 36 / 21; EfficientNet-B0's depthwise
    5x5 at 56x56x144 32 / 15 and 14x14x672 7.4 / 4.3, 3x3 at 112x112x96 100-132 / 107-135.
    Each phase's convolution is written in XLA:CPU's own order (kernel (h, w, in, out))."""
    n, h, w, cin = input_shape
    full = tuple(-(-size // s) for size, s in zip((h, w), stride))       # rows of the largest phase
    zero = jnp.zeros((), g.dtype)
    phase_rows = []
    for p in range(stride[0]):
        phase_row = []
        for q in range(stride[1]):
            taps = [_phase_taps(kernel.shape[i], stride[i], padding[i][0], phase, (h, w)[i], g.shape[1 + i])
                    for i, phase in ((0, p), (1, q))]
            size = (len(range(p, h, stride[0])), len(range(q, w, stride[1])))
            if None in taps:
                out = jnp.zeros((n, *size, cin), g.dtype)
            else:
                (rows, pad_h), (cols, pad_w) = taps
                # the taps s apart, in descending order: (th, tw, a group's out, in)
                sub = kernel[rows[-1]:rows[0] + 1:stride[0], cols[-1]:cols[0] + 1:stride[1]][::-1, ::-1]
                sub = _transposed_per_group(sub, groups)
                # negative padding crops the gradient first; the convolution pads the rest
                cropped = lax.pad(g, zero, ((0, 0, 0), (min(pad_h[0], 0), min(pad_h[1], 0), 0),
                                            (min(pad_w[0], 0), min(pad_w[1], 0), 0), (0, 0, 0)))
                pads = (tuple(max(v, 0) for v in pad_h), tuple(max(v, 0) for v in pad_w))
                if groups > 1:
                    out = _grouped_forward(cropped, sub, (1, 1), pads, (1, 1), groups)
                else:
                    out = _xla_conv(cropped, sub, (1, 1), pads, (1, 1))
            phase_row.append(lax.pad(out, zero, ((0, 0, 0), (0, full[0] - size[0], 0),
                                                 (0, full[1] - size[1], 0), (0, 0, 0))))
        phase_rows.append(jnp.stack(phase_row, axis=3))                    # (n, A, B, sw, in)
    dx = jnp.stack(phase_rows, axis=2)                                     # (n, A, sh, B, sw, in)
    return dx.reshape(n, full[0] * stride[0], full[1] * stride[1], cin)[:, :h, :w]


def _input_gradient(input_term, g, kernel, *, input_shape, **conv):
    """The transpose of ``input_term`` (a function of the input) applied to ``g``."""
    x = jax.ShapeDtypeStruct(input_shape, g.dtype)
    return jax.linear_transpose(lambda a: input_term(a, kernel, **conv), x)(g)[0]


def _kernel_gradient(kernel_term, x, g, *, kernel_shape, **conv):
    """The transpose of ``kernel_term`` (a function of the kernel) applied to ``g``."""
    kernel = jax.ShapeDtypeStruct(kernel_shape, g.dtype)
    return jax.linear_transpose(lambda k: kernel_term(x, k, **conv), kernel)(g)[0]


def _platform_primitive(name: str, cpu: Callable, default: Callable, shape: Callable):
    """A primitive lowered to ``cpu(*operands, **params)`` on CPU and to ``default`` elsewhere;
    ``shape(*operand_shapes, **params)`` is its result's shape (in its first operand's dtype).
    Eager calls compile it alone; under vmap it is both functions in a
    ``lax.platform_dependent``."""
    primitive = Primitive(name)
    primitive.def_impl(partial(xla.apply_primitive, primitive))
    primitive.def_abstract_eval(
        lambda *avals, **params: jax.core.ShapedArray(shape(*(a.shape for a in avals), **params), avals[0].dtype))
    mlir.register_lowering(primitive, mlir.lower_fun(cpu, multiple_results=False), platform="cpu")
    mlir.register_lowering(primitive, mlir.lower_fun(default, multiple_results=False))

    def batched(operands, axes, **params):
        def one(*a):
            return lax.platform_dependent(*a, cpu=partial(cpu, **params), default=partial(default, **params))
        return jax.vmap(one, in_axes=axes)(*operands), 0
    batching.primitive_batchers[primitive] = batched
    return primitive


def _conv_output_shape(x_shape, kernel_shape, *, stride, padding, dilation, groups):
    kh, kw, cin_group, cout = kernel_shape
    spans = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1, cin_group, cout)
    return tuple(int(d) for d in lax.conv_general_shape_tuple(x_shape, spans, stride, padding,
                                                              ("NHWC", "HWIO", "NHWC")))


# conv(x, kernel) -> y; input_gradient(g, kernel) -> dx; kernel_gradient(x, g) -> dkernel
_conv_p = _platform_primitive("jaxconv_conv", _conv_cpu, _conv_default, _conv_output_shape)
_conv_input_gradient_p = _platform_primitive(
    "jaxconv_conv_input_gradient", _conv_input_gradient_cpu, partial(_input_gradient, _conv_default),
    lambda g_shape, kernel_shape, *, input_shape, **conv: input_shape)
_conv_kernel_gradient_p = _platform_primitive(
    "jaxconv_conv_kernel_gradient", _conv_kernel_gradient_cpu, partial(_kernel_gradient, _conv_default),
    lambda x_shape, g_shape, *, kernel_shape, **conv: kernel_shape)


def _shape(operand) -> tuple[int, ...]:
    return tuple(operand.aval.shape)


ad.defbilinear(
    _conv_p,
    lambda ct, x, kernel, **conv: _conv_input_gradient_p.bind(ct, kernel, input_shape=_shape(x), **conv),
    lambda ct, x, kernel, **conv: _conv_kernel_gradient_p.bind(x, ct, kernel_shape=_shape(kernel), **conv))
ad.defbilinear(
    _conv_input_gradient_p,
    lambda ct, g, kernel, *, input_shape, **conv: _conv_p.bind(ct, kernel, **conv),
    lambda ct, g, kernel, *, input_shape, **conv: _conv_kernel_gradient_p.bind(
        ct, g, kernel_shape=_shape(kernel), **conv))
ad.defbilinear(
    _conv_kernel_gradient_p,
    lambda ct, x, g, *, kernel_shape, **conv: _conv_input_gradient_p.bind(g, ct, input_shape=_shape(x), **conv),
    lambda ct, x, g, *, kernel_shape, **conv: _conv_p.bind(x, ct, **conv))


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC input with an HWIO kernel.

    ``padding`` is an int, a pair (symmetric per dim), explicit ((top, bottom),
    (left, right)) pairs, or the string ``'SAME'`` for TensorFlow-trained weights.
    Grouped and depthwise convolutions use ``groups`` (XLA's feature_group_count).
    """
    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: Any = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_ch = x.shape[-1]
        if in_ch % self.groups or self.features % self.groups:
            raise ValueError(f"{self.name}: channels in={in_ch} out={self.features} are not "
                             f"divisible by groups={self.groups}")
        kh, kw = _pair(self.kernel_size)
        fan_in = (in_ch // self.groups) * kh * kw
        kernel = param(self, "kernel", self.kernel_init or torch_default_kernel_init(),
                       (kh, kw, in_ch // self.groups, self.features), self.param_dtype)
        if isinstance(self.padding, str):
            pads = self.padding
        else:
            pads = _padding_pairs(self.padding, f"Conv2d {self.name}")
            stride, dil = _pair(self.stride), _pair(self.dilation)
            for dim, k, s, p, d in zip(x.shape[1:3], (kh, kw), stride, pads, dil):
                if dim + p[0] + p[1] < d * (k - 1) + 1:
                    raise ValueError(f"Conv2d {self.name}: input {_dims(x.shape[1:3])} is too "
                                     f"small for a {kh}x{kw} kernel with padding {pads}")
        y = convolve(x.astype(self.dtype), kernel.astype(self.dtype), _pair(self.stride), pads,
                     _pair(self.dilation), self.groups)
        if self.use_bias:
            bias = param(self, "bias", self.bias_init or torch_default_bias_init(fan_in),
                         (self.features,), self.param_dtype)
            y = add_bias(y, bias.astype(self.dtype))
        return y

    def torch_repr(self, in_shape) -> str:
        kh, kw = _pair(self.kernel_size)
        text = (f"Conv2d({in_shape[-1]}, {self.features}, kernel_size=({kh}, {kw}), "
                f"stride={_pair(self.stride)}")
        if isinstance(self.padding, str):
            text += f", padding='{self.padding}'"
        else:
            pads = _padding_pairs(self.padding, "Conv2d")
            if any(p != (0, 0) for p in pads):
                sym = all(p[0] == p[1] for p in pads)
                text += f", padding={(pads[0][0], pads[1][0]) if sym else pads}"
        if _pair(self.dilation) != (1, 1):
            text += f", dilation={_pair(self.dilation)}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if not self.use_bias:
            text += ", bias=False"
        return text + ")"

    def macs(self, in_shape, out_shape) -> int:
        kh, kw = _pair(self.kernel_size)
        return int(np.prod(out_shape[1:])) * kh * kw * (in_shape[-1] // self.groups)


def dense(x, kernel):
    """``x @ kernel`` over ``x``'s last axis (``kernel`` is (in, out)).

    On CPU in float32 the product runs as XLA's 1x1 convolution, its gradients as matrix
    products. Under jaxconv's YNNPACK flag (:mod:`jaxconv.runtime`) a matrix product with
    few rows and a large kernel spends most of its time repacking the kernel: AlexNet's
    first classifier layer (9216 -> 4096), batch 16, 55 ms as a product against 23 ms as
    XLA's convolution; VGG-16's (25088 -> 4096) at batch 32, 271 against 97 ms. Of the
    gradients, the input's (reading the kernel along its rows) is fastest as a product (42
    ms against 186 as a convolution's transpose at 9216 -> 4096, batch 32) and the kernel's
    is the same either way (82 ms), so the derivative is written with products (Intel
    Cascade Lake host, 2 cores; BENCHMARKS.md)."""
    if jnp.dtype(x.dtype) != jnp.float32 or jnp.dtype(kernel.dtype) != jnp.float32:
        return jnp.dot(x, kernel)
    rows = x.reshape(-1, x.shape[-1])
    return _dense_float32(rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1])


@jax.custom_jvp
def _dense_float32(rows, kernel):
    return lax.platform_dependent(rows, kernel, cpu=_dense_as_convolution, default=jnp.dot)


def _dense_as_convolution(rows, kernel):
    return _xla_conv(rows[:, None, None, :], kernel[None, None], (1, 1), ((0, 0), (0, 0)), (1, 1))[:, 0, 0, :]


@partial(_dense_float32.defjvp, symbolic_zeros=True)
def _dense_float32_jvp(primals, tangents):
    rows, kernel = primals
    rows_dot, kernel_dot = tangents
    terms = [jnp.dot(r, k) for r, k in ((rows_dot, kernel), (rows, kernel_dot))
             if not isinstance(r if r is rows_dot else k, jax.custom_derivatives.SymbolicZero)]
    return _dense_float32(rows, kernel), sum(terms[1:], terms[0])


class Linear(nn.Module):
    """torch.nn.Linear with the kernel stored as (in, out) = torch's ``weight.T``."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        fan_in = x.shape[-1]
        kernel = param(self, "kernel", self.kernel_init or torch_default_kernel_init(),
                       (fan_in, self.features), self.param_dtype)
        y = dense(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param(self, "bias", self.bias_init or torch_default_bias_init(fan_in),
                         (self.features,), self.param_dtype)
            y = add_bias(y, bias.astype(self.dtype))
        return y

    def torch_repr(self, in_shape) -> str:
        return f"Linear(in_features={in_shape[-1]}, out_features={self.features}, bias={self.use_bias})"

    def macs(self, in_shape, out_shape) -> int:
        return int(np.prod(in_shape[1:])) * self.features


def _batch_norm_affine(scale, bias, mean, var, eps):
    """BatchNorm as one multiply-add: ``(alpha, beta)`` with ``y = x * alpha + beta``."""
    alpha = scale * lax.rsqrt(var + eps)
    return alpha, bias - mean * alpha


# How wide a row _column_sum's product reads: up to this many values, and up to
# _COLUMN_SUM_FOLD rows of the array laid side by side.
_COLUMN_SUM_WIDTH = 16384
_COLUMN_SUM_FOLD = 64


def _column_fold(rows: int, columns: int) -> int:
    """How many consecutive rows of a (rows, columns) array :func:`_column_sum` reads as one
    row: the largest power of two that divides ``rows``, at most
    ``_COLUMN_SUM_FOLD`` and ``_COLUMN_SUM_WIDTH / columns``."""
    fold = 1
    while (fold < _COLUMN_SUM_FOLD and rows % (2 * fold) == 0
           and 2 * fold * columns <= _COLUMN_SUM_WIDTH):
        fold *= 2
    return fold


def _column_sum_by_dot(rows):
    ones = jnp.ones((rows.shape[0],), rows.dtype)
    return jnp.dot(ones, rows, precision=lax.Precision.HIGHEST)


def _column_sum_by_reduction(rows):
    return jnp.sum(rows, axis=0)


def _column_sum(rows, fold: bool = True):
    """Column sums of a 2-d array: on CPU a matrix-vector product with ones (XLA:CPU's
    reductions over the leading axis run at a fraction of its GEMV: batch 16, 14x14x1024,
    29 ms against 2.5 ms for both statistics; torch's whole train-mode BatchNorm: 5.2 ms);
    elsewhere (GPU, TPU, where a float32 dot may round its inputs) a plain reduction.

    With ``fold``, either reads the array with several consecutive rows as one
    (:func:`_column_fold`; a free reshape) and adds each column's partial sums after. For
    an array in memory the wider, shorter product is faster and its sums shorter:
    XLA:CPU, float32, ms, one row / folded: 32x56x56 rows of 64 columns 1.44 / 0.52, of
    256 columns 7.8 / 3.3; 32x112x112 of 64 11.0 / 4.0; 32x14x14 of 1024 0.64 / 0.41;
    256x24x24 of 6 (LeNet5's first convolution) 0.60 / 0.05. For an elementwise result
    that XLA computes into the product's operand, pass ``fold=False``: XLA:CPU's loops
    run slower writing the folded rows (16x56x56x64, a square's sums: 1.0 / 1.2 ms)."""
    n, c = rows.shape
    fold = _column_fold(n, c) if fold else 1
    sums = lax.platform_dependent(rows.reshape(n // fold, fold * c), cpu=_column_sum_by_dot,
                                  default=_column_sum_by_reduction)
    return sums.reshape(fold, c).sum(0)


def _bias_rows_by_dot(bias, shape):
    n, c = int(np.prod(shape[:-1])), shape[-1]
    fold = _column_fold(n, c)
    ones = jnp.ones((n // fold, 1), bias.dtype)
    rows = lax.dot_general(ones, jnp.tile(bias, fold)[None], (((1,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST)
    return rows.reshape(shape)


def add_bias(y, bias):
    """``y + bias`` over the last axis; on CPU for float32, the bias's gradient (the column
    sums of the output's gradient) is :func:`_column_sum`'s product.

    The forward is a plain broadcast add. Its tangent broadcasts the bias's tangent as the
    outer product of ones with it, in the folded rows that :func:`_column_sum` reads, so
    the transpose -- the gradient -- is the product of ones with the gradient's rows. The
    transpose of a plain broadcast is XLA:CPU's reduction over the leading axes, at a
    fraction of the product's speed (LeNet5's first convolution, batch 256: 0.39 against
    0.05 ms; 32x112x112x64, VGG-16's first two: 19 against 3-4 ms). The output's gradient
    leaves through :func:`_held`: XLA would otherwise compute it into the product's folded
    rows (an index order its loops run at a seventh of their speed there) and again into
    each other reader. Forward mode, vmap and higher derivatives follow from JAX's rules."""
    if y.dtype != jnp.float32 or not y.size:
        return y + bias
    return lax.platform_dependent(y, bias, cpu=_add_bias_by_dot, default=jnp.add)


@jax.custom_jvp
def _add_bias_by_dot(y, bias):
    return y + bias


@_add_bias_by_dot.defjvp
def _add_bias_by_dot_jvp(primals, tangents):
    (y, bias), (dy, dbias) = primals, tangents
    return y + bias, _held(dy + _bias_rows_by_dot(dbias, y.shape), jnp.isfinite(bias[0]))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, eps):
    """Train-mode BatchNorm over the last axis: ``(y, batch mean, biased batch variance)``,
    with a hand-written gradient (which also carries the cotangents of the statistics).

    The per-channel sums of the statistics and of the gradient are :func:`_column_sum`, the
    one part that differs between platforms. Only those sums sit under
    ``lax.platform_dependent``: differentiating a platform-dependent conditional traces,
    linearises and transposes both branches, which made tracing ResNet-50's train step
    take seconds when the whole BatchNorm was the conditional."""
    y, mean, var, _ = _batch_norm_train_forward(x, scale, bias, eps)
    return y, mean, var


# The forward and the gradient are jitted, so that JAX traces each once per shape and
# autodiff, partial evaluation and lowering see one call where there were ~25 operations
# and two conditionals: a model has many BatchNorms of few shapes. ResNet-50's train step
# (b32, min of 8): trace 0.77-0.78 -> 0.61-0.66 s, lower 0.32-0.33 -> 0.25-0.27 s. XLA
# inlines the calls: the compiled program is the same.
@partial(jax.jit, static_argnums=(3,))
def _batch_norm_train_forward(x, scale, bias, eps):
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    mean = _column_sum(rows) / count                     # rows: the input, in memory
    centred = rows - mean
    var = _column_sum(jnp.square(centred), fold=False) / count       # two-pass, biased
    alpha, beta = _batch_norm_affine(scale, bias, mean, var, eps)
    return (rows * alpha + beta).reshape(x.shape), mean, var, lax.rsqrt(var + eps)


def _batch_norm_train_fwd(x, scale, bias, eps):
    y, mean, var, rstd = _batch_norm_train_forward(x, scale, bias, eps)
    return (y, mean, var), (x, scale, mean, rstd)


def _batch_norm_train_bwd(eps, residuals, cotangents):
    return _batch_norm_train_grads(*residuals, *cotangents)


@jax.jit
def _batch_norm_train_grads(x, scale, mean, rstd, g_y, g_mean, g_var):
    rows, g = x.reshape(-1, x.shape[-1]), g_y.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    centred = rows - mean
    xhat = centred * rstd
    g_bias = _column_sum(g, fold=False)
    g_scale = _column_sum(g * xhat, fold=False)
    g_x = (scale * rstd) * (g - g_bias / count - xhat * (g_scale / count))
    g_x = g_x + g_mean / count + centred * (2 * g_var / count)
    return g_x.reshape(x.shape), g_scale, g_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d over the last (channel) axis.

    ``momentum`` follows Flax's convention, ``1 - torch's`` (torch's 0.1 is 0.9 here).
    In train mode the batch is normalised with its biased variance and
    ``batch_stats['var']`` is updated with the unbiased one, as torch does. Statistics
    are kept in ``param_dtype`` and computed in at least float32 whatever ``dtype`` is
    (train mode: :func:`batch_norm_train`). Under ``jax.jit`` with a sharded batch the
    statistics are global automatically.

    A BatchNorm2d whose variables hold only ``params/bias`` (no ``scale``, no
    statistics) has been folded into the convolution before it by :func:`jaxconv.fuse_bn`
    and adds that bias (inference only).
    """
    eps: float = 1e-5
    momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        if not self.is_initializing() and not self.has_variable("params", "scale"):
            # folded into the preceding convolution by jaxconv.fuse_bn: a bias is all that is left
            if train:
                raise ValueError(f"BatchNorm2d {self.name} was folded by fuse_bn (inference only); "
                                 f"train with the unfused variables")
            bias = param(self, "bias", self.bias_init, (c,), self.param_dtype)
            return x.astype(self.dtype) + bias.astype(self.dtype)
        scale = param(self, "scale", self.scale_init, (c,), self.param_dtype)
        bias = param(self, "bias", self.bias_init, (c,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", nn.initializers.zeros, None,
                                     (c,), self.param_dtype)
        running_var = self.variable("batch_stats", "var", nn.initializers.ones, None,
                                    (c,), self.param_dtype)
        stat_dtype = jnp.promote_types(self.param_dtype, jnp.promote_types(x.dtype, jnp.float32))
        if train:
            count = x.size // c
            if count < 2:
                raise ValueError(f"BatchNorm2d {self.name}: expected more than 1 value per "
                                 f"channel when training, got input shape {x.shape}")
            y, mean, var = batch_norm_train(x.astype(stat_dtype), scale.astype(stat_dtype),
                                            bias.astype(stat_dtype), self.eps)
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = (m * running_mean.value + (1 - m) * mean).astype(self.param_dtype)
                unbiased = var * (count / (count - 1))
                running_var.value = (m * running_var.value + (1 - m) * unbiased).astype(self.param_dtype)
            return y.astype(self.dtype)
        mean = running_mean.value.astype(stat_dtype)
        var = running_var.value.astype(stat_dtype)
        alpha, beta = _batch_norm_affine(scale.astype(stat_dtype), bias.astype(stat_dtype), mean, var, self.eps)
        return x.astype(self.dtype) * alpha.astype(self.dtype) + beta.astype(self.dtype)

    def torch_repr(self, in_shape) -> str:
        return (f"BatchNorm2d({in_shape[-1]}, eps={self.eps:g}, "
                f"momentum={1 - self.momentum:.4g}, affine=True)")

    def macs(self, in_shape, out_shape) -> int:
        return 0


class ReLU(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.relu(x)

    def torch_repr(self, in_shape) -> str:
        return "ReLU()"

    def macs(self, in_shape, out_shape) -> int:
        return 0


class Dropout(nn.Module):
    """torch.nn.Dropout: active only in train mode, drawing from the ``'dropout'`` rng."""
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dropout(self.rate, deterministic=not train)(x)

    def torch_repr(self, in_shape) -> str:
        return f"Dropout(p={self.rate})"

    def macs(self, in_shape, out_shape) -> int:
        return 0


class MaxPool2d(nn.Module):
    """torch.nn.MaxPool2d, ``ceil_mode`` included (the overhang pads with -inf)."""
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: int | Sequence[int] = 0
    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        (kh, kw), (sh, sw) = _pair(self.kernel_size), _pair(self.stride or self.kernel_size)
        ph, pw = _pair(self.padding)
        if ph > kh // 2 or pw > kw // 2:
            raise ValueError(f"MaxPool2d: padding {(ph, pw)} must be at most half the kernel {(kh, kw)}")
        _, pad_h = _window_output(x.shape[1], kh, sh, ph, ceil_mode=self.ceil_mode, what="MaxPool2d")
        _, pad_w = _window_output(x.shape[2], kw, sw, pw, ceil_mode=self.ceil_mode, what="MaxPool2d")
        return max_pool(x, (kh, kw), (sh, sw), (pad_h, pad_w))

    def torch_repr(self, in_shape) -> str:
        k, s = _pair(self.kernel_size), _pair(self.stride or self.kernel_size)
        one = lambda v: v[0] if v[0] == v[1] else v  # noqa: E731
        return (f"MaxPool2d(kernel_size={one(k)}, stride={one(s)}, padding={one(_pair(self.padding))}, "
                f"dilation=1, ceil_mode={self.ceil_mode})")

    def macs(self, in_shape, out_shape) -> int:
        return 0


def max_pool(x, window, strides, padding):
    """Max pooling of NHWC input over explicit ``padding`` pairs (padded taps never win).

    The gradient goes to the first maximum of each window in row-major order, as torch's
    does. XLA's own gradient of a max pool (select-and-scatter) already does so, but
    XLA:CPU expands it into int32 index maps of the padded input and a five-output
    reduce-window, at 2-4 times torch's time; on CPU floating-point pools therefore take
    :func:`_max_pool_by_taps`. Elsewhere it is XLA's reduce-window and its own gradient."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return _reduce_window_max(x, window, strides, padding)
    return lax.platform_dependent(
        x, cpu=partial(_max_pool_by_taps, window=window, strides=strides, padding=padding),
        default=partial(_reduce_window_max, window=window, strides=strides, padding=padding))


def _reduce_window_max(x, window, strides, padding):
    # a numpy constant, so that JAX recognises the max monoid (and can differentiate it)
    init = np.array(-np.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min, x.dtype)
    return lax.reduce_window(x, init, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool_by_taps(x, window, strides, padding):
    """The max pool with a JVP that takes, for each window, the tangent at its first maximum.

    That JVP is linear in the tangent (slices and selects), so reverse mode follows by
    transposition, and forward mode (``jax.jvp``) works as well. The tangent is read in
    phases (see the rule) so that the transposed gradient is a few unstrided pads.
    Gradient alone against select-and-scatter on XLA:CPU, batch 32: 3x3 stride 2 at
    112x112x64 668 -> 310 ms (torch 276), 2x2 at 224x224x64 1827 -> 714 ms (torch 758).
    Where windows overlap (several shifts), the output's tangent leaves through
    :func:`_held`, so that the gradient reaching the pool is computed once and not inside
    each shift's pad (DenseNet-121's first pool: its six BatchNorm gradients, four times).

    The output alone (an inference call) is a chain of maxima over the window's taps where
    the input has at least ``POOL_TAPS_MIN_CHANNELS`` channels (:func:`_maximum_of_taps`)."""
    if x.shape[-1] < POOL_TAPS_MIN_CHANNELS:
        return _reduce_window_max(x, window, strides, padding)
    return _maximum_of_taps(x, window, strides, padding)


# On CPU a max pool's output alone is a chain of maxima over its taps from this many channels
# up; with fewer, XLA's reduce-window (see _maximum_of_taps).
POOL_TAPS_MIN_CHANNELS = 9


def _maximum_of_taps(x, window, strides, padding):
    """The max pool's output as one elementwise chain of maxima over the window's strided
    taps (padded with -inf), which XLA:CPU runs at a fraction of its reduce-window's time.
    Batch 16, with a BatchNorm-ReLU producer, ms, reduce-window / taps: 2x2 at 224x224x64
    (VGG-16's first) 87.4 / 21.5, at 112x112x128 42.7 / 5.3, at 56x56x256 24.5 / 3.9; 3x3
    stride 2 at 112x112x64 (ResNet's) 24.7 / 20.1; 3x3 stride 1 at 28x28x256 (GoogLeNet's
    inception) 8.7 / 3.3; 3x3 stride 2 at 55x55x64 (AlexNet's first) 2.5 / 0.8. With few
    channels the taps' loops are short and the reduce-window wins (LeNet5's 24x24x6, batch
    256: 0.35 / 0.63; 8 channels 0.58 / 0.86; 12 channels 1.66 / 0.70). The same values: the
    maximum is a NaN wherever the window holds one, as ``lax.max`` and torch's pool give.

    A strided pool's taps each pad their own slice (:func:`_conv_taps`), so that no padded
    copy of the input is written: 3x3 stride 2 at 112x112x64, batch 16, 20.3 -> 2.8 ms; with
    ceil mode at 56x56x192 16.1 -> 2.8 ms. (Not in training, :func:`_first_maximum`: there
    forward and gradient took longer, 68.2 -> 76.1 and 40.6 -> 49.4 ms.)"""
    taps, _ = _conv_taps(x, *window, strides, padding, (1, 1), pad_value=-np.inf, pad_each=tuple(strides) != (1, 1))
    y = taps[0]
    for tap in taps[1:]:
        y = lax.max(y, tap)
    return y


def _first_maximum(x, window, strides, padding):
    """The max pool's output and, for each window, the tap its gradient goes to, as one
    chain of selects over the window's taps.

    torch's rule: the index starts at the window's first tap inside the input, and a tap
    takes it over when it is greater than the running maximum or NaN -- so the first of
    tied maxima wins, a NaN maximum goes to the window's last NaN, a window of -inf only
    to its first tap inside the input; padding (-inf here) never wins. XLA writes the
    output and the index from one elementwise loop each over the taps, instead of a
    reduce-window, a score per tap, their stack and an argmax. Forward and
    gradient at batch 32, ms, before / after (torch): 3x3 stride 1 at 28x28x192 (GoogLeNet's
    inception pools) 64.6 / 18.7 (63.1); 3x3 stride 2 at 112x112x64 143.7 / 69.5 (147.2)."""
    (kh, kw), (sh, sw) = window, strides
    taps, (oh, ow) = _conv_taps(x, kh, kw, strides, padding, (1, 1), pad_value=-np.inf)
    index_dtype = np.int8 if kh * kw <= 127 else np.int32
    row_starts, col_starts = np.arange(oh) * sh - padding[0][0], np.arange(ow) * sw - padding[1][0]
    inside_row, inside_col = np.maximum(row_starts, 0) - row_starts, np.maximum(col_starts, 0) - col_starts
    start = (inside_row[:, None] * kw + inside_col[None, :]).astype(index_dtype)
    y = jnp.full(taps[0].shape, -np.inf, x.dtype)
    first = jnp.broadcast_to(start[None, :, :, None], taps[0].shape)
    for t, tap in enumerate(taps):
        takes = (tap > y) | jnp.isnan(tap)
        y = jnp.where(takes, tap, y)
        first = jnp.where(takes, np.array(t, index_dtype), first)
    return y, first


@_max_pool_by_taps.defjvp
def _max_pool_by_taps_jvp(window, strides, padding, primals, tangents):
    (x,), (dx,) = primals, tangents
    (kh, kw), (sh, sw) = window, strides
    n, h, w, c = x.shape
    y, first = _first_maximum(x, window, strides, padding)
    oh, ow = y.shape[1:3]
    if x.size:  # written to memory once: fused into the gradient's shifts, the chain ran in each
        first = _held(first, jnp.isfinite(x[0, 0, 0, 0]))
    # The tangent in phases: padded row r = sh * u + p is phases[:, u, p], and likewise for
    # columns, so tap (i, j) = (sh * a + p, sw * b + q) of window (o, o') is phases[:, o + a, p,
    # o' + b, q]. One contiguous slice per shift (a, b) serves every tap with that shift;
    # transposed (the gradient), each shift is one unstrided pad, ceil(k / s)^2 of them
    # (4 for a 3x3 stride-2 pool, 1 where kernel == stride) instead of one interior-padded
    # array of the input's size per tap.
    shifts_h, shifts_w = -(-kh // sh), -(-kw // sw)
    uh = max(shifts_h - 1 + oh, -(-(h + padding[0][0]) // sh))
    uw = max(shifts_w - 1 + ow, -(-(w + padding[1][0]) // sw))
    dxp = lax.pad(dx, jnp.zeros((), dx.dtype), ((0, 0, 0), (padding[0][0], sh * uh - h - padding[0][0], 0),
                                                (padding[1][0], sw * uw - w - padding[1][0], 0), (0, 0, 0)))
    phases = dxp.reshape(n, uh, sh, uw, sw, c)
    first = first[:, :, None, :, None, :]
    dy = None
    for a in range(shifts_h):
        for b in range(shifts_w):
            tap = np.full((sh, sw), -1, first.dtype)     # the tap at each phase for this shift
            for p in range(min(sh, kh - sh * a)):
                for q in range(min(sw, kw - sw * b)):
                    tap[p, q] = (sh * a + p) * kw + sw * b + q
            taken = first == tap[None, None, :, None, :, None]
            part = jnp.where(taken, phases[:, a:a + oh, :, b:b + ow], jnp.zeros((), dx.dtype)).sum((2, 4))
            dy = part if dy is None else dy + part
    if shifts_h * shifts_w > 1 and y.size:
        dy = _held(dy, jnp.isfinite(y[0, 0, 0, 0]))
    return y, dy


def avg_pool_divisor(size_hw, kernel, stride, padding, ceil_mode, count_include_pad) -> np.ndarray:
    """torch's per-window divisor for AvgPool2d, as an (out_h, out_w) array.

    A window's divisor counts the padding it covers when ``count_include_pad`` (but
    never the ceil-mode overhang past the right/bottom padding), else only the input
    cells it covers.
    """
    per_dim = []
    for size, k, s, p in zip(size_hw, kernel, stride, padding):
        out, _ = _window_output(size, k, s, p, ceil_mode=ceil_mode, what="AvgPool2d")
        start = np.arange(out) * s - p
        end = np.minimum(start + k, size + p)
        with_pad = end - start
        inside = np.minimum(end, size) - np.maximum(start, 0)
        per_dim.append(with_pad if count_include_pad else inside)
    return np.outer(per_dim[0], per_dim[1]).astype(np.float64)


class AvgPool2d(nn.Module):
    """torch.nn.AvgPool2d: ``count_include_pad`` and torch's divisor under ``ceil_mode``."""
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: int | Sequence[int] = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, s, p = _pair(self.kernel_size), _pair(self.stride or self.kernel_size), _pair(self.padding)
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            raise ValueError(f"AvgPool2d: padding {p} must be at most half the kernel {k}")
        _, pad_h = _window_output(x.shape[1], k[0], s[0], p[0], ceil_mode=self.ceil_mode, what="AvgPool2d")
        _, pad_w = _window_output(x.shape[2], k[1], s[1], p[1], ceil_mode=self.ceil_mode, what="AvgPool2d")
        total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, (1, *k, 1), (1, *s, 1),
                                  ((0, 0), pad_h, pad_w, (0, 0)))
        divisor = avg_pool_divisor(x.shape[1:3], k, s, p, self.ceil_mode, self.count_include_pad)
        return total / jnp.asarray(divisor, x.dtype)[None, :, :, None]

    def torch_repr(self, in_shape) -> str:
        return (f"AvgPool2d(kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}, "
                f"padding={self.padding}, ceil_mode={self.ceil_mode}, "
                f"count_include_pad={self.count_include_pad})")

    def macs(self, in_shape, out_shape) -> int:
        return 0


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's AdaptiveAvgPool bins.

    Bin i covers ``[floor(i*size/out), ceil((i+1)*size/out))``; the bins overlap or
    repeat cells when they do not divide evenly, and upsample when ``size < out``.
    """
    m = np.zeros((out, size), np.float64)
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class AdaptiveAvgPool2d(nn.Module):
    """torch.nn.AdaptiveAvgPool2d((h, w)) for any input size (identity when equal)."""
    output_size: int | Sequence[int]

    @nn.compact
    def __call__(self, x, train: bool = False):
        (h, w), (H, W) = _pair(self.output_size), x.shape[1:3]
        if (H, W) == (h, w):
            return x
        if (h, w) == (1, 1):
            return global_avg_pool(x)[:, None, None, :]
        if H % h == 0 and W % w == 0:  # equal bins: a plain mean, as torch computes it
            return x.reshape(x.shape[0], h, H // h, w, W // w, x.shape[3]).mean(axis=(2, 4))
        mh = jnp.asarray(adaptive_pool_matrix(H, h), x.dtype)
        mw = jnp.asarray(adaptive_pool_matrix(W, w), x.dtype)
        return jnp.einsum("nhwc,ih,jw->nijc", x, mh, mw, precision=lax.Precision.HIGHEST)

    def torch_repr(self, in_shape) -> str:
        return f"AdaptiveAvgPool2d(output_size={_pair(self.output_size)})"

    def macs(self, in_shape, out_shape) -> int:
        return 0


class Flatten(nn.Module):
    """Flatten all but the batch axis, in NHWC order.

    torch flattens (C, H, W); the importer permutes the rows of the first Linear's
    kernel so that the result is the same (see ``convert.mapping``).
    """
    @nn.compact
    def __call__(self, x, train: bool = False):
        return x.reshape(x.shape[0], -1)

    def torch_repr(self, in_shape) -> str:
        return "Flatten(start_dim=1, end_dim=-1)"

    def macs(self, in_shape, out_shape) -> int:
        return 0


def global_avg_pool(x):
    """AdaptiveAvgPool2d((1, 1)) followed by flatten: each image's mean over its rows and
    columns. On CPU, for float32, the sums are a product with ones
    (:func:`_image_means_by_dot`)."""
    if x.dtype != jnp.float32 or not x.size:
        return _image_means_by_reduction(x)
    return _image_means(x)


@jax.custom_jvp
def _image_means(x):
    return lax.platform_dependent(x, cpu=_image_means_by_dot, default=_image_means_by_reduction)


@_image_means.defjvp
def _image_means_jvp(primals, tangents):
    # the tangent as a reduction, so that the gradient is its transpose, a broadcast, and
    # not the transposed product (an outer product with ones)
    (x,), (dx,) = primals, tangents
    return _image_means(x), _image_means_by_reduction(dx)


def _image_means_by_reduction(x):
    return jnp.mean(x, axis=(1, 2))


def _image_means_by_dot(x):
    """The means as one product per image, ones (1, rows x columns) times its (rows x
    columns, channels) matrix. XLA:CPU runs the reduction over the middle axes as a loop
    per output value that reads along the rows, and fuses into it the elementwise ops
    that produce its input: ResNet-50's last three blocks' BatchNorms, additions and
    ReLUs, all but the last of which it has already written for the next block. With such a
    two-block chain behind it, ms, reduction / product: batch 16, 7x7x2048 7.8 / 3.1;
    batch 32 10.8 / 5.5; batch 16, 7x7x1024 2.2 / 0.9; batch 1, 7x7x2048 0.42 / 0.25."""
    n, h, w, c = x.shape
    ones = jnp.ones((n, 1, h * w), x.dtype)
    sums = lax.dot_general(ones, x.reshape(n, h * w, c), (((2,), (1,)), ((0,), (0,))),
                           precision=lax.Precision.HIGHEST)
    return sums.reshape(n, c) / (h * w)


# ----------------------------------------------------------------------------- sequences

def add_sequence(module: nn.Module, prefix: str, layers: Sequence[nn.Module]) -> tuple[str, ...]:
    """Register ``layers`` on ``module`` (inside ``setup``) as ``prefix_0, prefix_1, ...``.

    The index of each layer is its index in torch's ``nn.Sequential``, so
    ``features_3`` is torch's ``features.3``. Returns the names, in order, for
    :func:`run_sequence`.
    """
    names = []
    for i, layer in enumerate(layers):
        name = f"{prefix}_{i}"
        setattr(module, name, layer)
        names.append(name)
    return tuple(names)


def run_sequence(module: nn.Module, names: Sequence[str], x, train: bool = False):
    for name in names:
        x = getattr(module, name)(x, train=train)
    return x


def torch_trunc_normal(std: float, mean: float = 0.0, a: float = -2.0, b: float = 2.0) -> Initializer:
    """torch's ``trunc_normal_(mean, std, a, b)``: N(mean, std) cut at the *absolute*
    bounds ``[a, b]`` (not at ``a`` standard deviations), as torchvision's GoogLeNet and
    Inception-v3 ``init_weights`` call it with ``a=-2, b=2``."""
    if std <= 0:
        raise ValueError(f"torch_trunc_normal: std must be positive, got {std}")

    def init(key, shape, dtype=jnp.float32):
        z = jax.random.truncated_normal(key, (a - mean) / std, (b - mean) / std, shape, dtype)
        return z * jnp.asarray(std, dtype) + jnp.asarray(mean, dtype)

    return init


# ----------------------------------------------------------------------------- EfficientNet's layers

class SiLU(nn.Module):
    """torch.nn.SiLU: ``x * sigmoid(x)`` (a.k.a. swish)."""
    @nn.compact
    def __call__(self, x, train: bool = False):
        return x * jax.nn.sigmoid(x)

    def torch_repr(self, in_shape) -> str:
        return "SiLU(inplace=True)"

    def macs(self, in_shape, out_shape) -> int:
        return 0


class ReLU6(nn.Module):
    """torch.nn.ReLU6: ``min(max(x, 0), 6)``."""
    @nn.compact
    def __call__(self, x, train: bool = False):
        return jnp.minimum(jnp.maximum(x, 0), 6)

    def torch_repr(self, in_shape) -> str:
        return "ReLU6(inplace=True)"

    def macs(self, in_shape, out_shape) -> int:
        return 0


class Sigmoid(nn.Module):
    """torch.nn.Sigmoid."""
    @nn.compact
    def __call__(self, x, train: bool = False):
        return jax.nn.sigmoid(x)

    def torch_repr(self, in_shape) -> str:
        return "Sigmoid()"

    def macs(self, in_shape, out_shape) -> int:
        return 0


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: ``x * sigmoid(fc2(act(fc1(avgpool(x)))))``.

    fc1 and fc2 are 1x1 convolutions with bias (torch's ``fc1``/``fc2`` Conv2d), so the
    submodules and their torch names are ``avgpool``, ``fc1``, ``activation``, ``fc2``,
    ``scale_activation``. ``activation_layer`` builds the inner activation (torch's
    default ReLU; EfficientNet uses SiLU).
    """
    squeeze_channels: int
    activation_layer: Callable[[], nn.Module] = ReLU
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        def conv(features, name):
            return Conv2d(features, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)

        scale = AdaptiveAvgPool2d(1, name="avgpool")(x)
        scale = conv(self.squeeze_channels, name="fc1")(scale)
        scale = self.activation_layer(name="activation")(scale)
        scale = conv(x.shape[-1], name="fc2")(scale)
        scale = Sigmoid(name="scale_activation")(scale)
        return scale * x.astype(self.dtype)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth: in train mode zero a residual branch with
    probability ``p`` per sample (``mode='row'``) or for the whole batch (``'batch'``)
    and scale the survivors by ``1 / (1 - p)``; the identity in eval mode. The mask
    draws from the ``'dropout'`` rng."""
    p: float
    mode: str = "row"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {self.p}")
        if self.mode not in ("row", "batch"):
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {self.mode}")
        if not train or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "row" else (1,) * x.ndim
        noise = jax.random.bernoulli(self.make_rng("dropout"), survival, shape).astype(x.dtype)
        if survival > 0.0:
            noise = noise / jnp.asarray(survival, x.dtype)
        return x * noise

    def torch_repr(self, in_shape) -> str:
        return f"StochasticDepth(p={self.p}, mode={self.mode})"

    def macs(self, in_shape, out_shape) -> int:
        return 0
