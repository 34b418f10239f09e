"""A study's report: results.json (every run, every number, the spread over seeds), results.md (the
tables) and the plots (each evaluation per arm with its seeds; loss curves of all arms)."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from .runner import (DONE, EVAL, evaluation_is_current, final_losses, read_json, run_dir, train_flag_changed,
                     write_json)
from .spec import StudySpec

WORDS = ("true_image", "mismatched_image", "no_image")


def machine() -> dict[str, Any]:
    import torch
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in have]
            break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_flags": flags, "cores": cores, "torch": torch.__version__,
            "python": platform.python_version()}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """One run's evaluation as {"TASK/POOL/probe_top1": value, ..., "words/true_image": value}."""
    out = {}
    for task, r in (result.get("probes") or {}).items():
        for pool, values in r.items():
            if isinstance(values, dict):
                for k in ("probe_top1", "knn_top1"):
                    out[f"{task}/{pool}/{k}"] = values[k]
    for k in WORDS:
        if k in (result.get("masked_words") or {}):
            out[f"words/{k}"] = result["masked_words"][k]
    if "true_image" in (result.get("masked_words") or {}):
        mw = result["masked_words"]
        out["words/true_minus_mismatched"] = mw["true_image"] - mw["mismatched_image"]
    return out


def spread(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def collect(study: StudySpec, out: Path) -> dict[str, Any]:
    runs, summary = [], {}
    for arm in study.arms:
        per_metric: dict[str, list[float]] = {}
        for seed in (arm.seeds if arm.seeds is not None else study.seeds):
            directory = run_dir(out, arm, seed)
            done, result = read_json(directory / DONE), read_json(directory / EVAL)
            # An evaluation of other settings (the evals or the arm's recipe changed since) is stale:
            # shown as such, never averaged with current ones.
            stale = bool(result and done and not evaluation_is_current(study, arm, seed, out, done, result))
            if stale or (done and train_flag_changed(done, arm)):
                result, stale = None, True
            status = "evaluated" if result else ("stale" if stale else "trained" if done else "pending")
            row: dict[str, Any] = {"arm": arm.name, "seed": seed, "status": status}
            if done:
                row.update(train_seconds=done.get("train_seconds"), steps=done.get("steps"),
                           checkpoint=done.get("checkpoint"), precision=done.get("precision"))
                # From the training log, or where only records without it were kept, what done.json says.
                row["final"] = final_losses(directory / "metrics.jsonl") or done.get("final", {})
            if result:
                row.update(eval_seconds=result.get("eval_seconds"), metrics=flat_metrics(result), eval=result)
                for k, v in row["metrics"].items():
                    per_metric.setdefault(k, []).append(v)
            runs.append(row)
        summary[arm.name] = {"overrides": arm.overrides, "base": study.recipe(arm), "trained": arm.train,
                             "metrics": {k: spread(v) for k, v in per_metric.items()}}
    return {"study": study.name, "machine": machine(), "tasks": [p.get("name") for p in study.evals.get("probes", [])],
            "runs": runs, "arms": summary}


def _fmt(s: dict[str, Any]) -> str:
    if not s or s.get("n", 0) == 0:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ± {(s['max'] - s['min']) / 2:.1f}"


def markdown(results: dict[str, Any], study: StudySpec) -> str:
    arms = results["arms"]
    metrics = sorted({k for a in arms.values() for k in a["metrics"]})
    probe_keys = [k for k in metrics if not k.startswith("words/")]
    order = [p.get("name") for p in study.evals.get("probes", [])]  # the study file's order
    tasks = sorted(dict.fromkeys(k.split("/")[0] for k in probe_keys),
                   key=lambda t: order.index(t) if t in order else len(order))
    pools = list(dict.fromkeys(k.split("/")[1] for k in probe_keys))
    seeds = {a: sum(1 for r in results["runs"] if r["arm"] == a and r["status"] == "evaluated") for a in arms}
    lines = [f"# Study: {study.name}", "",
             "Entries: mean ± half the range over seeds (n = seeds evaluated); top-1 %, frozen encoder, "
             "images alone.", ""]
    for pool in pools:
        name = "[CLS] token" if pool == "cls" else "mean of the image tokens"
        lines += [f"## Probes on the {name} (`{pool}`)", ""]
        head = ["arm", "n"] + [f"{t} {m}" for t in tasks for m in ("probe", "kNN")]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, a in arms.items():
            cells = [arm, str(seeds[arm])]
            for t in tasks:
                for m in ("probe_top1", "knn_top1"):
                    cells.append(_fmt(a["metrics"].get(f"{t}/{pool}/{m}", {})))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if any(k.startswith("words/") for k in metrics):
        lines += ["## Masked-word accuracy on held-out captions (%)", "",
                  "| arm | n | true image | mismatched image | no image | true − mismatched |",
                  "|---|---|---|---|---|---|"]
        for arm, a in arms.items():
            if "words/true_image" not in a["metrics"]:
                continue
            cells = [arm, str(seeds[arm])] + [_fmt(a["metrics"].get(f"words/{k}", {}))
                                              for k in (*WORDS, "true_minus_mismatched")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Runs", "", "| arm | seed | status | precision | train min | eval min | final image loss | "
              "final text loss |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        f = r.get("final", {})
        cells = [r["arm"], str(r["seed"]), r["status"], r.get("precision") or "–",
                 f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "–",
                 f"{r['eval_seconds'] / 60:.1f}" if r.get("eval_seconds") else "–",
                 f"{f['image_loss']:.4f}" if "image_loss" in f else "–",
                 f"{f['text_loss']:.3f}" if "text_loss" in f else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    mixed = sorted({r["precision"] for r in results["runs"] if r.get("precision")})
    if len(mixed) > 1:  # e.g. precision: auto resumed or run on machines that resolve it differently
        lines += ["", f"**Runs trained in different precisions ({', '.join(mixed)})**: their differences mix "
                      "the arms' with the arithmetic's; pin `precision` in the recipe to compare arms."]
    m = results["machine"]
    flags = ", ".join(m.get("cpu_flags") or []) or "none of avx2/avx512f/avx512_bf16/amx"
    lines += ["", f"Machine: {m['cpu']} ({flags}), {m['cores']} cores, torch {m['torch']}.", ""]
    return "\n".join(lines)


def _bars(ax, names, stats_list, title, color="tab:blue"):
    xs = range(len(names))
    means = [s.get("mean", float("nan")) for s in stats_list]
    ax.bar(xs, means, color=color, alpha=0.55)
    for x, s in zip(xs, stats_list):
        for v in s.get("values", []):
            ax.plot(x, v, "k.", ms=5)
    finite = [v for s in stats_list for v in s.get("values", [])]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(1.0, (hi - lo) * 0.3)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def plot_evals(results: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    arms = results["arms"]
    names = list(arms)
    order = list(results.get("tasks", []))
    keys = sorted({k for a in arms.values() for k in a["metrics"] if not k.startswith("words/")},
                  key=lambda k: (order.index(k.split("/")[0]) if k.split("/")[0] in order else len(order), k))
    written = []
    for pool in dict.fromkeys(k.split("/")[1] for k in keys):
        mine = [k for k in keys if k.split("/")[1] == pool]
        if not mine:
            continue
        cols = min(4, len(mine))
        rows = math.ceil(len(mine) / cols)
        fig = Figure(figsize=(3.4 * cols, 3.0 * rows), dpi=100)
        for i, k in enumerate(mine):
            ax = fig.add_subplot(rows, cols, i + 1)
            task, _, metric = k.split("/")
            _bars(ax, names, [arms[a]["metrics"].get(k, {}) for a in names],
                  f"{task}: {'fast probe' if metric == 'probe_top1' else 'kNN'} top-1 (%)")
        fig.suptitle(f"{results['study']}: frozen {pool} features, bars = mean, dots = seeds", fontsize=10)
        fig.tight_layout()
        path = out / f"evals_{pool}.png"
        fig.savefig(path)
        written.append(path)
    with_words = [a for a in names if "words/true_image" in arms[a]["metrics"]]
    if with_words:
        fig = Figure(figsize=(max(5.0, 1.2 * len(with_words) + 2), 3.4), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        width = 0.27
        for j, (k, color) in enumerate(zip(WORDS, ("tab:green", "tab:orange", "tab:gray"))):
            for i, a in enumerate(with_words):
                s = arms[a]["metrics"].get(f"words/{k}", {})
                ax.bar(i + (j - 1) * width, s.get("mean", 0.0), width, color=color,
                       label=k.replace("_", " ") if i == 0 else None)
                for v in s.get("values", []):
                    ax.plot(i + (j - 1) * width, v, "k.", ms=4)
        ax.set_xticks(range(len(with_words)))
        ax.set_xticklabels(with_words, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("masked-word accuracy (%)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("hidden words of held-out captions, given the true / a mismatched / no image", fontsize=9)
        fig.tight_layout()
        path = out / "masked_words.png"
        fig.savefig(path)
        written.append(path)
    return written


def plot_losses(study: StudySpec, out: Path) -> Path | None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=100)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    drew = False
    colors = [f"C{i}" for i in range(10)]
    labelled: set[tuple[int, str]] = set()  # (axis, arm): each arm named once per axis, by its first seed drawn
    for i, arm in enumerate(a for a in study.arms if a.train):
        for j, seed in enumerate(arm.seeds if arm.seeds is not None else study.seeds):
            path = run_dir(out, arm, seed) / "metrics.jsonl"
            if not path.is_file():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            for k, (ax, key) in enumerate(zip(axes, ("image_loss", "text_loss"))):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    first = (k, arm.name) not in labelled
                    labelled.add((k, arm.name))
                    ax.plot(*zip(*pts), color=colors[i % 10], lw=1.2, alpha=0.9 if j == 0 else 0.5,
                            label=arm.name if first else None)
                    drew = True
    if not drew:
        return None
    for ax, title in zip(axes, ("image loss (masked patches)", "text loss (masked words)")):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[1]:  # an MAE-only study draws no text losses
            ax.legend(fontsize=7)
    fig.suptitle(f"{study.name}: training losses of every arm (seeds: lighter lines)", fontsize=10)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path)
    return path


def write_report(study: StudySpec, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = collect(study, out)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results, study))
    plot_evals(results, out)
    plot_losses(study, out)
    return results
