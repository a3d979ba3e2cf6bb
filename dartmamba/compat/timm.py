"""timm internals dartmamba depends on (timm >= 1.0.29), each re-exported here and nowhere else.

- ``feature_take_indices`` (private ``timm.models._features``): the index rule of ``forward_intermediates`` that
  timm's own models use (``(num_features, indices) -> (sorted take indices, max index)``); not exported from
  ``timm.models``. Used by the models' ``forward_intermediates`` / ``prune_intermediate_layers``.
- ``resolve_pretrained_cfg``: public (``timm.models.resolve_pretrained_cfg``), no shim; re-exported so the model
  files take everything of timm's builder from one place. Used by ``models/_common.fetch_pretrained``.

Checkpoint digests need no timm internals: they travel inside the state dict (see :mod:`dartmamba.files`).
tests/compat/test_timm.py checks each name here against the installed timm, naming the shim when it changes.
"""
from __future__ import annotations

from timm.models import resolve_pretrained_cfg
from timm.models._features import feature_take_indices

__all__ = ["feature_take_indices", "resolve_pretrained_cfg"]
