"""``jaxconv list``, ``jaxconv summary NAME`` and ``jaxconv parity NAME``."""
from __future__ import annotations


def _list(args) -> int:
    from jaxconv.registry import list_models, model_info

    for name in list_models():
        info = model_info(name)
        h, w, c = info.input_size
        tv = f"torchvision.models.{info.torchvision}" if info.torchvision else "-"
        print(f"{name:<22} {h}x{w}x{c:<4} {info.num_classes:>5} classes   {tv}")
    return 0


def _summary(args) -> int:
    from jaxconv.summary import summary

    size = tuple(args.input_size) if args.input_size else None
    print(summary(args.name, input_size=size, num_classes=args.num_classes))
    return 0


def _parity(args) -> int:
    from jaxconv import parity
    from jaxconv.registry import model_info

    info = model_info(args.name)
    torch_model = parity.torchvision_model(args.name)
    h, w, c = info.input_size
    parity.prepare_reference(torch_model, (4, c, h, w), seed=args.seed)
    sizes = [tuple(s) for s in args.size] if args.size else [(h, w)]
    ok = True
    for result in parity.check_eval(args.name, torch_model, sizes, batch=args.batch, seed=args.seed):
        print(result.line())
        ok &= result.ok
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("list", help="the registered models")
    p.set_defaults(func=_list)

    p = sub.add_parser("summary", help="a model's layers, parameters and FLOPs, torch-style")
    p.add_argument("name")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--num-classes", type=int)
    p.set_defaults(func=_summary)

    p = sub.add_parser("parity", help="compare a model with torchvision's (needs torch: jaxconv[test])")
    p.add_argument("name")
    p.add_argument("--size", type=int, nargs=2, action="append", metavar=("H", "W"),
                   help="input size (repeatable; default: the model's)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_parity)
