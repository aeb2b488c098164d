"""The ``jaxconv`` command.

Subcommands live beside the code they drive: each entry of ``COMMANDS`` names a module
with a ``register(subparsers)`` function that adds its parser and sets ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "jaxconv.cli_models",   # list, summary, parity
    "jaxconv.train.cli",    # train, eval
    "jaxconv.classify",     # classify
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxconv", description="Classic convnets in JAX, torchvision-exact.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"jaxconv {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
