"""``jaxconv summary``: a model's layers as torch prints them, with parameters and
cost per layer; and :func:`intermediates`, the named activations of a forward pass."""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def _layer_records(model: nn.Module, input_shape: tuple[int, ...], evaluated: bool = False):
    """Run ``model.init`` abstractly and record every torch-style layer call in order:
    (section, module path, module, input shape, output shape). ``evaluated``: record the
    calls of an eval-mode ``model.apply`` instead, which leaves out the layers that only
    training runs (GoogLeNet's and Inception-v3's auxiliary heads)."""
    records, sections = [], []

    def interceptor(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        is_root = module.parent is None or not isinstance(module.parent, nn.Module)
        pushed = is_root and method not in ("__call__", "setup")
        if pushed:
            sections.append(method)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            if pushed:
                sections.pop()
        if method == "__call__" and hasattr(module, "torch_repr") and args:
            section = sections[-1] if sections else None
            records.append((section, tuple(module.path), module, tuple(args[0].shape), tuple(out.shape)))
        return out

    x = jnp.zeros(input_shape, jnp.float32)
    if evaluated:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        with nn.intercept_methods(interceptor):
            jax.eval_shape(lambda v: model.apply(v, x), shapes)
        return records, shapes
    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return records, shapes


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _subtree(tree, path):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return {}
        tree = tree[part]
    return tree


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def summary(name: str, input_size: tuple[int, int] | None = None, num_classes: int | None = None) -> str:
    """A torch-style listing of model ``name``: each layer with its output shape,
    parameters and multiply-accumulates per image, subtotals per section (``features``,
    ``classifier``, ...) and the totals. FLOPs are counted as 2 x MACs (the GFLOPS that
    torchvision's model tables quote are MACs), of the layers that inference runs: a layer
    only training runs (GoogLeNet's and Inception-v3's auxiliary heads) is listed with
    ``train`` in place of its MACs."""
    from jaxconv.registry import get_model, model_info

    info = model_info(name)
    h, w, c = info.input_size
    if input_size is not None:
        h, w = input_size
    model = get_model(name, num_classes=num_classes)
    records, shapes = _layer_records(model, (1, h, w, c))
    evaluated = {record[1] for record in _layer_records(model, (1, h, w, c), evaluated=True)[0]}
    params = shapes.get("params", {})
    rows, totals, sections_seen = [], {}, set()
    for section, path, module, in_shape, out_shape in records:
        n_params = _count(_subtree(params, path))
        # a layer that only training runs (an auxiliary head) is listed, not counted
        macs = module.macs(in_shape, out_shape) if path in evaluated else None
        key = section or path[0]
        if section:
            sections_seen.add(section)
        sec = totals.setdefault(key, [0, 0])
        sec[0] += n_params
        sec[1] += macs or 0
        rows.append((key, "/".join(path), module.torch_repr(in_shape), "x".join(map(str, out_shape[1:])),
                     n_params, macs))
    bound = model.bind(shapes)
    blocks = [_block_of(bound, record[1]) for record in records]
    total_params, total_macs = _count(params), sum(r[5] or 0 for r in rows)
    width = max(len(r[2]) for r in rows) + 2
    path_width = max(len(r[1]) for r in rows) + 2
    lines = [f"{name}: input {h}x{w}x{c}, {total_params:,} parameters, {_human(total_macs)} MACs "
             f"({_human(2 * total_macs)} FLOPs) per image", ""]
    header = f"  {'layer':<{path_width}}{'torch module':<{width}}{'output':>14}{'params':>14}{'MACs':>10}"
    current = None
    for i, (key, path, text, out, n_params, macs) in enumerate(rows):
        if key != current:
            current = key
            if key in sections_seen:
                lines += [f"{key}:", header]
        label = f"  {path:<{path_width}}" if key in sections_seen else f"{path:<{path_width + 2}}"
        shown = "train" if macs is None else _human(macs)
        lines.append(f"{label}{text:<{width}}{out:>14}{n_params:>14,}{shown:>10}")
        if blocks[i] is not None and (i + 1 == len(rows) or blocks[i + 1] != blocks[i]):
            lines.append(_block_line(blocks, rows, i, params, key in sections_seen, path_width, width))
        if key in sections_seen and (i + 1 == len(rows) or rows[i + 1][0] != key):
            lines.append(f"  {key}: {totals[key][0]:,} parameters, {_human(totals[key][1])} MACs")
    lines += ["", f"total: {total_params:,} parameters, {_human(total_macs)} MACs, "
                  f"{_human(2 * total_macs)} FLOPs per image"]
    if any(r[5] is None for r in rows):
        lines.append("MACs 'train': a layer that only runs in training (not in the MAC totals)")
    return "\n".join(lines)


def _block_of(root: nn.Module, path: tuple[str, ...]):
    """(path, label) of the innermost module enclosing the layer at ``path`` that asks
    for a subtotal line in the summary (one with a ``summary_label()`` method, e.g.
    ResNet's blocks), or None. ``root`` is the bound model."""
    node, found = root, None
    for k, part in enumerate(path[:-1]):
        try:
            node = getattr(node, part)
        except Exception:  # a submodule defined inline (nn.compact) is not an attribute
            break
        if not isinstance(node, nn.Module):
            break
        if callable(getattr(node, "summary_label", None)):
            found = (tuple(path[:k + 1]), node.summary_label())
    return found


def _block_line(blocks, rows, i, params, indent: bool, path_width: int, width: int) -> str:
    """The subtotal line of the block that ends at row ``i``: its parameters and MACs."""
    path, label = blocks[i]
    macs = [r[5] for r, b in zip(rows, blocks) if b is not None and b[0] == path]
    shown = "train" if all(m is None for m in macs) else _human(sum(m or 0 for m in macs))
    text = f"= {'/'.join(path)}: {label}"
    pad = path_width + (2 if indent else 0)
    return f"  {'':<{pad}}{text:<{width + 14}}{_count(_subtree(params, path)):>14,}{shown:>10}"


def intermediates(model: nn.Module, variables: Any, x, train: bool = False,
                  names: Iterable[str] | None = None, rngs: Any = None) -> dict[str, jax.Array]:
    """Every submodule's output in one forward pass, keyed by module path
    (``'features_0'``, ``'layer1_0/conv1'``; the path of a torch module ``a.b.0`` is
    ``a_b_0``-style as in the variables). ``names`` keeps only those paths."""
    return output_and_intermediates(model, variables, x, train, names, rngs)[1]


def output_and_intermediates(model: nn.Module, variables: Any, x, train: bool = False,
                             names: Iterable[str] | None = None, rngs: Any = None):
    """``(model output, intermediates(...))`` from the same single forward pass."""
    mutable = ["intermediates"] + (["batch_stats"] if train else [])
    output, state = model.apply(variables, x, train=train, capture_intermediates=True,
                                mutable=mutable, rngs=rngs)
    out: dict[str, jax.Array] = {}

    def walk(tree, path):
        for key, value in tree.items():
            if key == "__call__":
                if path:
                    out["/".join(path)] = value[0]
            elif isinstance(value, dict):
                walk(value, path + (key,))

    walk(jax.tree.map(lambda v: v, dict(state["intermediates"]),
                      is_leaf=lambda v: isinstance(v, tuple)), ())
    if names is not None:
        wanted = list(names)
        missing = [n for n in wanted if n not in out]
        if missing:
            raise KeyError(f"no intermediate named {', '.join(missing)}; available: {', '.join(out)}")
        out = {n: out[n] for n in wanted}
    return output, out
