"""DeepSpeed internals dartmamba's training depends on (DeepSpeed 0.16 - 0.19), used here and nowhere else.

- :func:`disable_cpu_shm_comm`: on CPU, DeepSpeed's ``TorchBackend`` JIT-builds its shared-memory all-reduce op
  (``deepspeed_shm_comm``, about 100 s on 2 cores) when the process group starts, whenever the op's entry in
  ``deepspeed.ops.__compatible_ops__`` is true. DeepSpeed has no public switch for it (``DS_BUILD_SHM_COMM`` acts
  only when DeepSpeed itself is pip-installed), so the entry is set to False and gloo does the all-reduce.
- :func:`recorded_config_keys`: the top-level keys ``DeepSpeedConfig`` looks up while it parses a config. It is
  handed a dict subclass that records lookups: DeepSpeed reads its config with ``[]`` / ``get`` / ``in`` /
  ``pop`` on the mapping it is given. A key it never looked up is one it ignores.
- :data:`READ_BY_INITIALIZE`: top-level keys that ``deepspeed.initialize`` reads itself, not ``DeepSpeedConfig``.
- :func:`config_models`: DeepSpeed's pydantic section models (subclasses of
  ``deepspeed.runtime.config_utils.DeepSpeedConfigModel``), for the valid keys of a section.
- :func:`unfused_master_copies`: the fp32 master weights of DeepSpeed's unfused fp16/bf16 optimizer
  (``FP16_UnfusedOptimizer``: ZeRO-0 with bf16 weights), kept in its ``fp16_groups`` / ``fp32_groups`` lists;
  ``deepspeed.utils.safe_get_full_fp32_param`` does not reach them.

Each has a test in ``tests/compat/test_deepspeed.py`` that names it when DeepSpeed changes under it. Nothing here
imports deepspeed at import time.
"""
from __future__ import annotations

import copy
from collections.abc import KeysView

import torch

__all__ = ["READ_BY_INITIALIZE", "disable_cpu_shm_comm", "recorded_config_keys", "config_models",
           "unfused_master_copies"]

READ_BY_INITIALIZE = ("sequence_parallel_size", "data_parallel_size")


def disable_cpu_shm_comm() -> bool:
    """Keep DeepSpeed from building its shared-memory comm op (see the module docstring); call before
    ``deepspeed.init_distributed``. Returns True when the op was switched off, False where this DeepSpeed has no
    such op for the current accelerator or no ``__compatible_ops__`` dict (then DeepSpeed builds it if it can)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is None or not isinstance(compatible, dict):
        return False
    compatible[builder.NAME] = False
    return True


class _Recorder(dict):
    """A dict that remembers the keys looked up in it (``[]``, ``get``, ``in``, ``pop``, ``setdefault``, ``in
    keys()``); iterating it does not count. Survives ``copy.copy`` (the set is shared)."""

    def __init__(self, data: dict, seen: set | None = None):
        super().__init__(data)
        self.seen = set() if seen is None else seen

    def _saw(self, key):
        self.seen.add(key)
        return key

    def __getitem__(self, key):
        return super().__getitem__(self._saw(key))

    def __contains__(self, key):
        return super().__contains__(self._saw(key))

    def get(self, key, default=None):
        return super().get(self._saw(key), default)

    def pop(self, key, *default):
        return super().pop(self._saw(key), *default)

    def setdefault(self, key, default=None):
        return super().setdefault(self._saw(key), default)

    def keys(self):
        return _RecordedKeys(self)

    def __copy__(self):
        return _Recorder(self, self.seen)


class _RecordedKeys(KeysView):
    def __contains__(self, key):
        return key in self._mapping

    def __iter__(self):
        return dict.__iter__(self._mapping)


def recorded_config_keys(ds: dict) -> set:
    """Parse ``ds`` (a DeepSpeed config dict; not modified) with the installed DeepSpeed's ``DeepSpeedConfig`` (no
    process group needed) and return the top-level keys it looked up, plus :data:`READ_BY_INITIALIZE`. DeepSpeed's
    own errors propagate (``pydantic.ValidationError`` for a bad section, ``AssertionError`` / ``ValueError`` for
    others)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _Recorder(copy.deepcopy(ds))
    DeepSpeedConfig(probe)
    return probe.seen | set(READ_BY_INITIALIZE)


def config_models() -> list:
    """Every pydantic model class of DeepSpeed's config sections (``DeepSpeedConfigModel`` and its subclasses)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo, seen = [DeepSpeedConfigModel], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def unfused_master_copies(optimizer) -> dict:
    """``{id(low-precision parameter): its fp32 master}`` for DeepSpeed's unfused fp16/bf16 optimizer; empty for
    any other optimizer (or where the two group lists do not pair up tensor by tensor)."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not (isinstance(low, list) and isinstance(high, list) and len(low) == len(high)):
        return {}
    pairs = {}
    for low_group, high_group in zip(low, high):
        if not (isinstance(low_group, list) and isinstance(high_group, list) and len(low_group) == len(high_group)):
            return {}
        for lp, hp in zip(low_group, high_group):
            if not (torch.is_tensor(lp) and torch.is_tensor(hp) and lp.shape == hp.shape):
                return {}
            pairs[id(lp)] = hp
    return pairs
