"""`m3ae pretrain`: pretrain an M3AE (or an image-only MAE) from a preset plus overrides."""
from __future__ import annotations

import argparse
import shlex
import sys
from . import _checks as C


class _HelpWithSettings(argparse.Action):
    """-h/--help that also lists every KEY=VALUE setting (built only when asked: it imports the
    config classes, which `m3ae --help` should not wait for)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..train.settings import settings_help

        parser.epilog = settings_help()
        parser.print_help()
        parser.exit()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain M3AE. Settings: a YAML preset, then key=value overrides\n"
                                   "(e.g. model.depth=4 optim.lr=1e-3 data.num_workers=4).")
    p.add_argument("-h", "--help", action=_HelpWithSettings, help="show this help and every setting, then exit")
    p.add_argument("--config", default=None, help="shipped preset name (demo, m3ae_base_cc12m, ...) or a YAML path")
    p.add_argument("--out", type=C.output_folder, default=None,
                   help="run folder: checkpoints, metrics.jsonl, run_config.yaml (required)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (preset + overrides) as YAML, then exit")
    p.add_argument("--data", default=None, help="data spec (shorthand for data.spec=...)")
    p.add_argument("--steps", type=C.positive, default=None, help="total optimiser steps (shorthand for steps=N)")
    p.add_argument("--batch-size", type=C.batch_size, default=None, help="global batch (shorthand for batch_size=N)")
    p.add_argument("--resume", default=None,
                   help="'auto' continues from the newest checkpoint in --out (if any); or a checkpoint folder")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even though settings that make the run differ from an uninterrupted one "
                        "(batch, data, schedule, seed, ...) changed since the checkpoint")
    p.add_argument("--stop-at-step", type=C.positive, default=None,
                   help="stop (and checkpoint) at this step without changing the schedule")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard with FSDP2 instead of DDP (shorthand for distributed.fsdp=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings (listed below)")
    p.set_defaults(func=run)


def resume_command(argv: list[str]) -> str:
    """The same command line without --stop-at-step / --resume, plus --resume auto."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--stop-at-step", "--resume"):
            skip = True
            continue
        if arg.startswith(("--stop-at-step=", "--resume=")):
            continue
        kept.append(arg)
    return " ".join(shlex.quote(a) for a in kept + ["--resume", "auto"])


def run(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, init_distributed
    from ..train.config import load_config
    from ..train.loop import pretrain

    overrides = C.shorthand_overrides(args.overrides, {
        "data.spec": ("--data", args.data), "steps": ("--steps", args.steps),
        "batch_size": ("--batch-size", args.batch_size),
        "distributed.fsdp": ("--fsdp", args.fsdp or None)})
    config = load_config(args.config, overrides)
    for warning in config.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    if args.print_config:
        from ..train.config import to_yaml

        print(to_yaml(config), end="")
        return 0
    if args.out is None:
        raise ValueError("--out is required (the run folder)")
    # Launched by torchrun: join the process group (DDP/FSDP); otherwise a single process.
    info = init_distributed(config.device)
    try:
        result = pretrain(config, args.out, resume=args.resume, stop_at_step=args.stop_at_step, dist=info,
                          allow_changes=args.allow_changes)
    finally:
        cleanup()
    if not info.is_main:
        return 0
    if result.status == "stopped":
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}\n"
              f"resume with: m3ae {resume_command(sys.argv[1:])}", file=sys.stderr)
    elif result.last_loss is None:  # resumed a run that had already finished: nothing to do
        print(f"already finished ({result.step} steps); checkpoint {result.checkpoint}")
    else:
        print(f"finished {result.step} steps; final loss {result.last_loss:.4f}; checkpoint {result.checkpoint}")
    return 0
