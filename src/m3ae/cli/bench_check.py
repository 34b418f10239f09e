"""`m3ae bench check --out DIR`: the GPU check, one command that fits in ~8 minutes on one GPU.

Stages (each in its own process, with a timeout, so an out-of-memory or a hang costs one stage, not
the report): the CUDA-only tests (and the AMX-only ones), `bench train` for base and large at
256 px with and without torch.compile (samples/s, MFU against the device's table peak and a measured
matmul peak, memory, compiled graphs), `bench head`, a 2-process NCCL DDP run when 2 GPUs exist,
loader throughput at the machine's core count on synthetic JPEGs, the host CPU's bf16 and bf32 vs
fp32 steps (base width and whole base), MAE mode against HF ViTMAE on the host CPU when
transformers is installed, and the host's bf16 and fp32 steps split into matmuls, attention and the
rest at 2 threads (benchmarks/op_times.py).
Writes DIR/check.json and DIR/check.md. A stage that would start after the time budget is skipped
and says so. `--dry-run` runs every stage that can run on a CPU with nano models and a few steps
(the test suite does), to keep the check itself working.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="the GPU check: tests, step benchmarks, DDP, data, one report")
    p.add_argument("--out", required=True, type=C.output_folder,
                   help="folder for check.json, check.md and the stage logs")
    p.add_argument("--budget", type=C.number(0, above=True), default=480.0,
                   help="seconds for all stages together (default %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: nano models, a few steps, no compile (checks the check itself)")
    p.add_argument("--tests", default="tests",
                   help="tests to run with -m cuda (folder or file; the stage is skipped if absent)")
    p.set_defaults(func=run)


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout: float
    json_out: str | None = None  # a file the stage writes, folded into the report
    skip: str | None = None  # why it does not run here
    env: dict[str, str] = field(default_factory=dict)


def _m3ae(*args: str) -> list[str]:
    return [sys.executable, "-m", "m3ae", *args]


# The host-CPU stages' models, (stage name part, `bench train` arguments): base width and the whole
# base; the dry run times a nano model instead.
DRY_CPU_MODELS = [("", ["--preset", "nano", "--batch", "4", "--steps", "2", "--warmup", "1", "model.image_size=32",
                        "model.patch_size=8", "model.text_length=16"])]
CPU_MODELS = [
    ("", ["--preset", "base", "--batch", "16", "--steps", "8", "--warmup", "2", "model.depth=4",
          "model.image_size=128", "model.patch_size=16", "model.text_length=32"]),
    ("base 256", ["--preset", "base", "--batch", "16", "--steps", "6", "--warmup", "2", "--max-caption", "32",
                  "model.image_size=256"]),
]


CPU_PRECISIONS = ("fp32", "bf16", "bf32")


def plan(out: Path, dry: bool, gpus: int, cores: int, tests: Path) -> list[Stage]:
    """The stages, sized for one GPU (or, dry, for a CPU in seconds).

    Cheap stages run first and the compiled steps near the end, so a tight budget costs the slowest
    numbers (compile takes a minute or more per size), not the rest of the report; the optional
    host-CPU op times and MAE-vs-HF comparison come last. On an H200 machine the check without the
    bf32, op-times and MAE-vs-HF stages took 6.4 minutes (2026-11-30); the bf32 stages add about a
    minute, op times an estimated 2 (the base step at 2 host threads), MAE vs HF about 1.5. With
    `--budget 540` the op times are likely to run and MAE vs HF to be skipped.
    """
    # The CUDA tests, and the AMX ones: GPU machines' hosts are often AMX Xeons.
    stages = [Stage("cuda tests", [sys.executable, "-m", "pytest", "-m", "cuda or amx", str(tests)], 120,
                    skip=None if tests.exists() else f"no tests at {tests}")]
    if dry:
        sizes = [("nano", ["--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu",
                           "model.image_size=32", "model.patch_size=8", "model.text_length=16"])]
    else:
        sizes = [("base", ["--batch", "256", "--steps", "15", "--warmup", "5", "model.image_size=256"]),
                 ("large", ["--batch", "128", "--steps", "15", "--warmup", "5", "model.image_size=256"])]

    def train(preset: str, args: list[str], compiled: bool) -> Stage:
        name = f"train {preset}{' compile' if compiled else ''}"
        path = str(out / f"train-{preset}{'-compile' if compiled else ''}.json")
        argv = _m3ae("bench", "train", "--preset", preset, *args, "--no-reference", "--json", path,
                     *(["--compile"] if compiled else []))
        skip = "dry run: compile takes minutes on a CPU" if dry and compiled else None
        return Stage(name, argv, 180 if compiled else 90, path, skip)

    stages += [train(preset, args, False) for preset, args in sizes]
    head = ["--rows", "256", "--dim", "64", "--vocab", "1000", "--steps", "2", "--device", "cpu"] if dry else []
    stages.append(Stage("head", _m3ae("bench", "head", *head, "--json", str(out / "head.json")), 90,
                        str(out / "head.json")))
    ddp = _m3ae("pretrain", "--config", "demo", "--out", str(out / "ddp-run"), "steps=20", "progress=false",
                "log_every=10")
    stages.append(Stage("ddp nccl 2 gpus", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc-per-node", "2", *ddp[1:]], 150,
                        skip=None if gpus >= 2 else f"{gpus} GPU(s): DDP needs 2"))
    images, samples, batch = (16, 24, 4) if dry else (256, 1024, 32)
    workers = 1 if dry else max(1, cores)
    stages.append(Stage("data", _m3ae("bench", "data", str(out / "jpegs"), "--workers", str(workers),
                                      "--samples", str(samples), "--batch", str(batch),
                                      "--rounds", "1" if dry else "2", "--json", str(out / "data.json")), 120,
                        str(out / "data.json"), env={"M3AE_CHECK_IMAGES": str(images)}))
    # The host CPU: bf16 autocast and bf32 (fp32 with oneDNN's bf16-input matmuls) vs fp32, at base
    # width and for the paper's whole base at 256 px (BENCHMARKS.md's CPU bf16 rows). GPU machines
    # often have AMX Xeons, the CPUs on which precision=auto's bf16 is meant to double the step and
    # on which oneDNN runs bf32.
    for name, cpu in DRY_CPU_MODELS if dry else CPU_MODELS:
        for precision in CPU_PRECISIONS:
            stage = f"cpu {name}{' ' if name else ''}{precision}"
            path = str(out / (stage.replace(" ", "-") + ".json"))
            stages.append(Stage(stage, _m3ae("bench", "train", "--device", "cpu", "--precision", precision, *cpu,
                                             "--no-reference", "--json", path), 90, path))
    # Last (the most optional: a budget that runs out skips it first): MAE mode against HF ViTMAE on
    # the host CPU at 2 threads (the 2-vCPU AMX machine), when transformers is importable
    # and the source tree's benchmarks/ folder is here.
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "mae_vs_hf.py"
    mae_json = str(out / "mae-vs-hf.json")
    mae_skip = (f"no {script}" if not script.is_file()
                else None if importlib.util.find_spec("transformers") else "transformers is not installed")
    steps = ["--steps", "2", "--warmup", "1", "--batch", "8"] if dry else ["--steps", "20", "--warmup", "5"]
    stages += [train(preset, args, True) for preset, args in sizes]
    # Before it (both optional; a spent budget skips the last first): where the host's bf16 and fp32
    # steps spend their time at 2 threads (matmuls, attention, the rest, timed at the dispatcher),
    # what bounds bf16's speed-up on an AMX CPU.
    ops_script = script.with_name("op_times.py")
    ops_json = str(out / "cpu-op-times.json")
    model = (["--preset", "nano", "--batch", "4", "--max-caption", "8", "model.image_size=32", "model.patch_size=8",
              "model.text_length=16"] if dry else ["--preset", "base", "--batch", "16", "model.image_size=256"])
    stages.append(Stage("cpu op times", [sys.executable, str(ops_script), "--threads", "2", "--steps", "2", *model,
                                         "--json", ops_json], 240, ops_json,
                        skip=None if ops_script.is_file() else f"no {ops_script}"))
    stages.append(Stage("cpu mae vs hf", [sys.executable, str(script), "--threads", "2", "--bf32", *steps,
                                          "--json", mae_json], 150, mae_json, skip=mae_skip))
    return stages


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> None:
    """Smooth random photos-like JPEGs (gradients + noise), so the data stage needs no data set."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0, 1, h)[:, None, None]
    for i in range(count):
        base = rng.uniform(0, 255, (1, 1, 3)) * ramp + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(base, 0, 255).astype("uint8")).save(folder / f"{i:05d}.jpg", quality=90)


def _own_package_path() -> dict[str, str]:
    """PYTHONPATH with this m3ae first: stages run the code of the check that starts them (a source
    tree or worktree can differ from the installed package)."""
    root = str(Path(__file__).resolve().parents[2])
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def run_stage(stage: Stage, log: Path, timeout: float) -> dict:
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            done = subprocess.run(stage.argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **_own_package_path(), **stage.env})
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout:.0f} s"
    result = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "log": log.name,
              "command": " ".join(stage.argv)}
    if stage.json_out and Path(stage.json_out).is_file():
        result["result"] = json.loads(Path(stage.json_out).read_text())
    lines = log.read_text(errors="replace").strip().splitlines()
    result["tail"] = lines[-8:]
    return result


def summary(name: str, r: dict) -> str:
    """The stage's key numbers in one cell."""
    res = r.get("result")
    if not res:
        tail = r.get("tail") or [""]
        # pytest ends with a warnings footer: the count line ("4 passed in 56 s") is the number.
        counts = [line for line in tail if " passed" in line or " failed" in line or " error" in line]
        return (counts or tail)[-1].strip("= ")[:120]
    if name == "cpu mae vs hf":
        return "; ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items())
    if name == "cpu op times":
        return "fp32 / bf16 at 2 threads: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}x"
                                                          for k, v in res["ratios"].items())
    if name.startswith(("train", "cpu")):
        mem = (f"{res['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in res
               else f"{res.get('peak_rss_gib', 0):.1f} GiB RSS")
        graphs = (f", {res['compile_graphs']} graphs / {res['graph_breaks']} breaks" if "compile_graphs" in res
                  else "")
        return (f"{res['samples_per_s']:.1f} samples/s, MFU {100 * res['mfu']:.1f}% of {res['peak_tflops']:.3g} "
                f"TFLOP/s ({res['peak_source']}), matmul {res['matmul_tflops']:.3g} TFLOP/s, {mem}, "
                f"{res['precision']}, {res.get('image_dtype', 'float32')} images{graphs}")
    if name == "head":
        f, u = res["fused"], res["unfused"]
        return (f"fused {f['step_s'] * 1e3:.1f} ms vs {u['step_s'] * 1e3:.1f} ms, memory "
                f"{u['extra_memory_bytes'] / max(f['extra_memory_bytes'], 1):.1f}x lower")
    if name == "data":
        return "; ".join(f"{row['pipeline']} {row['one_worker']:.0f}/s (in-process), {row['many_workers']:.0f}/s "
                         f"({row['workers']} worker{'' if row['workers'] == 1 else 's'})" for row in res["rows"])
    return ""


def run(args: argparse.Namespace) -> int:
    import torch

    from ..perf import device_name

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    if not gpus and not args.dry_run:
        print("m3ae bench check: no CUDA device here; use --dry-run to check the check on a CPU", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    report = {"machine": {"device": device_name(torch.device("cuda" if gpus else "cpu")),
                          "cpu": device_name(torch.device("cpu")), "gpus": gpus, "cores": cores,
                          "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                          "dry_run": args.dry_run},
              "stages": {}}
    deadline = time.perf_counter() + args.budget
    for stage in plan(out, args.dry_run, gpus, cores, Path(args.tests)):
        left = deadline - time.perf_counter()
        if stage.skip or left < 10:
            report["stages"][stage.name] = {"status": "skipped: " + (stage.skip or "time budget spent")}
        else:
            if stage.name == "data":
                write_jpegs(out / "jpegs", int(stage.env["M3AE_CHECK_IMAGES"]))
            log = out / (stage.name.replace(" ", "-") + ".log")
            report["stages"][stage.name] = run_stage(stage, log, min(stage.timeout, left))
        print(f"{stage.name:22s} {report['stages'][stage.name]['status']}", file=sys.stderr, flush=True)
        # After every stage, so a check killed from outside still leaves the stages it finished.
        (out / "check.json").write_text(json.dumps(report, indent=2))
        (out / "check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [n for n, r in report["stages"].items() if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    return 1 if failed else 0


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# m3ae bench check{' (dry run)' if m['dry_run'] else ''}", "",
             f"Device: {m['device']}; {m['gpus']} GPU(s); CPU: {m['cpu']}, {m['cores']} cores; "
             f"torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}", "",
             "| stage | status | seconds | numbers |", "|---|---|---|---|"]
    for name, r in report["stages"].items():
        numbers = summary(name, r) if "seconds" in r else ""
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {numbers} |")
    labels = ((("", "nano (dry run)"),) if m["dry_run"]
              else (("", "base width"), ("base 256 ", "the whole base at 256 px")))
    for name, label in labels:
        fp32, bf16, bf32 = (report["stages"].get(f"cpu {name}{p}", {}).get("result") for p in CPU_PRECISIONS)
        for low, what in ((bf16, "bf16 autocast"), (bf32, "bf32 matmuls")):
            if fp32 and low:
                lines += ["", f"Host CPU, {what} vs fp32 step, {label}: "
                              f"{low['samples_per_s'] / fp32['samples_per_s']:.2f}x (same model, one after the other)."]
    return "\n".join(lines) + "\n"
