"""The evaluation commands' options, built from the library's settings dataclasses
(m3ae.eval.settings and the recipes that extend it): each field is one option with its type,
default and comment as help, so a setting is defined once. Also the result file every command writes."""
from __future__ import annotations

import argparse
import dataclasses
import time
import typing
from pathlib import Path
from . import _checks as C


def _comments(cls: type) -> dict[str, str]:
    from ..train.settings import field_comments

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's own comment wins over its base's
        if dataclasses.is_dataclass(klass):
            out.update(field_comments(klass))
    return out


# Fields whose range argparse checks itself, so the error names the option (--probe-batch-size), not
# the field; the dataclasses check the same range for library callers.
_OPTION_TYPES = {"batch_size": C.batch_size, "threads": C.threads_or_auto}
# Where a command's default differs from the library's: the commands run the thread policy
# (m3ae.threads) by default, the library leaves the process's threads alone unless asked.
_OPTION_DEFAULTS = {"threads": "auto"}


def add_fields(p: argparse.ArgumentParser, cls: type, *, rename: dict[str, str] | None = None) -> None:
    """One option per field of the dataclass `cls` (`--name-with-dashes`, or `rename`d); a field
    without a default is a required option."""
    hints, comments, rename = typing.get_type_hints(cls), _comments(cls), rename or {}
    for f in dataclasses.fields(cls):
        name = rename.get(f.name, f.name)
        flag, help_ = "--" + name.replace("_", "-"), comments.get(f.name, "").replace("%", "%%")
        required = f.default is dataclasses.MISSING
        if not required and f.default is not None and not isinstance(f.default, bool):
            help_ += f" (default: {' '.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default})"
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool:
            p.add_argument(flag, dest=name, action="store_true", help=help_)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(flag, dest=name, type=args[0], nargs=len(args),
                           default=list(typing.cast(tuple, f.default)), help=help_)
        else:
            type_ = _OPTION_TYPES.get(f.name, args[0] if args else kind)
            default = None if required else _OPTION_DEFAULTS.get(f.name, f.default)
            p.add_argument(flag, dest=name, type=type_, default=default, required=required, help=help_)


def from_args(cls: type, args: argparse.Namespace, rename: dict[str, str] | None = None):
    """The dataclass `cls` from the options `add_fields` made (any of its fields the args lack keep defaults)."""
    rename = rename or {}
    given = {f.name: getattr(args, rename.get(f.name, f.name)) for f in dataclasses.fields(cls)
             if hasattr(args, rename.get(f.name, f.name))}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def eval_parser(sub: argparse._SubParsersAction, name: str, splits: bool = True, **kwargs) -> argparse.ArgumentParser:
    """An evaluation command's parser: the shared settings' options, and --train / --val if `splits`."""
    p = sub.add_parser(name, **kwargs)
    add_model_args(p)
    if splits:
        add_split_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..eval.settings import EvalSettings

    add_fields(p, EvalSettings)
    p.set_defaults(thread_policy=True)  # cli.main applies m3ae.threads around the command
    p.add_argument("--result", type=C.output_file, default=None,
                   help="JSON result file (default: next to --out or ./results)")


def add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="labelled training data spec (or a feature file for fast/kNN)")
    p.add_argument("--val", required=True, help="labelled validation data spec (or a feature file)")
    p.add_argument("--limit-train", type=C.positive, default=None,
                   help="a fixed random subset of this many training items")
    p.add_argument("--limit-val", type=C.positive, default=None,
                   help="a fixed random subset of this many validation items")


def settings(args: argparse.Namespace):
    from ..eval.settings import EvalSettings

    return from_args(EvalSettings, args)


def finish(args: argparse.Namespace, result, default_path: Path, note: str = "") -> int:
    """Write the result JSON (--result, else `default_path`) and print the one summary line."""
    from ..eval.results import write_result

    path = write_result(Path(args.result) if args.result else default_path, result.command,
                        checkpoint=args.checkpoint, data=data_record(args), settings=settings_record(args),
                        metrics=result.metrics, seconds=result.seconds, extra=result.extra)
    print(result.summary() + f"{note} (result {path})")
    return 0


def timestamped(command: str, folder: str | None = None) -> Path:
    """FOLDER/COMMAND-YYYYmmdd-HHMMSS.json (FOLDER default ./results)."""
    return Path(folder or "results") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def data_record(args) -> dict:
    return {k: getattr(args, k) for k in ("train", "val", "data", "limit_train", "limit_val", "limit",
                                          "in_train", "in_test", "out_test", "in_classes", "out_classes")
            if hasattr(args, k)}


def settings_record(args, skip=("func", "command", "checkpoint", "result")) -> dict:
    data = data_record(args)
    return {k: v for k, v in vars(args).items() if k not in skip and k not in data}
