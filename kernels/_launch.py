"""Host-side pieces both kernel files share: where the kernels may run, the launch device, autograd's clamp
conventions (the backward kernels mirror them) and FLOP-formula registration. Imports torch only."""
import concurrent.futures
import contextlib
import functools

import torch
from torch import Tensor


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was defined under ``TRITON_INTERPRET=1`` (then it runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def device_guard(t: Tensor):
    """Launch on ``t``'s CUDA device (a no-op context for CPU tensors under the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_device(t: Tensor, what: str, module: str, interpreted: bool) -> None:
    """Raise unless ``t`` is a CUDA tensor, or a CPU tensor while the kernels of ``module`` are interpreted."""
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreted):
        raise RuntimeError(f"{what} runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                           f"{module} is imported); got a {t.device.type} tensor")


@functools.cache
def clamp_passes(value: float, lo: float, hi: float | None = None) -> bool:
    """Whether autograd of ``x.clamp(lo, hi)`` (``x.clamp_min(lo)`` when ``hi`` is None) passes the gradient at
    ``x == value``: the convention changed between torch releases, and the kernels follow the installed torch.

    Asked at first use (a kernel launch or a backward), never at import, and cached. The probe runs in a thread of
    its own: grad mode, inference mode and dispatch modes (a fake-tensor trace of the backward under
    ``torch.compile``) are thread-local, so the caller's state cannot change the answer or break the probe.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_clamp_probe, value, lo, hi).result()


def _clamp_probe(value: float, lo: float, hi: float | None) -> bool:
    x = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = x.clamp_min(lo) if hi is None else x.clamp(lo, hi)
        (grad,) = torch.autograd.grad(y, x)
    return bool(grad.item() != 0.0)


def register_flops(op, formula, part: str | None = None) -> None:
    """Register a custom op's FLOP formula with torch's FlopCounterMode (2 FLOPs per multiply-add, input shapes
    in), tagged with the part of a dartmamba FLOP report its work belongs to (see ``dartmamba.flops``)."""
    from torch.utils.flop_counter import register_flop_formula

    formula.flop_part = part
    register_flop_formula(op)(formula)
