"""`m3ae bench data SPEC [SPEC ...]`: loader throughput (decoded + augmented samples/s), ours vs a
plain baseline (full PIL decode, PIL crop + resize, to tensor, normalise), per worker and total.
"m3ae" normalises in the workers (evaluation loaders); "m3ae u8" is how training batches travel:
uint8 from the workers, normalised by the receiving process (on a GPU run, by the GPU; here the
main process does it on the CPU, so the row counts that work). "u8 pil" is "m3ae u8" with PIL's
JPEG decoding (jpeg_decoder=pil) instead of simplejpeg's: the same pixels, what the decoder buys.

The in-process rates are taken in --rounds rounds, each timing every pipeline once in turn, and the
medians are printed with the median of each round's ratio to the baseline: a VM that drifts by
10-20 % over seconds (seen on the 2-vCPU Xeons here) then slows all pipelines of a round alike."""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time

import numpy as np
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="data loader throughput, ours vs a plain PIL baseline")
    d.add_argument("spec", nargs="+", help="data SPECs (image sources are timed on their images)")
    d.add_argument("--image-size", type=C.positive, default=256, help="pixels (default %(default)s)")
    d.add_argument("--samples", type=C.positive, default=400, help="samples per measurement")
    d.add_argument("--workers", type=C.non_negative, default=2, help="loader workers for the total")
    d.add_argument("--batch", type=C.positive, default=32, help="samples per batch (default %(default)s)")
    d.add_argument("--rounds", type=C.positive, default=3,
                   help="in-process measurements per pipeline, interleaved (default %(default)s)")
    d.add_argument("--json", type=C.output_file, default=None, help="also write the rates to this JSON file")
    d.set_defaults(func=run)


class BaselineTransform:
    """The plain pipeline: decode the whole image, crop, resize (bicubic), flip, to tensor, normalise."""

    def __init__(self, size: int, stats="cc12m"):
        import torch

        from m3ae.data.normalization import resolve_stats

        self.size = size
        mean, std = resolve_stats(stats)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, data: str | bytes, rng: np.random.Generator):
        import torch
        from PIL import Image

        from m3ae.data.images import random_resized_crop_box

        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
        box = random_resized_crop_box(*image.size, rng)
        image = image.crop(box).resize((self.size, self.size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


class _Files:  # a map-style dataset (torch is imported only when the bench runs, not for --help)
    def __init__(self, records, transform):
        self.records, self.transform = records, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.transform(self.records[i].image, np.random.default_rng([0, i]))


def _rate(dataset, n: int, workers: int, batch: int, finish=None) -> float:
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False,
                                         sampler=[i % len(dataset) for i in range(n)])
    it = iter(loader)
    next(it)  # start-up (fork, first batch) is not throughput
    t, done = time.perf_counter(), 0
    for b in it:
        if finish is not None:
            b = finish(b)
        done += len(b)
    return done / (time.perf_counter() - t)


def run(args: argparse.Namespace) -> int:
    import torch

    from m3ae.data.images import TrainTransform
    from m3ae.data.normalization import normalize_uint8
    from m3ae.data.sources import build_sources

    from ..perf import device_name

    torch.set_num_threads(1)  # one worker = one core: the rates are per core
    machine = f"{device_name(torch.device('cpu'))}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"machine: {machine}")
    print(f"output {args.image_size}px, {args.samples} samples per cell, batch {args.batch}")
    # First in this process (the rate of one core), then through a DataLoader with --workers processes;
    # the first column is not called "1 worker", which `--workers 1` would print twice.
    loader = "in-process" if args.workers == 0 else f"{args.workers} worker{'s' if args.workers > 1 else ''}"
    print(f"{'source':48s} {'pipeline':9s} {'in-process':>12s} {'vs baseline':>12s} {loader:>12s}")
    rows = []
    for _, source in build_sources(",".join(args.spec)):
        records = [r for _, r in source.iterate(0, 1, seed=0, epochs=1) if r.image is not None]
        if not records:
            continue
        pipelines = {"baseline": (BaselineTransform(args.image_size), None),
                     "m3ae": (TrainTransform(args.image_size), None),
                     "m3ae u8": (TrainTransform(args.image_size, uint8=True), normalize_uint8),
                     "u8 pil": (TrainTransform(args.image_size, uint8=True, jpeg_decoder="pil"), normalize_uint8)}
        one: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, (transform, finish) in pipelines.items():
                one[name].append(_rate(_Files(records, transform), args.samples, 0, args.batch, finish))
        label = source.describe()
        label = label if len(label) <= 48 else "..." + label[-45:]  # the end tells sources apart
        for name, (transform, finish) in pipelines.items():
            many = _rate(_Files(records, transform), args.samples, args.workers, args.batch, finish)
            ratios = [a / b for a, b in zip(one[name], one["baseline"])]
            rate, ratio = statistics.median(one[name]), statistics.median(ratios)
            print(f"{label:>48s} {name:9s} {rate:9.0f}/s {ratio:11.2f}x {many:9.0f}/s", flush=True)
            rows.append({"source": source.describe(), "pipeline": name, "one_worker": rate,
                         "one_worker_rounds": one[name], "vs_baseline": ratio,
                         "vs_baseline_range": [min(ratios), max(ratios)],
                         "workers": args.workers, "many_workers": many})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "image_size": args.image_size, "samples": args.samples,
                       "rounds": args.rounds, "rows": rows}, f, indent=2)
    return 0
