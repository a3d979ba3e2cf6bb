"""Run configuration: typed sections (pydantic models), YAML recipes with ``_base_`` inheritance, ``key=value``
overrides, and recipes found by name.

Every key a recipe may set is a field below with its rule beside it (``Field(ge=1)``, a ``Literal``, a validator for
rules across fields); any other key is an error. Types are strict as before: ``train.epochs=ten`` or ``true`` is
refused; a number takes an int or a numeric string (PyYAML reads ``1e-3`` as a string). An error is one line: the
source (YAML file or override) that set the value, the key, the expected form, the closest spelling of an unknown
key. ``model.kwargs`` (checked by the timm model) and ``deepspeed.overrides`` (by DeepSpeed) are free-form.

``load_config`` takes a YAML path or a recipe name (``"vim_small_dart"``, ``"demo/vim_dart"``: ``<name>.yaml`` in the
installed package ``dartmamba_configs``, this checkout's ``configs/``). The input paths of :data:`PATH_KEYS` are
relative to the YAML file that sets them (``_base_`` files included), or to the working directory when set by an
override or :func:`config_from_dict`; a loaded config holds them absolute, so a saved config loads back the same
from anywhere. ``output.dir`` is an output and stays relative to the working directory.

    cfg = load_config("vim_tiny_dart", ["train.epochs=10", "data.root=/data/imagenet"])
    save_config(cfg, "outputs/run/config.yaml")

Sections support attribute access and assignment (not re-validated), ``==`` and ``copy.deepcopy``, as the
dataclasses they replace did; :func:`config_to_dict` gives the plain dict.
"""
import copy
import difflib
import importlib.resources
import os
import types
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic import model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = ["ConfigError", "RunConfig", "load_config", "config_from_dict", "config_to_dict", "save_config",
           "parse_override", "deep_merge", "recipe_names", "RECIPES_PACKAGE", "PATH_KEYS"]

RECIPES_PACKAGE = "dartmamba_configs"


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


# ---------------------------------------------------------------------------------------------------------------
# Value types: strict, with the checks that travel with them
# ---------------------------------------------------------------------------------------------------------------
def _rule(message: str, key: str = "", *related: str) -> PydanticCustomError:
    """A broken rule: ``message`` about ``key`` (dotted, relative to the model raising it; "" for the field being
    validated); ``related`` keys are the others the rule reads (the error names whichever of them was set)."""
    return PydanticCustomError("config", "{message}", {"message": message, "key": key, "related": related})


class _Hint(str):
    """Annotation metadata: a few words appended to the expected form in range errors."""


def _number(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):               # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _one_of(*values):
    """``Literal[values]`` refusing equal values of another type (``True`` for 1, ``1.0`` for 1)."""
    kinds = {type(v) for v in values}

    def exact_type(value):
        if type(value) not in kinds:
            raise PydanticCustomError("literal_error", "wrong type")
        return value
    return Annotated[Literal[values], BeforeValidator(exact_type)]


def _pair(low=None, high=None):
    """A ``[low, high]`` list with ``low <= high`` inside ``[low, high]`` bounds."""
    def check(values):
        if values is None:
            return values
        if len(values) != 2:
            raise _rule(f"expected a [low, high] pair, got {values!r}")
        if values[0] > values[1]:
            raise _rule(f"expected low <= high, got {values!r}")
        if low is not None and values[0] < low:
            raise _rule(f"values must be >= {low}, got {values!r}")
        if high is not None and values[1] > high:
            raise _rule(f"values must be <= {high}, got {values!r}")
        return values
    return AfterValidator(check)


def _sized(*lengths: int, what: str):
    def check(values):
        if values is not None and len(values) not in lengths:
            raise _rule(f"expected null or {what}, got {values!r}")
        return values
    return AfterValidator(check)


_listify = BeforeValidator(lambda v: list(v) if isinstance(v, tuple) else v)
Num = Annotated[float, BeforeValidator(_number)]
Nums = Annotated[list[Num], _listify]
Ints = Annotated[list[int], _listify]
Count = Annotated[int, Field(ge=1)]                 # an int >= 1
Unit = Annotated[Num, Field(ge=0, le=1)]           # a probability / fraction in [0, 1]
Positive = Annotated[Num, Field(gt=0)]


def _lr_scales(value: dict) -> dict:
    """{parameter-name prefix: learning-rate multiplier >= 0}."""
    scales = {}
    for key, scale in value.items():
        if not isinstance(key, str) or not key.strip(".") or key != key.strip("."):
            raise _rule(f"expected a mapping of parameter-name prefixes to numbers >= 0 (e.g. "
                        f"{{patch_embed.scorer: 0.1}}), got the key {key!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
            raise _rule(f"expected a number >= 0 for {key!r} (its parameters train at optim.lr times it), got "
                        f"{scale!r}")
        scales[key] = float(scale)
    return scales


LrScales = Annotated[dict, AfterValidator(_lr_scales)]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# ---------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------
class ModelConfig(_Section):
    """What to train. ``name`` is any timm model name (dartmamba's are registered on import)."""

    name: str = "vim_tiny_dart"
    kwargs: dict = Field(default_factory=dict)      # extra timm.create_model arguments (img_size, num_tokens, ...)
    drop_rate: Unit = 0.0
    drop_path_rate: Unit = 0.0
    init_checkpoint: Optional[str] = None           # weights to start from (.safetensors or torch file)
    grad_checkpointing: bool = False

    @field_validator("kwargs")
    @classmethod
    def _not_set_elsewhere(cls, kwargs: dict) -> dict:
        reserved = {"num_classes", "drop_rate", "drop_path_rate", "pretrained"} & set(kwargs)
        if reserved:
            raise _rule(f"{sorted(reserved)} are set elsewhere (data.num_classes, model.drop_rate, "
                        f"model.drop_path_rate); remove them from model.kwargs")
        return kwargs


class CanvasConfig(_Section):
    """The cluttered-canvas data set (:class:`dartmamba.data.ClutteredCanvas`) over scikit-learn's digits."""

    canvas_size: Annotated[int, Field(ge=4)] = 64
    output_size: Optional[Count] = None             # deliver at this side (a fixed grid's lower resolution)
    object_size: Annotated[Ints, _pair(low=1)] = [8, 12]               # high <= canvas_size (below)
    num_distractors: Annotated[Ints, _pair(low=0)] = [4, 8]
    fragment_fraction: Annotated[Nums, _pair(low=1e-9, high=1.0)] = [0.3, 0.6]
    distractor_contrast: Annotated[Nums, _pair(low=0.0)] = [0.5, 1.0]
    noise_std: Annotated[Num, Field(ge=0)] = 0.05
    background: Annotated[Nums, _pair(low=0.0, high=1.0)] = [0.0, 0.2]
    tint: bool = False
    train_length: Optional[Count] = None            # canvases per training epoch (default: one per train digit)
    val_length: Optional[Count] = None              # validation canvases (default: one per val digit)
    val_fraction: Annotated[Num, Field(gt=0, lt=1)] = 0.2
    split_seed: int = 0
    seed: int = 0                                   # base seed of the canvases (train: seed, val: seed + 1)

    @model_validator(mode="after")
    def _fits_the_canvas(self):
        if self.output_size is not None and self.output_size > self.canvas_size:
            raise _rule(f"expected null or an int in [1, canvas_size={self.canvas_size}], got {self.output_size!r}",
                        "output_size", "canvas_size")
        if self.object_size[1] > self.canvas_size:
            raise _rule(f"values must be <= {self.canvas_size}, got {self.object_size!r}", "object_size",
                        "canvas_size")
        return self


class VideoCanvasConfig(_Section):
    """Clips for ``data.kind: video_canvas`` (:class:`dartmamba.data.MovingDigitClips`): a digit moving over a
    static scene drawn with the ``data.canvas`` settings (clutter and a static decoy digit); label: the moving one."""

    num_frames: Count = 8                           # must equal the model's num_frames
    speed: Annotated[Nums, _pair(low=0.0)] = [2.0, 4.0]                # canvas pixels per frame
    frame_noise_std: Annotated[Num, Field(ge=0)] = 0.03                 # fresh noise per frame
    num_decoys: Annotated[int, Field(ge=0)] = 0     # whole digits that stand still (a frame alone is ambiguous)


class DataConfig(_Section):
    """Where images come from and how they are transformed (timm's ``create_dataset`` / ``create_transform``)."""

    kind: _one_of("imagefolder", "canvas", "video_canvas") = "imagefolder"
    root: Optional[str] = None                      # ImageFolder root with one folder per split (required for it)
    train_split: str = "train"
    val_split: str = "val"
    num_classes: Optional[Count] = None             # default: from the data set (required for video_canvas)
    img_size: Optional[Count] = None                # default: the model's pretrained-cfg input size
    crop_pct: Optional[Num] = Field(None, gt=0, le=1)
    interpolation: str = "bicubic"
    mean: Annotated[Optional[Nums], _sized(1, 3, what="1 or 3 numbers")] = None   # default: the model's mean / std
    std: Annotated[Optional[Nums], _sized(1, 3, what="1 or 3 numbers")] = None
    scale: Annotated[Nums, _pair(low=0.0, high=1.0)] = [0.08, 1.0]
    ratio: Annotated[Nums, _pair(low=0.0)] = [0.75, 4.0 / 3.0]
    hflip: Unit = 0.5
    color_jitter: Optional[Num] = 0.3
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: Unit = 0.25
    remode: str = "pixel"
    recount: Count = 1
    num_workers: Annotated[int, Field(ge=0)] = 8
    pin_memory: bool = True
    canvas: CanvasConfig = Field(default_factory=CanvasConfig)
    video: VideoCanvasConfig = Field(default_factory=VideoCanvasConfig)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std):
        if std is not None and not all(v > 0 for v in std):
            raise _rule(f"expected positive numbers, got {std!r}")
        return std


class AugConfig(_Section):
    """Batch-level regularisation: timm Mixup / CutMix with soft targets, label smoothing."""

    mixup: Annotated[Num, Field(ge=0), _Hint("0 disables it")] = 0.8
    cutmix: Annotated[Num, Field(ge=0), _Hint("0 disables it")] = 1.0
    cutmix_minmax: Annotated[Optional[Nums], _pair(low=0.0, high=1.0)] = None
    mixup_prob: Unit = 1.0
    mixup_switch_prob: Unit = 0.5
    mixup_mode: _one_of("batch", "pair", "elem") = "batch"
    smoothing: Unit = 0.1

    @property
    def mixing(self) -> bool:
        """Whether Mixup / CutMix run (they pair images, so the batch must be even)."""
        return (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None) and self.mixup_prob > 0


class OptimConfig(_Section):
    """timm ``create_optimizer_v2``; no weight decay on norms, biases, positional embeddings and class tokens.

    ``lr`` is absolute; when it is null, ``lr = lr_base * global_batch / lr_base_size`` (DeiT's linear rule).
    ``lr_scale`` multiplies the learning rate of the parameters whose names start with a prefix (timm's ``lr_scale``
    parameter-group key, which its schedulers apply), e.g. ``{patch_embed.scorer: 0}`` keeps a DART scorer as
    initialised.
    """

    opt: str = "adamw"
    lr: Optional[Positive] = None
    lr_base: Positive = 5e-4
    lr_base_size: Count = 512
    weight_decay: Annotated[Num, Field(ge=0)] = 0.05
    momentum: Num = 0.9
    eps: Optional[Num] = None
    betas: Annotated[Optional[Nums], _sized(2, what="two numbers")] = None
    layer_decay: Optional[Num] = Field(None, gt=0, le=1)
    # {parameter-name prefix: lr multiplier}, e.g. {patch_embed.scorer: 0.1}; the longest matching prefix applies
    lr_scale: LrScales = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_per_parameter_rule(self):
        if self.lr_scale and self.layer_decay is not None:
            raise _rule("cannot be combined with optim.layer_decay (each sets per-parameter learning rates); use one",
                        "lr_scale", "layer_decay")
        return self


class SchedConfig(_Section):
    """timm scheduler, stepped every optimizer update (``step_on_epochs=False``)."""

    sched: str = "cosine"
    warmup_epochs: Annotated[Num, Field(ge=0)] = 5.0                    # below train.epochs (or 0)
    warmup_lr: Num = 1e-6
    min_lr: Num = 1e-5
    cooldown_epochs: Num = 0.0
    decay_rate: Num = 0.1
    decay_epochs: Num = 90.0


class EmaConfig(_Section):
    """timm ``ModelEmaV3`` of the weights (evaluated and saved beside the model)."""

    enabled: bool = False
    decay: Annotated[Num, Field(gt=0, lt=1)] = 0.99996
    warmup: bool = False


class TrainConfig(_Section):
    """The loop. ``batch_size`` is per process (DeepSpeed's micro batch); the global batch is
    ``batch_size * grad_accum * world_size``."""

    epochs: Count = 300
    batch_size: Count = 128                         # even when aug mixes images
    eval_batch_size: Optional[Count] = None
    grad_accum: Count = 1
    clip_grad: Optional[Positive] = 5.0
    precision: _one_of("fp32", "bf16", "amp_bf16") = "amp_bf16"
    compile: bool = True
    compile_scope: _one_of("auto", "model", "blocks") = "auto"   # auto: model for ZeRO 0-2, blocks for ZeRO-3
    compile_backend: str = "inductor"
    compile_mode: Optional[str] = None
    seed: int = 0
    steps_per_epoch: Optional[Count] = None         # cap the updates per epoch (smoke runs); null: the whole set
    log_interval: Count = 50
    eval_interval: Count = 1                        # epochs
    save_interval: Count = 1                        # epochs
    keep_last: Count = 2                            # DeepSpeed checkpoints kept besides the best
    nonfinite: _one_of("stop", "skip") = "stop"     # a NaN/inf loss: stop the run, or skip that micro-batch
    # signals that save a checkpoint after the current update and exit 75 (docs/cluster.md); null: the environment's
    # DARTMAMBA_PREEMPT_SIGNALS, else "TERM,USR1"; "none" handles none
    preempt_signals: Optional[str] = None
    preempt_requeue: bool = False                   # after that save, rank 0 runs scontrol requeue (under SLURM)
    ema: EmaConfig = Field(default_factory=EmaConfig)


def _packaged(relative: str) -> str:
    """The absolute path of a file of the installed recipes."""
    return os.path.join(_recipe_root(), relative)


class DeepSpeedConfig(_Section):
    """``config``: a DeepSpeed JSON file (default: the recipes' ZeRO-1 one). ``stage``: override its ZeRO stage.
    ``overrides``: merged into the JSON last."""

    config: str = Field(default_factory=lambda: _packaged(os.path.join("deepspeed", "zero1.json")))
    stage: Optional[_one_of(0, 1, 2, 3)] = None
    overrides: dict = Field(default_factory=dict)


class OutputConfig(_Section):
    dir: str = "outputs/run"                        # relative to the working directory (an output, not an input)
    tensorboard: bool = False
    progress_bar: bool = True
    rank_log: bool = False                          # every rank writes ranks/rank<r>.csv (multi-process checks)
    overwrite: bool = False                         # a fresh run moves a previous run's checkpoints aside


class RunConfig(_Section):
    """A whole training run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    aug: AugConfig = Field(default_factory=AugConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sched: SchedConfig = Field(default_factory=SchedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    resume: Optional[str] = None                    # null, "auto" (the last checkpoint in output.dir) or a path

    @model_validator(mode="after")
    def _sections_agree(self):
        d, a, t = self.data, self.aug, self.train
        if d.kind == "imagefolder" and d.root is None:
            raise _rule("required when data.kind is 'imagefolder' (a folder with one sub-folder per split, e.g. "
                        "data.root=/data/imagenet)", "data.root", "data.kind")
        if d.kind == "video_canvas":
            if d.num_classes is None:
                raise _rule("required when data.kind is 'video_canvas' (10 for the digits)", "data.num_classes",
                            "data.kind")
            if a.cutmix != 0 or a.cutmix_minmax is not None:
                raise _rule("must be 0 for video clips (timm's CutMix cuts 2-D images); mixup works", "aug.cutmix",
                            "aug.cutmix_minmax", "data.kind")
        if a.mixing and t.batch_size % 2:
            raise _rule(f"mixup/cutmix need an even batch, got {t.batch_size}", "train.batch_size", "aug.mixup",
                        "aug.cutmix", "aug.cutmix_minmax", "aug.mixup_prob")
        warmup = self.sched.warmup_epochs
        if warmup != 0 and warmup >= t.epochs:
            raise _rule(f"must be below train.epochs={t.epochs}, got {warmup!r}", "sched.warmup_epochs",
                        "train.epochs")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line from pydantic's first error, described from the field's own declaration
# ---------------------------------------------------------------------------------------------------------------
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_TYPE_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}


def _section(tp) -> Optional[type]:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp, meta: list) -> Any:
    """``tp`` without ``Annotated`` layers; their metadata (constraints, hints) appended to ``meta``."""
    while get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        for item in extra:
            meta.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return tp


def _bounds(meta: list) -> str:
    b = {k: getattr(m, k) for m in meta for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    low = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    high = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>' if low[0] == '(' else '>='} {low[1]}"
    return f" {'<' if high[0] == ')' else '<='} {high[1]}" if high else ""


def _describe(tp, meta=(), *, bounds: bool = False) -> str:
    """The expected form of a field: ``"null or an int >= 1"``, ``"one of 'fp32', 'bf16'"``..."""
    meta = list(meta)
    tp = _unwrap(tp, meta)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a, meta, bounds=bounds) for a in inner)
        return f"null or {text}" if type(None) in get_args(tp) else text
    if origin is Literal:
        text = "one of " + ", ".join(repr(v) for v in get_args(tp))
    elif origin is list:
        text = f"a list of {_describe(get_args(tp)[0]).split(' ', 1)[1]}s"
    else:
        text = "a mapping" if _section(tp) else _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))
    if bounds:
        hint = next((m for m in meta if isinstance(m, _Hint)), None)
        text += _bounds(meta) + (f" ({hint})" if hint else "")
    return text


def _bare(tp) -> Any:
    """``tp`` without ``Annotated`` layers and ``Optional``."""
    tp = _unwrap(tp, [])
    if get_origin(tp) in (Union, types.UnionType):
        tp = _unwrap(next(a for a in get_args(tp) if a is not type(None)), [])
    return tp


def _field_at(loc: tuple) -> tuple[Any, list]:
    """(annotation, metadata) of the value at ``loc`` (field names, list indices) in RunConfig."""
    tp, meta = RunConfig, []
    for part in loc:
        if isinstance(part, int):
            tp, meta = get_args(_bare(tp))[0], []
        else:
            field = _bare(tp).model_fields[part]
            tp, meta = field.annotation, list(field.metadata)
    return tp, meta


def _dotted(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f"{'.' if i else ''}{p}" for i, p in enumerate(loc))


def _suggest(key: str, options, prefix: str = "") -> str:
    """`` (did you mean 'train.epochs'?)`` for the closest valid spelling, or nothing."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _unknown_key(loc: tuple) -> str:
    parent = _dotted(loc[:-1])
    names = _bare(_field_at(loc[:-1])[0]).model_fields
    return (f"unknown key {_dotted(loc)!r}{_suggest(str(loc[-1]), names, parent + '.' if parent else '')}; valid keys"
            f"{' under ' + parent if parent else ''}: {', '.join(sorted(names))}")


def _explain(err: dict) -> tuple[str, list[tuple]]:
    """(one-line message, the keys it is about: the first is the one it names) of one pydantic error."""
    loc, kind, value = tuple(err["loc"]), err["type"], err["input"]
    where = _dotted(loc) or "the top level"
    if kind == "config":
        ctx = err["ctx"]
        full = loc + tuple(ctx["key"].split(".")) if ctx["key"] else loc
        return f"{_dotted(full)}: {ctx['message']}", [full] + [loc + tuple(r.split(".")) for r in ctx["related"]]
    if kind == "extra_forbidden":
        return _unknown_key(loc), [loc]
    tp, meta = _field_at(loc)
    if kind in _RANGE_ERRORS:
        shown = _number(value) if _bare(tp) is float else value
        return f"{where}: expected {_describe(tp, meta, bounds=True)}, got {shown!r}", [loc]
    return f"{where}: expected {_describe(tp, meta)}, got {value!r} ({type(value).__name__})", [loc]


def _origin_of(keys: list[tuple], origins: dict) -> Optional[str]:
    """Which source set these keys (``origins`` is in the order the keys were set): the last to set the first key or
    one inside it, else the last to set a related key, else the last to set a section holding the first key."""
    def last(match) -> Optional[str]:
        hits = [key for key in origins if match(key)]
        return origins[hits[-1]] if hits else None

    first = keys[0]
    return (last(lambda k: k[:len(first)] == first) or last(lambda k: any(k[:len(r)] == r for r in keys[1:]))
            or last(lambda k: first[:len(k)] == k))


def _record(origins: dict, new: dict) -> dict:
    """``origins`` updated by ``new``, the keys of ``new`` moved last (they were set last)."""
    out = {k: v for k, v in origins.items() if k not in new}
    out.update(new)
    return out


def _validated(data: dict, origins: dict, fallback: Optional[str]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        text, keys = _explain(first)
        origin = _origin_of(keys, origins) or fallback
        raise ConfigError(f"{origin}: {text}" if origin else text) from None


# ---------------------------------------------------------------------------------------------------------------
# Input paths
# ---------------------------------------------------------------------------------------------------------------
# (key path, values that are keywords rather than paths); model.kwargs: timm's checkpoint_path, the DART scorer's trunk
PATH_KEYS = ((("deepspeed", "config"), ()), (("model", "init_checkpoint"), ()), (("data", "root"), ()),
             (("resume",), ("auto",)), (("model", "kwargs", "checkpoint_path"), ()),
             (("model", "kwargs", "dart_cfg", "trunk_weights"), ("pretrained", "random")),
             (("model", "kwargs", "tokenizer_cfg", "trunk_weights"), ("pretrained", "random")))


def _resolve_paths(data: dict, base: str) -> None:
    """Make the input paths set in ``data`` absolute, relative ones taken relative to ``base`` (in place)."""
    for key, keywords in PATH_KEYS:
        node = data
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(key[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and value not in keywords:
            node[key[-1]] = os.path.normpath(os.path.join(base, os.path.expanduser(value)))


# ---------------------------------------------------------------------------------------------------------------
# Recipes by name, files, overrides, saving
# ---------------------------------------------------------------------------------------------------------------
def _recipe_root() -> str:
    try:
        root = importlib.resources.files(RECIPES_PACKAGE)
    except ModuleNotFoundError:
        raise ConfigError(f"the recipes package {RECIPES_PACKAGE} is not installed (reinstall dartmamba)") from None
    return os.fspath(root)


def recipe_names() -> list[str]:
    """The recipes ``load_config`` finds by name (``"vim_tiny_dart"``, ``"demo/vim_dart"``...); the shared parts
    under ``base/`` are left out."""
    root, names = _recipe_root(), []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "base" and not d.startswith(("_", ".")))
        names += [os.path.relpath(os.path.join(folder, f), root)[:-5] for f in files if f.endswith(".yaml")]
    return sorted(n.replace(os.sep, "/") for n in names)


def _find_config(config: str) -> str:
    """A YAML file's absolute path: ``config`` itself when it is a file, else the recipe of that name."""
    if os.path.isfile(config):
        return os.path.abspath(config)
    name = config[:-5] if config.endswith(".yaml") else config
    if not os.path.isabs(name) and not os.path.normpath(name).startswith(".."):
        candidate = os.path.join(_recipe_root(), name + ".yaml")
        if os.path.isfile(candidate):
            return candidate
    names = recipe_names()
    raise ConfigError(f"config file not found: {os.path.abspath(config)}, nor a recipe named {name!r}"
                      f"{_suggest(name, names)}; recipes: {', '.join(names)}")


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, recursively for nested mappings (neither argument is changed)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _origins(data: dict, origin: str, prefix: tuple = ()) -> dict:
    """{key path: origin} of every key in ``data``, nested ones included."""
    out = {}
    for key, value in data.items():
        out[prefix + (key,)] = origin
        if isinstance(value, dict):
            out.update(_origins(value, origin, prefix + (key,)))
    return out


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(data, origins) of a YAML file with its ``_base_`` files (paths relative to it) merged underneath; its
    input paths made absolute relative to it."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(chain + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}" + (f" (a _base_ of {chain[-1]})" if chain else ""))
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty (expected a mapping of sections, e.g. train: {{epochs: 10}})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    _resolve_paths(data, os.path.dirname(path))
    merged, origins = {}, {}
    for base in bases:
        base_data, base_origins = _read_yaml(os.path.join(os.path.dirname(path), base), chain + (path,))
        merged, origins = deep_merge(merged, base_data), _record(origins, base_origins)
    return deep_merge(merged, data), _record(origins, _origins(data, path))


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


def _set_path(data: dict, parts: list[str], value: Any, origin: str) -> None:
    """``data[p0][p1]... = value``, each part checked against the schema down to a free-form mapping."""
    section, node = RunConfig, data
    for depth, part in enumerate(parts):
        path, last = ".".join(parts[:depth + 1]), depth == len(parts) - 1
        if section is not None:
            if part not in section.model_fields:
                raise ConfigError(f"{origin}: {_unknown_key(tuple(parts[:depth + 1]))}")
            tp = section.model_fields[part].annotation
            section = _section(tp)
            if last and section is not None and not isinstance(value, dict):
                first = next(iter(section.model_fields))
                raise ConfigError(f"{origin}: {path!r} is a section; set one of its keys, e.g. {path}.{first}=...")
            if not last and section is None and tp is not dict:
                raise ConfigError(f"{origin}: {path!r} is a value, not a section")
        if last:
            node[part] = copy.deepcopy(value)
            return
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {path!r} holds {child!r}, not a mapping")
        node = child


def config_from_dict(data: dict, origin: str = "config") -> RunConfig:
    """The checked RunConfig of a (possibly partial) dict; relative input paths are taken relative to the working
    directory."""
    data = copy.deepcopy(data)
    if isinstance(data, dict):
        _resolve_paths(data, os.getcwd())
    return _validated(data, _origins(data, origin) if isinstance(data, dict) else {}, origin)


def load_config(config: Optional[str] = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a recipe (a YAML path or a recipe name; the defaults when ``config`` is None), apply ``key=value``
    overrides (input paths relative to the working directory), check everything."""
    path = _find_config(os.fspath(config)) if config is not None else None
    data, origins = _read_yaml(path) if path is not None else ({}, {})
    for text in overrides:
        parts, value = parse_override(text)
        origin = f"override {text!r}"
        _set_path(data, parts, value, origin)
        nested = _origins(value, origin, tuple(parts)) if isinstance(value, dict) else {}
        origins = _record(origins, {tuple(parts): origin, **nested})
    _resolve_paths(data, os.getcwd())
    return _validated(data, origins, path)


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump()


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (a temp file in the same folder, then ``os.replace``)."""
    from dartmamba.files import atomic_write_text
    from .errors import file_error

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    try:
        atomic_write_text(path, text)
    except OSError as exc:          # a full disk (with the bytes needed and free), a read-only folder
        raise file_error(path, exc, "writing", needed=len(text.encode())) from None
