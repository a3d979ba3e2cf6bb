"""FLOP counting for dartmamba models, tokenizer included, per part.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and attention from their shapes; every
custom op registers its own formula beside its fake implementation (``dartmamba.ops`` and ``dartmamba_kernels``,
through ``torch.utils.flop_counter.register_flop_formula``), tagged with the part of a report its work belongs to
(the formula's ``flop_part`` attribute: ``"scan"``, ``"resample"``, ``"posembed"``, or none). This module

- counts a model on fake tensors, and makes a custom op **without** a formula an error naming it (a new op must
  say what it costs, even if that is 0), instead of a silent 0;
- adds, for the duration of a count only, formulas for ``aten.grid_sampler_2d`` / ``aten.upsample_bilinear2d``
  (4 taps per output element) and CPU flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``, which
  torch's table lacks; its CUDA siblings are in it);
- asks the model's tokenizer to split its own share into parts (``flop_parts``, see
  :class:`dartmamba.tokenizer.Tokenizer`): for DART ``scorer_trunk``, ``scorer_head`` (head, score standardisation
  and any resize), ``resample``, ``posembed`` (analytic where no op shows the work: the gather-based bilinear
  resampling and the running-sum re-binning) and ``embed`` (patch projection); then ``backbone`` (blocks and final
  norm; the scan's share is reported separately as ``scan``) and ``head`` (classifier).

Convention. Numbers are **multiply-adds** (MACs): one multiply-add, or one lone multiply, counts 1. This is fvcore's
convention and the one behind published "GFLOPs" (DeiT-S: 4.6 at 224), i.e. half of what ``FlopCounterMode``
reports for a matmul. Elementwise work (activations, norms, softmax, residual adds) and the DART partition (a few
hundred operations per score cell) are not counted, as in fvcore. Our additions beyond fvcore-style counts: the
selective scan (forward: 4 per (batch, channel, step, state) -- ``dt*A``, ``(dt*u)*B``, the state update
``exp(dt*A)*h + drive``, the output ``C*h`` -- plus 1 per (batch, channel, step) each for ``dt*u``, the ``D`` skip
and the ``z`` gate), the bilinear taps of resampling and resizes, and attention's two matmuls on CPU.

Counting runs on fake tensors (no memory, no arithmetic): :func:`count_model_flops` builds the model on the meta
device, so even Vim-B at 1568 tokens counts in about a second on a laptop CPU.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import flop_registry

from .compat.torch_internals import RecordingFlopCounterMode
from .ops.scan import scan_backward_macs, scan_forward_macs
from .tokenizer.posembed import posembed_macs
from .tokenizer.resample import resample_macs

__all__ = [
    "FlopReport", "PARTS", "count_flops", "count_model_flops", "fit_exponent", "custom_op_formulas",
    "scan_forward_macs", "scan_backward_macs", "resample_macs", "posembed_macs", "model_input_size",
    "model_num_tokens", "MissingFlopFormulaError",
]

# Parts of a report, in display order. ``scan`` is informational: it is already inside ``backbone``.
PARTS = ("scorer_trunk", "scorer_head", "resample", "posembed", "embed", "backbone", "head")
TOKENIZER_PARTS = ("scorer_trunk", "scorer_head", "resample", "posembed", "embed")
DART_EXTRA_PARTS = ("scorer_trunk", "scorer_head", "resample", "posembed")   # what a fixed grid does not have

_TAPS = 4   # bilinear interpolation: 4 multiply-adds per output element
# namespaces of torch's own operators; any other op that runs during a count is a custom op and needs a formula
_TORCH_NAMESPACES = {"aten", "prim", "prims", "higher_order", "c10d", "_c10d_functional", "profiler", "inductor",
                     "debugprims", "rngprims", "quantized", "_quantized"}


class MissingFlopFormulaError(RuntimeError):
    """A custom op ran during a FLOP count and has no FLOP formula."""


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _op_name(op) -> str:
    return str(op).replace("aten.", "").replace("dartmamba.", "")


def _namespace(op) -> str | None:
    name = getattr(op, "_qualified_op_name", None) or getattr(op, "name", lambda: "")()
    return name.split("::", 1)[0] if isinstance(name, str) and "::" in name else None


def custom_op_formulas() -> list[str]:
    """The ``dartmamba::`` custom ops registered so far that have a FLOP formula (each registers its own beside its
    fake implementation; the Triton kernels' ops exist once ``dartmamba_kernels`` is imported)."""
    return sorted(_op_name(op) for op in flop_registry if _namespace(op) == "dartmamba")


def _taps_formula(*args, out_shape=None, **kwargs) -> int:
    """Bilinear sampling or resize: 4 multiply-adds (8 FLOPs) per output element."""
    return 2 * _TAPS * _numel(out_shape)


def _grid_sample_formula(*args, out_shape=None, **kwargs) -> int:
    return _taps_formula(out_shape=out_shape)


_grid_sample_formula.flop_part = "resample"     # the literal reference resampler's work


def _cpu_attention_formula(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """softmax(q k^T) v: two matmuls, (B, H, Lq, E) x (B, H, E, Lk) and (B, H, Lq, Lk) x (B, H, Lk, Ev)."""
    *lead, lq, e = query
    lk, ev = key[-2], value[-1]
    heads = math.prod(lead)
    return 2 * heads * lq * lk * (e + ev)


def _extra_aten_formulas() -> dict:
    """Formulas added for one count only (torch's global table stays untouched)."""
    aten = torch.ops.aten
    extra = {aten.grid_sampler_2d: _grid_sample_formula, aten.upsample_bilinear2d: _taps_formula}
    cpu_attention = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None and cpu_attention not in flop_registry:
        extra[cpu_attention] = _cpu_attention_formula
    return extra


class _Counter(RecordingFlopCounterMode):
    """The FLOP counter of a count: records custom ops without a formula (a new op must say what it costs, even if
    that is 0) and picks up formulas registered after it began (see :mod:`dartmamba.compat.torch_internals`)."""

    def __init__(self, **kwargs):
        super().__init__(lambda op: _namespace(op) not in (None, *_TORCH_NAMESPACES), **kwargs)

    def part_of(self, op) -> str | None:
        return getattr(self.formula(op), "flop_part", None)


# ----------------------------------------------------------------------------------------------------------------
# Counting a model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FlopReport:
    """Multiply-adds per image, by part (see :data:`PARTS`); ``scan`` is the selective scan's share of ``backbone``."""

    model: str
    input_size: tuple[int, ...]          # (C, H, W), or (C, T, H, W) for video (counts are then per clip)
    num_tokens: int | None
    parts: dict[str, int]
    scan: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def gflops(self) -> float:
        """Total in GFLOPs, fvcore convention (a multiply-add counts one)."""
        return self.total / 1e9

    @property
    def tokenizer(self) -> int:
        return sum(self.parts[p] for p in TOKENIZER_PARTS)

    @property
    def dart_extra(self) -> int:
        """What the DART tokenizer adds over a fixed grid: scorer, resampling, positional-embedding re-binning."""
        return sum(self.parts[p] for p in DART_EXTRA_PARTS)

    def as_row(self) -> dict:
        row = {"model": self.model, "input_size": "x".join(map(str, self.input_size[1:])),
               "tokens": self.num_tokens, "gflops": self.total / 1e9}
        row.update({f"gflops_{p}": v / 1e9 for p, v in self.parts.items()})
        row["gflops_scan"] = self.scan / 1e9
        return row


def model_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) the model takes, (C, T, H, W) for a video model (its patch embedding has ``num_frames``): from its
    patch embedding (fixed grid or DART), else its pretrained cfg."""
    embed = getattr(model, "patch_embed", None)
    img = getattr(embed, "img_size", None)
    chans = getattr(embed, "in_chans", None)
    frames = getattr(embed, "num_frames", None)
    if chans is None and getattr(embed, "proj", None) is not None:
        chans = getattr(embed.proj, "in_channels", None)
    if img is not None:
        img = (img, img) if isinstance(img, int) else tuple(img)
        clip = () if frames is None else (int(frames),)
        return (int(chans or 3), *clip, int(img[0]), int(img[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass input_size=(C, H, W)")


def model_num_tokens(model: nn.Module) -> int | None:
    """Image tokens the backbone sees (DART: N; fixed grid: the number of patches); prefix tokens not included."""
    embed = getattr(model, "patch_embed", None)
    for attr in ("num_tokens", "num_patches"):
        value = getattr(embed, attr, None)
        if isinstance(value, int):
            return value
    return None


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _tokenizer(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """The model's tokenizer (the first module implementing :class:`dartmamba.tokenizer.Tokenizer`, usually
    ``patch_embed``), or a plain patch embedding (a timm model's ``PatchEmbed``), with its path."""
    from .tokenizer import Tokenizer

    for name, module in model.named_modules():
        if isinstance(module, Tokenizer):
            return name, module
    embed = getattr(model, "patch_embed", None)
    return _module_name(model, embed), embed


def count_flops(model: nn.Module, input_size: tuple[int, ...] | None = None, batch_size: int = 1,
                name: str | None = None) -> FlopReport:
    """Count the forward multiply-adds of ``model`` per image, by part, on fake tensors (nothing is computed).

    Args:
        model: any ``nn.Module`` taking (B, C, H, W) images; parameters on a real device (build on the meta device
            and call ``.to_empty(device="cpu")`` for a free model, as :func:`count_model_flops` does).
        input_size: (C, H, W), or (C, T, H, W) for a video model; default :func:`model_input_size`.
        batch_size: images in the fake batch (results are per image).
        name: label of the report (default the model's class).

    Returns:
        A :class:`FlopReport`.

    Raises:
        MissingFlopFormulaError: a custom op ran that has no FLOP formula.
    """
    from .compat.torch_internals import fake_tensor_mode

    input_size = tuple(input_size) if input_size is not None else model_input_size(model)
    root = type(model).__name__
    tok_path, tokenizer = _tokenizer(model)
    calls = []

    def record_call(module, args, kwargs, out):
        calls.append((args, kwargs))

    hook = (tokenizer.register_forward_hook(record_call, with_kwargs=True)
            if tokenizer is not None and hasattr(tokenizer, "flop_parts") else None)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fake_tensor_mode(allow_non_fake_inputs=True):
                images = torch.empty(batch_size, *input_size, device=device)
                # grad mode stays on: under no_grad, the module tracker trips on views of parameters (fake tensors
                # that require grad but have no grad_fn); the forward is counted either way
                with _Counter(display=False, custom_mapping=_extra_aten_formulas()) as counter:
                    model(images)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if counter.missing:
        names = ", ".join(sorted(str(op) for op in counter.missing))
        raise MissingFlopFormulaError(
            f"custom op(s) without a FLOP formula ran while counting {name or root}: {names}; register one beside the "
            f"op's fake implementation (torch.utils.flop_counter.register_flop_formula, or "
            f"dartmamba.ops._common.register_flops; 0 for work the convention leaves out)")

    counts = counter.get_flop_counts()

    def counted(path: str | None = None, part: str | None = None) -> int:
        """Multiply-adds inside module ``path`` (None: the whole model) by ops tagged ``part`` (None: all)."""
        key = root if not path else f"{root}.{path}"
        per_op = counts.get(key, {})
        return sum(v for op, v in per_op.items() if part is None or counter.part_of(op) == part) // 2

    by_op: dict[str, int] = {}
    scan = 0
    for op, v in counts.get("Global", {}).items():
        by_op[_op_name(op)] = by_op.get(_op_name(op), 0) + v // 2
        if counter.part_of(op) == "scan":
            scan += v // 2

    parts = dict.fromkeys(PARTS, 0)
    head_path = _module_name(model, model.get_classifier()) if hasattr(model, "get_classifier") else None
    parts["head"] = counted(head_path) if head_path is not None else 0
    if hook is not None and calls:
        prefix = f"{tok_path}." if tok_path else ""
        tokenizer_parts = tokenizer.flop_parts(
            calls[0], lambda submodule=None, part=None: counted(prefix + submodule if submodule else tok_path, part))
        unknown = sorted(set(tokenizer_parts) - set(PARTS))
        if unknown:
            raise ValueError(f"{type(tokenizer).__name__}.flop_parts returned unknown parts {unknown}; parts: {PARTS}")
        parts.update(tokenizer_parts)
        tokenizer_total = counted(tok_path)
    else:
        tokenizer_total = counted(tok_path) if tok_path is not None else 0
        parts["embed"] = tokenizer_total
    parts["backbone"] = counted() - tokenizer_total - parts["head"]
    per_image = {p: v // batch_size for p, v in parts.items()}
    return FlopReport(model=name or root, input_size=tuple(int(s) for s in input_size),
                      num_tokens=model_num_tokens(model), parts=per_image, scan=scan // batch_size,
                      by_op={op: v // batch_size for op, v in by_op.items()})


def count_model_flops(model_name: str, batch_size: int = 1, input_size=None, **kwargs) -> FlopReport:
    """Build a registered timm model on the meta device (no init cost, no memory) and count it.

    ``kwargs`` go to ``timm.create_model`` (e.g. ``num_tokens=392`` for DART, ``img_size=448`` for a fixed grid).
    """
    import timm

    import dartmamba.models  # noqa: F401  (registers the models)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # frozen scorer trunks warn that they start random
        with torch.device("meta"):
            model = timm.create_model(model_name, **kwargs)
    model = model.to_empty(device="cpu")
    return count_flops(model, input_size=input_size, batch_size=batch_size, name=model_name)


def fit_exponent(tokens, values, lo: float | None = None, hi: float | None = None) -> float:
    """Least-squares slope of log(value) against log(tokens) over the points with lo <= tokens <= hi:
    cost ~ tokens^slope (1 for linear growth, up to 2 for attention-dominated growth)."""
    pairs = [(float(t), float(v)) for t, v in zip(tokens, values)
             if v is not None and v > 0 and (lo is None or t >= lo) and (hi is None or t <= hi)]
    if len({t for t, _ in pairs}) < 2:
        raise ValueError(f"need values at two or more token counts in [{lo}, {hi}], got {pairs}")
    xs = [math.log(t) for t, _ in pairs]
    ys = [math.log(v) for _, v in pairs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
