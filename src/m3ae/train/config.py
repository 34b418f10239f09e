"""Run configuration: typed dataclasses, YAML presets, `key.sub=value` command-line overrides."""
from __future__ import annotations

import copy
import io
import math
import operator
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import MAX_BATCH_SIZE, MAX_SEED, PRESETS, ConfigError, M3AEConfig
from ..host_allocator import SETTINGS as HOST_ALLOCATOR_SETTINGS
from ..precision import PRECISIONS
from ..data.collate import static_shapes_in_use
from ..data.config import DataConfig, stream_shares
from ..data.spec import same_files_spec
from ..optim import scaled_lr


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # scaled by global batch / 256 unless `lr` is given
    lr: Optional[float] = None  # peak learning rate as given (None: from base_lr)
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: Optional[int] = None  # None: 5% of the run
    clip_grad: Optional[float] = 1.0  # clip the gradient norm to this (None: no clipping)
    decay_mode: str = "mae"  # "mae" or "reference" (the authors' decay mask)


@dataclass
class DistributedConfig:
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block) instead of DDP


# The most optimiser steps a run may have: checkpoint and picture folders are named step_NNNNNNNN, eight
# digits that list in step order, and 10**8 steps is already far past any pretraining schedule (the
# papers' are a few hundred thousand), so a larger value is a typo, not a plan.
MAX_STEPS = 10**8 - 1


@dataclass
class TrainConfig:
    model: M3AEConfig = field(default_factory=M3AEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    steps: int = 1000  # optimiser steps of the run
    batch_size: int = 64  # global batch per optimiser step (all processes, all accumulation steps)
    grad_accum: int = 1  # micro-batches accumulated per optimiser step
    seed: int = 0  # seeds the model, masks and data order
    log_every: int = 10  # steps between metrics.jsonl rows
    ckpt_every: int = 1000  # steps between checkpoints
    keep_last: int = 3  # checkpoints kept (the newest; 0 keeps all)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (bf16 on CUDA and on CPUs with native bf16 matmul, else fp32) | fp32 | bf16 | bf32 (CPU:
    # fp32 with oneDNN's bf16-input matmuls; m3ae.precision)
    precision: str = "auto"
    # torch CPU threads; None: auto = usable cores - data.num_workers, at least 1 (OMP_NUM_THREADS
    # wins over auto); with loader workers a CPU run then measures them over steps 11-30, tries a
    # core they leave idle over steps 31-50 and keeps the faster count; after that (or from step 11
    # without workers) the count follows the machine's load (m3ae.load_watch). Resume may change it;
    # on CPU another count changes the float rounding (said at the resume: not bit for bit). See
    # m3ae.threads. Set it for a fixed count.
    threads: Optional[int] = None
    # auto (keep on CPU runs) | keep | system: whether glibc keeps large freed blocks for the next step
    # instead of unmapping them (m3ae.host_allocator). Speed only; resume may change it.
    host_allocator: str = "auto"
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    # Device peak TFLOP/s (per process) for the logged MFU; None: m3ae.perf's table by device name
    # (no MFU where the device is not in it).
    peak_tflops: Optional[float] = None
    compile: bool = False  # torch.compile the model
    # Texts padded to text_length and a fixed number of visible text slots, so shapes never change
    # (no recompiles under compile; on a CPU in bf16 also no oneDNN kernels per caption length, which
    # held ~500 MB more at emb 32 on fashion-44k). None: on exactly when compile is.
    static_shapes: Optional[bool] = None
    tensorboard: bool = False  # also log to OUT/tensorboard (scalars, viz_every grids, hparams)
    progress: bool = True  # show a progress bar
    # Weights & Biases (pip install 'm3ae[wandb]'): the metrics.jsonl rows, the viz_every grids and
    # the resolved config; a resumed run continues the same W&B run.
    wandb: bool = False
    wandb_project: str = "m3ae"  # W&B project
    wandb_name: Optional[str] = None  # W&B run name (None: the --out folder's name)
    wandb_tags: Optional[str] = None  # comma-separated W&B tags
    wandb_mode: Optional[str] = None  # online | offline | disabled (None: WANDB_MODE, else online)
    viz_every: int = 0  # write a reconstruction grid every K steps (0: never)
    # Fast probe + kNN on a small labelled set every K steps (0: never); specs as m3ae.eval.labelled.
    eval_every: int = 0
    eval_train: Optional[str] = None  # labelled training set of the periodic probe
    eval_val: Optional[str] = None  # labelled validation set of the periodic probe

    def peak_lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else scaled_lr(self.optim.base_lr, self.batch_size)

    def warmup(self) -> int:
        return self.optim.warmup_steps if self.optim.warmup_steps is not None else int(0.05 * self.steps)

    def uses_static_shapes(self) -> bool:
        return static_shapes_in_use(self.compile, self.static_shapes)

    def validate(self) -> None:
        """Every setting against its allowed range (a wrong sign must not train silently wrong)."""
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"steps must be positive and at most {MAX_STEPS:,}, got {self.steps:,}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"batch_size must be positive and at most {MAX_BATCH_SIZE:,}, got {self.batch_size:,}")
        if self.grad_accum <= 0:
            raise ConfigError(f"grad_accum must be positive, got {self.grad_accum:,}")
        o, d = self.optim, self.data
        checks = [
            ("seed", 0 <= self.seed <= MAX_SEED, f"in 0..{MAX_SEED}"),
            ("log_every", self.log_every >= 1, ">= 1"), ("ckpt_every", self.ckpt_every >= 1, ">= 1"),
            ("keep_last", self.keep_last >= 0, ">= 0 (0: keep all)"),
            ("max_nonfinite", self.max_nonfinite >= 1, ">= 1"),
            ("viz_every", self.viz_every >= 0, ">= 0"), ("eval_every", self.eval_every >= 0, ">= 0"),
            ("optim.base_lr", _finite(o.base_lr) and o.base_lr > 0, "> 0"),
            ("optim.lr", o.lr is None or (_finite(o.lr) and o.lr > 0), "> 0 or null"),
            ("optim.min_lr", _finite(o.min_lr) and 0 <= o.min_lr <= self.peak_lr(), "in [0, peak lr]"),
            ("optim.weight_decay", _finite(o.weight_decay) and o.weight_decay >= 0, ">= 0"),
            ("optim.beta1", 0 <= o.beta1 < 1, "in [0, 1)"), ("optim.beta2", 0 <= o.beta2 < 1, "in [0, 1)"),
            ("optim.eps", _finite(o.eps) and o.eps > 0, "> 0"),
            ("optim.warmup_steps", o.warmup_steps is None or o.warmup_steps >= 0, ">= 0 or null"),
            ("optim.clip_grad", o.clip_grad is None or (_finite(o.clip_grad) and o.clip_grad > 0),
             "> 0, or null for no clipping"),
            ("data.num_workers", d.num_workers >= 0, ">= 0"),
            ("data.prefetch_factor", d.prefetch_factor >= 1, ">= 1"),
            ("data.demo_samples", d.demo_samples >= 1, ">= 1"),
            ("data.caption_drop", 0 <= d.caption_drop <= 1, "in [0, 1]"),
            ("data.shuffle_buffer", d.shuffle_buffer >= 0, ">= 0 (0: shard order)"),
            ("data.crop_scale_min", 0 < d.crop_scale_min <= d.crop_scale_max <= 1,
             "with crop_scale_max: 0 < min <= max <= 1"),
            ("data.max_image_pixels", d.max_image_pixels >= 1, ">= 1"),
            ("data.max_bad_fraction", 0 <= d.max_bad_fraction <= 1, "in [0, 1]"),
            ("data.bad_min_samples", d.bad_min_samples >= 0, ">= 0"),
            ("data.pad_value", 0 <= d.pad_value <= 255, "in 0..255"),
            ("data.square", d.square in ("crop", "pad"), "crop or pad"),
            ("data.max_member_bytes", d.max_member_bytes >= 1, ">= 1"),
            ("data.max_shard_bytes", d.max_shard_bytes >= d.max_member_bytes, ">= data.max_member_bytes"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                value = operator.attrgetter(name)(self)
                raise ConfigError(f"{name} must be {allowed}, got {value!r}")
        for name in PATH_SETTINGS:  # a study run's run_config.yaml, given as --config outside the study
            value = operator.attrgetter(name)(self)
            if isinstance(value, str) and value.startswith(ROOT + "/"):
                raise ConfigError(f"{name}: {value!r} names a file by its place in the study folder this run "
                                  f"belongs to: give {name}=STUDY_FOLDER/{value[len(ROOT) + 1:]}, or continue "
                                  "the run with m3ae study")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"peak_tflops must be positive, got {self.peak_tflops}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1 (or null for auto), got {self.threads}")
        if self.host_allocator not in HOST_ALLOCATOR_SETTINGS:
            raise ConfigError(f"host_allocator must be one of {', '.join(HOST_ALLOCATOR_SETTINGS)}, "
                              f"got {self.host_allocator!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.optim.decay_mode not in ("mae", "reference"):
            raise ConfigError(f"optim.decay_mode must be 'mae' or 'reference', got {self.optim.decay_mode!r}")
        if self.eval_every > 0 and not (self.eval_train and self.eval_val):
            raise ConfigError("eval_every needs eval_train and eval_val (labelled data specs)")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"wandb_mode must be online, offline or disabled, got {self.wandb_mode!r}")

    def warnings(self) -> list[str]:
        """Settings that run but are probably not what was meant."""
        out = []
        if self.warmup() >= self.steps:
            out.append(f"warmup ({self.warmup()} steps) is not shorter than the run ({self.steps} steps): the "
                       f"learning rate never reaches its peak {self.peak_lr():g}; lower optim.warmup_steps")
        return out


def _from_override(override: str) -> DictConfig:
    """One KEY=VALUE override; a VALUE that is not valid YAML ("model={depth: 1") is a ConfigError
    naming the override (OmegaConf lets yaml's parser error through, a traceback)."""
    try:
        return OmegaConf.from_dotlist([override])
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML "
                          f"({' '.join(str(err).split())})") from None


def _finite(value: float) -> bool:
    return math.isfinite(value)


def preset_path(name: str) -> Path:
    """A YAML preset shipped with the package (configs/NAME.yaml) or a path to one (.yaml / .yml)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    shipped = resources.files("m3ae") / "configs" / f"{name}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    if path.exists():  # the suffix tells a settings file from a preset name: say so, not "unknown preset"
        raise ConfigError(f"{path} is {'a folder' if path.is_dir() else 'not a .yaml / .yml file'}: a run config is "
                          "a YAML file named *.yaml or *.yml, or a shipped preset name")
    names = sorted(p.name[:-5] for p in (resources.files("m3ae") / "configs").iterdir()
                   if p.name.endswith(".yaml"))
    raise ConfigError(f"unknown run preset {name!r}; shipped presets: {names}, or give a .yaml path")


# `${a.b}` refers to another setting: harmless. `${name:...}` calls a resolver: oc.env reads an
# environment variable (a token) into the settings, which run_config.yaml, the model card and a data
# or tokenizer name sent to the hub then carry away. A settings file may come from anyone: refuse.
_NODE_REFERENCE = re.compile(r"\$\{[\w.\[\]-]*\}")


def check_no_resolvers(value: Any, source: str, where: str = "") -> None:
    """Refuse OmegaConf resolver calls anywhere in `value` (a container read with resolve=False)."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_no_resolvers(key, source, where)
            check_no_resolvers(item, source, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_no_resolvers(item, source, f"{where}[{i}]")
    elif isinstance(value, str) and "${" in _NODE_REFERENCE.sub("", value):
        raise ConfigError(f"{source}: {where or 'a key'}: {value[:80]!r} calls an OmegaConf resolver (${{name:...}}; "
                          "oc.env would read an environment variable into the settings); only ${other.setting} "
                          "references are allowed in a settings file")


def load_settings_yaml(path: str | Path) -> DictConfig:
    """A YAML settings file (preset, run_config.yaml) as OmegaConf reads it, safely: no python tags
    (OmegaConf's loader is yaml's safe one), no resolver calls, a YAML error as a ConfigError, and a
    mapping at the top level (an empty file is an empty one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML settings file (not UTF-8 text)") from None
    try:
        # The top-level node first: OmegaConf reads a lone word ("hello") as the key of a mapping and
        # refuses a lone number with an OSError, neither saying that the file holds no settings.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and not isinstance(root, yaml.MappingNode) and root.tag != "tag:yaml.org,2002:null":
            got = "a list" if isinstance(root, yaml.SequenceNode) else f"the value {str(root.value)[:40]!r}"
            raise ConfigError(f"{path} must hold a mapping of settings (key: value lines) at its top level, "
                              f"got {got}")
        layer = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    assert isinstance(layer, DictConfig)  # a mapping or nothing, checked above
    check_no_resolvers(OmegaConf.to_container(layer, resolve=False), str(path))
    return layer


def preset_layers(name: str, _seen: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The YAML layers of a run preset as (file, settings), base first: a preset may start from another
    with a top-level `base: NAME` (a shipped name or a path relative to the file) and change only what
    differs."""
    path = preset_path(name)
    if str(path.resolve()) in _seen:
        raise ConfigError(f"run presets inherit in a cycle: {' -> '.join(_seen + (str(path),))}")
    layer = load_settings_yaml(path)
    if not layer:  # likely the wrong file, or one not written yet: running on all defaults would hide it
        raise ConfigError(f"{path} holds no settings (an empty file); give no preset to run on the defaults")
    base = layer.pop("base", None)
    if base is None:
        return [(str(path), layer)]
    relative = path.parent / str(base)
    base_name = str(relative) if str(base).endswith((".yaml", ".yml")) and relative.is_file() else str(base)
    return preset_layers(base_name, _seen + (str(path.resolve()),)) + [(str(path), layer)]


def _check_sections(layer: Any, source: str, schema: DictConfig, where: str = "") -> None:
    """Refuse a value that is not a mapping where the settings have a section ("model: 3"): OmegaConf's
    own "Merge error: int is not a subclass of M3AEConfig" names neither the file nor the key."""
    for key, value in layer.items() if isinstance(layer, dict) else ():
        section = schema.get(key) if isinstance(key, str) and key in schema else None
        if not isinstance(section, DictConfig):
            continue  # a setting, or a key the merge refuses by name
        name = f"{where}{key}"
        if isinstance(value, dict):
            _check_sections(value, source, section, name + ".")
        elif not (isinstance(value, str) and "${" in value):  # a ${reference} may name a section
            raise ConfigError(f"{source}: {name} is a section of settings ({name}.KEY), not a value; "
                              f"got {value!r}")


def _merge(merged: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """`layer` merged onto `merged`; an error names `source` (the file or override) and the setting."""
    _check_sections(OmegaConf.to_container(layer, resolve=False), source, merged)
    try:
        result = OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_message(err)}") from None
    assert isinstance(result, DictConfig)  # mappings merged
    return result


def _message(err: OmegaConfBaseException) -> str:
    """OmegaConf's error as one line naming the setting (it gives the setting on a line of its own)."""
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    return f"{key}: {message}" if key and key not in message else message


def load_config(preset: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- model size preset <- YAML preset (and its bases) <- overrides (`model.depth=4`)."""
    try:
        layers = preset_layers(preset) if preset else []
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers += [(f"override {o!r}", _from_override(o)) for o in overrides]
        peek = OmegaConf.merge(*(layer for _, layer in layers)) if layers else OmegaConf.create()
        size = OmegaConf.select(peek, "model.preset")
        if size is not None:
            if size not in PRESETS:
                raise ConfigError(f"unknown model preset {size!r}; choose one of {sorted(PRESETS)}")
            layers.insert(0, (f"model preset {size!r}", OmegaConf.create({"model": PRESETS[size]})))
        merged = OmegaConf.structured(TrainConfig)
        for source, layer in layers:  # one at a time, so that an error names its file or override
            merged = _merge(merged, layer, source)
        config = _to_config(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_message(err)) from err
    config.validate()
    return config


# Settings that name a local file. A run kept inside a folder that may move or be named another way
# (a study folder: pretrain(root=...)) records such a file that lies in that folder as ROOT/path-in-it,
# resolved against the folder when read back; a file outside it is recorded by its absolute path
# (a relative one would name another file from another working directory).
PATH_SETTINGS = ("data.tokenizer",)
ROOT = "$ROOT"


def _names_a_file(value: str) -> bool:
    # load_tokenizer's rule: anything else is a hub name, which no folder relocates.
    return os.path.exists(value) or value.endswith((".json", ".txt")) or value.startswith((".", "/"))


def _map_paths(config: TrainConfig, change: Callable[[str], str]) -> TrainConfig:
    config = copy.deepcopy(config)
    for key in PATH_SETTINGS:
        section, name = key.split(".")
        holder = getattr(config, section)
        value = getattr(holder, name)
        if isinstance(value, str) and value:
            setattr(holder, name, change(value))
    return config


def relative_paths(config: TrainConfig, root: str | os.PathLike) -> TrainConfig:
    """A copy with PATH_SETTINGS as recorded for a run in `root`: ROOT/... for a file inside it,
    absolute for one outside it, unchanged for hub names and values already given as ROOT/..."""
    base = Path(root).resolve()

    def change(value: str) -> str:
        if value.startswith(ROOT + "/") or not _names_a_file(value):
            return value
        try:
            return f"{ROOT}/{Path(value).resolve().relative_to(base).as_posix()}"
        except ValueError:
            return os.path.abspath(value)
    return _map_paths(config, change)


def resolve_paths(config: TrainConfig, root: str | os.PathLike) -> TrainConfig:
    """A copy with PATH_SETTINGS recorded as ROOT/... (relative_paths) naming the file in `root`."""
    return _map_paths(config, lambda v: str(Path(root) / v[len(ROOT) + 1:]) if v.startswith(ROOT + "/") else v)


def same_files(config: TrainConfig, root: str | os.PathLike | None = None) -> TrainConfig:
    """A copy for comparing settings, not for recording: files named the same way however they were
    spelled, so that `--data-root ../data` and `--data-root /abs/data` (the same files) are one
    setting. PATH_SETTINGS as relative_paths records them (with `root`), data.spec's local paths
    absolute and real (m3ae.data.spec.same_files_spec: braces, globs, options, hub names and URLs
    as written)."""
    config = relative_paths(config, root) if root is not None else copy.deepcopy(config)
    config.data.spec = same_files_spec(config.data.spec)
    return config


def to_yaml(config: TrainConfig, root: str | os.PathLike | None = None) -> str:
    """The run's settings as run_config.yaml records them; with `root`, files inside it as ROOT/..."""
    if root is not None:
        config = relative_paths(config, root)
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_yaml(text: str, root: str | os.PathLike | None = None) -> TrainConfig:
    """Settings recorded by to_yaml; with `root`, ROOT/... paths resolved against it."""
    recorded = OmegaConf.create(text)
    check_no_resolvers(OmegaConf.to_container(recorded, resolve=False), "run_config.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), recorded)
    config = _to_config(merged)
    return resolve_paths(config, root) if root is not None else config


def _to_config(merged: Any) -> TrainConfig:
    config = OmegaConf.to_object(merged)
    assert isinstance(config, TrainConfig)  # a merge onto the TrainConfig schema builds one
    return config


# Settings that may change on resume without changing what is computed (logging, speed, limits;
# compile, device and model.attention change the float rounding; static shapes, set or implied by
# compile, the draw of the text masks).
RESUME_SAFE = ("log_every", "ckpt_every", "keep_last", "progress", "tensorboard", "device", "viz_every",
               "eval_every", "eval_train", "eval_val", "max_nonfinite", "peak_tflops", "compile",
               "static_shapes", "distributed.fsdp", "data.num_workers", "data.prefetch_factor",
               "data.max_bad_fraction", "data.bad_min_samples", "data.max_member_bytes", "data.max_shard_bytes",
               "threads", "host_allocator", "model.grad_checkpointing", "model.attention", "wandb", "wandb_project",
               "wandb_name", "wandb_tags", "wandb_mode")

# Resume-safe switches that compute the same function with other float rounding, so a run resumed
# with them changed is close to, not bit for bit, an uninterrupted one. The thread count is checked
# as resolved (threads unset: cores - loader workers), in m3ae.train.loop.
ROUNDING_SWITCHES = ("model.attention", "compile", "device")


def setting_changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple]:
    """Every setting (dotted name) whose value differs: {name: (old, new)}."""
    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out
    a = flat(OmegaConf.to_container(OmegaConf.structured(old)))
    b = flat(OmegaConf.to_container(OmegaConf.structured(new)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def study_root(recorded: TrainConfig, config: TrainConfig, run_dir: str | os.PathLike) -> Path | None:
    """The folder a run's ROOT/... paths (relative_paths) meant, when it is resumed without it (plain
    `m3ae pretrain --resume` of a study's run): the folder that holds both the run and the file
    `config` names at that place in it. None when no setting tells."""
    run = Path(run_dir).resolve()
    for key in PATH_SETTINGS:
        was, now = operator.attrgetter(key)(recorded), operator.attrgetter(key)(config)
        if not (isinstance(was, str) and was.startswith(ROOT + "/") and isinstance(now, str) and now):
            continue
        place = Path(was[len(ROOT) + 1:])
        given = Path(now).resolve()
        if len(given.parts) > len(place.parts) and given.parts[-len(place.parts):] == place.parts:
            root = Path(*given.parts[:-len(place.parts)])
            if run.is_relative_to(root):
                return root
    return None


def check_resume_changes(checkpoint_yaml: str, config: TrainConfig, allow: bool, source: str,
                         root: str | os.PathLike | None = None, *, stream_parts: int | None = None,
                         world_size: int = 1, run_dir: str | os.PathLike | None = None) -> list[str]:
    """Lines describing what changed since the checkpoint's run; raises ConfigError for changes that
    break exact resumption (batch, data, schedule, model, seed, ...) unless `allow`. With `root` (the
    run's movable folder, see PATH_SETTINGS) files inside it are compared by their place in it;
    without it, `run_dir` lets study_root find that folder. `stream_parts`: the number of stream
    shares (processes x workers) the checkpoint's data position was saved with, when its data has a
    stream source; `world_size`: the processes resuming it."""
    try:
        old = from_yaml(checkpoint_yaml)
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{source}: cannot read the run config: {str(err).splitlines()[0]}") from None
    if root is None and run_dir is not None:
        root = study_root(old, config, run_dir)
    if root is not None:  # also a checkpoint written before such paths were relative: its absolute path
        old = resolve_paths(old, root)
    # The same data files spelled another way (a relative or absolute --data-root) are no change.
    old, config = same_files(old, root), same_files(config, root)
    changes = setting_changes(old, config)
    breaking = [k for k in changes if k not in RESUME_SAFE]
    notes = {k: "" if k in RESUME_SAFE else " (not exact)" for k in changes}
    for k in ROUNDING_SWITCHES:
        if k in changes:  # allowed, but the bits of the run change (tested: attention, threads)
            notes[k] = " (not exact: changes the float rounding)"
    if old.uses_static_shapes() != config.uses_static_shapes():  # set, or implied by compile
        over = "text_length" if config.uses_static_shapes() else "the longest caption of each batch"
        for k in ("compile", "static_shapes"):
            if k in changes:  # m3ae.data.collate.Collator: the draw is over the padded length
                notes[k] = (f" (not exact: the text masks are now drawn over {over}, so other tokens are "
                            "masked than in an uninterrupted run)")
    parts = stream_shares(config.data, world_size)
    if "data.num_workers" in changes and stream_parts is not None and stream_parts != parts:
        # Safe for indexed sources (a position maps to a record whoever reads it), not for streams:
        # their position is kept per (process, worker) share, and another number of shares restarts
        # every share at the slowest saved shard. Said, not refused: a change in the number of
        # processes does the same (warned in resume.restore), both may be forced by the machine a
        # run resumes on, and the run goes on at shard level as documented (docs/data.md).
        notes["data.num_workers"] = (f" (not exact: a stream's position is kept per process x worker share, "
                                     f"{stream_parts} saved, {parts} now: each restarts at the slowest "
                                     f"saved shard, some shards are read again)")
    lines = [f"{k}: {v[0]!r} -> {v[1]!r}{notes[k]}" for k, v in changes.items()]
    if breaking and not allow:
        raise ConfigError(f"resuming with settings changed since {source}: {'; '.join(lines)}. These make "
                          "the run differ from an uninterrupted one; pass --allow-changes "
                          "(allow_changes=True) to continue anyway")
    return lines
