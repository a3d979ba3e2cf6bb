"""Helpers shared by several test folders: the repository root, tiny model shapes, partition invariants (sorted
edges, full coverage, positive widths, constant scores -> the regular partition) and degenerate score maps."""
import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# tiny models that build and run in well under a second on one CPU core
TINY_VIM = {"embed_dim": 32, "depth": 1, "num_classes": 5}
TINY_FIXED = {"patch_size": 8}
TINY_DART = {"img_size": 64, "patch_size": 8, "grid_size": 4, "dart_cfg": {"trunk": "tiny_cnn"}}


def assert_valid_partition(bands, edges, grid_h, grid_w, num_rows, num_tokens, context=""):
    assert bands.shape[-1] == num_rows + 1 and edges.shape[-1] == num_tokens + 1, context
    assert torch.isfinite(bands).all() and torch.isfinite(edges).all(), context
    assert (bands[:, 0] == 0).all() and (bands[:, -1] == grid_h).all(), context
    assert (edges[:, 0] == 0).all() and (edges[:, -1] == grid_w * num_rows).all(), context
    band_gaps = bands[:, 1:] - bands[:, :-1]
    edge_gaps = edges[:, 1:] - edges[:, :-1]
    # Exact maths bounds every gap below by (1 / parts) / (max density <= 1): far from zero.
    assert (band_gaps > 0.5 / num_rows).all(), f"{context} min band gap {band_gaps.min().item()}"
    assert (edge_gaps > 0.5 / num_tokens).all(), f"{context} min token width {edge_gaps.min().item()}"


def assert_uniform_is_regular(scores, bands, edges, context=""):
    """Samples whose scores are all equal get the regular partition: bands at k * Gh / R, token edges at
    k * Gw * R / N (bit for bit on the patch grid R = Gh, N = Gh * Gw in float32, the plain patchification)."""
    grid_h, grid_w = scores.shape[1:]
    num_rows, num_tokens = bands.shape[1] - 1, edges.shape[1] - 1
    constant = (scores == scores[:, :1, :1]).flatten(1).all(dim=1)
    assert constant.any(), f"{context}: no constant map among the samples"
    regular_bands = torch.linspace(0, grid_h, num_rows + 1, dtype=torch.float64).to(bands.dtype)
    regular_edges = torch.linspace(0, grid_w * num_rows, num_tokens + 1, dtype=torch.float64).to(edges.dtype)
    exact = num_rows == grid_h and num_tokens == grid_h * grid_w and bands.dtype == torch.float32
    for got, want in ((bands[constant], regular_bands), (edges[constant], regular_edges)):
        if exact:
            assert torch.equal(got, want.expand_as(got)), context
        else:
            torch.testing.assert_close(got, want.expand_as(got), rtol=0, atol=1e-5 * float(want[-1]), msg=context)


def degenerate_maps(grid_h, grid_w, generator):
    maps = []
    spike = torch.full((grid_h, grid_w), 1e-6)
    spike[torch.randint(grid_h, (1,), generator=generator), torch.randint(grid_w, (1,), generator=generator)] = 1e6
    maps.append(spike)
    maps.append(torch.ones(grid_h, grid_w))
    maps.append(torch.full((grid_h, grid_w), 1e-30))
    maps.append(torch.full((grid_h, grid_w), 1e30))
    row = torch.full((grid_h, grid_w), 1e-6)
    row[torch.randint(grid_h, (1,), generator=generator)] = 1e6
    maps.append(row)
    col = torch.full((grid_h, grid_w), 1e-6)
    col[:, torch.randint(grid_w, (1,), generator=generator)] = 1e6
    maps.append(col)
    corner = torch.full((grid_h, grid_w), 1.0)
    corner[-1, -1] = 1e6
    maps.append(corner)
    first = torch.full((grid_h, grid_w), 1.0)
    first[0, 0] = 1e6
    maps.append(first)
    log_uniform = torch.exp(torch.empty(grid_h, grid_w).uniform_(math.log(1e-6), math.log(1e6), generator=generator))
    maps.append(log_uniform)
    for _ in range(3):                          # constant maps of other values: the regular partition
        value = math.exp(torch.empty(()).uniform_(math.log(1e-20), math.log(1e20), generator=generator).item())
        maps.append(torch.full((grid_h, grid_w), value))
    return torch.stack(maps)


# Prelude of a test subprocess that records every call of torch.autograd.backward / grad (Tensor.backward calls the
# former) in any thread, through Python's own profiling hooks (sys.setprofile, threading.setprofile for threads
# started later): nothing of torch is replaced. `autograd_calls` lists them; `stop_recording()` removes the hooks.
RECORD_AUTOGRAD_CALLS = """
import sys as _sys, threading as _threading
import torch.autograd as _autograd

autograd_calls = []
_WATCHED = {_autograd.backward.__code__: "torch.autograd.backward", _autograd.grad.__code__: "torch.autograd.grad"}


def _watch(frame, event, arg):
    if event == "call" and frame.f_code in _WATCHED:
        autograd_calls.append(f"{_WATCHED[frame.f_code]} (thread {_threading.current_thread().name})")


def stop_recording():
    _sys.setprofile(None)
    _threading.setprofile(None)


_sys.setprofile(_watch)
_threading.setprofile(_watch)
"""
