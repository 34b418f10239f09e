"""`m3ae demo`: pretrain a small M3AE on built-in synthetic captioned shapes, then draw it."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain a tiny M3AE on synthetic shapes (CPU, minutes)",
                       description="Generates captioned images of coloured shapes, pretrains a small M3AE, "
                                   "and writes the checkpoint, metrics, loss.png and reconstruction.png.")
    p.add_argument("--out", required=True, type=C.output_folder, help="output folder")
    p.add_argument("--steps", type=C.positive, default=None, help="optimiser steps (preset: 600)")
    p.add_argument("--seed", type=C.seed, default=None, help="seed of the run (preset: 0)")
    p.add_argument("--samples", type=C.figure_rows, default=6,
                   help=f"samples in reconstruction.png (1..{C.MAX_FIGURE_ROWS}; default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..model import M3AE
    from ..pretrained import checkpoint_tokenizer
    from ..train.config import load_config
    from ..train.loop import pretrain
    from ..viz.curves import plot_curves, read_metrics
    from ..viz.reconstruction import reconstruct, reconstruction_figure
    from ..viz.training import fixed_viz_batch

    out = Path(args.out)
    overrides = C.shorthand_overrides(args.overrides, {"steps": ("--steps", args.steps),
                                                       "seed": ("--seed", args.seed)})
    config = load_config("demo", overrides)

    # The run's first samples with fixed masks, shown before and after.
    batch = fixed_viz_batch(config, n=args.samples)
    if batch is None:
        raise ValueError(f"no samples to show from data spec {config.data.spec!r}")
    torch.manual_seed(config.seed)  # the trainer builds its model from this same seed
    initial = M3AE(config.model)
    before = reconstruct(initial, **batch.model_inputs())

    started = time.perf_counter()
    result = pretrain(config, out, resume="auto")
    assert result.checkpoint is not None  # one process: it is rank 0, which always writes the last checkpoint
    model = M3AE.from_pretrained(result.checkpoint)
    after = reconstruct(model, **batch.model_inputs())

    tokenizer = checkpoint_tokenizer(result.checkpoint, config.model.vocab_size)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    vocab = {i: w for w, i in tokenizer.get_vocab().items()} if tokenizer is not None else {}
    loss_png = plot_curves([out / "metrics.jsonl"], out / "loss.png", labels=["demo"])
    recon_png = reconstruction_figure([("step 0", before), (f"step {result.step}", after)],
                                      out / "reconstruction.png", decode=lambda i: vocab.get(i, f"<{i}>"),
                                      stats=config.data.normalization)
    rows = read_metrics(out / "metrics.jsonl")  # the whole run, also when it was resumed
    first, last = rows[0]["step_losses"][0], rows[-1]["step_losses"][-1]
    print(f"loss at start {first:.4f} -> at end {last:.4f} "
          f"({result.step} steps, {time.perf_counter() - started:.0f} s)")
    print(f"checkpoint      {result.checkpoint}")
    print(f"metrics         {out / 'metrics.jsonl'}")
    print(f"loss curves     {loss_png}")
    print(f"reconstructions {recon_png}")
    return 0
