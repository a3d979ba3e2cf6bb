"""The DART tokenizer's inference forward replayed from one CUDA graph.

The tokenizer is launch-bound at inference (a MobileNetV3 trunk is dozens of small kernels, the geometry a few
more): recorded once in a CUDA graph, a whole forward costs one graph launch. Everything in the path has static
shapes and no host synchronisation (value checks are skipped while capturing; the fused Triton kernels and the
torch paths never read tensor values on the host), which is what makes the capture possible.

    tokenizer.eval()
    runner = tokenizer.capture(batch_size=256)           # or CapturedTokenizer(tokenizer, 256)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        out = tokenizer(images, grid_pos_embed)          # replays the graph (captured on the first call)

Inputs are copied into the graph's static buffers unless they *are* those buffers: write a batch straight into
``runner.static_images`` to save the copy (B x 3 x 448 x 448 values). Outputs are static buffers too, overwritten
by the next replay. Shapes, dtypes, devices, the autocast state or grad mode that differ from the captured ones run
the eager forward instead. ``compile=True`` records the ``torch.compile``-d forward (fewer, fused kernels) in the
graph instead of the eager one.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["CapturedTokenizer", "capture_tokenizer"]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, (torch.get_autocast_dtype(device_type) if enabled else None)


def _dropped():
    return None


def _uncached_autocast(device_type: str):
    """The ambient autocast state with autocast's weight-cast cache off. Casts cached while recording would be
    freed when the caller's autocast block exits, and the graph would keep reading that memory; uncached, each
    replay recasts into the graph's own pool."""
    enabled, dtype = _autocast_state(device_type)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


class CapturedTokenizer:
    """One CUDA graph replaying ``tokenizer.forward_eager`` for a fixed batch size (inference only).

    Args:
        tokenizer: a :class:`~dartmamba.tokenizer.DartTokenizer` on a CUDA device, in eval mode when called.
        batch_size: B of every captured call.
        with_pos_embed: capture the positional-embedding resampling too (the graph then expects a
            (1, Gh * Gw, D) ``grid_pos_embed`` on every call; D = the tokenizer's ``embed_dim``).
        image_dtype: dtype of the images the graph takes (default: the tokenizer's parameter dtype).
        compile: record ``torch.compile(forward_eager, fullgraph=True)`` instead of the eager forward.
        warmup: eager (or compiled) runs on a side stream before the capture (kernel compilation, cuBLAS
            workspaces, autotuning happen there, never inside the capture).

    The graph is recorded on the first call that :meth:`accepts` (so under the autocast state of that call).
    """

    def __init__(self, tokenizer, batch_size: int, *, with_pos_embed: bool = True,
                 image_dtype: torch.dtype | None = None, compile: bool = False, warmup: int = 3):
        params = list(tokenizer.parameters())
        device = params[0].device if params else torch.device("cpu")
        if device.type != "cuda":
            raise RuntimeError(f"CapturedTokenizer needs a tokenizer on a CUDA device (CUDA graphs); it is on {device}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = device
        weight_dtype = tokenizer.proj.weight.dtype
        self.static_images = torch.zeros(batch_size, tokenizer.in_chans, *tokenizer.img_size,
                                         dtype=image_dtype or weight_dtype, device=device)
        grid_cells = tokenizer.grid_size[0] * tokenizer.grid_size[1]
        self.static_pos = (torch.zeros(1, grid_cells, tokenizer.embed_dim, dtype=weight_dtype, device=device)
                           if with_pos_embed else None)
        self.warmup = warmup
        self._fn = (torch.compile(tokenizer.forward_eager, fullgraph=True, dynamic=False) if compile
                    else tokenizer.forward_eager)
        self.compiled = compile
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None
        self.autocast = None
        self._capturing = False

    # copies of a model (timm's EMA deep-copies) and pickles drop the graph: they run the eager forward
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return _dropped, ()

    def accepts(self, images: Tensor, grid_pos_embed: Tensor | None) -> bool:
        """Whether a call with these inputs can replay the graph (no value is read: host-side checks only)."""
        if self._capturing or torch.is_grad_enabled() or self.tokenizer.training:
            return False
        if images.shape != self.static_images.shape or images.dtype != self.static_images.dtype:
            return False
        if images.device != self.device:
            return False
        if (grid_pos_embed is None) != (self.static_pos is None):
            return False
        if grid_pos_embed is not None and (grid_pos_embed.shape != self.static_pos.shape
                                           or grid_pos_embed.device != self.device):
            return False
        return self.autocast is None or self.autocast == _autocast_state(self.device.type)

    def _run(self):
        return self._fn(self.static_images, self.static_pos)

    def capture(self) -> None:
        """Warm up on a side stream, then record the forward (called by the first accepted call)."""
        self._capturing = True
        try:
            autocast = _autocast_state(self.device.type)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.no_grad(), _uncached_autocast(self.device.type):
                for _ in range(max(1, self.warmup)):
                    self._run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), _uncached_autocast(self.device.type), torch.cuda.graph(graph):
                self.outputs = self._run()
            self.graph, self.autocast = graph, autocast
        finally:
            self._capturing = False

    def __call__(self, images: Tensor, grid_pos_embed: Tensor | None = None):
        """Replay (recording first if needed). Returns the static :class:`~dartmamba.tokenizer.DartTokens`."""
        if images is not self.static_images:
            self.static_images.copy_(images)
        if grid_pos_embed is not None and grid_pos_embed is not self.static_pos:
            self.static_pos.copy_(grid_pos_embed)
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.outputs


def capture_tokenizer(model, batch_size: int, **options) -> CapturedTokenizer:
    """:meth:`DartTokenizer.capture` on ``model`` itself or on its ``patch_embed`` (DeiT-DART, Vim-DART)."""
    from .dart import DartTokenizer

    tokenizer = model if isinstance(model, DartTokenizer) else getattr(model, "patch_embed", None)
    if not isinstance(tokenizer, DartTokenizer):
        raise TypeError(f"{type(model).__name__} is not a DartTokenizer and has no DartTokenizer patch_embed")
    return tokenizer.capture(batch_size, **options)
