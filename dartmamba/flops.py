"""FLOP counting for dartmamba models, tokenizer included, per part.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and attention from their shapes, but it
cannot see our custom ops (the selective scan, the Triton resampler) nor the gather-based resampling, and nothing
counts ``grid_sample``. This module

- registers FLOP formulas for our custom ops (:func:`register_flop_formulas`, run on import and again before every
  count, so ops registered later, such as the Triton resampler's, are picked up):
  ``dartmamba::selective_scan_{cpu,cuda}_{fwd,bwd}`` and ``dartmamba::resample_patches_triton{,_backward,_out}``;
- adds, for the duration of a count only, formulas for ``aten.grid_sampler_2d`` / ``aten.upsample_bilinear2d``
  (4 taps per output element) and CPU flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``, which
  torch's table lacks; its CUDA siblings are in it);
- counts analytically what no op shows: the gather-based bilinear resampling (4 taps per output element) and the
  re-binning of the positional embeddings;
- splits the count into parts: ``scorer_trunk``, ``scorer_head`` (head, score standardisation and any resize),
  ``resample``, ``posembed``, ``embed`` (patch projection), ``backbone`` (blocks and final norm; the scan's share
  is reported separately as ``scan``) and ``head`` (classifier).

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
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

__all__ = [
    "FlopReport", "PARTS", "count_flops", "count_model_flops", "fit_exponent", "register_flop_formulas",
    "scan_forward_macs", "scan_backward_macs", "resample_macs", "posembed_macs", "model_input_size",
    "model_num_tokens",
]

# Parts of a report, in display order. ``scan`` is informational: it is already inside ``backbone``.
PARTS = ("scorer_trunk", "scorer_head", "resample", "posembed", "embed", "backbone", "head")
TOKENIZER_PARTS = ("scorer_trunk", "scorer_head", "resample", "posembed", "embed")
DART_EXTRA_PARTS = ("scorer_trunk", "scorer_head", "resample", "posembed")   # what a fixed grid does not have

_TAPS = 4   # bilinear interpolation: 4 multiply-adds per output element


# ----------------------------------------------------------------------------------------------------------------
# Analytic counts (multiply-adds)
# ----------------------------------------------------------------------------------------------------------------
def scan_forward_macs(batch: int, dim: int, length: int, dstate: int, has_D: bool = True, has_z: bool = True) -> int:
    """Multiply-adds of one selective-scan forward (u, delta, z: (batch, dim, L); A: (dim, N)).

    Per (batch, dim, step, state): ``dt*A``, ``(dt*u)*B``, ``exp(dt*A)*h + drive``, ``C*h`` (accumulated) = 4.
    Per (batch, dim, step): ``dt*u``, and ``+ D*u`` and ``* silu(z)`` when present. exp/softplus/silu: not counted.
    """
    return batch * dim * length * (4 * dstate + 1 + int(has_D) + int(has_z))


def scan_backward_macs(batch: int, dim: int, length: int, dstate: int, has_D: bool = True,
                       has_z: bool = True) -> int:
    """Multiply-adds of an exact selective-scan backward (the state recomputed from chunk checkpoints).

    Per (batch, dim, step, state): recompute ``dt*A``, ``(dt*u)*B`` and the state (3), the output ``C*h`` again
    when gated (1), the adjoint ``C*g`` and ``exp(dt*A)*g_next`` (2), ``dC``, ``d(dt*u)``, ``dB`` (3) and the
    decay chain ``g*exp(dt*A)*h_prev`` times ``A`` and times ``dt`` (4). Per (batch, dim, step): the split of
    ``d(dt*u)`` (2), ``dD`` and ``du`` from the skip (2), the gate's gradient (2).
    """
    per_state = 12 + int(has_z)
    return batch * dim * length * (dstate * per_state + 2 + 2 * int(has_D) + 2 * int(has_z))


def resample_macs(batch: int, num_tokens: int, chans: int, patch_size: int) -> int:
    """Bilinear resampling to (B, N, C, p, p): 4 taps (multiply-adds) per output element."""
    return _TAPS * batch * num_tokens * chans * patch_size * patch_size


def posembed_macs(batch: int, num_rows: int, grid_w: int, num_tokens: int, dim: int) -> int:
    """Re-binning the grid positional embeddings onto the bands, then onto the tokens (running-integral form).

    Rows: (R + 1) interpolated integrals per grid column and channel, then R * Gw divisions; tokens: (N + 1)
    interpolated integrals and N divisions per channel.
    """
    return batch * dim * ((2 * num_rows + 1) * grid_w + 2 * num_tokens + 1)


# ----------------------------------------------------------------------------------------------------------------
# FLOP formulas (torch's FlopCounterMode convention: 2 FLOPs per multiply-add)
# ----------------------------------------------------------------------------------------------------------------
def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _scan_fwd_formula(u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    batch, dim, length = u
    return 2 * scan_forward_macs(batch, dim, length, A[1], D is not None and _numel(D) > 0,
                                 z is not None and _numel(z) > 0)


def _scan_bwd_formula(dout, u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    batch, dim, length = u
    return 2 * scan_backward_macs(batch, dim, length, A[1], D is not None and _numel(D) > 0,
                                  z is not None and _numel(z) > 0)


def _resample_fwd_formula(images, band_bounds, token_edges, patch_size, *args, out_shape=None, **kwargs) -> int:
    batch, chans = images[0], images[1]
    return 2 * resample_macs(batch, token_edges[1] - 1, chans, patch_size)


def _resample_bwd_formula(grad, images, band_bounds, token_edges, patch_size, paper, deterministic, need_image,
                          need_geometry, *args, out_shape=None, **kwargs) -> int:
    """Image gradient: 4 scatter multiply-adds per output element; geometry gradient: the 4 taps' differences
    weighted by the incoming gradient (another 4)."""
    per = resample_macs(grad[0], grad[1], grad[2], patch_size)
    return 2 * per * (int(bool(need_image)) + int(bool(need_geometry)))


_CUSTOM_FORMULAS = {
    "selective_scan_cpu_fwd": _scan_fwd_formula,
    "selective_scan_cuda_fwd": _scan_fwd_formula,
    "selective_scan_cpu_bwd": _scan_bwd_formula,
    "selective_scan_cuda_bwd": _scan_bwd_formula,
    "resample_patches_triton": _resample_fwd_formula,
    "resample_patches_triton_out": _resample_fwd_formula,
    "resample_patches_triton_backward": _resample_bwd_formula,
}
_SCAN_OPS = ("selective_scan_cpu_fwd", "selective_scan_cuda_fwd", "selective_scan_cpu_bwd", "selective_scan_cuda_bwd")
_RESAMPLE_OPS = ("resample_patches_triton", "resample_patches_triton_out", "resample_patches_triton_backward")


def _custom_op(name: str):
    """``torch.ops.dartmamba.<name>`` when that op is registered (its module imported), else None."""
    try:
        return getattr(torch.ops.dartmamba, name)
    except (AttributeError, RuntimeError):
        return None


def register_flop_formulas() -> list[str]:
    """Register FLOP formulas for every dartmamba custom op that exists now; idempotent. Returns the op names that
    have a formula. (The Triton resampler's ops exist once ``dartmamba_kernels.resample`` is imported.)"""
    import dartmamba.ops  # noqa: F401  (registers the scan ops)
    done = []
    for name, formula in _CUSTOM_FORMULAS.items():
        op = _custom_op(name)
        if op is None:
            continue
        if op not in flop_registry:
            register_flop_formula(op)(formula)
        done.append(name)
    return done


def _taps_formula(*args, out_shape=None, **kwargs) -> int:
    """Bilinear sampling or resize: 4 multiply-adds (8 FLOPs) per output element."""
    return 2 * _TAPS * _numel(out_shape)


def _cpu_attention_formula(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """softmax(q k^T) v: two matmuls, (B, H, Lq, E) x (B, H, E, Lk) and (B, H, Lq, Lk) x (B, H, Lk, Ev)."""
    *lead, lq, e = query
    lk, ev = key[-2], value[-1]
    heads = math.prod(lead)
    return 2 * heads * lq * lk * (e + ev)


def _extra_aten_formulas() -> dict:
    """Formulas added for one count only (torch's global table stays untouched)."""
    aten = torch.ops.aten
    extra = {aten.grid_sampler_2d: _taps_formula, aten.upsample_bilinear2d: _taps_formula}
    cpu_attention = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None and cpu_attention not in flop_registry:
        extra[cpu_attention] = _cpu_attention_formula
    return extra


register_flop_formulas()


# ----------------------------------------------------------------------------------------------------------------
# Counting a model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FlopReport:
    """Multiply-adds per image, by part (see :data:`PARTS`); ``scan`` is the selective scan's share of ``backbone``."""

    model: str
    input_size: tuple[int, int, int]
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


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes: from its patch embedding (fixed grid or DART), else its pretrained cfg."""
    embed = getattr(model, "patch_embed", None)
    img = getattr(embed, "img_size", None)
    chans = getattr(embed, "in_chans", None)
    if chans is None and getattr(embed, "proj", None) is not None:
        chans = getattr(embed.proj, "in_channels", None)
    if img is not None:
        img = (img, img) if isinstance(img, int) else tuple(img)
        return (int(chans or 3), int(img[0]), int(img[1]))
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


def _find(model: nn.Module, kind) -> tuple[str, nn.Module] | tuple[None, None]:
    for name, module in model.named_modules():
        if isinstance(module, kind):
            return name, module
    return None, None


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _op_name(op) -> str:
    return str(op).replace("aten.", "").replace("dartmamba.", "")


def count_flops(model: nn.Module, input_size: tuple[int, int, int] | None = None, batch_size: int = 1,
                name: str | None = None) -> FlopReport:
    """Count the forward multiply-adds of ``model`` per image, by part, on fake tensors (nothing is computed).

    Args:
        model: any ``nn.Module`` taking (B, C, H, W) images; parameters on a real device (build on the meta device
            and call ``.to_empty(device="cpu")`` for a free model, as :func:`count_model_flops` does).
        input_size: (C, H, W); default :func:`model_input_size`.
        batch_size: images in the fake batch (results are per image).
        name: label of the report (default the model's class).

    Returns:
        A :class:`FlopReport`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tokenizer import DartTokenizer

    register_flop_formulas()
    input_size = tuple(input_size) if input_size is not None else model_input_size(model)
    root = type(model).__name__
    tok_name, tokenizer = _find(model, DartTokenizer)
    analytic = {"resample": 0, "posembed": 0}

    def on_tokenizer(module, args, kwargs, out):
        images = args[0]
        grid_pos_embed = args[1] if len(args) > 1 else kwargs.get("grid_pos_embed")
        batch, chans = images.shape[:2]
        analytic["resample"] += resample_macs(batch, module.num_tokens, chans, module.patch_size)
        if grid_pos_embed is not None:
            analytic["posembed"] += posembed_macs(batch, module.num_rows, module.grid_size[1], module.num_tokens,
                                                  grid_pos_embed.shape[-1])

    hook = tokenizer.register_forward_hook(on_tokenizer, with_kwargs=True) if tokenizer is not None else None
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with FakeTensorMode(allow_non_fake_inputs=True):
                images = torch.empty(batch_size, *input_size, device=device)
                # grad mode stays on: under no_grad, the module tracker trips on views of parameters (fake tensors
                # that require grad but have no grad_fn); the forward is counted either way
                with FlopCounterMode(display=False, custom_mapping=_extra_aten_formulas()) as counter:
                    model(images)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)

    counts = counter.get_flop_counts()

    def module_total(path: str | None, ops=None) -> int:
        if path is None:
            return 0
        key = root if path == "" else f"{root}.{path}"
        per_op = counts.get(key, {})
        return sum(v for op, v in per_op.items() if ops is None or _op_name(op) in ops)

    raw_total = sum(counts.get("Global", {}).values())
    by_op: dict[str, int] = {}
    for op, v in counts.get("Global", {}).items():
        by_op[_op_name(op)] = by_op.get(_op_name(op), 0) + v
    scan_raw = sum(v for op, v in by_op.items() if op in _SCAN_OPS)

    parts = dict.fromkeys(PARTS, 0)
    head_path = _module_name(model, model.get_classifier()) if hasattr(model, "get_classifier") else None
    parts["head"] = module_total(head_path)
    embed_path = tok_name if tokenizer is not None else _module_name(model, getattr(model, "patch_embed", None))
    if tokenizer is not None:
        trunk = module_total(f"{tok_name}.scorer.trunk")
        scorer = module_total(f"{tok_name}.scorer")
        counted_resample = module_total(tok_name, ops={*_RESAMPLE_OPS, "grid_sampler_2d"})
        tokenizer_raw = module_total(tok_name)
        parts["scorer_trunk"] = trunk // 2
        parts["scorer_head"] = (scorer - trunk) // 2
        parts["embed"] = (tokenizer_raw - scorer - counted_resample) // 2
        # the Triton op or grid_sample shows in the counter; the gather path does not: count it analytically
        parts["resample"] = counted_resample // 2 if counted_resample else analytic["resample"]
        parts["posembed"] = analytic["posembed"]
        embed_raw = tokenizer_raw
    else:
        embed_raw = module_total(embed_path)
        parts["embed"] = embed_raw // 2
    parts["backbone"] = (raw_total - embed_raw - parts["head"]) // 2
    parts["head"] //= 2
    per_image = {p: v // batch_size for p, v in parts.items()}
    return FlopReport(model=name or root, input_size=tuple(int(s) for s in input_size),
                      num_tokens=model_num_tokens(model), parts=per_image, scan=scan_raw // 2 // batch_size,
                      by_op={op: v // 2 // batch_size for op, v in by_op.items()})


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
