"""`m3ae bench ...`: benchmarks. Each sub-command lives in its own module exposing
`register(bench_subparsers)`; add one (e.g. `m3ae.cli.bench_data`) by listing it here."""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = [
    "m3ae.cli.bench_train",
    "m3ae.cli.bench_data",
    "m3ae.cli.bench_head",
    "m3ae.cli.bench_check",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (training step, ...)",
                       description="Benchmarks. `m3ae bench train --help` for the training step.")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(bench_sub)
