"""Bidirectional Mamba mixer ("bimamba v2", as in Vision Mamba) and the Vim residual block.

Built only from :mod:`dartmamba.ops`, which choose the backend (mamba-ssm's CUDA kernels, the C++ CPU kernels, the
torch scan) in one place: the mixer calls each op one way on every device, with the layout modes it wants
(``reverse=True`` for the backward branch, the low-rank ``delta_proj`` for ``dt_proj``, strided views), and a backend
without a mode gets the ops' generic adapter. Parameter names and shapes follow hustvl/Vim so its checkpoints load
unchanged.

Two implementations of the same mixer (``bimamba_impl``): ``"fused"`` runs both directions as one problem of
2 * d_inner channels (one causal conv, one batched GEMM for each of x_proj and dt_proj, one selective scan with B
and C grouped per direction); ``"two_pass"`` runs them one after the other, as Vim's code does, the backward branch
right to left (``reverse=True``), the two scans and their gated mean as one op (``bimamba_scan``: on CPU without
autograd, one pass of the C++ scan over both directions). ``"auto"`` (the default) decides by a capability of the
scan backend the inputs' device gets: two-pass where it runs right to left natively (no flipped copies; the C++
kernel), fused where ``reverse`` would be adapted with flipped copies anyway (mamba-ssm's kernel; one launch per
stage instead of two).
docs/benchmarks.md has the timings behind the rule.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, register_notrace_function, register_notrace_module
from torch import Tensor

from .. import backends
from ..ops import RMSNorm, ScanBranch, bimamba_scan, causal_conv1d, rms_norm, selective_scan
from .linear import OutputPaddedLinear

BIMAMBA_IMPLS = ("auto", "fused", "two_pass")
DEFAULT_BIMAMBA_IMPL = "auto"


def resolve_bimamba_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` means for inputs on ``device``: "auto" is "two_pass" where the scan backend the
    device gets runs right to left itself (capability ``"reverse"``), else "fused"."""
    if impl != "auto":
        return impl
    return "two_pass" if "reverse" in backends.capabilities("scan", device) else "fused"


def _grouped_mm(a: Tensor, b: Tensor) -> Tensor:
    """(G, M, K) @ (G, K, N) -> (G, M, N): one batched GEMM when both operands are dense, else one GEMM per group
    (mm reads strided rows in place, where bmm may copy the operands first; the fused mixer's x_proj input is such a
    view when the conv's output is channel-last)."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.bmm(a, b)
    return torch.stack([torch.mm(a[g], b[g]) for g in range(a.shape[0])])


def check_bimamba_impl(impl: str) -> str:
    if impl not in BIMAMBA_IMPLS:
        raise ValueError(f"bimamba_impl must be one of {BIMAMBA_IMPLS}, got {impl!r}")
    return impl


def _scan_branch(d_inner: int, d_state: int, d_conv: int, dt_rank: int, dd: dict):
    """The parameters of one scan direction: causal conv, input-dependent (dt, B, C) projection, A and D.
    ``dd``: the factory kwargs (device, dtype)."""
    conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True, **dd)
    x_proj = OutputPaddedLinear(d_inner, dt_rank + 2 * d_state, bias=False, **dd)
    dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **dd)
    return (conv1d, x_proj, dt_proj, nn.Parameter(torch.empty(d_inner, d_state, **dd)),
            nn.Parameter(torch.empty(d_inner, **dd)))


def _check_mixer_args(**sizes) -> None:
    """Every size an int >= 1 (``dt_rank`` may also be ``"auto"``), else an error naming it."""
    for name, value in sizes.items():
        if name == "dt_rank" and value == "auto":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            allowed = "an int >= 1 or 'auto'" if name == "dt_rank" else "an int >= 1"
            raise ValueError(f"{name} must be {allowed}, got {value!r}")


# torch.fx (timm's feature extraction, get_graph_node_names): the fused ops check their arguments in Python and call
# custom ops, so they are leaves of the graph, and so is the mixer (einops reshapes of traced sizes).
register_notrace_function(rms_norm)


@register_notrace_module
class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer. (B, L, D) -> (B, L, D).

    Shared ``in_proj`` (D -> 2 * d_inner, no bias) and ``out_proj`` (d_inner -> D, no bias); a forward branch
    (``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``) and a backward branch with the same names suffixed
    ``_b`` that runs on the flipped sequence (x and the gate z). Output ``out_proj((y_f + flip(y_b)) / 2)``.
    Both branches run on every backend.

    ``bimamba_impl``: ``"fused"`` (both directions in one pass over 2 * d_inner channels; the stacked weights are
    built from the two branches' parameters on every call, so there is no second copy to drift), ``"two_pass"``
    (one direction after the other) or ``"auto"`` (per call, by the scan backend's capabilities: see the module
    docstring). Same parameters, same result to rounding.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 layer_idx: int | None = None, *, bimamba_impl: str = DEFAULT_BIMAMBA_IMPL, device=None, dtype=None):
        super().__init__()
        _check_mixer_args(dim=dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
        self.bimamba_impl = check_bimamba_impl(bimamba_impl)
        dd = {"device": device, "dtype": dtype}
        self.dim, self.d_state, self.d_conv, self.expand = dim, d_state, d_conv, expand
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False, **dd)
        # hustvl/Vim names: conv1d, x_proj, dt_proj, A_log, D and conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _scan_branch(
            self.d_inner, d_state, d_conv, self.dt_rank, dd)
        self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = _scan_branch(
            self.d_inner, d_state, d_conv, self.dt_rank, dd)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False, **dd)
        self.reset_ssm_parameters()

    def _branch(self, direction: str):
        if direction == "forward":
            return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D
        return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init for both branches: dt log-uniform in [dt_min, dt_max] through an inverse-softplus bias,
        A = -(1..N), D = 1. (Vim's own code zeroes the backward dt bias by accident; not here.) Everything is
        drawn on the parameters' device (nothing is allocated elsewhere, e.g. on the meta device)."""
        for direction in ("forward", "backward"):
            _, _, dt_proj, A_log, D = self._branch(direction)
            std = self.dt_rank ** -0.5 * self.dt_scale
            nn.init.uniform_(dt_proj.weight, -std, std)
            device = dt_proj.bias.device
            dt = torch.exp(torch.rand(self.d_inner, device=device) * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse of softplus
            A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device))
                        .repeat(self.d_inner, 1))
            D.fill_(1.0)

    def _branch_inputs(self, x: Tensor, direction: str, reverse: bool = False) -> ScanBranch:
        """x: (B, d_inner, L) -> the scan inputs of one direction (its conv, x_proj, dt_proj, A, D); ``reverse``:
        the conv right to left (the branch of the flipped sequence, in the original order)."""
        conv, x_proj, dt_proj, A_log, D = self._branch(direction)
        seq_len = x.shape[-1]
        x = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu", reverse=reverse)
        x_dbl = x_proj(rearrange(x, "b d l -> (b l) d"))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        B = rearrange(B, "(b l) n -> b n l", l=seq_len)
        C = rearrange(C, "(b l) n -> b n l", l=seq_len)
        # delta as dt_proj.weight @ dt (the low-rank mode); B, C and dt as strided views of x_dbl
        dt = rearrange(dt, "(b l) r -> b r l", l=seq_len)
        return ScanBranch(x, dt, -torch.exp(A_log.float()), B, C, D.float(), dt_proj.bias.float(), dt_proj.weight)

    def _stacked(self) -> dict:
        """Both branches' parameters stacked (forward first), in the one-pass layout: conv (2 d_inner, K) and bias,
        x_proj (2, R, d_inner), dt_proj (2, d_inner, dt_rank) and bias (2 d_inner,), A (2 d_inner, N) and D."""
        return {"conv_w": torch.cat([self.conv1d.weight, self.conv1d_b.weight]).squeeze(1),
                "conv_b": torch.cat([self.conv1d.bias, self.conv1d_b.bias]),
                "x_proj": torch.stack([self.x_proj.weight, self.x_proj_b.weight]),
                "dt_proj": torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]),
                "dt_bias": torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
                "A": -torch.exp(torch.cat([self.A_log, self.A_b_log]).float()),
                "D": torch.cat([self.D, self.D_b]).float()}

    def forward_fused(self, hidden_states: Tensor) -> Tensor:
        """Both directions in one pass. (B, L, D) -> (B, L, D).

        Channels [0, d_inner) are the forward branch, [d_inner, 2 d_inner) the backward branch on the flipped
        sequence; the scan takes B and C grouped per branch, (B, 2, N, L). The activations stay channel-last
        (B, L, 2 d_inner) where the backends keep that layout (the C++ CPU kernels do), so that x_proj reads the
        conv's output and out_proj the scan's without a transposing copy.
        """
        seq_len = hidden_states.shape[1]
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        w = self._stacked()
        x, z = self.in_proj(hidden_states).split(d, dim=-1)                                 # (B, L, d) views
        x = torch.cat([x, x.flip(1)], dim=-1).transpose(1, 2)                               # (B, 2d, L)
        x = causal_conv1d(x, w["conv_w"], w["conv_b"], activation="silu")
        # x_proj of both branches: one batched GEMM (2, B*L, d) @ (2, d, R)
        x_dbl = _grouped_mm(rearrange(x, "b (g d) l -> g (b l) d", g=2), w["x_proj"].transpose(1, 2))
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        # dt_proj of both branches: (2, d, r) @ (2, r, B*L), laid out (B, 2d, L) with unit stride along L
        dt = rearrange(_grouped_mm(w["dt_proj"], dt.transpose(1, 2)), "g d (b l) -> b (g d) l", l=seq_len)
        B = rearrange(B, "g (b l) n -> b g n l", l=seq_len)
        C = rearrange(C, "g (b l) n -> b g n l", l=seq_len)
        z = torch.cat([z, z.flip(1)], dim=-1).transpose(1, 2)                               # (B, 2d, L)
        y = selective_scan(x, dt, w["A"], B, C, w["D"], z=z, delta_bias=w["dt_bias"], delta_softplus=True)
        y = (y[:, :d] + y[:, d:].flip(-1)).mul_(0.5)                                        # (B, d, L)
        return self.out_proj(rearrange(y, "b d l -> b l d"))

    def forward(self, hidden_states: Tensor) -> Tensor:
        if resolve_bimamba_impl(self.bimamba_impl, hidden_states.device) == "fused":
            return self.forward_fused(hidden_states)
        xz = rearrange(self.in_proj(hidden_states), "b l d -> b d l")
        x, z = xz.chunk(2, dim=1)
        # 0.5 * (scan(forward) + scan(backward, right to left)) * silu(z): one pass over both on CPU without
        # autograd, else the two scans (the op's dispatch)
        y = bimamba_scan(self._branch_inputs(x, "forward"), self._branch_inputs(x, "backward", reverse=True), z,
                         delta_softplus=True)
        return self.out_proj(rearrange(y, "b d l -> b l d"))


class VimBlock(nn.Module):
    """Pre-norm residual block: residual += drop_path(hidden); hidden = mixer(RMSNorm(residual)).

    (hidden (B, L, D), residual (B, L, D) or None) -> (hidden, residual); the residual stream stays fp32 when
    ``residual_in_fp32``; the add and the norm are one fused op where the backend allows.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, eps: float = 1e-5,
                 residual_in_fp32: bool = True, device=None, dtype=None):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=eps, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        update = hidden_states if residual is None else self.drop_path(hidden_states)
        hidden_states, residual = rms_norm(update, self.norm.weight, residual=residual, eps=self.norm.eps,
                                           prenorm=True, residual_in_fp32=self.residual_in_fp32)
        return self.mixer(hidden_states), residual
