"""`m3ae` command line. Each command lives in its own module exposing `register(subparsers)`,
which adds a parser and sets `func(args) -> int`. Add a command by listing its module here."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "m3ae.cli.pretrain",
    "m3ae.cli.demo",
    "m3ae.cli.embed",
    "m3ae.cli.probe",
    "m3ae.cli.knn",
    "m3ae.cli.finetune",
    "m3ae.cli.ood",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3ae", description="Multimodal Masked Autoencoders")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # configuration and input errors: no traceback
        print(f"m3ae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
