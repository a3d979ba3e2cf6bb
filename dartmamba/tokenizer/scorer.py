"""DART scoring network: a (usually frozen) feature trunk and a small trainable head -> positive (B, Gh, Gw) scores.

Trunks (``trunk=``):

==========================  ===========================================  ========  =======
name                        cut (torchvision ``features[:k]`` equivalent)  channels  frozen
==========================  ===========================================  ========  =======
``mobilenetv3_small``       ``features[:13]`` (head v2, Vim/DeiT-Tiny)     576       yes
``mobilenetv3_small_v1``    ``features[:11]`` (head v1)                    96        yes
``mobilenetv3_large``       ``features[:17]`` (head v2, Small/Base)        960       yes
``mobilenetv3_large_v1``    ``features[:15]`` (head v1)                    160       yes
``mobilenetv3_small_s16``   ``features[:8]`` (stride 16, video DART)       48        yes
``tiny_cnn``                three stride-2 convs (small images, tests)    64        no
==========================  ===========================================  ========  =======

The MobileNetV3 trunks are timm's ``mobilenetv3_{small,large}_100`` cut at the stage the official DART code uses,
with timm's parameter names (``conv_stem``, ``bn1``, ``blocks.i.j``). Frozen trunks run under ``no_grad``, stay in
eval mode whatever ``.train()`` says, and are skipped by :meth:`DartScorer.init_weights`.

Trunk weights (``trunk_weights=``), as the paper trains: ``"pretrained"`` (the default) loads timm's ImageNet
weights of ``mobilenetv3_{small,large}_100`` through timm's pretrained cfg, from the Hugging Face cache or the Hub
(:func:`dartmamba.hub.hub_file`: offline and not cached, a fast error says which file to get); a path loads a local
file (a timm or torchvision state dict, ``.safetensors`` or a torch file); ``"random"`` opts out (tests, tiny
configs, speed benchmarks). ``None`` means the environment's ``DARTMAMBA_TRUNK_WEIGHTS`` if set, else
``"pretrained"``. Nothing is loaded on the meta device. The trainable ``tiny_cnn`` trunk has no pretrained weights.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..files import read_state_dict
from .validation import autocast_enabled

SCORE_NORMS = ("sample", "batch")
HEADS = ("v1", "v2")
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(value, name: str = "scorer_dtype") -> torch.dtype | None:
    """None, a torch floating dtype or its name ("bfloat16"/"bf16", "float16"/"fp16", "float32"/"fp32")."""
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower()]
    raise ValueError(f"{name} must be None, a floating torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {value!r}")


# trunk name -> (timm model, number of timm blocks kept after the stem counting each inverted-residual block and the
# final 1x1 ConvBnAct as one, output channels)
_MOBILENET_TRUNKS = {
    "mobilenetv3_small": ("mobilenetv3_small_100", 12, 576),
    "mobilenetv3_small_v1": ("mobilenetv3_small_100", 10, 96),
    "mobilenetv3_large": ("mobilenetv3_large_100", 16, 960),
    "mobilenetv3_large_v1": ("mobilenetv3_large_100", 14, 160),
    "mobilenetv3_small_s16": ("mobilenetv3_small_100", 7, 48),   # the video tokenizer's stride-16 cut
}
TRUNKS = (*_MOBILENET_TRUNKS, "tiny_cnn")


TRUNK_WEIGHTS_ENV = "DARTMAMBA_TRUNK_WEIGHTS"


class TinyConvTrunk(nn.Module):
    """Trainable stride-8 CNN for small images: 3 x (conv3x3 s2, GroupNorm, GELU). (B, C, H, W) -> (B, 64, H/8, W/8).

    On CPU the activations run channels-last (the output too; values as in NCHW to rounding): oneDNN's convolutions,
    the backward above all, were faster that way at the demo's shape (64 x 3 x 64 x 64, 1 thread; docs/benchmarks.md)
    with the weights in the same layout (channels-last input alone was slower); the weights are converted per call
    (a few KB), so parameters and state dicts keep the default layout.
    """

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 64), device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        layers, prev = [], in_chans
        for width in widths:
            layers += [nn.Conv2d(prev, width, 3, stride=2, padding=1, bias=False, **dd),
                       nn.GroupNorm(min(8, width), width, **dd), nn.GELU()]
            prev = width
        self.layers = nn.Sequential(*layers)
        self.out_chans = prev

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return self.layers(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                weight = layer.weight.contiguous(memory_format=torch.channels_last)
                x = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                x = layer(x)
        return x


class MobileNetV3Trunk(nn.Module):
    """timm MobileNetV3 cut after ``num_blocks`` blocks (timm names kept, so timm state dicts load by name).

    torchvision's MobileNetV3 (the official DART trunk) is the same network with other names and BatchNorm
    eps 1e-3 instead of timm's 1e-5: :meth:`load_torchvision_state_dict` maps it (exact same outputs).
    """

    def __init__(self, timm_name: str, num_blocks: int, in_chans: int = 3, device=None, dtype=None):
        super().__init__()
        import timm

        self.timm_name = timm_name
        # the device context too: some timm layers (MobileNetV3's squeeze-excite gates) ignore the factory kwargs
        with torch.device(device) if device is not None else contextlib.nullcontext():
            full = timm.create_model(timm_name, pretrained=False, in_chans=in_chans, device=device, dtype=dtype)
        self.conv_stem, self.bn1 = full.conv_stem, full.bn1
        stages, remaining = [], num_blocks
        for stage in full.blocks:
            if remaining <= 0:
                break
            keep = min(remaining, len(stage))
            stages.append(stage if keep == len(stage) else nn.Sequential(*list(stage)[:keep]))
            remaining -= keep
        self.blocks = nn.Sequential(*stages)
        self.out_chans = _last_out_chans(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))

    def set_bn_eps(self, eps: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = eps

    @property
    def bn_eps(self) -> float:
        """The BatchNorm eps every layer of the trunk uses (timm's 1e-5, or torchvision's 1e-3 once its weights are
        loaded)."""
        return next(m.eps for m in self.modules() if isinstance(m, nn.BatchNorm2d))

    def torchvision_key_map(self, torchvision_keys: list[str], source: str = "torchvision state dict") -> dict:
        """Map torchvision ``features.*`` keys (in their state-dict order, prefix stripped) to ours.

        Both networks register their tensors in the same order (stem, then per block: expand, depthwise, SE,
        project; BatchNorm weight, bias, running_mean, running_var, num_batches_tracked), so the map pairs them in
        order and checks that every pair is the same kind of tensor.
        """
        own = list(self.state_dict().keys())
        if len(torchvision_keys) != len(own):
            raise ValueError(f"{source}: {len(torchvision_keys)} MobileNetV3 trunk tensors, this trunk has {len(own)}")
        for theirs, ours in zip(torchvision_keys, own):
            kind_theirs, kind_ours = theirs.rsplit(".", 1)[-1], ours.rsplit(".", 1)[-1]
            if kind_theirs != kind_ours:
                raise ValueError(f"{source}: tensor {theirs!r} does not line up with {ours!r}")
        return dict(zip(torchvision_keys, own))

    def rename_torchvision(self, state: dict, prefix: str, source: str = "torchvision state dict") -> dict:
        """torchvision ``features.*`` tensors (that prefix removed) -> ``{prefix + our name: tensor}``."""
        return {prefix + ours: state[theirs] for theirs, ours in self.torchvision_key_map(list(state), source).items()}

    def load_torchvision_state_dict(self, state: dict, source: str = "torchvision state dict") -> None:
        """Load torchvision MobileNetV3 ``features[:k]`` weights (keys ``N.block.M...``, any prefix removed)."""
        key_map = self.torchvision_key_map(list(state), source)
        own = self.state_dict()
        for theirs, ours in key_map.items():
            if state[theirs].shape != own[ours].shape:
                raise ValueError(f"{source}: {theirs!r} has shape {tuple(state[theirs].shape)}, expected "
                                 f"{tuple(own[ours].shape)} for {ours!r}")
        self.load_state_dict({ours: state[theirs] for theirs, ours in key_map.items()}, strict=True)
        self.set_bn_eps(1e-3)   # torchvision trains MobileNetV3 with BatchNorm eps 1e-3


def _last_out_chans(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def load_trunk_weights(trunk: nn.Module, path: str) -> None:
    """Load trunk weights from a local file: a timm MobileNetV3 state dict (full model or trunk only), or a
    torchvision one (``features.*`` keys), or the trunk's own state dict."""
    state = read_state_dict(path, "trunk_weights")
    if isinstance(trunk, MobileNetV3Trunk) and any(k.startswith("features.") for k in state):
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        kept = sorted({int(k.split(".", 1)[0]) for k in features})
        own_count = len(trunk.state_dict())
        subset, count = {}, 0
        for index in kept:                                   # torchvision features[:k]: keep leading stages
            stage = {k: v for k, v in features.items() if int(k.split(".", 1)[0]) == index}
            if count + len(stage) > own_count:
                break
            subset.update(stage)
            count += len(stage)
        trunk.load_torchvision_state_dict(subset, f"trunk_weights file {path}")
        return
    own = trunk.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"trunk_weights file {path} lacks {len(missing)} trunk tensors, first: {missing[0]!r}")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise ValueError(f"trunk_weights file {path}: {key!r} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(value.shape)}")
    trunk.load_state_dict({k: state[k] for k in own}, strict=True)


def resolve_trunk_weights(trunk_weights: str | None) -> str:
    """``trunk_weights`` as given, or (None) the environment's ``DARTMAMBA_TRUNK_WEIGHTS``, else "pretrained"."""
    if trunk_weights is None:
        trunk_weights = os.environ.get(TRUNK_WEIGHTS_ENV) or "pretrained"
    if not isinstance(trunk_weights, (str, os.PathLike)):
        raise TypeError(f"trunk_weights must be 'pretrained', 'random' or a file path, got {trunk_weights!r}")
    return os.fspath(trunk_weights)


def pretrained_trunk_file(timm_name: str, cache_dir=None) -> str:
    """Local path of timm's ImageNet weights of ``timm_name`` (its default pretrained tag), from the Hugging Face
    cache or the Hub; a fast :class:`~dartmamba.hub.HubFileUnavailable` offline."""
    import timm

    from ..hub import hub_file

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm has no Hub weights for {timm_name!r}")
    return hub_file(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors", cache_dir=cache_dir,
                    what=f"the frozen scorer trunk ({timm_name}, timm's ImageNet weights)",
                    instead="pass trunk_weights=<local timm weights file> (or trunk_weights='random' to opt out of "
                            "the pretrained trunk, which the paper's method needs)")


def check_trunk_bn_eps(trunk_bn_eps, trunk: str) -> None:
    """``trunk_bn_eps``: None, or a number > 0 for a trunk with BatchNorm (the MobileNetV3 ones)."""
    if trunk_bn_eps is None:
        return
    if isinstance(trunk_bn_eps, bool) or not isinstance(trunk_bn_eps, (int, float)) or not trunk_bn_eps > 0:
        raise ValueError(f"trunk_bn_eps must be None or a number > 0, got {trunk_bn_eps!r}")
    if trunk not in _MOBILENET_TRUNKS:
        raise ValueError(f"trunk_bn_eps: the {trunk!r} trunk has no BatchNorm (only the MobileNetV3 trunks "
                         f"{sorted(_MOBILENET_TRUNKS)} take it), got {trunk_bn_eps!r}")


def build_trunk(name: str, in_chans: int = 3, weights: str | None = None, device=None,
                dtype=None) -> tuple[nn.Module, bool]:
    """Returns (trunk module with ``out_chans``, whether it is frozen); weights as :func:`resolve_trunk_weights`."""
    weights = resolve_trunk_weights(weights)
    if name == "tiny_cnn":
        trunk = TinyConvTrunk(in_chans, device=device, dtype=dtype)
        if weights not in ("pretrained", "random"):
            load_trunk_weights(trunk, weights)
        return trunk, False
    if name not in _MOBILENET_TRUNKS:
        raise ValueError(f"trunk must be one of {TRUNKS}, got {name!r}")
    timm_name, num_blocks, channels = _MOBILENET_TRUNKS[name]
    trunk = MobileNetV3Trunk(timm_name, num_blocks, in_chans, device=device, dtype=dtype)
    assert trunk.out_chans == channels
    if next(trunk.parameters()).is_meta or weights == "random":
        return trunk, True                          # meta: sizes and FLOPs only, nothing to load
    if weights == "pretrained":
        if in_chans != 3:
            raise ValueError(f"trunk_weights='pretrained': timm's {timm_name} weights take 3 input channels, got "
                             f"in_chans={in_chans}; pass trunk_weights=<file> or 'random'")
        weights = pretrained_trunk_file(timm_name)
    load_trunk_weights(trunk, weights)
    return trunk, True


class ScoreHeadV1(nn.Module):
    """Per-location MLP C -> C -> 1 with GELU. (B, C, h, w) -> (B, h, w) raw scores."""

    def __init__(self, chans: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(chans, chans, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(chans, 1, device=device, dtype=dtype)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(features.permute(0, 2, 3, 1)))).squeeze(-1)

    @staticmethod
    def squash(standardised: Tensor) -> Tensor:
        return torch.sigmoid(standardised) + 0.1  # the floor bounds the density ratio at 11x


class ScoreHeadV2(nn.Module):
    """Channel gate g = sigmoid(MLP_{C->hidden->C}(mean f)) (GELU); score = sum_c f_c g_c. (B, C, h, w) -> (B, h, w)."""

    def __init__(self, chans: int, hidden: int = 96, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(chans, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, chans, device=device, dtype=dtype)

    def forward(self, features: Tensor) -> Tensor:
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(features.mean(dim=(2, 3))))))
        return torch.einsum("bchw,bc->bhw", features, gate)

    @staticmethod
    def squash(standardised: Tensor) -> Tensor:
        return torch.sigmoid(2.0 * standardised)


def standardise_scores(raw: Tensor, score_norm: str = "sample", eps: float = 1e-8) -> Tensor:
    """Zero-mean, unit-std scores. (B, Gh, Gw) -> (B, Gh, Gw).

    ``"sample"``: each map on its own (a sample's tokens never depend on its batch).
    ``"batch"``: one mean/std over the whole batch, as the official code does (for checkpoint parity).
    """
    if score_norm == "sample":
        dims, group = (1, 2), raw[0].numel()
    elif score_norm == "batch":
        dims, group = (0, 1, 2), raw.numel()
    else:
        raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {score_norm!r}")
    mean = raw.mean(dim=dims, keepdim=True)
    std = raw.std(dim=dims, keepdim=True) if group > 1 else torch.ones_like(mean)
    return (raw - mean) / (std + eps)


class DartScorer(nn.Module):
    """Images (B, C, H, W) -> positive scores (B, Gh, Gw).

    Args:
        grid_size: (Gh, Gw) of the score map.
        trunk: one of :data:`TRUNKS`.
        head: ``"v1"`` or ``"v2"``.
        score_norm: ``"sample"`` (default) or ``"batch"`` (official).
        input_size: resize images to this size before the trunk (the newer official code uses 224 for 448 input);
            ``None`` keeps the full image.
        trunk_weights: ``"pretrained"`` (default: timm's ImageNet weights, see the module docstring), ``"random"``
            or a local weights file; ``None``: ``DARTMAMBA_TRUNK_WEIGHTS`` or "pretrained".
        head_hidden: hidden width of the v2 gate MLP.
        channels_last: keep the trunk's weights and feed its input in channels-last memory format (faster
            convolutions on tensor-core GPUs).
        trunk_dtype: run the trunk under autocast to this dtype (``torch.bfloat16`` / ``"bf16"``, ...); its features
            go to the head in float32 unless an outer autocast is active. ``None``: whatever precision is ambient.
        trunk_bn_eps: the BatchNorm eps of a MobileNetV3 trunk, set after its weights are loaded (the official DART
            checkpoints: torchvision's 1e-3); ``None`` keeps what the weights imply (timm's 1e-5, torchvision's 1e-3).
            A model records it (:func:`dartmamba.models._common.effective_model_args`), so a saved model computes
            the same after loading.
    """

    def __init__(self, grid_size: tuple[int, int], trunk: str = "mobilenetv3_small", head: str = "v2",
                 score_norm: str = "sample", input_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                 trunk_weights: str | None = None, head_hidden: int = 96, channels_last: bool = False,
                 trunk_dtype=None, trunk_bn_eps: float | None = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.trunk_dtype = resolve_dtype(trunk_dtype, "trunk_dtype")
        self.channels_last = bool(channels_last)
        self.check_head(head)
        if score_norm not in SCORE_NORMS:
            raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {score_norm!r}")
        check_trunk_bn_eps(trunk_bn_eps, trunk)
        self.grid_size = tuple(grid_size)
        self.score_norm = score_norm
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else (
            None if input_size is None else tuple(input_size))
        self.trunk_name = trunk
        self.trunk, self.trunk_frozen = build_trunk(trunk, in_chans, trunk_weights, **dd)
        if trunk_bn_eps is not None:
            self.trunk.set_bn_eps(float(trunk_bn_eps))
        if self.trunk_frozen:
            self.trunk.requires_grad_(False)
            self.trunk.eval()
        if self.channels_last:
            self.trunk.to(memory_format=torch.channels_last)
        self.head_version = head
        self.head = self.build_head(head, self.trunk.out_chans, head_hidden, **dd)
        self.init_weights()

    @property
    def trunk_bn_eps(self) -> float | None:
        """The trunk's BatchNorm eps (None for a trunk without BatchNorm, ``tiny_cnn``)."""
        return self.trunk.bn_eps if isinstance(self.trunk, MobileNetV3Trunk) else None

    @staticmethod
    def check_head(head: str) -> None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")

    @staticmethod
    def build_head(head: str, chans: int, hidden: int, device=None, dtype=None) -> nn.Module:
        """The trainable head on the trunk's ``chans`` feature channels (subclasses add their own heads)."""
        dd = {"device": device, "dtype": dtype}
        return ScoreHeadV1(chans, **dd) if head == "v1" else ScoreHeadV2(chans, hidden, **dd)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.trunk_frozen:
            self.trunk.eval()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise the trainable parts only; a frozen trunk is never touched."""
        for module in self.head.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if not self.trunk_frozen:
            for module in self.trunk.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def trunk_features(self, images: Tensor) -> Tensor:
        """The trunk's features (resized input, channels-last / autocast as configured; no gradient through a frozen
        trunk). (B, C, H, W) -> (B, C', h, w)."""
        x = images
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        device_type = x.device.type
        if self.trunk_dtype is None or device_type == "meta":      # autocast does not know the meta device
            autocast = contextlib.nullcontext()
        elif self.trunk_dtype == torch.float32:
            autocast = torch.autocast(device_type, enabled=False)
            x = x.float()
        else:
            autocast = torch.autocast(device_type, dtype=self.trunk_dtype)
        with autocast:
            if self.trunk_frozen:
                with torch.no_grad():
                    features = self.trunk(x)
            else:
                features = self.trunk(x)
        if self.trunk_dtype is not None and not autocast_enabled(device_type):
            features = features.float()
        return features

    def raw_scores(self, images: Tensor) -> Tensor:
        """Unsquashed head output resized to the grid. (B, C, H, W) -> (B, Gh, Gw)."""
        raw = self.head(self.trunk_features(images))
        if tuple(raw.shape[-2:]) != self.grid_size:
            raw = F.interpolate(raw[:, None], size=self.grid_size, mode="bilinear", align_corners=False)[:, 0]
        return raw

    def forward(self, images: Tensor) -> Tensor:
        raw = self.raw_scores(images).float()
        return self.head.squash(standardise_scores(raw, self.score_norm))
