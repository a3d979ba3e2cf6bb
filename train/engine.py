"""The DeepSpeed engine around a timm model: config, optimizer, scheduler, loss, compile, the training step, and
consolidated (full, fp32) weights.

Precision (``train.precision``):

- ``"fp32"``: everything in fp32.
- ``"amp_bf16"`` (default): fp32 weights and optimizer, the forward under ``torch.autocast(bf16)`` (DeepSpeed's
  ``torch_autocast`` section). Vim's A, D and dt bias stay fp32, as the method notes ask.
- ``"bf16"``: DeepSpeed's ``bf16`` section: bf16 weights and activations, fp32 master weights in the optimizer.

The optimizer is a timm optimizer object handed to ``deepspeed.initialize`` (a DS-config optimizer would JIT-build
fused Adam). The timm scheduler is stepped by the loop on every optimizer update; DeepSpeed gets no scheduler.

Compilation (``train.compile``, ``train.compile_scope``): ZeRO 0-2 compile the whole module with
``engine.compile()`` (one graph; the forward and, through AOTAutograd, the backward); ZeRO-3 compiles region by
region (patch embedding, each block), see :func:`resolve_compile_scope`. The loss and the optimizer step stay eager.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ConfigError, RunConfig, deep_merge
from .deepspeed_keys import check_deepspeed_keys

__all__ = ["EngineParts", "build_deepspeed_config", "create_model", "shape_model", "check_init_checkpoint",
           "create_optimizer", "scaled_param_groups", "create_scheduler", "create_losses", "initialize_engine",
           "train_micro_step", "consolidated_state_dict", "gathered_params", "resolve_deepspeed_json",
           "FrozenSnapshot"]

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def resolve_deepspeed_json(path: str) -> str:
    """``deepspeed.config`` as an absolute file path. The config loader makes it absolute (relative to the YAML that
    set it, or to the working directory for a command-line override); a relative path (a config built in code with
    ``config_from_dict``) is relative to the working directory."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        where = ("a path in a YAML is relative to that YAML, one on the command line to the working directory"
                 if os.path.isabs(path) else f"looked in: {full}, relative to the working directory")
        raise ConfigError(f"deepspeed.config: file not found: {path} ({where})")
    return full


def build_deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The JSON of ``deepspeed.config`` with the batch, accumulation, clipping and precision of the run filled in.

    Batch sizes come from ``train.batch_size`` / ``train.grad_accum`` only; a JSON that sets them (other than
    ``"auto"``), or that declares an optimizer or scheduler, is refused with the reason; so is a key DeepSpeed does
    not know (:func:`~dartmamba_train.deepspeed_keys.check_deepspeed_keys`).
    """
    path = resolve_deepspeed_json(cfg.deepspeed.config)
    with open(path) as handle:
        try:
            ds = json.load(handle)
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object, got {type(ds).__name__}")
    ds = deep_merge(ds, cfg.deepspeed.overrides)
    if not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"deepspeed: zero_optimization must be a mapping (e.g. {{\"stage\": 2}}), got "
                          f"{ds['zero_optimization']!r}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed.config: {path} declares an {key!r}; remove it: the {key} comes from the "
                              f"optim / sched sections (a timm object, so DeepSpeed builds no fused op)")
    for key in _BATCH_KEYS:
        if key in ds and ds[key] != "auto":
            raise ConfigError(f"deepspeed.config: {path} sets {key}={ds[key]!r}; batch sizes come from "
                              f"train.batch_size and train.grad_accum (use \"auto\" or leave it out)")
    for key in ("fp16", "bf16", "torch_autocast", "amp"):
        if key in ds:
            raise ConfigError(f"deepspeed.config: {path} sets {key!r}; precision comes from train.precision")
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.deepspeed.stage is not None:
        zero["stage"] = cfg.deepspeed.stage
    zero.setdefault("stage", 0)
    # ZeRO-3's "memory-efficient linear" replaces torch.nn.functional.linear for the whole process, for good (every
    # model built afterwards uses it), and with torch 2.11 its autograd.Function loses the gradients of everything
    # inside a torch.compile'd region (weights get only their weight decay). Off unless the JSON asks for it.
    zero.setdefault("memory_efficient_linear", False)
    ds["zero_optimization"] = zero
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.batch_size * t.grad_accum * world_size
    ds["gradient_clipping"] = float(t.clip_grad or 0.0)
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "amp_bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    # ZeRO refuses optimizers other than its few known ones unless told; timm's are plain element-wise torch
    # optimizers over the (flattened, partitioned) fp32 parameters, which is all ZeRO needs.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    check_deepspeed_keys(ds, cfg.deepspeed.overrides, path)
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Model, optimizer, scheduler, losses
# ---------------------------------------------------------------------------------------------------------------
def _timm_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """``timm.create_model(model.name, num_classes, drop_rate, drop_path_rate, **model.kwargs)``; an unknown name or
    arguments the model rejects are a ConfigError."""
    import timm

    import dartmamba.models  # noqa: F401  (registers vim_* / deit_*_dart)

    m = cfg.model
    if not timm.is_model(m.name):
        import difflib

        close = difflib.get_close_matches(m.name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"model.name: unknown model {m.name!r}; similar registered names: {close}")
    try:
        return timm.create_model(m.name, pretrained=False, num_classes=num_classes, drop_rate=m.drop_rate,
                                 drop_path_rate=m.drop_path_rate, **m.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.kwargs: {m.name} rejected its arguments {sorted(m.kwargs)}: "
                          f"{' '.join(str(err).split())}") from None


def shape_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The run's model on the meta device (its arguments checked, shapes and config known; no memory, no init
    cost, no warnings about random weights), for the checks made before a run starts."""
    import warnings

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _timm_model(cfg, num_classes)


def check_init_checkpoint(cfg: RunConfig, model: nn.Module) -> None:
    """``model.init_checkpoint`` exists and, for a ``.safetensors`` file, holds exactly the model's tensors with its
    shapes (read from the header). Its digests are verified when it is loaded."""
    path = cfg.model.init_checkpoint
    if not path:
        return
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.init_checkpoint: file not found: {path}")
    if not path.endswith(".safetensors"):
        return
    from dartmamba.files import read_safetensors_header

    try:
        _, shapes = read_safetensors_header(path)
    except ValueError as err:
        raise ConfigError(f"model.init_checkpoint: {err}") from None
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    for name in list(own) + [n for n in shapes if n not in own]:
        theirs = shapes[name][1] if name in shapes else None
        if theirs != own.get(name):
            raise ConfigError(f"model.init_checkpoint: {path} does not fit {cfg.model.name}: tensor {name!r} has "
                              f"shape {theirs or '(missing)'} there, the model {own.get(name) or '(none)'}")


def create_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """``timm.create_model(model.name, num_classes, drop_rate, drop_path_rate, **model.kwargs)``, dartmamba's
    models registered; ``model.init_checkpoint`` loaded (strict, digests verified) when given."""
    m = cfg.model
    model = _timm_model(cfg, num_classes)
    if m.init_checkpoint:
        if not os.path.isfile(m.init_checkpoint):
            raise FileNotFoundError(f"model.init_checkpoint: file not found: {os.path.abspath(m.init_checkpoint)}")
        from timm.models import load_checkpoint

        load_checkpoint(model, m.init_checkpoint, strict=True)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def global_batch_size(cfg: RunConfig, world_size: int) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * world_size


def resolved_lr(cfg: RunConfig, world_size: int) -> float:
    """``optim.lr``, or DeiT's linear rule ``lr_base * global_batch / lr_base_size``."""
    o = cfg.optim
    return o.lr if o.lr is not None else o.lr_base * global_batch_size(cfg, world_size) / o.lr_base_size


# torch's fused CPU kernels: one C++ call per step instead of a Python loop over the parameter tensors
# (docs/benchmarks.md)
_FUSED_ON_CPU = ("adam", "adamw")


def scaled_param_groups(model: nn.Module, scales: dict[str, float], weight_decay: float) -> list[dict]:
    """timm's weight-decay groups (``param_groups_weight_decay`` with the model's ``no_weight_decay()``, as
    ``create_optimizer_v2`` forms them), each split by the scale of its parameters' longest matching prefix in
    ``scales`` (1 where none matches) into groups carrying ``lr_scale``, which timm's schedulers multiply the
    learning rate by. A prefix matches a parameter's name or the names under it (``patch_embed.scorer`` matches
    ``patch_embed.scorer.head.gate.weight``). A prefix that matches no trainable parameter is a ConfigError."""
    from timm.optim import param_groups_weight_decay

    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    names = {id(p): n for n, p in model.named_parameters()}
    matched = dict.fromkeys(scales, 0)
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay):
        by_scale: dict[float, list] = {}
        for param in group["params"]:
            name = names[id(param)]
            prefix = max((k for k in scales if name == k or name.startswith(k + ".")), key=len, default=None)
            if prefix is not None:
                matched[prefix] += 1
            by_scale.setdefault(1.0 if prefix is None else scales[prefix], []).append(param)
        settings = {k: v for k, v in group.items() if k != "params"}
        groups += [{**settings, "params": params, "lr_scale": scale} for scale, params in by_scale.items()]
    unmatched = [k for k, count in matched.items() if count == 0]
    if unmatched:
        modules = sorted({n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad})
        raise ConfigError(f"optim.lr_scale: {unmatched[0]!r} is the prefix of no trainable parameter of the model "
                          f"(its top-level parts with trainable parameters: {', '.join(modules)})")
    return groups


def create_optimizer(cfg: RunConfig, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2``: no weight decay for 1-d parameters (norms, biases) and the model's
    ``no_weight_decay()`` set (positional embeddings, class token, Vim's A_log); frozen parameters left out;
    ``optim.lr_scale`` splits the groups by learning-rate scale (:func:`scaled_param_groups`). Adam and AdamW on CPU
    parameters take torch's fused implementation."""
    import timm.optim

    o = cfg.optim
    kwargs = {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if o.opt.lower() in _FUSED_ON_CPU and trainable and all(p.device.type == "cpu" for p in trainable):
        kwargs["fused"] = True
    if o.eps is not None:
        kwargs["eps"] = o.eps
    if o.betas is not None:
        kwargs["betas"] = tuple(o.betas)
    params = scaled_param_groups(model, o.lr_scale, o.weight_decay) if o.lr_scale else model
    return timm.optim.create_optimizer_v2(params, opt=o.opt, lr=resolved_lr(cfg, world_size),
                                          weight_decay=o.weight_decay, momentum=o.momentum,
                                          layer_decay=o.layer_decay, filter_bias_and_bn=True, **kwargs)


def create_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm ``create_scheduler_v2`` stepped per optimizer update (call ``step_update(num_updates)``)."""
    import timm.scheduler

    s = cfg.sched
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=cfg.train.epochs, warmup_epochs=s.warmup_epochs,
        warmup_lr=s.warmup_lr, min_lr=s.min_lr, cooldown_epochs=s.cooldown_epochs, decay_rate=s.decay_rate,
        decay_epochs=s.decay_epochs, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    scheduler.step_update(0)
    return scheduler


def create_losses(cfg: RunConfig, num_classes: int):
    """(timm Mixup or None, training loss). Mixup/CutMix give soft targets with the smoothing folded in
    (SoftTargetCrossEntropy); without them, label smoothing is LabelSmoothingCrossEntropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    a = cfg.aug
    mixup_active = (a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None) and a.mixup_prob > 0
    if mixup_active:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, cutmix_minmax=a.cutmix_minmax, prob=a.mixup_prob,
                      switch_prob=a.mixup_switch_prob, mode=a.mixup_mode, label_smoothing=a.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, LabelSmoothingCrossEntropy(a.smoothing) if a.smoothing > 0 else nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class FrozenSnapshot:
    """fp32 copies of what the optimizer never changes (frozen parameters, buffers), taken before DeepSpeed may
    cast the module to bf16, so consolidated weights keep the original values."""

    tensors: dict

    @classmethod
    def of(cls, model: nn.Module) -> "FrozenSnapshot":
        tensors = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()
                   if not p.requires_grad}
        tensors.update({name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()})
        return cls(tensors)


@dataclass
class EngineParts:
    engine: object
    optimizer: torch.optim.Optimizer       # the timm optimizer (the scheduler writes its param_groups' lr)
    scheduler: object
    frozen: FrozenSnapshot
    zero_stage: int
    compile_scope: str | None = None       # None, "model" or "blocks"


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """The modules compiled one by one under ``compile_scope: blocks``: the patch embedding (fixed grid or DART)
    and every block of the repeated stack, as the model's timm ``feature_info`` names them (``layers.i`` for Vim,
    ``blocks.i`` for timm ViTs)."""
    regions = []
    if isinstance(getattr(model, "patch_embed", None), nn.Module):
        regions.append(model.patch_embed)
    for info in getattr(model, "feature_info", None) or []:
        name = info.get("module") if isinstance(info, dict) else None
        try:
            block = model.get_submodule(name) if name else None
        except AttributeError:
            block = None
        if block is not None and block not in regions:
            regions.append(block)
    if len(regions) < 2:
        raise ConfigError(f"train.compile_scope: {type(model).__name__} names no blocks in its feature_info to "
                          f"compile one by one; use train.compile_scope=model (ZeRO 0-2) or train.compile=false")
    return regions


def resolve_compile_scope(cfg: RunConfig, zero_stage: int) -> str | None:
    """None (no compile), ``"model"`` (the whole module, one graph) or ``"blocks"`` (region by region).

    Whole-model compile under ZeRO-3 cannot serve dartmamba's models: they read child modules' weights
    functionally (fused Mamba / RMSNorm calls, DART's patch GEMM), which eager ZeRO-3 gathers on attribute access
    but a compiled graph does not. Region by region, each region is a ZeRO-3 leaf module (its weights are gathered
    once for its forward and backward) and the glue between regions runs eagerly.
    """
    t = cfg.train
    if not t.compile:
        return None
    if t.compile_scope == "auto":
        return "blocks" if zero_stage == 3 else "model"
    if t.compile_scope == "model" and zero_stage == 3:
        raise ConfigError("train.compile_scope: 'model' does not work under ZeRO-3 for these models (weights read "
                          "functionally inside a compiled graph are not gathered); use 'blocks' or 'auto'")
    return t.compile_scope


def initialize_engine(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                      ds_config: dict) -> EngineParts:
    """``deepspeed.initialize`` with the timm optimizer, then compilation as :func:`resolve_compile_scope` says."""
    import deepspeed

    frozen = FrozenSnapshot.of(model)
    stage = int(ds_config["zero_optimization"]["stage"])
    scope = resolve_compile_scope(cfg, stage)
    regions = compile_regions(model) if scope == "blocks" else []
    if regions and stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, sorted({type(r) for r in regions}, key=lambda c: c.__name__))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    compile_kwargs = {"dynamic": False, "backend": cfg.train.compile_backend}
    if cfg.train.compile_mode:
        compile_kwargs["mode"] = cfg.train.compile_mode
    if scope == "model":
        engine.compile(backend=compile_kwargs.pop("backend"), compile_kwargs=compile_kwargs)
    for region in regions:
        region.compile(**compile_kwargs)
    return EngineParts(engine, optimizer, scheduler, frozen, stage, scope)


def _input_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def forward_logits(engine, images: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Engine forward (compiled if enabled, autocast if amp_bf16). (B, C, H, W) -> fp32 logits (B, classes)."""
    return engine(images.to(_input_dtype(cfg))).float()


def train_micro_step(engine, images: torch.Tensor, targets: torch.Tensor, loss_fn, cfg: RunConfig) -> torch.Tensor:
    """One micro-batch: forward, loss, ``engine.backward``, ``engine.step`` (DeepSpeed applies the update, with
    clipping, at the accumulation boundary). Returns the detached fp32 loss."""
    loss = loss_fn(forward_logits(engine, images, cfg), targets)
    engine.backward(loss)
    engine.step()
    return loss.detach()


@contextlib.contextmanager
def gathered_params(engine, zero_stage: int):
    """Full parameters on every rank for the duration (ZeRO-3 gathers them; other stages hold them already)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def consolidated_state_dict(parts: EngineParts) -> dict:
    """The model's full state dict in fp32 on CPU, whatever the stage and precision. Call on every rank (ZeRO-3
    and bf16 master weights are gathered collectively); every rank gets the same dict.

    Trainable parameters come from DeepSpeed's fp32 master copies where it keeps them (``safe_get_full_fp32_param``),
    otherwise from the module. Frozen parameters and buffers keep their original (pre-cast) values unless training
    changed them.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    from dartmamba.compat.deepspeed import unfused_master_copies

    engine = parts.engine
    module = engine.module
    state = {}
    masters = unfused_master_copies(engine.optimizer)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for name, param in trainable:
        full = safe_get_full_fp32_param(param)        # ZeRO 1-3 and BF16_Optimizer (a collective under ZeRO-3)
        if full is None:
            full = masters.get(id(param), param.detach())
        state[name] = full.detach().float().cpu().clone()
    with gathered_params(engine, parts.zero_stage):
        for name, param in module.named_parameters():
            if not param.requires_grad:
                state[name] = _unchanged_or_live(parts.frozen.tensors.get(name), param.detach())
        for name, buf in module.named_buffers():
            state[name] = _unchanged_or_live(parts.frozen.tensors.get(name), buf.detach())
    reference = module.state_dict().keys()
    return {name: state[name] for name in reference if name in state}


def _unchanged_or_live(original: torch.Tensor | None, live: torch.Tensor) -> torch.Tensor:
    """The original tensor if ``live`` is just its (possibly lower-precision) copy, else ``live`` in the original
    dtype."""
    live = live.cpu()
    if original is None:
        return live.clone()
    if original.is_floating_point() and live.dtype != original.dtype:
        if torch.equal(original.to(live.dtype), live):
            return original.clone()
        return live.to(original.dtype)
    return original.clone() if torch.equal(original, live) else live.clone()
