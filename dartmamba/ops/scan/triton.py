"""The ``"triton"`` backend: dartmamba's own Triton selective scan, forward and backward (no compiled extension).

mamba-ssm's signature (``u, delta, A, B, C, D, z, delta_bias, delta_softplus``, grouped B/C, ``return_last_state``)
with gradients flowing from the last state too. CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (the
tests; :func:`dartmamba.backends.allow_device`). float16 / bfloat16 / float32 inputs, any mix; the state, every
product and every sum are float32; results in each input's dtype (the last state in float32).

Design, for speed on the GPU:

- **Grid** ``(dim / BLOCK_D, batch)``: a program owns ``BLOCK_D`` channels of one batch row, inside one B/C group,
  and all N states; it never talks to another program (no host synchronisation, no inter-program barrier).
- **Chunked scan.** The program walks L in tiles of ``BLOCK_L`` steps. Inside a tile the recurrence
  ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t`` is a ``tl.associative_scan`` of affine maps over a
  ``[BLOCK_D, N, BLOCK_L]`` register tile (log2 depth, every lane busy, coalesced tile loads along L); the tile's
  composed map is applied to the state carried in from the previous tile, so tiles combine sequentially with one
  multiply-add per element. The state entering each tile is written as a float32 checkpoint
  ``(batch, dim, n_tiles, N)`` (mamba-ssm's kernel keeps the same kind, every 2048 steps).
- **Backward** walks the tiles right to left: the tile's states are recomputed from its checkpoint (one forward
  tile scan, nothing else is saved but the inputs), the adjoint ``lambda_t = C_t dy_t + exp(dt_{t+1} A)
  lambda_{t+1}`` is a reverse associative scan carried across tiles (starting from the last state's gradient),
  and ``dL/d(dt A) = lambda_t (h_t - dt_t u_t B_t)`` needs no shifted state. dB, dC (sums over a group's channels)
  are float32 atomic adds; dA, dD, d(delta_bias) are per-program partial sums reduced by one torch sum
  (deterministic).
- **Both directions in one launch.** The kernel does not declare ``reverse``, so Vim's mixer with
  ``bimamba_impl="auto"`` takes its fused formulation on this backend: one launch over 2 * d_inner channels with
  B and C grouped per direction (groups = 2). Strided inputs (the mixer's B, C and dt are views of x_proj's
  output) are read in place: the kernels take every stride (capability ``"any_strides"``).
- **torch.compile / CUDA graphs**: the kernels are the custom ops ``dartmamba::selective_scan_triton_fwd`` /
  ``_bwd`` with fake implementations, registered autograd and FLOP formulas; nothing reads a tensor value.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import backends
from .._common import TritonKernels, register_flops
from .checks import check_args, grads_like, grouped, scan_bwd_flops, scan_fwd_flops, with_state

CAPABILITIES = frozenset({"any_strides"})
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_DSTATE = 256
# Steps per tile: the GPU value keeps a [BLOCK_D, N, BLOCK_L] tile near 2048 float32 values (16 per thread at 4
# warps); the interpreter's is small so that tests at L ~ 20-40 cross tile boundaries.
BLOCK_L_GPU, BLOCK_L_INTERPRETED = 32, 16


_TRITON = TritonKernels("dartmamba.ops.scan._triton_kernels", "scan_fwd_kernel")
interpreted = _TRITON.interpreted
triton_unavailable = backends.cached_check(_TRITON.unavailable)


def _kernels():
    return _TRITON.kernels


def unsupported(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
                **modes) -> Optional[str]:
    """Why the kernels cannot take these inputs (None when they can); metadata only."""
    bad = [t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, modes.get("delta_proj"))
           if t is not None and t.dtype not in _DTYPES]
    if bad:
        return f"its kernels compute float16/bfloat16/float32 inputs, got {bad[0]}"
    if A.shape[1] > _MAX_DSTATE:
        return f"its kernels keep N <= {_MAX_DSTATE} states in registers, got A of shape {tuple(A.shape)}"
    return None


def _blocks(dim: int, groups: int, dstate: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_L, num_warps). BLOCK_D is a power of two dividing dim / groups (a program stays
    inside one group). On the GPU a forward tile holds ~2048 values and a backward tile, with about twice the live
    tensors, ~1024, so that neither spills registers at 4 warps."""
    import triton

    block_n = triton.next_power_of_2(dstate)
    block_l = BLOCK_L_INTERPRETED if interpreted() else BLOCK_L_GPU
    per_group = dim // groups
    cap = max(1, (1024 if backward else 2048) // (block_n * block_l)) if not interpreted() else 64
    block_d = 1
    while block_d * 2 <= cap and per_group % (block_d * 2) == 0:
        block_d *= 2
    return block_d, block_n, block_l, 4


def _n_chunks(length, block_l: int):
    """Tiles of ``block_l`` steps covering ``length`` (a SymInt under dynamic shapes)."""
    return (length + block_l - 1) // block_l


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter rounds float32 -> bfloat16 by truncation (compiled Triton and torch round to nearest even)
    return torch.float32 if dtype == torch.bfloat16 and interpreted() else dtype


def _device_guard(t: Tensor):
    from dartmamba_kernels._launch import device_guard
    return device_guard(t)


def _strides(t: Optional[Tensor], n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _params(A, D, delta_bias):
    """A, D, delta_bias as contiguous float32 (tiny)."""
    return (A.float().contiguous(), None if D is None else D.float().contiguous(),
            None if delta_bias is None else delta_bias.float().contiguous())


@torch.library.custom_op("dartmamba::selective_scan_triton_fwd", mutates_args=())
def _fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            delta_bias: Optional[Tensor], delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """B, C: (batch, G, N, L). Returns out (batch, dim, L) in u.dtype, the last state (batch, dim, N) float32 and
    the checkpoints (batch, dim, n_tiles, N) float32 (the state entering each tile)."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    block_d, block_n, block_l, warps = _blocks(dim, groups, dstate)
    n_chunks = _n_chunks(length, block_l)
    Af, Df, bf = _params(A, D, delta_bias)
    out = u.new_empty((batch, dim, length), dtype=_store_dtype(u.dtype))
    last = u.new_empty((batch, dim, dstate), dtype=torch.float32)
    ckpt = u.new_empty((batch, dim, n_chunks, dstate), dtype=torch.float32)
    if u.numel():
        with _device_guard(u):
            _kernels().scan_fwd_kernel[(_n_chunks(dim, block_d), batch)](
                u, delta, Af, B, C, Df, z, bf, out, ckpt, last, length, dim, dstate, dim // groups, n_chunks,
                *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z, 3),
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=warps)
    else:
        last.zero_()
    return out.to(u.dtype), last, ckpt


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    block_l = BLOCK_L_INTERPRETED if interpreted() else BLOCK_L_GPU
    return (u.new_empty((batch, dim, length)), u.new_empty((batch, dim, A.shape[1]), dtype=torch.float32),
            u.new_empty((batch, dim, _n_chunks(length, block_l), A.shape[1]), dtype=torch.float32))


@torch.library.custom_op("dartmamba::selective_scan_triton_bwd", mutates_args=())
def _bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], delta_bias: Optional[Tensor], ckpt: Tensor, dlast: Optional[Tensor],
            delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in each input's dtype and shape (B, C grouped as
    given: (batch, G, N, L)); 0-element for absent inputs."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    block_d, block_n, block_l, warps = _blocks(dim, groups, dstate, backward=True)
    Af, Df, bf = _params(A, D, delta_bias)
    dout = dout.contiguous()
    f32 = dict(dtype=torch.float32)
    du = u.new_empty((batch, dim, length), dtype=_store_dtype(u.dtype))
    ddelta = u.new_empty((batch, dim, length), dtype=_store_dtype(delta.dtype))
    dz = u.new_empty((batch, dim, length), dtype=_store_dtype(z.dtype)) if z is not None else u.new_empty(0)
    dB = u.new_zeros((batch, groups, dstate, length), **f32)
    dC = u.new_zeros((batch, groups, dstate, length), **f32)
    dA = u.new_zeros((batch, dim, dstate), **f32)
    dD = u.new_zeros((batch, dim), **f32)
    dbias = u.new_zeros((batch, dim), **f32)
    dlast = None if dlast is None else dlast.float().contiguous()
    if u.numel():
        with _device_guard(u):
            _kernels().scan_bwd_kernel[(_n_chunks(dim, block_d), batch)](
                u, delta, Af, B, C, Df, z, bf, ckpt, dout, dlast, du, ddelta, dA, dB, dC, dD, dz, dbias,
                length, dim, dstate, dim // groups, groups, ckpt.shape[2],
                *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z, 3),
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus, HAS_DLAST=dlast is not None, BLOCK_D=block_d, BLOCK_N=block_n,
                BLOCK_L=block_l, num_warps=warps)
    else:
        du.zero_(), ddelta.zero_(), dz.zero_()
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else u.new_empty(0), dz.to(z.dtype) if z is not None else dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0))


@_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, ckpt, dlast, delta_softplus):
    return grads_like(u, delta, A, B, C, D, z, delta_bias)


register_flops(torch.ops.dartmamba.selective_scan_triton_fwd, scan_fwd_flops, part="scan")
register_flops(torch.ops.dartmamba.selective_scan_triton_bwd, scan_bwd_flops, part="scan")


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    ctx.delta_softplus = delta_softplus
    ctx.set_materialize_grads(False)      # an unused last state costs no zero tensor


def _backward(ctx, grad_out, grad_last, grad_ckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    grads = _bwd_op(grad_out, u, delta, A, B, C, D, z, delta_bias, ckpt, grad_last, ctx.delta_softplus)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    has_D, has_z, has_bias = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                return_last_state: bool = False):
    """The registered backend (arguments checked by the dispatcher): one call of the forward op."""
    out, last, _ = _fwd_op(u, delta, A, grouped(B), grouped(C), D, z, delta_bias, bool(delta_softplus))
    return with_state(out, last, return_last_state)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                          z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = False, return_last_state: bool = False):
    """The Triton selective scan, called directly (checks its arguments and that it can run them).

    Shapes as :func:`~dartmamba.ops.selective_scan` (grouped B, C included; any strides). Result in ``u.dtype``;
    with ``return_last_state``, (out, last_state (batch, dim, N) float32), gradients flowing from both. Raises
    :class:`~dartmamba.backends.BackendUnavailableError` when triton cannot run here or the inputs do not fit.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    reason = triton_unavailable() or unsupported(u, delta, A, B, C, D, z, delta_bias)
    if reason is not None:
        raise backends.BackendUnavailableError(f"scan backend 'triton' is not available: {reason}")
    return scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


backends.register(
    "scan", "triton", scan_triton, devices=("cuda",), available=triton_unavailable, supports=unsupported,
    capabilities=CAPABILITIES,
    fallback_warning="dartmamba's Triton selective scan is unavailable, so CUDA tensors use the portable chunked "
                     "torch scan (much slower); install triton")
