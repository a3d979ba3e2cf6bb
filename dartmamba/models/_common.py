"""What the model families share: the pretrained cfg, the tokenizer options, and ``forward_intermediates``'
packaging (timm conventions)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from ..tokenizer import Tokenizer, create_tokenizer, tokenizer_class


@dataclass(frozen=True)
class ModelFamily:
    """A family of registered models (for benchmarks and scaling studies): its sizes and the timm names of its
    fixed-grid and DART models (``{size}`` stands for the size); ``modality``: what it takes, ``"image"``
    (B, C, H, W) or ``"video"`` (B, C, T, H, W)."""

    name: str
    sizes: tuple[str, ...]
    grid: str
    dart: str
    modality: str = "image"

    def model_name(self, size: str, tokenizer: str) -> str:
        """The registered name of ``size`` with ``tokenizer`` (``"fixed"``/``"grid"`` or ``"dart"``)."""
        if size not in self.sizes:
            raise ValueError(f"{self.name}: size must be one of {self.sizes}, got {size!r}")
        if tokenizer not in ("fixed", "grid", "dart"):
            raise ValueError(f"tokenizer must be 'fixed' or 'dart', got {tokenizer!r}")
        return (self.dart if tokenizer == "dart" else self.grid).format(size=size)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def model_cfg(input_size: int = 224, **kwargs) -> dict:
    """A timm pretrained cfg for our models at ``input_size`` (square; eval resize 512 -> 448 crop for the 448
    DART models, timm's 0.875 crop otherwise)."""
    crop_pct = 448 / 512 if input_size == 448 else 0.875
    return {"url": "", "num_classes": 1000, "input_size": (3, input_size, input_size), "pool_size": None,
            "crop_pct": crop_pct, "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", **kwargs}


# What the official DART releases (HF hub yinkx3/DART) were trained with. The scorer standardises scores over the
# whole batch, and sees the full 448 px image: the code of the release (HCPLab-SYSU/DART and ykx3/DART, README Model
# Zoo of 2025-06-12/13, dart/dart.py) calls ``self.spn(x)`` (the 224 resize ``org_x`` is computed but not used); a
# later ykx3/DART commit switched to ``self.spn(org_x)``, with the same Model Zoo. docs/pretrained.md has the evidence.
OFFICIAL_DART_SCORER = {"score_norm": "batch", "scorer_input_size": None}


def release_kwargs(variant: str, pretrained: bool, kwargs: dict, releases: dict[str, dict]) -> dict:
    """``kwargs`` with the model arguments of a release (``releases["<variant>.<tag>"]``) under the user's (a
    ``tokenizer_cfg`` is merged key by key), when the model is that release's:

    - a tag the user names (``vim_small_dart.dart_in1k_392``, or ``pretrained_cfg="dart_in1k_392"``) builds its
      architecture, with or without ``pretrained``;
    - a pretrained cfg given as a dict or ``PretrainedCfg`` applies its tag only when it points at the release's own
      file (its ``hf_hub_id`` / ``hf_hub_filename`` / ``url``, no ``file`` of its own). The config a saved model
      carries (``local-dir:``, ``hf-hub:``, transformers) names the release it came from but another file: its
      ``model_args`` hold everything the model computes with (:func:`effective_model_args`), and no release
      setting is added to them;
    - without either, ``pretrained=True`` loads the default tag's file, and its settings apply (not with a file of
      the user's, ``pretrained_cfg_overlay=dict(file=...)``).
    """
    import timm

    requested = kwargs.get("pretrained_cfg")
    if isinstance(requested, str):
        tag = requested
    elif requested is not None:
        tag = _field(requested, "tag")
        if tag and not _is_release_file(variant, tag, requested):
            tag = None
    elif pretrained and not _user_source(kwargs):
        default = timm.models.get_pretrained_cfg(variant)
        tag = default.tag if default is not None else None
    else:
        tag = None
    args = releases.get(f"{variant}.{tag}") if tag else None
    if not args:
        return kwargs
    merged = dict(kwargs)
    for key, value in args.items():
        if key == "tokenizer_cfg":
            user = merged.pop("tokenizer_cfg", None) or merged.pop("dart_cfg", None) or {}
            merged["tokenizer_cfg"] = {**value, **user}
        else:
            merged.setdefault(key, value)
    return merged


_SOURCE_FIELDS = ("hf_hub_id", "hf_hub_filename", "url", "file")


def _field(cfg, key: str):
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def _user_source(kwargs: dict) -> bool:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    return any(overlay.get(key) for key in ("file", "url", "state_dict"))


def _is_release_file(variant: str, tag: str, cfg) -> bool:
    """Whether the pretrained cfg ``cfg`` loads the file registered as ``variant.tag``."""
    import timm

    try:
        release = timm.models.get_pretrained_cfg(f"{variant}.{tag}")
    except RuntimeError:                       # a tag this architecture does not register
        return False
    return release is not None and all(_field(cfg, key) == getattr(release, key, None) for key in _SOURCE_FIELDS)


def fetch_pretrained(variant: str, pretrained: bool, kwargs: dict) -> dict:
    """For ``pretrained=True`` with Hub weights: the file from the Hugging Face cache or the Hub
    (:func:`dartmamba.hub.hub_file`: offline and not cached, a fast error naming the file, never minutes of
    retries), read with :func:`dartmamba.files.read_state_dict` (official files also hold their training ``args``)
    and handed to timm's loader as the ``state_dict`` source. A source the user gives (``file``, ``url``,
    ``state_dict`` in ``pretrained_cfg_overlay``) is left to timm."""
    if not pretrained:
        return kwargs
    from ..compat.timm import resolve_pretrained_cfg
    from ..files import read_state_dict
    from ..hub import hub_file

    if _user_source(kwargs):
        return kwargs
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay)
    if not (cfg.hf_hub_id and cfg.hf_hub_filename):
        return kwargs
    name = f"{variant}.{cfg.tag}" if cfg.tag else variant
    path = hub_file(cfg.hf_hub_id, cfg.hf_hub_filename, cache_dir=kwargs.get("cache_dir"),
                    what=f"pretrained weights of {name}",
                    instead="pass pretrained_cfg_overlay=dict(file=<your local copy>)")
    overlay["state_dict"] = read_state_dict(path, f"pretrained weights of {name}")
    return {**kwargs, "pretrained_cfg_overlay": overlay}


# Keywords that say where weights come from or where a model is placed, not what it computes.
_NOT_MODEL_ARGS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "features_only",
                             "out_indices", "checkpoint_path", "cache_dir", "pretrained_strict", "feature_cfg",
                             "feature_cls", "device", "dtype", "pretrained"})


def effective_model_args(model, recorded: dict) -> dict:
    """The construction arguments that rebuild ``model`` as it computes now: ``recorded`` (the factory's keywords)
    with the settings read back from the model on top, so a release's settings (adopted when its file loaded) or a
    changed head travel with it.

    - ``num_classes``, ``global_pool``: the head's now (``reset_classifier``); ``img_size``: the tokenizer's
      (``set_input_size``);
    - for a DART tokenizer (image or video): ``num_tokens``, ``grid_size`` and, in ``tokenizer_cfg`` (``dart_cfg``
      folded in), the scorer's ``trunk``, ``head`` (image) / ``score_mode`` and ``first_frame_score`` (video),
      ``score_norm``,
      ``scorer_input_size``, ``trunk_bn_eps`` (MobileNetV3 trunks), ``num_rows``, ``sampling``, ``uniform_scores``, and
      ``trunk_weights="random"``: the saved weights hold the trunk, so loading fetches nothing;
    - ``scorer_dtype`` as a name (JSON); placement and weight-source keywords dropped.

    Any other tokenizer's options pass as recorded. Idempotent (timm reads, updates and writes it back).
    """
    from ..tokenizer import DartTokenizer
    from ..tokenizer.video import VideoDartTokenizer

    args = {k: v for k, v in recorded.items() if k not in _NOT_MODEL_ARGS}
    # both when timm merged the factory's keywords (dart_cfg) into what this returned before (tokenizer_cfg)
    options = {**(args.pop("tokenizer_cfg", None) or {}), **(args.pop("dart_cfg", None) or {})}
    if hasattr(model, "num_classes"):
        args["num_classes"] = model.num_classes
    if isinstance(getattr(model, "global_pool", None), str):
        args["global_pool"] = model.global_pool
    tokenizer = getattr(model, "patch_embed", None)
    if getattr(tokenizer, "img_size", None) is not None:          # set_input_size changes it
        args["img_size"] = list(tokenizer.img_size)
    if isinstance(tokenizer, (DartTokenizer, VideoDartTokenizer)):
        scorer = tokenizer.scorer
        args["num_tokens"] = tokenizer.num_tokens
        args["grid_size"] = list(tokenizer.grid_size)          # set_input_size scales it
        options.update(trunk=scorer.trunk_name, score_norm=scorer.score_norm,
                       scorer_input_size=None if scorer.input_size is None else list(scorer.input_size),
                       num_rows=tokenizer.num_rows, sampling=tokenizer.sampling,
                       uniform_scores=bool(tokenizer.uniform_scores), trunk_weights="random")
        if isinstance(tokenizer, VideoDartTokenizer):
            options["score_mode"] = scorer.score_mode
            if scorer.first_frame_score is None:
                options.pop("first_frame_score", None)
            else:
                options["first_frame_score"] = scorer.first_frame_score
        else:
            options["head"] = scorer.head_version
        if scorer.trunk_bn_eps is not None:
            options["trunk_bn_eps"] = scorer.trunk_bn_eps
        else:
            options.pop("trunk_bn_eps", None)
    if isinstance(options.get("scorer_dtype"), torch.dtype):
        options["scorer_dtype"] = str(options["scorer_dtype"]).removeprefix("torch.")
    if options:
        args["tokenizer_cfg"] = options
    return args


def dart_scorer_cfg(defaults: dict, user_cfg: dict | None, img_size) -> dict:
    """The tokenizer options of a registered DART model: ``defaults`` (trunk, head) under the user's options.

    The paper's MobileNetV3 scorer sees the image at half resolution (224 for 448): its published FLOPs count that,
    so ``scorer_input_size`` defaults to half of ``img_size`` for those trunks (an explicit value wins).
    """
    cfg = {**defaults, **(user_cfg or {})}
    if cfg["trunk"].startswith("mobilenetv3"):
        half = img_size // 2 if isinstance(img_size, int) else tuple(side // 2 for side in img_size)
        cfg.setdefault("scorer_input_size", half)
    return cfg


def tokenizer_options(tokenizer_cfg: dict | None, dart_cfg: dict | None) -> dict:
    """The tokenizer's own options: ``tokenizer_cfg``, or its older name ``dart_cfg`` (recipes and saved
    checkpoints use it); not both."""
    if tokenizer_cfg and dart_cfg:
        raise ValueError("pass the tokenizer's options as tokenizer_cfg or dart_cfg (the same thing), not both")
    return dict(tokenizer_cfg or dart_cfg or {})


def registered_tokenizer_cfg(tokenizer, defaults: dict, options: dict, img_size, pretrained: bool) -> dict:
    """The tokenizer options of a registered DART model (``vim_*_dart``, ``deit_*_dart``).

    With the DART tokenizer (or a subclass): the size's scorer ``defaults`` (trunk, head) under the user's
    ``options`` (:func:`dart_scorer_cfg`), and a random trunk init when ``pretrained`` (the checkpoint holds it).
    With any other tokenizer (``tokenizer="grid"``, a user's own) those defaults are DART's, not its: the user's
    ``options`` pass as they are.
    """
    from ..tokenizer import DartTokenizer

    factory = tokenizer_class(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not (isinstance(factory, type) and issubclass(factory, DartTokenizer)):
        return dict(options)
    options = dict(options)
    if pretrained:
        options.setdefault("trunk_weights", "random")      # the checkpoint holds the scorer trunk
    return dart_scorer_cfg(defaults, options, img_size)


def _unexpected_keywords(factory, names) -> list[str]:
    """The ``names`` that ``factory`` does not take (none when it takes ``**kwargs`` or has no signature)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return sorted(name for name in names if name not in params)


def build_tokenizer(tokenizer, options: dict, **kwargs) -> Tokenizer:
    """The backbone's tokenizer: a registered name (``"grid"``, ``"dart"``, ...) or a Tokenizer class, built with
    the backbone's keywords (``kwargs``) and its own ``options``. A keyword the tokenizer does not take is a
    one-line TypeError naming it (not an error from deep inside its constructor)."""
    clash = sorted(set(options) & set(kwargs))
    if clash:
        raise ValueError(f"tokenizer_cfg: {clash} are model arguments; set them on the model, not in tokenizer_cfg")
    factory = tokenizer_class(tokenizer) if isinstance(tokenizer, str) else tokenizer
    label = f"tokenizer {tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, '__name__', tokenizer)!r}"
    unexpected = _unexpected_keywords(factory, options)
    if unexpected:
        raise TypeError(f"tokenizer_cfg: {label} does not take {unexpected} (options of another tokenizer?)")
    unexpected = _unexpected_keywords(factory, kwargs)
    if unexpected:
        hint = " (video backbones pass it: they need a video tokenizer)" if "num_frames" in unexpected else ""
        raise TypeError(f"{label} does not take {unexpected}, which the backbone passes{hint}")
    return create_tokenizer(tokenizer, **kwargs, **options)


# ---------------------------------------------------------------------------------------------------------------
# forward_intermediates
# ---------------------------------------------------------------------------------------------------------------
def split_prefix(tokens: Tensor, prefix_index: int) -> tuple[Tensor, Tensor]:
    """(B, 1 + M, D) with the class token at ``prefix_index`` -> (spatial (B, M, D), prefix (B, 1, D))."""
    prefix = tokens[:, prefix_index:prefix_index + 1]
    spatial = torch.cat([tokens[:, :prefix_index], tokens[:, prefix_index + 1:]], dim=1)
    return spatial, prefix


def package_intermediates(final: Tensor | None, intermediates: list[Tensor], prefix_index: int,
                          tokenizer: Tokenizer, output, output_fmt: str, intermediates_only: bool,
                          return_prefix_tokens: bool, output_dict: bool):
    """Everything after the block loop of a timm-style ``forward_intermediates``.

    ``output_fmt``: ``"NCHW"`` (feature maps: the tokenizer's ``to_feature_map``, e.g. DART tokens scattered onto
    the score grid) or ``"NLC"`` (tokens in the tokenizer's order). With ``output_dict`` the tokenizer's output
    (tokens, geometry, ...) is returned under its ``output_key`` (``"dart"`` for DART).
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    split = [split_prefix(t, prefix_index) for t in intermediates]
    prefixes = [prefix for _, prefix in split]
    spatial = [s for s, _ in split]
    if output_fmt == "NCHW":
        spatial = [tokenizer.to_feature_map(s, output) for s in spatial]
    if output_dict:
        result = {"image_intermediates": spatial}
        if return_prefix_tokens:
            result["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            result["image_features"] = final
        if tokenizer.output_key is not None:
            result[tokenizer.output_key] = output
        return result
    if return_prefix_tokens:
        spatial = list(zip(spatial, prefixes))
    return spatial if intermediates_only else (final, spatial)
