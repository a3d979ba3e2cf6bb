"""Run configuration: a typed schema, YAML files with ``_base_`` inheritance, and ``key=value`` overrides.

Every key a recipe may set is a field below; anything else (a typo, a key at the wrong level) is an error that
names the key, where it came from and the closest valid spelling, before any work starts. Values are checked
against the field's type (``train.epochs=ten`` is refused) and then against the rules in :func:`validate`.

Two fields are free-form on purpose: ``model.kwargs`` (passed to ``timm.create_model``, which reports bad model
arguments itself) and ``deepspeed.overrides`` (merged into the DeepSpeed JSON, which DeepSpeed validates).

    cfg = load_config("configs/vim_tiny_dart.yaml", ["train.epochs=10", "model.kwargs.num_tokens=144"])
    save_config(cfg, "outputs/run/config.yaml")
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

__all__ = ["ConfigError", "RunConfig", "load_config", "config_from_dict", "config_to_dict", "save_config",
           "parse_override"]


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


# ---------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """What to train. ``name`` is any timm model name (dartmamba's are registered on import)."""

    name: str = "vim_tiny_dart"
    kwargs: dict = field(default_factory=dict)      # extra timm.create_model arguments (img_size, num_tokens, ...)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_checkpoint: Optional[str] = None           # weights to start from (.safetensors or torch file)
    grad_checkpointing: bool = False


@dataclass
class CanvasConfig:
    """The cluttered-canvas data set (:class:`dartmamba.data.ClutteredCanvas`) over scikit-learn's digits."""

    canvas_size: int = 64
    output_size: Optional[int] = None               # deliver at this side (a fixed grid's lower resolution)
    object_size: list[int] = field(default_factory=lambda: [8, 12])
    num_distractors: list[int] = field(default_factory=lambda: [4, 8])
    fragment_fraction: list[float] = field(default_factory=lambda: [0.3, 0.6])
    distractor_contrast: list[float] = field(default_factory=lambda: [0.5, 1.0])
    noise_std: float = 0.05
    background: list[float] = field(default_factory=lambda: [0.0, 0.2])
    tint: bool = False
    train_length: Optional[int] = None              # canvases per training epoch (default: one per train digit)
    val_length: Optional[int] = None                # validation canvases (default: one per val digit)
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0                                   # base seed of the canvases (train: seed, val: seed + 1)


@dataclass
class VideoCanvasConfig:
    """Clips for ``data.kind: video_canvas`` (:class:`dartmamba.data.MovingDigitClips`): a digit moving over a
    static scene drawn with the ``data.canvas`` settings (clutter and a static decoy digit); label: the moving one."""

    num_frames: int = 8                             # must equal the model's num_frames
    speed: list[float] = field(default_factory=lambda: [2.0, 4.0])     # canvas pixels per frame
    frame_noise_std: float = 0.03                   # fresh noise per frame
    num_decoys: int = 0                             # whole digits that stand still (a frame alone is ambiguous)


@dataclass
class DataConfig:
    """Where images come from and how they are transformed (timm's ``create_dataset`` / ``create_transform``)."""

    kind: Literal["imagefolder", "canvas", "video_canvas"] = "imagefolder"
    root: Optional[str] = None                      # ImageFolder root with one folder per split
    train_split: str = "train"
    val_split: str = "val"
    num_classes: Optional[int] = None               # default: from the data set
    img_size: Optional[int] = None                  # default: the model's pretrained-cfg input size
    crop_pct: Optional[float] = None
    interpolation: str = "bicubic"
    mean: Optional[list[float]] = None              # default: the model's (ImageNet) mean / std
    std: Optional[list[float]] = None
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5
    color_jitter: Optional[float] = 0.3
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    num_workers: int = 8
    pin_memory: bool = True
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    video: VideoCanvasConfig = field(default_factory=VideoCanvasConfig)


@dataclass
class AugConfig:
    """Batch-level regularisation: timm Mixup / CutMix with soft targets, label smoothing."""

    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: Optional[list[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    smoothing: float = 0.1


@dataclass
class OptimConfig:
    """timm ``create_optimizer_v2``; no weight decay on norms, biases, positional embeddings and class tokens.

    ``lr`` is absolute; when it is null, ``lr = lr_base * global_batch / lr_base_size`` (DeiT's linear rule).
    """

    opt: str = "adamw"
    lr: Optional[float] = None
    lr_base: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    eps: Optional[float] = None
    betas: Optional[list[float]] = None
    layer_decay: Optional[float] = None


@dataclass
class SchedConfig:
    """timm scheduler, stepped every optimizer update (``step_on_epochs=False``)."""

    sched: str = "cosine"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: float = 0.0
    decay_rate: float = 0.1
    decay_epochs: float = 90.0


@dataclass
class EmaConfig:
    """timm ``ModelEmaV3`` of the weights (evaluated and saved beside the model)."""

    enabled: bool = False
    decay: float = 0.99996
    warmup: bool = False


@dataclass
class TrainConfig:
    """The loop. ``batch_size`` is per process (DeepSpeed's micro batch); the global batch is
    ``batch_size * grad_accum * world_size``."""

    epochs: int = 300
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    grad_accum: int = 1
    clip_grad: Optional[float] = 5.0
    precision: Literal["fp32", "bf16", "amp_bf16"] = "amp_bf16"
    compile: bool = True
    compile_scope: Literal["auto", "model", "blocks"] = "auto"  # auto: model for ZeRO 0-2, blocks for ZeRO-3
    compile_backend: str = "inductor"
    compile_mode: Optional[str] = None
    seed: int = 0
    steps_per_epoch: Optional[int] = None           # cap the updates per epoch (smoke runs); null: the whole set
    log_interval: int = 50
    eval_interval: int = 1                          # epochs
    save_interval: int = 1                          # epochs
    keep_last: int = 2                              # DeepSpeed checkpoints kept besides the best
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class DeepSpeedConfig:
    """``config``: a JSON file (absolute, relative to the working directory, or to the repository's configs/).
    ``stage``: override its ZeRO stage. ``overrides``: merged into the JSON last."""

    config: str = "deepspeed/zero1.json"
    stage: Optional[int] = None
    overrides: dict = field(default_factory=dict)


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    tensorboard: bool = False
    progress_bar: bool = True
    rank_log: bool = False                          # every rank writes ranks/rank<r>.csv (multi-process checks)


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resume: Optional[str] = None                    # null, "auto" (the last checkpoint in output.dir) or a path


_FREE_FORM = ("model.kwargs", "deepspeed.overrides")


# ---------------------------------------------------------------------------------------------------------------
# Type checking
# ---------------------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints (and strings such as ``"1e-3"``, which PyYAML does not
    read as numbers) are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise _type_error(value, tp, path)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(v) for v in typing.get_args(tp)}:
            return value
        raise _type_error(value, tp, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, path)
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, tp, path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):       # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(value, tp, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, path)
    if tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
        raise _type_error(value, tp, path)
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a schema bug, not a user error


def _type_error(value, tp, path: str) -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _suggest(key: str, options, prefix: str = "") -> str:
    """`` (did you mean 'train.epochs'?)`` for the closest valid spelling, or nothing."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _check_keys(data: dict, cls, prefix: str, origin: str) -> None:
    """Every key of ``data`` must be a field of ``cls`` (recursively); free-form fields are not descended."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'the top level'} must be a mapping, "
                          f"got {data!r} ({type(data).__name__})")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"{origin}: unknown key {path!r}{_suggest(str(key), names, prefix)}; "
                              f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {valid}")
        if dataclasses.is_dataclass(hints[key]) and path not in _FREE_FORM:
            _check_keys(value, hints[key], path + ".", origin)


def _build(cls, data: dict, prefix: str = ""):
    """Dataclass instance from a (key-checked) dict, type-checking every value."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, path = hints[f.name], data[f.name], f"{prefix}{f.name}"
        kwargs[f.name] = _build(tp, value, path + ".") if dataclasses.is_dataclass(tp) else _coerce(value, tp, path)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks
# ---------------------------------------------------------------------------------------------------------------
def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _pair(values, path: str, *, integer: bool = False, low=None, high=None) -> None:
    _require(len(values) == 2, f"{path}: expected a [low, high] pair, got {values!r}")
    _require(values[0] <= values[1], f"{path}: expected low <= high, got {values!r}")
    if low is not None:
        _require(values[0] >= low, f"{path}: values must be >= {low}, got {values!r}")
    if high is not None:
        _require(values[1] <= high, f"{path}: values must be <= {high}, got {values!r}")


def validate(cfg: RunConfig) -> RunConfig:
    """Rules that types alone cannot express. Raises ConfigError naming the key and the expected form."""
    t, d, a, o, s = cfg.train, cfg.data, cfg.aug, cfg.optim, cfg.sched
    for path, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                        ("train.grad_accum", t.grad_accum), ("train.log_interval", t.log_interval),
                        ("train.eval_interval", t.eval_interval), ("train.save_interval", t.save_interval),
                        ("optim.lr_base_size", o.lr_base_size), ("data.recount", d.recount)):
        _require(value >= 1, f"{path}: expected an int >= 1, got {value!r}")
    _require(t.keep_last >= 1, f"train.keep_last: expected an int >= 1, got {t.keep_last!r}")
    for path, value in (("train.eval_batch_size", t.eval_batch_size), ("train.steps_per_epoch", t.steps_per_epoch),
                        ("data.num_classes", d.num_classes), ("data.img_size", d.img_size)):
        _require(value is None or value >= 1, f"{path}: expected null or an int >= 1, got {value!r}")
    _require(t.clip_grad is None or t.clip_grad > 0, f"train.clip_grad: expected null or a number > 0, "
                                                     f"got {t.clip_grad!r}")
    _require(0 < t.ema.decay < 1, f"train.ema.decay: expected a number in (0, 1), got {t.ema.decay!r}")
    _require(d.num_workers >= 0, f"data.num_workers: expected an int >= 0, got {d.num_workers!r}")
    if d.kind == "imagefolder":
        _require(d.root is not None, "data.root: required when data.kind is 'imagefolder' (a folder with one "
                                     "sub-folder per split, e.g. data.root=/data/imagenet)")
    for path, values in (("data.mean", d.mean), ("data.std", d.std)):
        _require(values is None or len(values) in (1, 3), f"{path}: expected null or 1 or 3 numbers, got {values!r}")
    _require(d.std is None or all(v > 0 for v in d.std), f"data.std: expected positive numbers, got {d.std!r}")
    _pair(d.scale, "data.scale", low=0.0, high=1.0)
    _pair(d.ratio, "data.ratio", low=0.0)
    _require(d.crop_pct is None or 0 < d.crop_pct <= 1, f"data.crop_pct: expected null or a number in (0, 1], "
                                                        f"got {d.crop_pct!r}")
    c = d.canvas
    _require(c.canvas_size >= 4, f"data.canvas.canvas_size: expected an int >= 4, got {c.canvas_size!r}")
    _require(c.output_size is None or 1 <= c.output_size <= c.canvas_size,
             f"data.canvas.output_size: expected null or an int in [1, canvas_size={c.canvas_size}], "
             f"got {c.output_size!r}")
    _pair(c.object_size, "data.canvas.object_size", low=1, high=c.canvas_size)
    _pair(c.num_distractors, "data.canvas.num_distractors", low=0)
    _pair(c.fragment_fraction, "data.canvas.fragment_fraction", low=1e-9, high=1.0)
    _pair(c.distractor_contrast, "data.canvas.distractor_contrast", low=0.0)
    _pair(c.background, "data.canvas.background", low=0.0, high=1.0)
    _require(c.noise_std >= 0, f"data.canvas.noise_std: expected a number >= 0, got {c.noise_std!r}")
    _require(0 < c.val_fraction < 1, f"data.canvas.val_fraction: expected a number in (0, 1), got {c.val_fraction!r}")
    for path, value in (("data.canvas.train_length", c.train_length), ("data.canvas.val_length", c.val_length)):
        _require(value is None or value >= 1, f"{path}: expected null or an int >= 1, got {value!r}")
    if d.kind == "video_canvas":
        v = d.video
        _require(v.num_frames >= 1, f"data.video.num_frames: expected an int >= 1, got {v.num_frames!r}")
        _pair(v.speed, "data.video.speed", low=0.0)
        _require(v.frame_noise_std >= 0, f"data.video.frame_noise_std: expected a number >= 0, "
                                         f"got {v.frame_noise_std!r}")
        _require(v.num_decoys >= 0, f"data.video.num_decoys: expected an int >= 0, got {v.num_decoys!r}")
        _require(d.num_classes is not None, "data.num_classes: required when data.kind is 'video_canvas' (10 for "
                                            "the digits)")
        _require(a.cutmix == 0 and a.cutmix_minmax is None, "aug.cutmix: must be 0 for video clips (timm's CutMix "
                                                             "cuts 2-D images); mixup works")
    for path, value in (("aug.mixup", a.mixup), ("aug.cutmix", a.cutmix)):
        _require(value >= 0, f"{path}: expected a number >= 0 (0 disables it), got {value!r}")
    for path, value in (("aug.mixup_prob", a.mixup_prob), ("aug.mixup_switch_prob", a.mixup_switch_prob),
                        ("aug.smoothing", a.smoothing), ("data.reprob", d.reprob), ("data.hflip", d.hflip)):
        _require(0 <= value <= 1, f"{path}: expected a number in [0, 1], got {value!r}")
    if a.cutmix_minmax is not None:
        _pair(a.cutmix_minmax, "aug.cutmix_minmax", low=0.0, high=1.0)
    if (a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None) and a.mixup_prob > 0:
        _require(t.batch_size % 2 == 0, f"train.batch_size: mixup/cutmix need an even batch, got {t.batch_size}")
    _require(o.lr is None or o.lr > 0, f"optim.lr: expected null or a number > 0, got {o.lr!r}")
    _require(o.lr_base > 0, f"optim.lr_base: expected a number > 0, got {o.lr_base!r}")
    _require(o.weight_decay >= 0, f"optim.weight_decay: expected a number >= 0, got {o.weight_decay!r}")
    _require(o.betas is None or len(o.betas) == 2, f"optim.betas: expected null or two numbers, got {o.betas!r}")
    _require(o.layer_decay is None or 0 < o.layer_decay <= 1,
             f"optim.layer_decay: expected null or a number in (0, 1], got {o.layer_decay!r}")
    _require(s.warmup_epochs >= 0, f"sched.warmup_epochs: expected a number >= 0, got {s.warmup_epochs!r}")
    _require(s.warmup_epochs < t.epochs or s.warmup_epochs == 0,
             f"sched.warmup_epochs: must be below train.epochs={t.epochs}, got {s.warmup_epochs!r}")
    _require(cfg.deepspeed.stage is None or cfg.deepspeed.stage in (0, 1, 2, 3),
             f"deepspeed.stage: expected null or one of 0, 1, 2, 3, got {cfg.deepspeed.stage!r}")
    for key in ("model.kwargs",):
        reserved = {"num_classes", "drop_rate", "drop_path_rate", "pretrained"} & set(cfg.model.kwargs)
        _require(not reserved, f"{key}: {sorted(reserved)} are set elsewhere (data.num_classes, model.drop_rate, "
                               f"model.drop_path_rate); remove them from {key}")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides, saving
# ---------------------------------------------------------------------------------------------------------------
def deep_merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, recursively for nested mappings (neither argument is changed)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict:
    """A YAML file with its ``_base_`` files (paths relative to it) merged underneath, key-checked per file."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(chain + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    _check_keys(data, RunConfig, "", path)
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, _read_yaml(os.path.join(os.path.dirname(path), base), chain + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=10"`` -> (["train", "epochs"], 10). The value is read as YAML (``null``, ``[8, 12]``,
    ``1e-3``, ``true``); a value that is not valid YAML is kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: expected a dotted key such as train.batch_size")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_path(data: dict, parts: list[str], value: Any, text: str) -> None:
    """Set ``data[p0][p1]...`` checking each part against the schema (free-form mappings accept any key)."""
    cls, node, prefix = RunConfig, data, ""
    for depth, part in enumerate(parts):
        path = prefix + part
        last = depth == len(parts) - 1
        if cls is not None:
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(f"override {text!r}: unknown key {path!r}{_suggest(part, names, prefix)}; valid keys"
                                  f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(names))}")
            tp = _hints(cls)[part]
            nested = dataclasses.is_dataclass(tp) and path not in _FREE_FORM
            if last:
                if nested and not isinstance(value, dict):
                    raise ConfigError(f"override {text!r}: {path!r} is a section; set one of its keys, e.g. "
                                      f"{path}.{dataclasses.fields(tp)[0].name}=...")
                if nested:
                    _check_keys(value, tp, path + ".", f"override {text!r}")
                node[part] = value
                return
            cls = tp if nested else None
            if not nested and tp is not dict:
                raise ConfigError(f"override {text!r}: {path!r} is a value, not a section")
        elif last:
            node[part] = value
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {path!r} holds {child!r}, not a mapping")
        node, prefix = child, path + "."


def config_from_dict(data: dict, origin: str = "config") -> RunConfig:
    _check_keys(data, RunConfig, "", origin)
    return validate(_build(RunConfig, data))


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a recipe (or the defaults when ``path`` is None), apply ``key=value`` overrides, check everything."""
    data = _read_yaml(path) if path is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(data, parts, value, text)
    return config_from_dict(data, path or "config")


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (a temp file in the same folder, then ``os.replace``)."""
    from dartmamba.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))
