"""timm internals dartmamba depends on (timm >= 1.0.31), each re-exported or wrapped here and nowhere else.

- ``feature_take_indices`` (private ``timm.models._features``): the index rule of ``forward_intermediates`` that
  timm's own models use (``(num_features, indices) -> (sorted take indices, max index)``); not exported from
  ``timm.models``. Used by the models' ``forward_intermediates`` / ``prune_intermediate_layers``.
- ``resolve_pretrained_cfg``: public (``timm.models.resolve_pretrained_cfg``), no shim; re-exported so the model
  files take everything of timm's builder from one place. Used by ``models/_common.fetch_pretrained``.
- :func:`recorded_model_args`: the attribute under which timm (>= 1.0.31) keeps a model's construction arguments,
  ``_model_args``: ``timm.create_model`` writes the factory keywords into it once the model is built, and
  ``timm.models.get_model_args`` (public; behind ``save_for_hf`` / ``push_to_hf_hub``, which write it into
  config.json as ``model_args``) reads it. Our model classes define it as a property, so what a saved config
  records is what the model computes now (settings adopted from a loaded release file included), not only the
  keywords the factory saw. Nothing of timm is assigned or replaced: timm writes into our property.
- ``record_input_size`` (private ``timm.models._input.update_model_input_size``): what timm's own models call from
  ``set_input_size`` so the traits and ``model_args`` (``img_size``) follow a resize; ``VisionMamba.set_input_size``
  calls it (DeiT-DART gets it from timm's ``VisionTransformer.set_input_size``).

Checkpoint digests need no timm internals: they travel inside the state dict (see :mod:`dartmamba.files`).
tests/compat/test_timm.py checks each name here against the installed timm, naming the shim when it changes.
"""
from __future__ import annotations

from typing import Callable

import timm.models
from timm.models import resolve_pretrained_cfg
from timm.models._features import feature_take_indices

try:
    from timm.models._input import update_model_input_size as _update_model_input_size
except ImportError:        # timm < 1.0.31 (the GPU image's 1.0.29) keeps no input traits or model_args to update
    _update_model_input_size = None

__all__ = ["MODEL_ARGS_ATTRIBUTE", "RECORDS_MODEL_ARGS", "feature_take_indices", "record_input_size",
           "recorded_model_args", "resolve_pretrained_cfg"]

# timm >= 1.0.31 records construction arguments (create_model writes them, get_model_args / save_for_hf read them);
# older timm saves no model_args unless they are passed to save_for_hf, so a Hub round trip of non-default settings
# needs timm >= 1.0.31 (or dartmamba.hub.save_pretrained, which passes them itself)
RECORDS_MODEL_ARGS = hasattr(timm.models, "get_model_args")


def record_input_size(model, img_size) -> None:
    """timm's ``update_model_input_size(model, img_size)`` where timm has it (>= 1.0.31); nothing to record before."""
    if _update_model_input_size is not None:
        _update_model_input_size(model, img_size)

MODEL_ARGS_ATTRIBUTE = "_model_args"       # timm's name; a model class binds recorded_model_args(...) to it
_STORE = "_dartmamba_timm_model_args"      # where the property keeps what timm wrote (in the instance __dict__)


def recorded_model_args(effective: Callable[[object, dict], dict]) -> property:
    """A property to bind to :data:`MODEL_ARGS_ATTRIBUTE` in a model class body.

    timm's writes are kept as they are; a read returns ``effective(model, what timm wrote)`` (``{}`` before timm
    wrote anything, e.g. a model built by its class). ``effective`` must be idempotent: timm's
    ``update_model_args`` reads, updates and writes back."""

    def read(model) -> dict:
        return effective(model, dict(model.__dict__.get(_STORE, {})))

    def write(model, value) -> None:
        model.__dict__[_STORE] = dict(value)

    return property(read, write, doc="the model's construction arguments (timm's `model_args`), as it computes now")
