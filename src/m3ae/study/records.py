"""A study's records: the small files of every run (what it was trained with, its training log, its
evaluations), without the weights, in the study folder's own layout, so that a folder of records is
a study folder the report reads (`m3ae study STUDY.yaml --report-only --out RECORDS`).

Weights are large and often left behind (a scratch disk, another machine); records are kilobytes and
can be committed. Saving records into a folder that already holds some merges them: runs the study
folder has replace their records there, runs only the records folder has are kept, so the runs of
several sessions or machines add up to one report.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoint import RUN_CONFIG_NAME
from .runner import DONE, read_json, run_dir
from .spec import StudySpec

TOKENIZER = "tokenizer.json"


def record_files(run: Path) -> list[Path]:
    """The record files of one run folder: done.json, every eval*.json, the training log and the run's
    settings (never checkpoints or weights)."""
    names = [DONE, "metrics.jsonl", RUN_CONFIG_NAME]
    found = [run / n for n in names if (run / n).is_file()]
    return found + sorted(p for p in run.glob("eval*.json") if p.is_file())


def _same_vocabulary(a: Path, b: Path) -> bool:
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(str(a)).get_vocab() == load_tokenizer(str(b)).get_vocab()


def _same_run(done: Path, saved: Path) -> bool:
    """Whether the records folder's done.json is this run's (an evaluation saved there under another
    name, made of the same weights elsewhere, is kept) or another's (a run redone since)."""
    return saved.is_file() and read_json(saved) == read_json(done)


def _copy(source: Path, target: Path) -> None:
    """Copy through a temporary file and a rename, so a stop leaves the old record or the new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def check_records_folder(out: str | Path, records: str | Path) -> None:
    """A records folder must be another folder than the study folder it copies from."""
    if Path(out).resolve() == Path(records).resolve():
        raise ValueError(f"the records folder {records} is the study folder itself: give another folder")


def save_records(study: StudySpec, out: str | Path, records: str | Path) -> list[str]:
    """Copy the records of every finished run of `study` in folder `out` into folder `records`
    (created if need be) and return the runs copied ("arm/seedS"). A run redone since its records
    were saved replaces them as a whole; the same run (the same done.json) keeps any other
    evaluation saved beside its own (an eval_steady.json made elsewhere). The study's vocabulary
    comes along; records whose vocabulary differs from the study folder's are refused (their runs and
    these could not be compared)."""
    out, records = Path(out), Path(records)
    check_records_folder(out, records)
    tokenizer, saved_tokenizer = out / TOKENIZER, records / TOKENIZER
    if tokenizer.is_file() and saved_tokenizer.is_file() and not _same_vocabulary(tokenizer, saved_tokenizer):
        raise ValueError(f"{saved_tokenizer} is another vocabulary than {tokenizer}: the runs recorded in "
                         f"{records} were tokenized differently; save these records to another folder")
    copied = []
    for arm in study.arms:
        for seed in (arm.seeds if arm.seeds is not None else study.seeds):
            run = run_dir(out, arm, seed)
            if not (run / DONE).is_file():  # unfinished: whatever the records folder has stays
                continue
            target = run_dir(records, arm, seed)
            files = record_files(run)
            if not _same_run(run / DONE, target / DONE):  # redone since: the old run's records all go
                for old in record_files(target) if target.is_dir() else []:
                    if old.name not in {f.name for f in files}:
                        old.unlink()
            for f in files:
                _copy(f, target / f.name)
            copied.append(f"{arm.name}/seed{seed}")
    if tokenizer.is_file() and not saved_tokenizer.is_file():
        _copy(tokenizer, saved_tokenizer)
    return copied
