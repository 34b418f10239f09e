"""Training-step benchmark: our fast step beside a reference-equivalent step, in one process.

Fast step (what `m3ae pretrain` runs): visible-token encoder, text cut to the longest caption,
heads only on hidden patches / hidden real tokens, per-sample masks drawn by the Collator, bf16
autocast on CUDA, fused AdamW, SDPA attention, optional torch.compile.
Reference-equivalent step (what the authors' code computes): the same model and weights in fp32,
text padded to the full text_length, one mask permutation shared by the batch (over padding too),
explicit softmax attention with padded-key scores set to -1e7, heads over every position with the
loss taken from those outputs (full_outputs=True), torch's default (unfused) AdamW unless
`reference_fused_adamw`.
In MAE mode (vocab_size 0) the reference-equivalent step is what HF ViTMAE / FAIR MAE compute: the
decoder and the pixel head over every slot, fp32, explicit attention, torch's default AdamW.
`background_load` runs busy processes beside the measurement (a shared machine, made repeatable).
Data are synthetic in-memory tensors (a pool of pre-collated batches), so the loader is never the
bottleneck; the data wait is still measured around fetching from the iterator.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence, cast

import torch

from ..config import M3AEConfig
from ..data.collate import Batch, BatchPart, Collator, pad_texts, static_shapes_in_use
from ..masking import masks_for
from ..model import M3AE
from ..optim import build_optimizer
from ..distributed import pick_device
from ..perf import batch_train_flops, device_name, measure_matmul_tflops, synchronize, table_peak
from ..precision import resolve_precision, slow_precision_warning, step_context
from .config import load_config
from .step import TrainStep

log = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    model: M3AEConfig
    batch: int = 32
    steps: int = 20
    warmup: int = 5
    min_caption: int = 8
    max_caption: int | None = None  # None: text_length
    device: str = "auto"
    precision: str = "auto"  # auto (m3ae.precision: bf16 on CUDA and native-bf16 CPUs) | fp32 | bf16
    compile: bool = False
    static_shapes: bool | None = None  # None: with compile (as the trainer)
    reference: bool = True
    reference_fused_adamw: bool = False  # default: torch's AdamW default (on CPU, a per-tensor loop)
    peak_tflops: float | None = None
    seed: int = 0
    pool: int = 8  # distinct pre-collated batches cycled through
    background_load: int = 0  # busy processes running beside the measurement
    # "uint8": images reach the step as the trainer's loader ships them (uint8, normalised on the
    # device); "float32": normalised float from the host (four times the bytes to copy)
    image_dtype: str = "uint8"

    def __post_init__(self) -> None:
        for name, least in (("batch", 1), ("steps", 1), ("warmup", 0), ("pool", 1), ("background_load", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        if self.image_dtype not in ("uint8", "float32"):
            raise ValueError(f"image_dtype must be uint8 or float32, got {self.image_dtype!r}")

    @property
    def uses_static_shapes(self) -> bool:
        return static_shapes_in_use(self.compile, self.static_shapes)


def bench_model_config(preset: str, overrides: Sequence[str] = ()) -> M3AEConfig:
    """The model of a size preset with `model.KEY=VALUE` overrides, read by the run config's own
    parser (m3ae.train.config.load_config), so `bench train` and `pretrain` spell models alike."""
    other = [o for o in overrides if not o.startswith("model.")]
    if other:
        raise ValueError(f"bench train takes model.KEY=VALUE settings only, got {other}")
    return load_config(None, [f"model.preset={preset}", *overrides]).model


def synthetic_batches(config: M3AEConfig, opts: BenchOptions) -> list[Batch]:
    """Random images and captions of uniform length in [min_caption, max_caption], collated. Images
    are uint8 with the data's pixel statistics (as the trainer's loader ships them) or normalised
    float32, by `opts.image_dtype`."""
    if opts.image_dtype not in ("uint8", "float32"):
        raise ValueError(f"image_dtype must be uint8 or float32, got {opts.image_dtype!r}")
    g = torch.Generator().manual_seed(opts.seed)
    hi = min(opts.max_caption or config.text_length, config.text_length)
    uint8 = opts.image_dtype == "uint8"
    collate = Collator(config, seed=opts.seed, static_shapes=opts.uses_static_shapes,
                       pixel_stats="cc12m" if uint8 else None)
    batches = []
    for step in range(opts.pool):
        samples = []
        for i in range(opts.batch):
            n = int(torch.randint(opts.min_caption, hi + 1, (1,), generator=g))
            shape = (config.in_chans, config.image_size, config.image_size)
            image = (torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if uint8
                     else torch.randn(shape, generator=g))
            text = torch.randint(1, config.vocab_size, (n,), generator=g).tolist() if config.has_text else None
            samples.append({"image": image, "text": text, "key": f"{step}-{i}"})
        batches.append(collate(samples, step))
    return batches


def reference_batch(batch: Batch, config: M3AEConfig, generator: torch.Generator) -> Batch:
    """The same samples, text padded to the full text_length, batch-shared (reference) masks."""
    parts = []
    for p in batch.parts:
        text = pad = None
        if p.text is not None:
            assert p.text_padding_mask is not None  # collate gives every text part its padding mask
            text, pad = pad_texts([row[~row_pad] for row, row_pad in zip(p.text, p.text_padding_mask)],
                                  config.text_length)
        masks = masks_for(config, p.size, has_image=p.image is not None, text_padding=pad, mode="reference",
                          generator=generator)
        parts.append(BatchPart(p.image, text, pad, masks, p.keys, pixel_stats=p.pixel_stats))
    return Batch(parts, batch.step)


class _Step:
    """The trainer's own step (m3ae.train.step.TrainStep) over one Batch, clip 1.0, AdamW, with the
    trainer's one host sync per step (the finite check on the gradient norm)."""

    def __init__(self, model: M3AE, device: torch.device, mode: str, full_outputs: bool,
                 compile: bool, fused_adamw: bool | None = None):
        # torch.compile of a module returns a module (OptimizedModule); its stub says only Callable.
        run = cast(torch.nn.Module, torch.compile(model)) if compile else model
        optimizer = build_optimizer(model, 1e-4, 0.05, fused=fused_adamw)  # None: fused where available
        self.step = TrainStep(model, run, optimizer, device=device, autocast=step_context(device, mode),
                              clip_grad=1.0, full_outputs=full_outputs)

    def __call__(self, batch: Batch) -> torch.Tensor:
        metrics, grad_norm = self.step.backward([batch])
        self.step.update(bool(torch.isfinite(grad_norm)), grad_norm)
        return metrics[0]


def _time_steps(runs: dict[str, tuple[_Step, list[Batch]]], opts: BenchOptions, device: torch.device
                ) -> dict[str, dict[str, Any]]:
    """Median wall and process-CPU time per step over opts.steps steps after opts.warmup.

    The steps of the runs are interleaved (fast, reference, fast, ...) so a shared or throttled
    machine slows both alike and the speed-up stays meaningful. Data wait is timed around next().
    """
    sources = {name: itertools.cycle(batches) for name, (_, batches) in runs.items()}
    rec: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "wait": []} for name in runs}
    for i in range(opts.warmup + opts.steps):
        for name, (step, _) in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            batch = next(sources[name]).to(device, non_blocking=True)
            t1 = time.perf_counter()
            step(batch)
            synchronize(device)  # the benchmark's own sync, to time each step; the trainer has none here
            t2, c2 = time.perf_counter(), time.process_time()
            if i >= opts.warmup:
                rec[name]["wall"].append(t2 - t0)
                rec[name]["cpu"].append(c2 - c0)
                rec[name]["wait"].append(t1 - t0)
    return {name: {"step_s": statistics.median(r["wall"]), "cpu_s": statistics.median(r["cpu"]),
                   "step_s_range": _spread(r["wall"]),
                   "data_wait_share": sum(r["wait"]) / sum(r["wall"]), "steps": len(r["wall"])}
            for name, r in rec.items()}


def _dynamo_counters() -> dict[str, dict[str, int]]:
    """A copy of dynamo's process-wide counters (graphs compiled, graph breaks by reason)."""
    from torch._dynamo.utils import counters  # private, but what torch._dynamo.explain reads too

    return {k: dict(v) for k, v in counters.items()}


def compile_graphs(before: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Graphs compiled and graph breaks (by reason) since `before`: a compiled step that breaks into
    many graphs leaves fusion and CUDA-graph gains on the table."""
    now = _dynamo_counters()
    delta = lambda group: {k: n - before.get(group, {}).get(k, 0)  # noqa: E731
                           for k, n in now.get(group, {}).items() if n != before.get(group, {}).get(k, 0)}
    breaks = delta("graph_break")
    return {"compile_graphs": delta("stats").get("unique_graphs", 0),
            "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": sorted(breaks, key=lambda why: breaks[why], reverse=True)[:5]}


def _spread(values: list[float]) -> tuple[float, float]:
    """10th and 90th percentile: how steady the timed steps were (a wide range = a noisy machine)."""
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return pick(0.1), pick(0.9)


@contextlib.contextmanager
def background_load(processes: int):
    """`processes` busy-looping Python processes for the duration of the block."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield busy
    finally:
        for p in busy:
            p.kill()
        for p in busy:
            p.wait()


def run_train_bench(opts: BenchOptions) -> dict[str, Any]:
    device = pick_device(opts.device)
    mode = resolve_precision(opts.precision, device)
    config = opts.model
    torch.manual_seed(opts.seed)
    model = M3AE(config).to(device)
    batches = synthetic_batches(config, opts)
    result: dict[str, Any] = {
        "device": device_name(device), "batch": opts.batch, "precision": mode,
        "compile": opts.compile, "static_shapes": opts.uses_static_shapes, "image_dtype": opts.image_dtype,
        "threads": torch.get_num_threads(), "background_load": opts.background_load,
        "mode": "m3ae" if config.has_text else "mae", "params": model.num_parameters(),
        "config": config.to_dict(),
    }
    slow = slow_precision_warning(mode, device)
    if slow is not None:
        log.warning("%s", slow)
        result["precision_warning"] = slow
    if hasattr(os, "getloadavg"):
        result["load_average_before"] = os.getloadavg()[0]
    counters_before = _dynamo_counters() if opts.compile else {}
    runs = {"fast": (_Step(model, device, mode, False, opts.compile), batches)}
    if opts.reference:
        # What the authors' code does: batch-shared masks over padded full-length text, explicit
        # softmax attention, heads everywhere, fp32, torch's default AdamW. Same weights.
        ref_config = replace(config, masking="reference", attention="explicit")
        ref_model = M3AE(ref_config).to(device)
        ref_model.load_state_dict(model.state_dict())
        g = torch.Generator().manual_seed(opts.seed + 1)
        ref_batches = [reference_batch(b, ref_config, g) for b in batches]
        runs["reference"] = (_Step(ref_model, device, "fp32", True, False, fused_adamw=opts.reference_fused_adamw),
                             ref_batches)
    if device.type == "cuda":  # as the trainer's loader delivers them (pin_memory=True)
        runs = {name: (step, [b.pin_memory() for b in pool]) for name, (step, pool) in runs.items()}
        torch.cuda.reset_peak_memory_stats(device)
    log.info(f"timing {' + '.join(runs)} steps, interleaved: {opts.warmup} warm-up + {opts.steps} timed each"
             + (f", {opts.background_load} busy background process(es)" if opts.background_load else "") + " ...")
    with background_load(opts.background_load):
        timed = _time_steps(runs, opts, device)
    fast = timed["fast"]
    if opts.compile:
        result.update(compile_graphs(counters_before))
    flops = sum(batch_train_flops(b, config) / b.size for b in batches) / len(batches)
    result.update(step_s=fast["step_s"], step_s_range=fast["step_s_range"], cpu_s=fast["cpu_s"],
                  samples_per_s=opts.batch / fast["step_s"],
                  data_wait_share=fast["data_wait_share"], timed_steps=fast["steps"],
                  flops_per_sample=flops, achieved_tflops=flops * opts.batch / fast["step_s"] / 1e12)
    if device.type == "cuda":  # both steps' high-water mark when the reference runs too
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process high-water mark (Linux reports KiB)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if hasattr(os, "getloadavg"):
        result["load_average_after"] = os.getloadavg()[0]

    dtype = "fp32" if mode == "fp32" else "bf16"  # bf32's matmuls run at the bf16 rate
    with step_context(device, mode) if mode == "bf32" else contextlib.nullcontext():
        result["matmul_tflops"] = measure_matmul_tflops(device, torch.float32 if mode != "bf16" else torch.bfloat16)
    peak = opts.peak_tflops or table_peak(result["device"], dtype)
    result["peak_source"] = ("--peak-tflops" if opts.peak_tflops else "table" if peak
                             else "measured matmul (no table entry for this device)")
    result["peak_tflops"] = peak or result["matmul_tflops"]
    result["mfu"] = result["achieved_tflops"] / result["peak_tflops"]

    if opts.reference:
        ref = timed["reference"]
        ref_flops = sum(batch_train_flops(b, config, full=True) / b.size for b in ref_batches) / len(ref_batches)
        result["reference"] = {"step_s": ref["step_s"], "step_s_range": ref["step_s_range"], "cpu_s": ref["cpu_s"],
                               "samples_per_s": opts.batch / ref["step_s"], "flops_per_sample": ref_flops,
                               "achieved_tflops": ref_flops * opts.batch / ref["step_s"] / 1e12}
        result["speedup"] = ref["step_s"] / fast["step_s"]
    return result


def _ms_range(bounds) -> str:
    return f"{bounds[0] * 1e3:.0f}-{bounds[1] * 1e3:.0f} ms"


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"device            {r['device']}  (precision {r['precision']}, compile {r['compile']}, "
        f"static shapes {r['static_shapes']}, threads {r.get('threads_reason', r['threads'])}"
        + (f", host allocator: {r['host_allocator']}" if r.get("host_allocator") else "")
        + (f", {r['background_load']} busy background process(es)" if r.get("background_load") else "") + ")",
        *([f"warning           {r['precision_warning']}"] if r.get("precision_warning") else []),
        f"model             {r['mode'].upper()}, {r['params'] / 1e6:.2f} M parameters, batch {r['batch']}",
        f"fast step         {r['samples_per_s']:.1f} samples/s, step {r['step_s'] * 1e3:.1f} ms "
        f"(median of {r['timed_steps']}, p10-p90 {_ms_range(r['step_s_range'])}; process CPU "
        f"{r['cpu_s'] * 1e3:.0f} ms), "
        f"data wait {100 * r['data_wait_share']:.2f}%",
        f"model FLOPs       {r['flops_per_sample'] / 1e9:.3f} GFLOP/sample (train, analytic), "
        f"achieved {r['achieved_tflops']:.3f} TFLOP/s",
        f"MFU               {100 * r['mfu']:.1f}% of {r['peak_tflops']:.2f} TFLOP/s ({r['peak_source']}); "
        f"measured matmul peak {r['matmul_tflops']:.2f} TFLOP/s",
    ]
    if "compile_graphs" in r:
        lines.append(f"compiled          {r['compile_graphs']} graph(s), {r['graph_breaks']} graph break(s)"
                     + "".join(f"\n                  break: {why[:150]}" for why in r["graph_break_reasons"]))
    if "peak_memory_gib" in r:
        lines.append(f"peak memory       {r['peak_memory_gib']:.2f} GiB (torch.cuda.max_memory_allocated)")
    else:
        lines.append(f"peak memory       {r['peak_rss_gib']:.2f} GiB (process peak RSS)")
    if "reference" in r:
        ref = r["reference"]
        lines.append(f"reference step    {ref['samples_per_s']:.1f} samples/s, step {ref['step_s'] * 1e3:.1f} ms "
                     f"(p10-p90 {_ms_range(ref['step_s_range'])}), "
                     f"{ref['flops_per_sample'] / 1e9:.3f} GFLOP/sample, {ref['achieved_tflops']:.3f} TFLOP/s")
        lines.append(f"load average      {r.get('load_average_before', float('nan')):.1f} before, "
                     f"{r.get('load_average_after', float('nan')):.1f} after (1-min; >threads means a shared machine)")
        lines.append(f"speed-up          {r['speedup']:.2f}x (fast vs reference-equivalent, same process)")
    return "\n".join(lines)
