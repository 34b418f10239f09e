"""A load that arrives in the middle of a CPU run, and leaves: how each thread setting copes.

    PYTHONPATH=src python benchmarks/load_mid_run.py [--threads auto 2 1] [--phases 100 120 120]
        [--busy 1] [pretrain overrides ...]

For each `threads` setting, one `m3ae pretrain` run (the demo config in MAE mode by default, no
loader workers, fp32) goes through three phases: quiet, `--busy` busy-looping processes beside it,
quiet again. The rows of its metrics.jsonl are timed as they appear; each phase's samples/s is
the mean of the rows that end in it, leaving out the rows of its first 30 s (the step count the
load watch tries, and the transition). Runs go one after the other, so nothing else should run.
Prints one line per run and a markdown table.
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from m3ae.perf import device_name  # noqa: E402
from m3ae.train.bench import background_load  # noqa: E402

SETTLE_S = 30.0
DEFAULTS = ["model.vocab_size=0", "model.use_type_embedding=false", "data.num_workers=0", "precision=fp32",
            "log_every=10", "progress=false", "steps=1000000", "ckpt_every=1000000"]


def run_once(threads: str, phases: list[float], busy: int, overrides: list[str], root: Path) -> dict:
    out = root / f"threads-{threads}"
    argv = [sys.executable, "-m", "m3ae", "pretrain", "--config", "demo", "--out", str(out), *DEFAULTS, *overrides]
    if threads != "auto":
        argv.append(f"threads={threads}")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    log = (root / f"threads-{threads}.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics = out / "metrics.jsonl"
    rows: list[tuple[float, dict]] = []  # (seconds since the phases began, row)
    seen = 0
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):  # past start-up
        time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"the run ended early: {root / f'threads-{threads}.log'}")
    seen = metrics.read_text().count("\n")
    t0 = time.perf_counter()
    edges = [sum(phases[:i + 1]) for i in range(len(phases))]

    def poll_until(t_end: float) -> None:
        nonlocal seen
        while time.perf_counter() - t0 < t_end:
            time.sleep(0.5)
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                rows.append((time.perf_counter() - t0, json.loads(line)))
            seen = len(lines)

    poll_until(edges[0])
    with background_load(busy):
        poll_until(edges[1])
    poll_until(edges[2])
    proc.terminate()
    proc.wait()
    log.close()
    said = [line.strip() for line in (root / f"threads-{threads}.log").read_text().splitlines()
            if "(auto threads)" in line]
    result = {"threads": threads, "phases": [], "decisions": said}
    start = 0.0
    for end in edges:
        picked = [r for t, r in rows if start + SETTLE_S <= t < end]
        rate = statistics.mean(r["samples_per_s"] for r in picked) if picked else float("nan")
        counts = sorted({r["threads"] for t, r in rows if start <= t < end})
        result["phases"].append({"samples_per_s": rate, "rows": len(picked), "thread_counts": counts})
        start = end
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", nargs="+", default=["auto", "2", "1"])
    p.add_argument("--phases", nargs=3, type=float, default=[100.0, 120.0, 120.0], metavar="S",
                   help="seconds quiet, loaded, quiet again")
    p.add_argument("--busy", type=int, default=1, help="busy processes in the middle phase")
    p.add_argument("overrides", nargs="*", help="pretrain settings (KEY=VALUE)")
    args = p.parse_args()
    import torch  # for the header only
    print(f"# {device_name(torch.device('cpu'))}; phases {args.phases} s, {args.busy} busy process(es) "
          f"in the middle one; the first {SETTLE_S:.0f} s of each left out", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            r = run_once(threads, args.phases, args.busy, args.overrides, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| threads | quiet | loaded | quiet again | counts seen (per phase) |\n|---|---|---|---|---|")
    for r in results:
        ph = r["phases"]
        print(f"| {r['threads']} | " + " | ".join(f"{x['samples_per_s']:.1f}" for x in ph)
              + " | " + " / ".join(",".join(map(str, x["thread_counts"])) for x in ph) + " |")


if __name__ == "__main__":
    main()
