"""Run a study: pretrain every (arm, seed) that is not finished, evaluate every run that has no
result yet, then write the report. Safe to stop at any moment and run again (it picks up where it
stopped: finished runs and evaluations are skipped, an interrupted pretraining resumes from its
newest checkpoint), and safe to run in several processes at once (a lock per run folder: each
process takes the runs nobody holds).

Layout of OUT: tokenizer.json, study.yaml (the resolved study), runs/ARM/seedS/ (the pretraining run
folder: checkpoints/, metrics.jsonl; plus done.json and eval.json), results.json, results.md, *.png.
"""
from __future__ import annotations

import fcntl
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import RUN_CONFIG_NAME
from ..config import ConfigError
from ..files import atomic_write
from ..host_allocator import keep_freed_memory
from ..model import M3AE
from ..train.config import TrainConfig, from_yaml, load_config, same_files, setting_changes, to_yaml
from .evaluate import (EvalSpec, FeatureCache, ImageCache, load_captioned, load_probe_sets, masked_word_accuracy,
                       run_probe)
from . import fingerprint as fp
from .spec import ArmSpec, StudySpec

DONE = "done.json"
EVAL = "eval.json"
INIT = "init"  # an untrained arm's weights

log = logging.getLogger(__name__)


class StudyStopped(Exception):
    """A run was stopped (SIGINT/SIGTERM) after writing a checkpoint: run the same command to go on."""


def run_dir(out: Path, arm: ArmSpec, seed: int) -> Path:
    return out / "runs" / arm.name / f"seed{seed}"


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextmanager
def run_lock(directory: Path) -> Iterator[bool]:
    """Yields True if this process holds the run folder's lock (released when it exits, even if killed)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_tokenizer(study: StudySpec, out: Path) -> str | None:
    """OUT/tokenizer.json, which every arm uses: a copy of `tokenizer.path` (relative to the study
    file), or trained once on `tokenizer.train_from`. HF WordPiece training orders tied tokens by a
    randomly seeded hash map, so two trainings on the same texts differ: a study that must be
    reproducible from a clean clone ships its vocabulary (`path`)."""
    tok = study.tokenizer
    named = study_tokenizer(study, out)
    if named is None:
        return None
    path = Path(named)
    if tok.path:
        from ..data.tokenizer import load_tokenizer

        source = Path(tok.path)
        if not source.is_absolute() and study.path is not None and (study.path.parent / source).is_file():
            source = study.path.parent / source
        if not source.is_file():
            raise FileNotFoundError(f"study tokenizer not found: {tok.path}")
        tokenizer = load_tokenizer(str(source))  # checks that it loads
        if path.is_file():  # this folder's runs used that copy: the study must still name the same vocabulary
            if load_tokenizer(str(path)).get_vocab() != tokenizer.get_vocab():
                raise ValueError(f"{source} is not the vocabulary {path} holds, which this folder's runs used; "
                                 "use another --out, or delete that folder to redo the runs")
            return str(path)
    elif path.is_file():
        return str(path)
    else:
        from ..data.sources import build_source
        from ..data.spec import parse_item
        from ..data.tokenizer import source_texts, train_wordpiece

        train_from = str(tok.train_from)  # set: checked above
        log.info("training a %d-token WordPiece vocabulary on %s", tok.vocab_size, train_from)
        tokenizer = train_wordpiece(source_texts([build_source(parse_item(train_from))]), tok.vocab_size,
                                    tok.min_frequency)
    atomic_write(path, lambda tmp: tokenizer.save(tmp))
    return str(path)


def arm_config(study: StudySpec, arm: ArmSpec, seed: int, tokenizer: str | None) -> TrainConfig:
    """The run's settings, as its run_config.yaml records them (no progress bar in a study)."""
    overrides = list(study.overrides)
    if tokenizer:
        overrides.append(f"data.tokenizer={tokenizer}")
    overrides += list(arm.overrides) + [f"seed={seed}"]
    config = load_config(study.recipe(arm), overrides)
    config.progress = False
    return config


def study_tokenizer(study: StudySpec, out: Path) -> str | None:
    """OUT/tokenizer.json where the study names a tokenizer (prepare_tokenizer makes it), else None."""
    return str(out / "tokenizer.json") if (study.tokenizer.path or study.tokenizer.train_from) else None


def train_flag_changed(done: dict, arm: ArmSpec) -> bool:
    """The run was pretrained (or left at init) where the study now says otherwise."""
    return done.get("trained", arm.train) != arm.train


def evaluation_is_current(study: StudySpec, arm: ArmSpec, seed: int, out: Path, done: dict,
                          evaluation: dict) -> bool:
    """Whether this finished run's eval.json was made with the study's current settings (the report;
    the runner applies the same rule, m3ae.study.fingerprint.evaluation_is_current)."""
    config = arm_config(study, arm, seed, study_tokenizer(study, out))
    return fp.evaluation_is_current(evaluation, EvalSpec.from_dict(study.evals), config, done["checkpoint"], out,
                                    run_dir(out, arm, seed))


def final_losses(metrics: Path, last: int = 5) -> dict[str, float]:
    """The mean of the last `last` logged values of each loss in a training log (empty without one)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "loss" in r]
    out = {}
    for key in ("image_loss", "text_loss", "text_accuracy"):
        values = [r[key] for r in rows[-last:] if key in r]
        if values:
            out[key] = sum(values) / len(values)
    return out


def train_seconds(metrics_path: Path, batch_size: int) -> float:
    """Pretraining time from the logged throughput (resume-proof: the rows of the steps kept)."""
    seconds, last_step = 0.0, 0
    if not metrics_path.is_file():
        return 0.0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "samples_per_s" in row and row.get("samples_per_s"):
            seconds += (row["step"] - last_step) * batch_size / row["samples_per_s"]
            last_step = row["step"]
    return seconds


class Evaluator:
    """The study's evaluation sets, loaded once per process and shared by every run."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        self._probes: dict[tuple, Any] = {}
        self._images = ImageCache()
        self._captioned: dict[tuple, Any] = {}

    def probe_sets(self, task, image_size: int, stats):
        key = (task.name, image_size, str(stats))
        if key not in self._probes:
            t0 = time.perf_counter()
            self._probes[key] = load_probe_sets(task, image_size, stats, self._images)
            s = self._probes[key]
            log.info("probe %s: %d classes, %d train / %d test images (%.0f s to read)", task.name,
                     len(s.classes), len(s.train_index), len(s.test_index), time.perf_counter() - t0)
        return self._probes[key]

    def captioned(self, tokenizer_path: str, image_size: int, text_length: int, stats):
        from ..data.tokenizer import load_tokenizer
        key = (tokenizer_path, image_size, text_length, str(stats))
        if key not in self._captioned:
            if self.spec.masked_words is None:
                raise ValueError("the study has no masked_words evaluation")
            self._captioned[key] = load_captioned(self.spec.masked_words, load_tokenizer(tokenizer_path),
                                                  image_size, text_length, stats)
        return self._captioned[key]

    def __call__(self, model: M3AE, config: TrainConfig) -> dict[str, Any]:
        stats = config.data.normalization
        result: dict[str, Any] = {"probes": {}}
        features = FeatureCache(model, self.spec)
        for task in self.spec.probes:
            sets = self.probe_sets(task, config.model.image_size, stats)
            result["probes"][task.name] = run_probe(sets, self.spec, features)
            summary = ", ".join(f"{p} probe {r['probe_top1']:.2f} knn {r['knn_top1']:.2f}"
                                for p, r in result["probes"][task.name].items() if isinstance(r, dict))
            log.info("  %s: %s", task.name, summary)
        mw = self.spec.masked_words
        if mw is not None and config.model.has_text and config.data.tokenizer:
            t0 = time.perf_counter()
            data = self.captioned(config.data.tokenizer, config.model.image_size, config.model.text_length, stats)
            if int(data.text.max()) >= config.model.vocab_size:
                raise ValueError(f"{config.data.tokenizer} gives token ids up to {int(data.text.max())}, beyond "
                                 f"the model's vocab_size {config.model.vocab_size}")
            words = masked_word_accuracy(model, data, mw, self.spec.batch_size)
            words["seconds"] = time.perf_counter() - t0
            result["masked_words"] = words
            log.info("  masked words: true image %.2f, mismatched %.2f, no image %.2f (%%)", words["true_image"],
                     words["mismatched_image"], words["no_image"])
        return result


def run_one(study: StudySpec, arm: ArmSpec, seed: int, out: Path, tokenizer: str | None,
            evaluator: Evaluator) -> str:
    """Pretrain (or resume) and evaluate one run; returns 'done', 'busy' (another process has it)."""
    directory = run_dir(out, arm, seed)
    config = arm_config(study, arm, seed, tokenizer)
    with run_lock(directory) as mine:
        if not mine:
            if read_json(directory / DONE) is not None:  # finished before; another worker is only reading it
                return "done"
            log.info("%s seed %d: another process is on it; skipping", arm.name, seed)
            return "busy"
        saved = directory / RUN_CONFIG_NAME
        # Files inside the study folder are compared by their place in it (run_config.yaml records them
        # so; older folders hold absolute paths), so a moved or differently spelled --out still resumes;
        # data files by their real path (another spelling of --data-root is no change); settings added
        # since the run was made count at their defaults (m3ae.study.fingerprint).
        if saved.is_file() and not fp.same_run_settings(saved.read_text(), config, out):
            changed = setting_changes(same_files(from_yaml(saved.read_text(), out), out), same_files(config, out))
            raise ValueError(f"{directory} was made by a different recipe or study file ("
                             + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
                             + "); use another --out, or delete that folder to redo the run")
        done = read_json(directory / DONE)
        if done is not None and train_flag_changed(done, arm):
            raise ValueError(f"{directory} was {'pretrained' if done.get('trained') else 'left at its random init'}"
                             f", but the study now says train: {arm.train}; use another --out, or delete that "
                             "folder to redo the run")
        if done is None:
            precision = None  # what `precision: auto` resolved to on the machine that trained it
            if arm.train:
                from ..train.loop import pretrain
                log.info("%s seed %d: pretraining %d steps -> %s", arm.name, seed, config.steps, directory)
                result = pretrain(config, directory, resume="auto", root=out)
                if result.status != "finished":
                    raise StudyStopped(f"{arm.name} seed {seed} stopped at step {result.step}")
                assert result.checkpoint is not None  # a finished run has saved its last step
                checkpoint = str(result.checkpoint.relative_to(out))
                precision = result.precision
            else:
                torch.manual_seed(config.seed)
                model = M3AE(config.model)
                model.save_pretrained(directory / INIT)
                saved.write_text(to_yaml(config, out))
                checkpoint = str((directory / INIT).relative_to(out))
            done = {"checkpoint": checkpoint, "steps": config.steps if arm.train else 0, "trained": arm.train,
                    "train_seconds": train_seconds(directory / "metrics.jsonl", config.batch_size)}
            if precision is not None:
                done["precision"] = precision
            if arm.train:  # kept with the run's records even where its log is not (m3ae.study.records)
                done["final"] = final_losses(directory / "metrics.jsonl")
            write_json(directory / DONE, done)
        fingerprint = fp.eval_fingerprint(evaluator.spec, config, done["checkpoint"], out)
        existing = read_json(directory / EVAL)
        if existing is None or not fp.evaluation_is_current(existing, evaluator.spec, config, done["checkpoint"], out,
                                                            directory):
            log.info("%s seed %d: evaluating %s", arm.name, seed, done["checkpoint"])
            t0 = time.perf_counter()
            model = M3AE.from_pretrained(out / done["checkpoint"])
            with keep_freed_memory("auto", "cpu"):  # the evaluations run on the CPU: as m3ae.eval's
                evaluation = evaluator(model, config)
            evaluation.update(fingerprint=fingerprint, arm=arm.name, seed=seed, checkpoint=done["checkpoint"],
                              eval_seconds=time.perf_counter() - t0)
            write_json(directory / EVAL, evaluation)
    return "done"


def _in_file(study: StudySpec, message: str) -> ConfigError:
    return ConfigError(f"{study.path}: {message}" if study.path is not None else message)


def eval_data(spec: EvalSpec) -> list[tuple[str, str]]:
    """(study file key, path or shard pattern) of every file the evaluations read."""
    named = []
    for i, probe in enumerate(spec.probes):
        named += [(f"evals.probes[{i}].train", probe.train), (f"evals.probes[{i}].test", probe.test)]
        if probe.classes_file:
            named.append((f"evals.probes[{i}].classes_file", probe.classes_file))
    if spec.masked_words is not None:
        named.append(("evals.masked_words.data", spec.masked_words.data))
    return named


def check_study(study: StudySpec, out: str | Path, *, data: bool = True) -> EvalSpec:
    """What can be checked before any run starts, so a mistake fails now and not hours into the
    study: the evals settings, every arm's config and, with `data`, that every file the evaluations
    read exists (ConfigError naming the study file, the key and the path)."""
    try:
        spec = EvalSpec.from_dict(study.evals)
    except ConfigError as err:
        raise _in_file(study, str(err)) from None
    # Every arm's config, not only the arms run now: a typo in the last arm fails before the first.
    tokenizer = study_tokenizer(study, Path(out))
    for arm, seed in study.runs():
        try:
            arm_config(study, arm, seed, tokenizer)
        except ConfigError as err:
            raise _in_file(study, f"arm {arm.name!r} seed {seed}: {err}") from None
    if data:
        from ..data.sources.wds import list_shards

        for key, pattern in eval_data(spec):
            try:
                if key.endswith("classes_file"):
                    if not Path(pattern).is_file():
                        raise FileNotFoundError(f"file not found: {pattern}")
                else:
                    list_shards(pattern)  # the rule the evaluation reads them by
            except FileNotFoundError as err:
                raise _in_file(study, f"{key}: {err}") from None
    return spec


def select_runs(study: StudySpec, only: list[str] | None = None, seeds: list[int] | None = None
                ) -> list[tuple[ArmSpec, int]]:
    """The (arm, seed) runs named by arm names (`only`) and `seeds`, in file order (None: all);
    ValueError for an unknown arm, or seeds no chosen arm has (a typo would "finish" running nothing)."""
    unknown = sorted(set(only or []) - {a.name for a in study.arms})
    if unknown:
        raise ValueError(f"unknown arms {unknown}; the study has {[a.name for a in study.arms]}")
    chosen = [(arm, seed) for arm, seed in study.runs()
              if (not only or arm.name in only) and (seeds is None or seed in seeds)]
    if not chosen:
        arms = f"the arms {', '.join(only)}" if only else "the study"
        have = sorted({s for a, s in study.runs() if not only or a.name in only})
        raise ValueError(f"no run of {arms} has seed {' or '.join(map(str, seeds or []))}; their seeds: {have}")
    return chosen


def run_study(study: StudySpec, out: str | Path, *, only: list[str] | None = None,
              seeds: list[int] | None = None) -> dict[str, str]:
    """Every (arm, seed) of the study, or those `select_runs` picks; returns {run: status}."""
    out = Path(out)
    chosen = select_runs(study, only, seeds)
    evaluator = Evaluator(check_study(study, out))  # before the tokenizer, which may train a vocabulary
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare_tokenizer(study, out)
    status = {}
    for arm, seed in chosen:
        status[f"{arm.name}/seed{seed}"] = run_one(study, arm, seed, out, tokenizer, evaluator)
    return status
