"""ONNX export of every dartmamba family (Vim, Vim-DART, DeiT-DART, VideoMamba, VideoMamba-DART), checked against
PyTorch with onnxruntime right after export.

``python -m dartmamba.export --model vim_small_dart --checkpoint last.safetensors --out model.onnx`` exports with
``torch.onnx.export(..., dynamo=True)``, a dynamic batch axis and a named opset, then runs the file with
onnxruntime's CPU provider on random inputs of another batch size and prints the largest differences from the eager
model (logits, and DART's token edges with ``--token-edges``). From Python: :func:`export_onnx` (returns an
:class:`ExportReport`) and :func:`check_parity`.

How each of our ops reaches ONNX (what ``torch.onnx.export`` alone fails on):

- **Every op with several backends** (the registry's ``scan``, ``conv1d``, ``rmsnorm``, ``partition``,
  ``resample``, ``posembed``): the export runs under :func:`export_backends`, which forces each op's ``"torch"``
  backend. The C++ CPU kernels (``torch.ops.dartmamba_cpu_<isa>_<hash>.*``, a namespace that differs per machine),
  mamba-ssm's CUDA kernels and the Triton kernels of ``dartmamba_kernels`` (resample, geometry) are thereby
  decomposed at export time into standard ops: the causal conv into ``Conv`` (groups = channels) + slice + SiLU,
  RMSNorm into ``ReduceMean``/``Sqrt`` arithmetic, the partition, resampling and positional-embedding re-binning
  into ``CumSum``/``GatherElements``/arithmetic (the geometry stays in float64, as in eager). The graph is the same
  on every machine, whichever kernels this one has.
- **The scan** (``torch.ops.dartmamba.selective_scan_torch_fwd``, the torch backend's custom op) gets an ONNX
  translation (:func:`onnx_translations`): the step sizes, the decays ``exp(dt A)`` and the inputs ``dt B u`` of all
  L steps are computed as whole tensors (L, B, D, N), one ONNX ``Scan`` runs the recurrence
  ``h_t = decay_t * h_{t-1} + drive_t`` (two nodes per step in its body), and ``y_t = C_t . h_t``, the skip ``D u``
  and the gate ``silu(z)`` are again whole-tensor ops. Why a ``Scan`` and not an unrolled recurrence: the graph
  stays the same size whatever L (an unrolled one grows by ~7 nodes per step and scan: Vim-Ti's 48 scans of 197
  steps would add ~66,000 nodes; at depth 2 it had 5,796 nodes against 300), exports ~12x faster, and onnxruntime
  ran it faster; the measurements (file size, node count, export time, onnxruntime speed, both ways) are in
  docs/deployment.md.
  ``scan="unrolled"`` keeps the unrolled form for such comparisons.
- ``aten.searchsorted`` (the partition's inverse CDF; torch's ONNX library has no translation): a broadcast
  comparison of every level with every CDF entry and a ``ReduceSum`` (B x N x R Gw elements, a few thousand).

The file is written without torch's optimisation pass (``optimize=True`` deletes ``x + c`` for ``|c| <= 1e-8`` as if it
were ``x + 0``, see :func:`optimize_model`); constants are folded and unused nodes dropped instead, and onnxruntime
optimises the graph when it loads it. Weights are stored inside the one ``.onnx`` file.

DART's token edges (B, N + 1) in score-grid units are a second output (``token_edges=True``) read from the
tokenizer's output inside the same forward, so the scorer runs once and both outputs come from one partition.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import time
import typing
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import backends

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportReport", "ParityReport", "export_backends", "onnx_translations",
           "INPUT_KINDS", "input_shape", "example_input", "WithTokenEdges", "export_onnx", "optimize_model", "count_nodes",
           "session", "check_parity", "build_model", "main"]

DEFAULT_OPSET = 18              # torch's ONNX library is written for opset 18; onnxruntime >= 1.14 runs it
SCAN_FORMS = ("scan", "unrolled")
_NO_TRANSLATION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)")


class ExportError(RuntimeError):
    """A model or op that cannot be exported, or an export whose parity check failed (one line, naming it)."""


@dataclasses.dataclass
class ParityReport:
    """onnxruntime (CPU provider) against the eager model on the same random inputs.

    ``max_rel`` is the largest absolute difference over the largest absolute eager value (of the logits);
    ``edges_max_abs`` the largest difference of DART's token edges (score-grid units), when exported, and
    ``edges_max_rel`` that over the flow's length (the last edge, R * Gw cells). Both relative differences must be
    within ``tolerance``.
    """

    batch_size: int
    max_abs: float
    max_rel: float
    tolerance: float
    edges_max_abs: float | None = None
    edges_max_rel: float | None = None
    inputs: str = "smooth"

    @property
    def passed(self) -> bool:
        edges_ok = self.edges_max_rel is None or self.edges_max_rel <= self.tolerance
        return self.max_rel <= self.tolerance and edges_ok

    def summary(self) -> str:
        edges = ("" if self.edges_max_abs is None else
                 f"; token edges max abs {self.edges_max_abs:.2e}, max rel {self.edges_max_rel:.2e}")
        return (f"parity (onnxruntime CPUExecutionProvider vs PyTorch eager, batch {self.batch_size}, {self.inputs} "
                f"inputs): logits max abs "
                f"{self.max_abs:.2e}, max rel {self.max_rel:.2e}{edges} (tolerance {self.tolerance:g}): "
                f"{'ok' if self.passed else 'FAILED'}")


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: the file, its opset, size and node count, the example input it was traced
    with, and (after :func:`check_parity`) the parity."""

    path: str
    model: str
    opset: int
    file_bytes: int
    num_nodes: int
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    outputs: tuple[str, ...]
    seconds: float
    scan: str = "scan"
    parity: ParityReport | None = None

    def summary(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else f"fixed batch {self.input_shape[0]}"
        lines = [f"exported {self.model} to {self.path}: opset {self.opset}, {self.file_bytes / 2**20:.2f} MiB, "
                 f"{self.num_nodes} nodes, outputs {', '.join(self.outputs)}, {batch} (traced with input "
                 f"{tuple(self.input_shape)}), {self.seconds:.1f} s"]
        if self.parity is not None:
            lines.append(self.parity.summary())
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Backends and translations
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def export_backends() -> Iterator[None]:
    """Force every registered op's ``"torch"`` backend inside the block (export-time decomposition of the C++, CUDA
    and Triton kernels into standard ops; see the module docstring)."""
    with contextlib.ExitStack() as stack:
        for op in backends.ops():
            if "torch" in backends.backend_names(op):
                stack.enter_context(backends.use_backend(op, "torch"))
        yield


def onnx_translations(scan: str = "scan") -> dict:
    """The ``custom_translation_table`` of :func:`torch.onnx.export`: the torch scan's custom op and
    ``aten.searchsorted.Tensor``. ``scan``: ``"scan"`` (an ONNX ``Scan`` over the time steps) or ``"unrolled"`` (one
    pair of nodes per step)."""
    if scan not in SCAN_FORMS:
        raise ValueError(f"scan must be one of {SCAN_FORMS}, got {scan!r}")
    import dartmamba.ops.scan  # noqa: F401  (registers dartmamba::selective_scan_torch_fwd)
    from onnxscript import graph, script
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

    @script()
    def ssm_states(h0, decay, drive):
        """h0 (B, D, N); decay, drive (L, B, D, N) -> states (L, B, D, N), last state (B, D, N)."""
        @graph()
        def step(h, a, b):
            h_next = a * h + b
            h_out = op.Identity(h_next)
            return h_next, h_out

        h_last, states = op.Scan(h0, decay, drive, body=step, num_scan_inputs=2)
        return states, h_last

    # torch reads the outputs of a function call from its return annotation; onnxscript's parser only takes the
    # names of our module, so the annotation is added to our own function once it is parsed
    ssm_states.function.__annotations__["return"] = typing.Tuple[TFloat, TFloat]

    def selective_scan_torch_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                                 chunk: int = 64):
        """u, delta, z (b, d, L); A (d, N); B, C (b, N, L); D, delta_bias (d,) -> out (b, d, L), chunk states
        (never read at inference: a placeholder), last state (b, d, N)."""
        dt = delta if delta_bias is None else op.Add(delta, op.Unsqueeze(delta_bias, [1]))
        if delta_softplus:       # F.softplus: x itself above the threshold 20
            dt = op.Where(op.Greater(dt, op.CastLike(20.0, dt)), dt, op.Softplus(dt))
        dt_t = op.Transpose(dt, perm=[2, 0, 1])                                           # (L, b, d)
        u_t = op.Transpose(u, perm=[2, 0, 1])
        decay = op.Exp(op.Mul(op.Unsqueeze(dt_t, [3]), A))                                # (L, b, d, N)
        drive = op.Mul(op.Unsqueeze(op.Mul(dt_t, u_t), [3]),
                       op.Unsqueeze(op.Transpose(B, perm=[2, 0, 1]), [2]))                # (L, b, d, N)
        h0 = op.Mul(op.Squeeze(op.Slice(decay, [0], [1], [0]), [0]), op.CastLike(0.0, decay))
        if scan == "scan":
            states, h_last = ssm_states(h0, decay, drive)
        else:
            length = u.shape[2]
            if not isinstance(length, int):
                raise ExportError("scan='unrolled' needs a static sequence length")
            h, steps = h0, []
            for t in range(length):
                h = op.Add(op.Mul(op.Squeeze(op.Slice(decay, [t], [t + 1], [0]), [0]), h),
                           op.Squeeze(op.Slice(drive, [t], [t + 1], [0]), [0]))
                steps.append(op.Unsqueeze(h, [0]))
            states, h_last = op.Concat(*steps, axis=0), h
        y = op.ReduceSum(op.Mul(states, op.Unsqueeze(op.Transpose(C, perm=[2, 0, 1]), [2])), [3], keepdims=0)
        y = op.Transpose(y, perm=[1, 2, 0])                                               # (b, d, L)
        if D is not None:
            y = op.Add(y, op.Mul(u, op.Unsqueeze(D, [1])))
        if z is not None:
            y = op.Mul(y, op.Mul(z, op.Sigmoid(z)))
        return y, op.Unsqueeze(h_last, [0]), h_last

    def searchsorted(sorted_sequence, self, out_int32: bool = False, right: bool = False, side: str = "",
                     sorter=None):
        """sorted_sequence (..., M), values (..., K) with the same leading dims (or a 1-D sequence) -> (..., K):
        the number of entries < value (<= with right / side='right')."""
        if sorter is not None:
            raise ExportError("aten.searchsorted with a sorter has no ONNX translation")
        right = right or side == "right"
        entries, values = op.Unsqueeze(sorted_sequence, [-2]), op.Unsqueeze(self, [-1])
        below = op.LessOrEqual(entries, values) if right else op.Less(entries, values)
        return op.ReduceSum(op.Cast(below, to=6 if out_int32 else 7), [-1], keepdims=0)   # INT32 / INT64

    return {torch.ops.dartmamba.selective_scan_torch_fwd.default: selective_scan_torch_fwd,
            torch.ops.aten.searchsorted.Tensor: searchsorted}


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------------------------
def input_shape(model: nn.Module, batch_size: int) -> tuple[int, ...]:
    """(B, C, H, W), or (B, C, T, H, W) for a video model, from the model's tokenizer (``patch_embed``)."""
    tokenizer = getattr(model, "patch_embed", None)
    img_size = getattr(tokenizer, "img_size", None)
    proj = getattr(tokenizer, "proj", None)
    if img_size is None or not isinstance(proj, (nn.Conv2d, nn.Conv3d)):
        raise ExportError(f"{type(model).__name__}: cannot tell its input size (no patch_embed with img_size and "
                          f"proj); pass example=")
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    frames = getattr(model, "num_frames", None)
    chans = proj.in_channels
    return (batch_size, chans, frames, height, width) if frames else (batch_size, chans, height, width)


INPUT_KINDS = ("smooth", "noise")


def example_input(model: nn.Module, batch_size: int = 2, seed: int = 0, kind: str = "smooth") -> Tensor:
    """Random images (or clips) of ``batch_size`` in the model's input shape and parameter dtype.

    ``kind``: ``"smooth"`` (normal noise at 1/16 of the resolution, upsampled bicubically: image-like, what a
    deployed model sees) or ``"noise"`` (independent normal pixels: the worst case for DART, whose resampling reads
    between pixels, so a geometry that moves by float32 rounding changes the patches by as much as neighbouring pixels
    differ).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    dtype = next(model.parameters()).dtype
    shape = input_shape(model, batch_size)
    generator = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.randn(shape, generator=generator).to(dtype)
    height, width = shape[-2:]
    low = torch.randn((*shape[:-2], max(2, height // 16), max(2, width // 16)), generator=generator)
    frames = low.reshape(-1, 1, *low.shape[-2:])                 # every (sample, channel, frame) as one map
    images = torch.nn.functional.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False)
    return images.reshape(shape).to(dtype)


class WithTokenEdges(nn.Module):
    """``model`` with DART's token edges as a second output: images -> (logits, token_edges (B, N + 1)).

    The edges are those of the tokenizer's own partition in the same forward (read from its output by a forward
    hook), so nothing runs twice. A model whose tokenizer returns no DART geometry is refused, naming it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        tokenizer = getattr(model, "patch_embed", None)
        if tokenizer is None or not hasattr(tokenizer, "num_rows"):
            raise ExportError(f"token_edges: {type(model).__name__} has no DART tokenizer (patch_embed is "
                              f"{type(tokenizer).__name__}); export the logits alone")
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        edges: list[Tensor] = []
        handle = self.model.patch_embed.register_forward_hook(
            lambda module, args, output: edges.append(output.geometry.token_edges))
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return logits, edges[-1]


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _one_line(exc: BaseException) -> str:
    """The first op without a translation in ``exc``'s chain, or the innermost error's first line."""
    chain, seen = [], exc
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for error in chain:
        found = _NO_TRANSLATION.search(str(error))
        if found:
            return (f"op {found.group(1)}.{found.group(2)} has no ONNX translation (give one in "
                    f"custom_translation_table, or register a 'torch' backend for it)")
    inner = chain[-1]
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"[:400]


# ----------------------------------------------------------------------------------------------------------------
# Export and parity
# ----------------------------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: str | os.PathLike, *, example: Tensor | None = None, batch_size: int = 2,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, token_edges: bool = False,
                scan: str = "scan", name: str | None = None) -> ExportReport:
    """Export ``model`` (eval mode, no gradient, on CPU) to ONNX at ``path``.

    Args:
        model: a dartmamba (or timm) model; it is put in eval mode and its parameters must be on the CPU.
        example: the input traced with (default: :func:`example_input` of ``batch_size``).
        opset: the default-domain opset of the file (>= 18).
        dynamic_batch: the batch axis of the input and outputs is symbolic (``batch``).
        token_edges: export DART's token edges as a second output (:class:`WithTokenEdges`).
        scan: ``"scan"`` (ONNX ``Scan``, the default) or ``"unrolled"`` (see the module docstring).
        name: how errors and the report name the model (default: its timm architecture).

    Returns:
        An :class:`ExportReport` (its ``parity`` is None: see :func:`check_parity`). Raises :class:`ExportError`
        (one line naming the model and the op or the cause) when the model cannot be exported.
    """
    name = name or _model_name(model)
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 18:
        raise ValueError(f"opset must be an int >= 18 (torch's ONNX library targets opset 18), got {opset!r}")
    if scan not in SCAN_FORMS:
        raise ValueError(f"scan must be one of {SCAN_FORMS}, got {scan!r}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"model: export runs on CPU parameters, got {sorted(devices)} (call model.cpu() first)")
    if example is None:
        example = example_input(model, batch_size)
    elif not isinstance(example, Tensor) or example.dim() < 1:
        raise ValueError(f"example must be a tensor with a batch axis (images (B, C, H, W), clips (B, C, T, H, W)), "
                         f"got {type(example).__name__ if not isinstance(example, Tensor) else tuple(example.shape)}")
    model = model.eval()
    module = WithTokenEdges(model).eval() if token_edges else model
    outputs = ("logits", "token_edges") if token_edges else ("logits",)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    path = os.fspath(path)
    start = time.perf_counter()
    try:
        with export_backends(), torch.no_grad():
            program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=["images"], output_names=list(outputs),
                                        dynamic_shapes=dynamic_shapes, optimize=False,
                                        custom_translation_table=onnx_translations(scan), verbose=False)
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        optimize_model(program.model)
        program.save(path, external_data=False)
    except ExportError as exc:
        raise ExportError(f"cannot export {name}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001  (torch.onnx's errors are long; the user gets one line naming the cause)
        raise ExportError(f"cannot export {name}: {_one_line(exc)}") from exc
    seconds = time.perf_counter() - start
    import onnx

    proto = onnx.load(path, load_external_data=False)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    return ExportReport(path=path, model=name, opset=written, file_bytes=os.path.getsize(path),
                        num_nodes=count_nodes(proto.graph) + sum(count_nodes(f) for f in proto.functions),
                        input_shape=tuple(example.shape), dynamic_batch=dynamic_batch, outputs=outputs,
                        seconds=seconds, scan=scan)


def optimize_model(model) -> None:
    """Fold constants and drop unused nodes, functions and opsets of an ``onnx_ir`` model, in place.

    Instead of ``torch.onnx.export(optimize=True)``: its rewrite rules (onnxscript 0.7.2) take ``x + c`` for
    ``x + 0`` whenever ``|c| <= 1e-8`` and delete it, which drops the ``+ 1e-8`` of the DART scorer's score
    standardisation (``(raw - mean) / (std + 1e-8)``); with a randomly initialised scorer (raw scores ~1e-4, std
    ~3e-5) the scores then differ by ~3e-4 relative and the token edges by ~2e-3 cells. onnxruntime applies its own
    graph optimisations when it loads the file.
    """
    import onnx_ir.passes.common as common_passes
    from onnxscript import optimizer

    optimizer.fold_constants(model)
    for step in (common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
                 common_passes.RemoveUnusedOpsetsPass(), common_passes.CommonSubexpressionEliminationPass()):
        step(model)


def count_nodes(graph) -> int:
    """Nodes of an ONNX graph or function, those of subgraphs (a ``Scan``'s body) included."""
    total = 0
    for node in graph.node:
        total += 1
        for attribute in node.attribute:
            if attribute.g is not None and attribute.HasField("g"):
                total += count_nodes(attribute.g)
            for sub in attribute.graphs:
                total += count_nodes(sub)
    return total


def session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime session on the CPU provider (``threads``: intra-op threads, None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def check_parity(path: str | os.PathLike, model: nn.Module, *, batch_size: int = 3, token_edges: bool = False,
                 tolerance: float = 1e-4, seed: int = 1, kind: str = "smooth",
                 example: Tensor | None = None) -> ParityReport:
    """Run the ONNX file with onnxruntime (CPU provider) and ``model`` eagerly (its default backends) on the same
    random inputs of ``batch_size`` (choose one other than the batch exported with) and compare.

    ``kind``: the random inputs (:func:`example_input`). ``token_edges``: the file has DART's token edges as a second
    output (compared too). Returns a
    :class:`ParityReport`; it does not raise when the difference exceeds ``tolerance`` (``report.passed``).
    """
    images = example if example is not None else example_input(model, batch_size, seed=seed, kind=kind)
    model = model.eval()
    with torch.no_grad():
        if token_edges:
            wrapped = WithTokenEdges(model)
            logits, edges = wrapped(images)
        else:
            logits, edges = model(images), None
    runner = session(path)
    results = runner.run(None, {runner.get_inputs()[0].name: images.numpy()})
    got = torch.from_numpy(results[0]).to(logits.dtype)
    max_abs = (got - logits).abs().max().item()
    max_rel = max_abs / max(logits.abs().max().item(), torch.finfo(logits.dtype).tiny)
    edges_diff = edges_rel = None
    if edges is not None:
        edges_diff = (torch.from_numpy(results[1]).to(edges.dtype) - edges).abs().max().item()
        edges_rel = edges_diff / max(edges.abs().max().item(), torch.finfo(edges.dtype).tiny)
    return ParityReport(batch_size=images.shape[0], max_abs=max_abs, max_rel=max_rel, tolerance=tolerance,
                        edges_max_abs=edges_diff, edges_max_rel=edges_rel,
                        inputs="given" if example is not None else kind)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dartmamba.export", description=(
        "Export a dartmamba model to ONNX (dynamic batch) and check it against PyTorch with onnxruntime."))
    parser.add_argument("--model", help="timm model name (e.g. vim_small_dart); optional with a checkpoint written "
                                        "by dartmamba.save_model or training")
    parser.add_argument("--checkpoint", help="weights (.safetensors / .pth); default: the model's own init")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the example traced with (default 2)")
    parser.add_argument("--check-batch-size", type=int, default=None,
                        help="batch of the parity check (default: --batch-size + 1)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (a model argument)")
    parser.add_argument("--num-tokens", type=int, default=None, help="DART token count (a model argument)")
    parser.add_argument("--num-classes", type=int, default=None, help="head outputs (a model argument)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--token-edges", action="store_true", help="also output DART's token edges (B, N + 1)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch-size")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative logit difference allowed")
    parser.add_argument("--inputs", choices=INPUT_KINDS, default="smooth",
                        help="random inputs of the parity check: smooth (image-like, default) or noise")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--scan", choices=SCAN_FORMS, default="scan", help=argparse.SUPPRESS)
    return parser


def build_model(model_name: str | None, checkpoint: str | None, overrides: dict) -> tuple[nn.Module, str]:
    """The model the CLI exports: from our checkpoint's own config (``dartmamba.load_model``) when it has one, else
    ``timm.create_model(model_name, checkpoint_path=checkpoint, **overrides)``."""
    import timm

    import dartmamba.models  # noqa: F401  (registers the models)
    from .models.checkpoints import load_model, read_model_config

    if checkpoint is not None and not os.path.exists(checkpoint):
        raise ExportError(f"--checkpoint: no such file {checkpoint!r}")
    config = None
    if checkpoint is not None and checkpoint.endswith(".safetensors"):
        with contextlib.suppress(ValueError):
            config = read_model_config(checkpoint)
    if config is not None:
        if model_name is not None and model_name != config["model"]:
            raise ExportError(f"--model: {model_name!r} differs from the checkpoint's model {config['model']!r}")
        return load_model(checkpoint, **overrides), config["model"]
    if model_name is None:
        raise ExportError("--model: required unless --checkpoint was written by dartmamba.save_model")
    if not timm.is_model(model_name):
        raise ExportError(f"--model: unknown model {model_name!r} (see timm.list_models('*dart*'))")
    kwargs = dict(overrides)
    if checkpoint is not None:
        kwargs["checkpoint_path"] = checkpoint
    return timm.create_model(model_name, **kwargs), model_name


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        for flag in ("batch_size", "check_batch_size", "img_size", "num_tokens", "num_classes"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ExportError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
        overrides = {k: v for k, v in (("img_size", args.img_size), ("num_tokens", args.num_tokens),
                                       ("num_classes", args.num_classes)) if v is not None}
        try:
            model, name = build_model(args.model, args.checkpoint, overrides)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001  (a bad model argument: one line naming it)
            raise ExportError(f"cannot build {args.model or args.checkpoint}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        report = export_onnx(model, args.out, batch_size=args.batch_size, opset=args.opset,
                             dynamic_batch=not args.static_batch, token_edges=args.token_edges, scan=args.scan,
                             name=name)
        if not args.no_check:
            check_batch = args.check_batch_size or (args.batch_size if args.static_batch else args.batch_size + 1)
            report.parity = check_parity(args.out, model, batch_size=check_batch, token_edges=args.token_edges,
                                         tolerance=args.tolerance, kind=args.inputs)
    except (ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if report.parity is not None and not report.parity.passed:
        print(f"error: {name}: onnxruntime differs from PyTorch beyond the tolerance {args.tolerance:g}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
