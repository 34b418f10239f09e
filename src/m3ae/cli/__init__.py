"""`m3ae` command line. Each command lives in its own module exposing `register(subparsers)`,
which adds a parser and sets `func(args) -> int`. Add a command by listing its module here."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

from ..data.bad import DataQualityError, LoaderError, worker_message
from ..optional import missing_dependency

COMMANDS = [
    "m3ae.cli.pretrain",
    "m3ae.cli.demo",
    "m3ae.cli.convert_jax",
    "m3ae.cli.export",
    "m3ae.cli.push",
    "m3ae.cli.data",
    "m3ae.cli.tokenizer",
    "m3ae.cli.bench",
    "m3ae.cli.reconstruct",
    "m3ae.cli.attention",
    "m3ae.cli.tsne",
    "m3ae.cli.plot",
    "m3ae.cli.embed",
    "m3ae.cli.probe",
    "m3ae.cli.knn",
    "m3ae.cli.finetune",
    "m3ae.cli.ood",
    "m3ae.cli.study",
]


def _version() -> str:
    from importlib import metadata

    from .. import __version__

    try:
        torch = metadata.version("torch")  # without importing it (slow)
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"m3ae {__version__} (torch {torch}, python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3ae", description="Multimodal Masked Autoencoders")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


@contextmanager
def log_to_stderr() -> Iterator[None]:
    """The library's log records ("m3ae.*" loggers) as plain lines on stderr, for one command: the
    library itself configures no handler, so an application embedding it decides where they go."""
    logger = logging.getLogger("m3ae")
    handler = logging.StreamHandler(sys.stderr)  # the stderr of now (tests swap it per test)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE settings may come in several groups between options ("--out x steps=7 --resume auto
    # progress=false"); argparse takes only the first group as the positional list.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with log_to_stderr():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ImportError as err:  # an optional dependency: say which extra brings it
        message = missing_dependency(err)
        if message is None:
            raise
        print(f"m3ae {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # configuration and input errors: no traceback
        print(f"m3ae {args.command}: error: {worker_message(err)}", file=sys.stderr)
        return 2
    except (FloatingPointError, DataQualityError, LoaderError) as err:  # a run that had to stop
        print(f"m3ae {args.command}: stopped: {worker_message(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a vanished mount, a permission: the environment, not a bug
        print(f"m3ae {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"m3ae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an unforeseen failure: the traceback for the report, then exit
        traceback.print_exc()
        print(f"m3ae {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    """The command, under the thread policy (m3ae.threads) when it takes --threads / --num-workers."""
    if not getattr(args, "thread_policy", False):
        return int(args.func(args) or 0)
    from ..threads import torch_threads

    with torch_threads(None if args.threads == "auto" else args.threads, args.num_workers) as threads:
        print(f"m3ae {args.command}: threads {threads}", file=sys.stderr)
        return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
