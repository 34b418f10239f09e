"""`m3ae study`: run a study (arms x seeds of one recipe, each evaluated), resumably, and report it."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a study: several pretraining arms, evaluated and compared",
                       description="Pretrain every arm x seed of STUDY.yaml that is not finished, evaluate each, "
                                   "and write OUT/results.json, results.md and plots. Run it again after a stop: "
                                   "finished runs are skipped, an interrupted one resumes from its checkpoint.")
    p.add_argument("study", help="study file (e.g. studies/fashion.yaml)")
    p.add_argument("--out", required=True, type=C.output_folder, help="study folder")
    p.add_argument("--data-root", default=None, help="replaces $DATA in the study file's paths")
    p.add_argument("--arms", default=None, help="comma-separated arm names to run (default: all)")
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="comma-separated seeds to run, of those the study gives each arm (default: all)")
    p.add_argument("--threads", type=C.positive, default=None,
                   help="torch threads per process (default: torch's; with --jobs N, cores / N)")
    p.add_argument("--jobs", type=C.positive, default=1,
                   help="runs side by side in N processes (each takes the runs no other holds)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from what is done")
    p.add_argument("--save-records", default=None, metavar="DIR", type=C.output_folder,
                   help="also copy every finished run's records (settings, training log, evaluations; no "
                        "weights) into DIR, merged with the runs DIR already holds (a run redone replaces its "
                        "records), and write DIR's report: a folder to commit, whose report `--report-only "
                        "--out DIR` rewrites")
    p.add_argument("--pictures", default=None, metavar="ARM[/seedS]",
                   help="also draw reconstructions and word-to-patch attention from this arm's model")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # --jobs workers
    p.set_defaults(func=run)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def _child_command(args: argparse.Namespace, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "m3ae", "study", args.study, "--out", args.out, "--threads", str(threads),
           "--no-report"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.arms:
        cmd += ["--arms", args.arms]
    if args.seeds is not None:
        cmd += ["--seeds", ",".join(map(str, args.seeds))]
    return cmd


def _wait_forwarding_signals(children: list[subprocess.Popen]) -> list[int]:
    """Wait for the workers. SIGTERM (a scheduler's preemption) is passed on, so each worker
    checkpoints its run and stops; SIGINT from a terminal already reaches the whole process group,
    so the parent only keeps waiting (a second SIGINT to a worker means "stop now")."""
    def forward(signum, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None)}
    try:
        return [c.wait() for c in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import torch

    from ..study.report import write_report
    from ..study.runner import StudyStopped, check_study, prepare_tokenizer, run_study, select_runs
    from ..study.spec import load_study

    study = load_study(args.study, args.data_root)
    only = [a for a in args.arms.split(",") if a] if args.arms else None
    # Before anything runs (the vocabulary, --jobs workers), and with --report-only too: the checks of
    # a run (run_study repeats them for library callers). Only a run or --pictures reads the evaluation
    # data; --pictures is checked now too, not after the training it waits for.
    check_study(study, args.out, data=not args.report_only or bool(args.pictures))
    if args.save_records:  # before anything runs, not after the training
        from ..study.records import check_records_folder
        check_records_folder(args.out, args.save_records)
    if not args.report_only:
        select_runs(study, only, args.seeds)  # an unknown arm or seed: one clear error, before any worker
    if args.pictures:
        from ..study.pictures import check_pictures
        check_pictures(study, args.out, args.pictures, trains=[] if args.report_only else only)
    stopped: str | Exception | None = None
    failed = False
    if not args.report_only:
        if args.jobs > 1:
            # Once, here: workers each training their own vocabulary would differ (WordPiece ties).
            Path(args.out).mkdir(parents=True, exist_ok=True)
            prepare_tokenizer(study, Path(args.out))
            threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.jobs)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            children = [subprocess.Popen(_child_command(args, threads), env=env) for _ in range(args.jobs)]
            codes = _wait_forwarding_signals(children)
            signalled = {130, 128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGINT}
            if any(c and c not in signalled for c in codes):
                failed = True
                print(f"m3ae study: a worker process failed (exit codes {codes}); the report shows what is done",
                      file=sys.stderr)
            elif any(codes):
                stopped = "a worker was stopped by a signal"
        else:
            if args.threads:  # pretrain's thread policy takes OMP_NUM_THREADS as an explicit choice
                os.environ["OMP_NUM_THREADS"] = str(args.threads)
                torch.set_num_threads(args.threads)
            # SIGTERM outside pretraining (which checkpoints on it itself), e.g. while evaluating:
            # stop like Ctrl-C (exit 130, the run redone next time), not die with 143.
            previous = signal.signal(signal.SIGTERM, _interrupt)
            try:
                run_study(study, args.out, only=only, seeds=args.seeds)
            except StudyStopped as err:
                stopped = err
            except KeyboardInterrupt:
                stopped = "interrupted by a signal"
            finally:
                signal.signal(signal.SIGTERM, previous)
    if getattr(args, "no_report", False):
        return 130 if stopped else 1 if failed else 0
    results = write_report(study, args.out)
    if args.save_records:
        from ..study.records import save_records
        copied = save_records(study, args.out, args.save_records)
        kept = write_report(study, args.save_records)
        print(f"saved the records of {len(copied)} runs to {args.save_records}; its report: "
              f"{sum(r['status'] == 'evaluated' for r in kept['runs'])} of {len(kept['runs'])} runs evaluated")
    if args.pictures:
        from ..study.pictures import draw_pictures
        for path in draw_pictures(study, args.out, args.pictures):
            print(f"wrote {path}")
    pending = [f"{r['arm']}/seed{r['seed']}" for r in results["runs"] if r["status"] != "evaluated"]
    print(f"wrote {args.out}/results.json, results.md and plots; "
          f"{len(results['runs']) - len(pending)} of {len(results['runs'])} runs evaluated")
    if stopped:
        print(f"stopped: {stopped}; run the same command again to continue", file=sys.stderr)
        return 130
    if pending:
        print(f"not finished: {', '.join(pending)}", file=sys.stderr)
    return 1 if failed else 0
