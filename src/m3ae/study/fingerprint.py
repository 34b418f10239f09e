"""Whether a study run's evaluation (eval.json) is current: the one rule the runner (evaluate again
or not) and the report (`evaluated` or `stale`) both use.

An evaluation depends on the evaluation settings, the settings the weights were trained with and
the checkpoint, and on nothing else. Its fingerprint hashes exactly those, written so that only
what can change a result changes it:

* only the settings that differ from their dataclass defaults (TrainConfig and EvalSpec alike).
  A setting added to either later is absent from the hash at its default, and by this project's
  convention a new setting's default does what the code did before it existed (as resume reads an
  older run_config.yaml: from_yaml fills the settings it lacks with their defaults), so a library
  upgrade leaves evaluations current instead of redoing every one;
* files named whatever way they were spelled: data paths by their absolute real path where their
  folder exists (m3ae.train.config.same_files: `--data-root ../data` and `--data-root /abs/data` are
  one setting), files inside the study folder by their place in it ($ROOT/..., so the folder may
  move), hub names, URLs and the rest as written.

A default that changes between versions: an evaluation's fingerprint, which leaves defaults out,
does not see it, but the run folder's run_config.yaml records every setting's value, the old
default included, and the recorded settings must be the study's current ones (same_run_settings)
for an evaluation to be current: a run trained with the old default is stale in the report, and
refused by the runner, as any other change of recipe is.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checkpoint import RUN_CONFIG_NAME
from ..data.spec import same_files_path
from ..train.config import TrainConfig, from_yaml, same_files, to_yaml
from .evaluate import EvalSpec

FORM = 2  # the fingerprint form written now; see fingerprint_matches for the forms still read


def non_default(obj: Any) -> Any:
    """A dataclass as {field: value} of the fields that differ from their defaults, nested
    dataclasses (and lists of them) likewise; fields without a default are always kept."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                out[f.name] = non_default(value)
                continue
            if value != default:
                out[f.name] = non_default(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [non_default(v) for v in obj]
    return obj


def run_settings(config: TrainConfig, out: str | Path | None) -> dict[str, Any]:
    """The training settings that count: those not at their defaults, files named as same_files
    names them (with the study folder `out`, files in it as $ROOT/...)."""
    return non_default(same_files(config, out))


def eval_settings(spec: EvalSpec) -> dict[str, Any]:
    """The evaluation settings that count: those not at their defaults, the files the evaluations
    read (shard patterns, classes files) by same_files_path."""
    spec = copy.deepcopy(spec)
    for probe in spec.probes:
        probe.train, probe.test = same_files_path(probe.train), same_files_path(probe.test)
        if probe.classes_file:
            probe.classes_file = same_files_path(probe.classes_file)
    if spec.masked_words is not None:
        spec.masked_words.data = same_files_path(spec.masked_words.data)
    return non_default(spec)


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def eval_fingerprint(spec: EvalSpec, config: TrainConfig, checkpoint: str, out: str | Path | None = None) -> str:
    """The fingerprint a new evaluation records: the evaluation settings, the weights' run settings
    and checkpoint (`out`: the study folder, whose files count by their place in it)."""
    return _digest({"form": FORM, "evals": eval_settings(spec), "run": run_settings(config, out),
                    "checkpoint": checkpoint})


def form1_fingerprint(spec: EvalSpec, run_yaml: str, checkpoint: str) -> str:
    """The fingerprint evaluations made before FORM 2 recorded: every field of both dataclasses (the
    run config as to_yaml wrote it), paths as spelled."""
    return _digest([asdict(spec), run_yaml, checkpoint])


def fingerprint_matches(evaluation: dict, spec: EvalSpec, config: TrainConfig, checkpoint: str, out: Path,
                        recorded_yaml: str | None = None) -> bool:
    """Whether `evaluation` was made with these settings and checkpoint. Besides the form written now,
    the form 1 fingerprints of evaluations made by earlier releases are accepted where they still
    describe these settings, so that upgrading does not redo a folder's evaluations (hours at scale):
    over the config as the study folder records it ($ROOT/...) and, for folders evaluated before
    that, as the absolute paths named it (current where the folder has not moved), both from today's
    settings; and over the run's own run_config.yaml (`recorded_yaml`, which the runner wrote with the
    settings of that release, the one the evaluation hashed), which callers accept only where it
    holds the current settings (same_run_settings). Form 1 hashed every EvalSpec field and the data
    paths as spelled: such an evaluation stays current only while EvalSpec has the same fields and
    --data-root is spelled as it was then."""
    found = evaluation.get("fingerprint")
    if found == eval_fingerprint(spec, config, checkpoint, out):
        return True
    run_yamls = [to_yaml(config, out), to_yaml(config)] + ([recorded_yaml] if recorded_yaml is not None else [])
    return found in {form1_fingerprint(spec, text, checkpoint) for text in run_yamls}


def recorded_config(run: Path) -> str | None:
    """The run folder's run_config.yaml (None when it has none)."""
    try:
        return (run / RUN_CONFIG_NAME).read_text()
    except FileNotFoundError:
        return None


def same_run_settings(recorded_yaml: str, config: TrainConfig, out: Path) -> bool:
    """Whether the run_config.yaml of a run in the study folder `out` holds `config`'s settings (a
    setting it lacks, added since, at its default; the same files however spelled). An unreadable
    one (a setting removed since, say) does not."""
    try:
        recorded = from_yaml(recorded_yaml, out)
    except Exception:  # noqa: BLE001 - any unreadable record is "not the same settings"
        return False
    return run_settings(recorded, out) == run_settings(config, out)


def evaluation_is_current(evaluation: dict, spec: EvalSpec, config: TrainConfig, checkpoint: str, out: Path,
                          run: Path) -> bool:
    """Whether the eval.json of the finished run in folder `run` of the study folder `out` was made
    with the evaluation settings `spec` of the weights `checkpoint` trained with `config`: the run's
    recorded settings are `config`'s (which also catches a default changed since) and the
    fingerprint matches."""
    recorded = recorded_config(run)
    if recorded is not None and not same_run_settings(recorded, config, out):
        return False
    return fingerprint_matches(evaluation, spec, config, checkpoint, out, recorded)
