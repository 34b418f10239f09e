"""Option types for the commands' parsers, so that a bad value is refused by argparse itself: one line
naming the option ("argument --limit: must be >= 1, got 0"), exit 2, before anything is loaded or
written. One set of rules for every command instead of a check in each. Also the rule for options
that are shorthands of KEY=VALUE settings (`shorthand_overrides`)."""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, NoReturn, Sequence

from ..config import MAX_BATCH_SIZE, MAX_SEED

# The image formats matplotlib writes (Figure.savefig picks one by the file's suffix).
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp", ".tif", ".tiff", ".eps", ".ps")


def _fail(message: str) -> NoReturn:
    raise argparse.ArgumentTypeError(message)


def integer(least: int | None = None, most: int | None = None) -> Callable[[str], int]:
    """An int in least..most (either end open when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _fail(f"expected an integer, got {text!r}")
        if (least is not None and value < least) or (most is not None and value > most):
            _fail(f"must be {_range(least, most)}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its own "invalid ... value" message
    return parse


def number(least: float | None = None, most: float | None = None, *, above: bool = False,
           below: bool = False) -> Callable[[str], float]:
    """A finite float in [least, most]; `above` / `below` make that end open (least < x, x < most)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _fail(f"expected a number, got {text!r}")
        low_ok = least is None or (value > least if above else value >= least)
        high_ok = most is None or (value < most if below else value <= most)
        if not (math.isfinite(value) and low_ok and high_ok):
            lo = "" if least is None else f"{'>' if above else '>='} {least:g}"
            hi = "" if most is None else f"{'<' if below else '<='} {most:g}"
            _fail(f"must be a finite number{' ' if lo or hi else ''}{' and '.join(s for s in (lo, hi) if s)}, "
                  f"got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _range(least: int | None, most: int | None) -> str:
    if least is not None and most is not None:
        return f"in {least}..{most}"
    return f">= {least}" if least is not None else f"<= {most}"


def shorthand_overrides(overrides: Sequence[str], shorthands: dict[str, tuple[str, object]]) -> list[str]:
    """The KEY=VALUE `overrides` plus those the options given stand for: `shorthands` maps a setting
    to (the option, its value: None when not given, True for a switch that is on). A setting given
    both ways is refused naming both: which should win is a guess, and the loser would be ignored."""
    keys = {o.split("=", 1)[0].strip(): o for o in overrides}
    out = list(overrides)
    for key, (option, value) in shorthands.items():
        if value is None:
            continue
        if key in keys:
            given = option if value is True else f"{option} {value}"
            raise ValueError(f"{given} and {keys[key]} both set {key}; give one of them")
        out.append(f"{key}={'true' if value is True else value}")
    return out


def text(value: str) -> str:
    """A non-empty string (an empty one would read as "not given" and be silently ignored)."""
    if not value.strip():
        _fail("must not be empty")
    return value


def output_file(value: str) -> str:
    """A file to write: not empty, not an existing folder, and its folder (if it exists) a folder."""
    if not value:
        _fail("must name a file, got ''")
    if os.path.isdir(value):
        _fail(f"{value} is a folder; give a file name")
    parent = os.path.dirname(value)
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        _fail(f"{parent} is a file, not a folder")
    return value


def figure_file(value: str) -> str:
    """An image to write: an output_file whose suffix names a format matplotlib writes (it would
    otherwise append .png, and the file written would not be the one named)."""
    value = output_file(value)
    suffix = os.path.splitext(value)[1].lower()
    if suffix not in FIGURE_SUFFIXES:
        _fail(f"must end in an image suffix ({', '.join(FIGURE_SUFFIXES[:5])}, ...), got {value!r}")
    return value


def output_folder(value: str) -> str:
    """A folder to write into: not empty, not an existing file."""
    if not value:
        _fail("must name a folder, got ''")
    if os.path.exists(value) and not os.path.isdir(value):
        _fail(f"{value} is a file; give a folder")
    return value


# The shared ones.
positive = integer(1)


def threads_or_auto(value: str) -> int | str:
    """A thread count (>= 1) or `auto`."""
    return "auto" if value.strip().lower() == "auto" else positive(value)
non_negative = integer(0)
seed = integer(0, MAX_SEED)
batch_size = integer(1, MAX_BATCH_SIZE)
# One figure row per sample: past a few hundred the figure exceeds matplotlib's 2**16-pixel limit
# (and reading the samples in, the memory); 64 rows is already a tall page.
MAX_FIGURE_ROWS = 64
figure_rows = integer(1, MAX_FIGURE_ROWS)
