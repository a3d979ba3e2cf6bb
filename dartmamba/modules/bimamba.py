"""Bidirectional Mamba mixer ("bimamba v2", as in Vision Mamba) and the Vim residual block.

Built only from :mod:`dartmamba.ops`, so the backend (mamba-ssm CUDA kernels or the exact CPU scan) is chosen in
one place. Parameter names and shapes follow hustvl/Vim so its checkpoints load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, register_notrace_function, register_notrace_module
from torch import Tensor

from ..ops import RMSNorm, causal_conv1d, rms_norm, selective_scan


def _scan_branch(d_inner: int, d_state: int, d_conv: int, dt_rank: int, dd: dict):
    """The parameters of one scan direction: causal conv, input-dependent (dt, B, C) projection, A and D.
    ``dd``: the factory kwargs (device, dtype)."""
    conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True, **dd)
    x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **dd)
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
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        _check_mixer_args(dim=dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
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

    def _scan(self, x: Tensor, z: Tensor, direction: str) -> Tensor:
        """x, z: (B, d_inner, L) -> y (B, d_inner, L)."""
        conv, x_proj, dt_proj, A_log, D = self._branch(direction)
        seq_len = x.shape[-1]
        x = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        x_dbl = x_proj(rearrange(x, "b d l -> (b l) d"))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(dt_proj.weight @ dt.t(), "d (b l) -> b d l", l=seq_len)
        B = rearrange(B, "(b l) n -> b n l", l=seq_len).contiguous()
        C = rearrange(C, "(b l) n -> b n l", l=seq_len).contiguous()
        A = -torch.exp(A_log.float())
        return selective_scan(x, dt, A, B, C, D.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True)

    def forward(self, hidden_states: Tensor) -> Tensor:
        xz = rearrange(self.in_proj(hidden_states), "b l d -> b d l")
        x, z = xz.chunk(2, dim=1)
        y_forward = self._scan(x, z, "forward")
        y_backward = self._scan(x.flip(-1), z.flip(-1), "backward").flip(-1)
        return self.out_proj(rearrange((y_forward + y_backward) * 0.5, "b d l -> b l d"))


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
