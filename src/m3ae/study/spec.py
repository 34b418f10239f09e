"""The study file: a base recipe, arms as overrides of it, seeds, and the evaluations to run.

```yaml
name: fashion
base: fashion_m3ae                  # a run preset (shipped name or .yaml path)
overrides: [data.spec=$DATA/fashion-44k/train-0000{0..3}.tar.gz]   # for every arm
seeds: [0]                          # default seeds of an arm
tokenizer: {path: fashion_tokenizer.json}   # or {train_from: TEXT SPEC, vocab_size: 4096}
arms:
  - {name: random, train: false, seeds: [0, 1]}      # the recipe's architecture, not trained
  - {name: mae, base: fashion_mae, seeds: [0, 1]}
  - {name: m3ae-t0.15, overrides: [model.text_mask_ratio=0.15]}
evals: {...}                        # see m3ae.study.evaluate.EvalSpec
```
`$DATA` in any string is replaced by the data root given on the command line (`--data-root`), so the
file names no machine's paths.

A study file may start from another in its folder (`extends: fashion.yaml`): the other file's
mapping, with this file's keys laid over it: mappings merged key by key, anything else (lists,
strings) replaced. So a variant names only what it changes, e.g. the same arms evaluated with
other `evals:` settings, into another study folder. (In the same folder, so that the relative paths
both files may hold, recipes and the tokenizer, read the same.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ..config import ConfigError
from ..train.config import check_no_resolvers

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class ArmSpec:
    name: str
    base: str | None = None  # None: the study's base recipe
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | None = None  # None: the study's seeds
    train: bool = True  # False: evaluate the recipe's architecture at its random init


@dataclass
class TokenizerSpec:
    train_from: str | None = None  # a text spec: a WordPiece vocabulary is trained once, per study
    vocab_size: int = 4096
    min_frequency: int = 2
    path: str | None = None  # or this tokenizer.json / vocab.txt (relative to the study file), copied


@dataclass
class StudySpec:
    name: str
    base: str
    arms: list[ArmSpec]
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    evals: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the study file, for resolving relative recipe paths

    def runs(self) -> list[tuple[ArmSpec, int]]:
        """Every (arm, seed) in file order."""
        return [(arm, seed) for arm in self.arms for seed in (arm.seeds if arm.seeds is not None else self.seeds)]

    def recipe(self, arm: ArmSpec) -> str:
        name = arm.base or self.base
        if self.path is not None and name.endswith((".yaml", ".yml")):
            relative = self.path.parent / name
            if relative.is_file():
                return str(relative)
        return name


def _substitute(value: Any, data_root: str | None) -> Any:
    if isinstance(value, str):
        if "$DATA" in value:
            if data_root is None:
                raise ConfigError(f"{value!r} uses $DATA: give the data root (--data-root DIR)")
            return value.replace("$DATA", str(data_root).rstrip("/"))
        return value
    if isinstance(value, list):
        return [_substitute(v, data_root) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, data_root) for k, v in value.items()}
    return value


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of KEY=VALUE strings, got {value!r}")
    return value


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(v) is int and v >= 0 for v in value):
        raise ConfigError(f"{where} must be a list of seeds (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where} lists a seed twice: {value}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def parse_study(raw: dict[Any, Any], data_root: str | None = None, path: Path | None = None) -> StudySpec:
    raw = _substitute(raw, data_root)
    unknown = sorted(set(raw) - {"name", "base", "arms", "overrides", "seeds", "tokenizer", "evals"})
    if unknown:
        raise ConfigError(f"unknown study keys {unknown}")
    for key in ("name", "base", "arms"):
        if key not in raw:
            raise ConfigError(f"a study needs '{key}'")
    arms = []
    for item in raw["arms"]:
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"each arm needs a name, got {item!r}")
        extra = sorted(set(item) - {"name", "base", "overrides", "seeds", "train"})
        if extra:
            raise ConfigError(f"arm {item['name']!r}: unknown keys {extra}")
        where = f"arm {item['name']!r}"
        train = item.get("train", True)
        if not isinstance(train, bool):  # "false" as a string would be true
            raise ConfigError(f"{where}: train must be true or false, got {train!r}")
        arm = ArmSpec(_text(item["name"], f"{where}: name"),
                      None if item.get("base") is None else _text(item["base"], f"{where}: base"),
                      _strings(item.get("overrides"), f"{where}: overrides"),
                      None if item.get("seeds") is None else _seeds(item["seeds"], f"{where}: seeds"), train)
        if not _NAME.match(arm.name):
            raise ConfigError(f"arm name {arm.name!r}: letters, digits and _ . + - only (it names a folder)")
        arms.append(arm)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"arm names must be unique, got {names}")
    if not arms:
        raise ConfigError("a study needs at least one arm")
    tok = raw.get("tokenizer") or {}
    extra = sorted(set(tok) - {"train_from", "vocab_size", "min_frequency", "path"})
    if extra:
        raise ConfigError(f"tokenizer: unknown keys {extra}")
    if not isinstance(raw.get("evals") or {}, dict):
        raise ConfigError(f"evals must be a mapping, got {raw['evals']!r}")
    study = StudySpec(name=_text(raw["name"], "name"), base=_text(raw["base"], "base"), arms=arms,
                      overrides=_strings(raw.get("overrides"), "overrides"),
                      seeds=_seeds(raw.get("seeds", [0]), "seeds"), tokenizer=TokenizerSpec(**tok),
                      evals=dict(raw.get("evals") or {}), path=path)
    for arm, _seed in study.runs():
        if any(o.split("=", 1)[0] == "seed" for o in arm.overrides):
            raise ConfigError(f"arm {arm.name!r}: give seeds with 'seeds:', not a seed= override")
    return study


def _laid_over(base: dict[Any, Any], top: dict[Any, Any]) -> dict[Any, Any]:
    """`top` laid over `base`: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _laid_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict[Any, Any]:
    """A study file's mapping, with the files it extends laid under it."""
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(map(str, chain))}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as err:  # a config error (exit 2, one line), as for run presets
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a YAML mapping")
    check_no_resolvers(raw, str(path))  # arms' settings are merged (and resolved) into run configs
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent or Path(parent).name != parent:
        raise ConfigError(f"{path}: extends must name a study file in the same folder, got {parent!r}")
    return _laid_over(_read_mapping(path.parent / parent, (*chain, path.resolve())), raw)


def load_study(path: str | Path, data_root: str | None = None) -> StudySpec:
    path = Path(path)
    raw = _read_mapping(path)
    try:
        return parse_study(raw, data_root, path)
    except ConfigError as err:  # name the file: a study file is the user's own
        raise ConfigError(f"{path}: {err}") from None
