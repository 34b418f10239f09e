"""How steady is the fast probe's test top-1? The same features probed again and again, under the two
perturbations that moved the fashion study's numbers: the features' last bits (a code change that
only rounds differently) and the random hold-out the L2 strength is picked on.

    PYTHONPATH=src python benchmarks/probe_stability.py studies/fashion.yaml --data-root ../shared/data \
        [--checkpoint RUN/checkpoints/step_N | --arm random] [--task type] [--pool cls] \
        [--repeats 6] [--folds 1 5] [--solvers plain preconditioned] [--eps 1e-6] [--max-iter N] \
        [--features /tmp/feats.safetensors] [--json OUT]
    ... --trace 1e-4 [--budgets 50 100 200 400 800]    # one L2, both solvers, by iteration budget

The model is a study run's checkpoint, or the arm's architecture at its random init (`--arm`, seed
0). Features of the task's training and test images are extracted once (cached in --features).
Then, for each solver (`plain` L-BFGS, as the published studies, or `preconditioned`, the library's
default; m3ae.eval.fast_probe.fit_logistic) and L2-selection protocol (`--folds 1`: one 20 %
hold-out, as the published studies; `--folds k`: k-fold cross-validation), the probe runs
`--repeats` times on features scaled by (1 + eps * N(0, 1)) with hold-out seed 0, and `--repeats`
times on the plain features with hold-out seeds 0..R-1. It prints the spread (max - min) and
standard deviation of test top-1 and the L2 strengths picked. The study's grid, max_iter and task
settings are used unless overridden. With `--trace L2`, instead: one fit on all training features at
that L2 per solver and iteration budget, with its objective (mean cross-entropy + L2 penalty) and
test top-1, to see how far each solver is from the optimum.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def features(args, study, spec, task) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    if args.features and Path(args.features).is_file():
        return load_file(args.features)
    from m3ae import M3AE
    from m3ae.study.evaluate import FeatureCache, load_probe_sets
    from m3ae.study.runner import arm_config

    arm = next(a for a in study.arms if a.name == args.arm)
    config = arm_config(study, arm, 0, None)
    if args.checkpoint:
        model = M3AE.from_pretrained(args.checkpoint)
    else:
        torch.manual_seed(config.seed)
        model = M3AE(config.model)
    sets = load_probe_sets(task, model.config.image_size, config.data.normalization)
    cache = FeatureCache(model, spec)
    train, _ = cache(sets.train)
    test, _ = cache(sets.test)
    out = {"train_y": sets.train_labels, "test_y": sets.test_labels}
    for pool in spec.pools:
        out[f"train_{pool}"] = train[pool][sets.train_index].contiguous()
        out[f"test_{pool}"] = test[pool][sets.test_index].contiguous()
    if args.features:
        save_file(out, args.features)
    return out


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "spread": max(values) - min(values),
            "std": statistics.pstdev(values), "values": values}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--data-root", default=None)
    p.add_argument("--checkpoint", default=None, help="a study run's checkpoint (default: --arm at random init)")
    p.add_argument("--arm", default="random", help="the arm whose architecture and data settings are used")
    p.add_argument("--task", default="type")
    p.add_argument("--pool", default="cls")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--folds", type=int, nargs="+", default=[1, 5])
    p.add_argument("--solvers", nargs="+", choices=("plain", "preconditioned"), default=["plain", "preconditioned"])
    p.add_argument("--eps", type=float, default=1e-6, help="relative size of the last-bits perturbation")
    p.add_argument("--l2", type=float, nargs="+", default=None, help="L2 grid (default: the study's)")
    p.add_argument("--max-iter", type=int, default=None, help="L-BFGS iterations (default: the study's)")
    p.add_argument("--features", default=None, help="cache the extracted features here (safetensors)")
    p.add_argument("--trace", type=float, default=None, metavar="L2",
                   help="objective and top-1 of each solver by iteration budget, at this L2")
    p.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from m3ae.eval.fast_probe import fast_probe, fit_logistic
    from m3ae.eval.knn import topk_accuracy
    from m3ae.study.evaluate import EvalSpec
    from m3ae.study.spec import load_study

    study = load_study(args.study, args.data_root)
    spec = EvalSpec.from_dict(study.evals)
    task = next(t for t in spec.probes if t.name == args.task)
    t0 = time.perf_counter()
    feats = features(args, study, spec, task)
    x, y = feats[f"train_{args.pool}"], feats["train_y"]
    vx, vy = feats[f"test_{args.pool}"], feats["test_y"]
    classes = int(max(y.max(), vy.max())) + 1
    grid = args.l2 or spec.l2_grid
    max_iter = args.max_iter or spec.max_iter
    print(f"{args.checkpoint or args.arm + ' (random init)'}: {args.task}/{args.pool}, {len(y)} train / {len(vy)} "
          f"test features of {x.shape[1]}, {classes} classes; features {time.perf_counter() - t0:.0f} s; "
          f"grid {grid}, max_iter {max_iter}", file=sys.stderr)
    report: dict = {"model": args.checkpoint or f"{args.arm} (random init)", "task": args.task, "pool": args.pool,
                    "grid": grid, "max_iter": max_iter, "eps": args.eps, "protocols": {}}
    if args.trace is not None:
        l2 = args.trace
        report["trace"] = {"l2": l2, "rows": []}
        for solver in args.solvers:
            for budget in args.budgets:
                start = time.perf_counter()
                model = fit_logistic(x, y, classes, l2, budget, precondition=solver != "plain")
                seconds = time.perf_counter() - start
                objective = model.objective(x, y, l2)
                top1 = topk_accuracy(model.logits(vx), vy, ks=(1,))["top1"]
                report["trace"]["rows"].append({"solver": solver, "budget": budget, "iterations": model.iterations,
                                                "objective": objective, "top1": top1, "seconds": seconds})
                print(f"{solver:14s} {budget:5d} iterations: objective {objective:.5f}, test top-1 {top1:.2f} "
                      f"({seconds:.1f} s)", flush=True)
    solvers = args.solvers if args.trace is None else []  # --trace replaces the repeated probes
    for solver in solvers:
        for folds in args.folds:
            rows: dict[str, dict] = {}
            for kind in ("last bits", "hold-out seed"):
                top1, picks, seconds = [], [], []
                for r in range(args.repeats):
                    xr = x
                    if kind == "last bits" and r > 0:
                        g = torch.Generator().manual_seed(r)
                        xr = x * (1 + args.eps * torch.randn(x.shape, generator=g))
                    start = time.perf_counter()
                    res = fast_probe(xr, y, vx, vy, classes, l2_grid=grid, max_iter=max_iter, folds=folds,
                                     seed=r if kind == "hold-out seed" else 0, precondition=solver != "plain")
                    seconds.append(time.perf_counter() - start)
                    top1.append(res["top1"])
                    picks.append(res["l2"])
                rows[kind] = {**summary(top1), "picks": picks, "seconds_per_probe": statistics.fmean(seconds)}
                s = rows[kind]
                print(f"{solver}, folds {folds}, {kind:13s}: top-1 mean {s['mean']:.2f}, spread {s['spread']:.2f}, "
                      f"std {s['std']:.2f}; L2 picked {picks}; {s['seconds_per_probe']:.1f} s a probe", flush=True)
            report["protocols"][f"{solver}, folds {folds}"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
