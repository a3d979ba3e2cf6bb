"""Argument checks of the backbones' constructors, made before anything is built: each error names the argument
and the range it must lie in (the tokenizer checks its own geometry, :mod:`dartmamba.tokenizer.validation`)."""
from __future__ import annotations

from ..tokenizer.validation import as_pair, is_positive_int

# argument -> what it is (for the message)
_POSITIVE_INTS = {"patch_size": "the side of a patch in pixels", "in_chans": "image channels",
                  "embed_dim": "the token width D", "d_state": "the SSM state size", "expand": "the Mamba expansion",
                  "d_conv": "the causal conv width", "num_heads": "attention heads"}
_NON_NEGATIVE_INTS = {"depth": "blocks", "num_classes": "head outputs (0: no head)"}
_RATES = ("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "patch_drop_rate")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_backbone_args(**args) -> None:
    """Check whichever of these a constructor was given: ``img_size`` (int or pair, >= 1), ``patch_size``,
    ``in_chans``, ``embed_dim``, ``d_state``, ``expand``, ``d_conv``, ``num_heads`` (ints >= 1, ``embed_dim``
    divisible by ``num_heads``), ``depth``, ``num_classes`` (ints >= 0), ``num_tokens`` (None or an int >= 1) and the
    dropout rates (in [0, 1)). Others are ignored. Raises ValueError (TypeError for a non-int size)."""
    if "img_size" in args:
        as_pair(args["img_size"], "img_size")
    for name, what in _POSITIVE_INTS.items():
        if name in args and not is_positive_int(args[name]):
            raise ValueError(f"{name} must be an int >= 1 ({what}), got {args[name]!r}")
    for name, what in _NON_NEGATIVE_INTS.items():
        if name in args and not (_is_int(args[name]) and args[name] >= 0):
            raise ValueError(f"{name} must be an int >= 0 ({what}), got {args[name]!r}")
    num_tokens = args.get("num_tokens")
    if num_tokens is not None and not is_positive_int(num_tokens):
        raise ValueError(f"num_tokens must be None (the tokenizer's default) or an int >= 1, got {num_tokens!r}")
    if "num_heads" in args and "embed_dim" in args and args["embed_dim"] % args["num_heads"]:
        raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={args['embed_dim']} and "
                         f"num_heads={args['num_heads']}")
    for name in _RATES:
        value = args.get(name)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
