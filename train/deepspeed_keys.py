"""Unknown DeepSpeed keys are errors, found with DeepSpeed's own config code, before anything starts.

DeepSpeed ignores top-level keys it does not read (``bogus_key: 1`` passes silently) and reports unknown keys of
its pydantic sections (``zero_optimization.stagee``) as a multi-line ``ValidationError``. :func:`check_deepspeed_keys`
runs the installed DeepSpeed's ``DeepSpeedConfig`` on the run's config (no process group needed) with mappings
that record every key DeepSpeed looks up: a top-level key it never looked up is unknown; a pydantic error becomes
one line naming the key, the closest valid spelling (from the pydantic model's fields) and the valid keys. Both
come from the installed DeepSpeed, so they stay true across its versions. Keys inside non-pydantic sections
(``activation_checkpointing``, ``flops_profiler``, ...) are not checked: DeepSpeed reads some of them only when
others are set.
"""
from __future__ import annotations

import copy
import difflib
import typing
from collections.abc import KeysView
from .config import ConfigError

__all__ = ["check_deepspeed_keys"]

# top-level keys read by deepspeed.initialize itself rather than by DeepSpeedConfig (DeepSpeed 0.16 - 0.19)
_READ_BY_INITIALIZE = ("sequence_parallel_size", "data_parallel_size")


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


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _suggest(key: str, options, prefix: str) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _holds(mapping, path: tuple) -> bool:
    for part in path:
        if not isinstance(mapping, dict) or part not in mapping:
            return False
        mapping = mapping[part]
    return True


def _pydantic_models():
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo, seen = [DeepSpeedConfigModel], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def _sub_model(annotation):
    """The pydantic model class inside a field annotation (``Model``, ``Optional[Model]``, ...), or None."""
    import pydantic

    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _sub_model(arg)
        if found is not None:
            return found
    return None


def _field_names(model, path: tuple) -> set[str]:
    """Field names and aliases of the model at ``path`` below ``model`` (empty when the path leaves the models)."""
    for part in path:
        fields = {**model.model_fields, **{f.alias: f for f in model.model_fields.values() if f.alias}}
        model = _sub_model(fields[part].annotation) if part in fields else None
        if model is None:
            return set()
    return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def _pydantic_error(err, ds: dict, origin_of) -> str:
    first = err.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    section = next((key for key, value in ds.items() if isinstance(value, dict) and loc and _holds(value, loc)), None)
    path = ".".join((section, *loc) if section else loc)
    origin = origin_of(path)
    if first["type"] == "extra_forbidden" and loc:
        fields = set()
        for model in _pydantic_models():
            if model.__name__ == err.title:
                fields |= _field_names(model, loc[:-1])
        parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
        listing = f"; valid keys under {parent.rstrip('.')}: {', '.join(sorted(fields))}" if fields and parent else ""
        return f"{origin}: unknown DeepSpeed key {path!r}{_suggest(loc[-1], fields, parent)}{listing}"
    got = f" (got {first['input']!r})" if "input" in first and loc else ""
    return f"{origin}: {path or err.title}: {_one_line(first['msg'])}{got}"


def check_deepspeed_keys(ds: dict, overrides: dict, source: str) -> None:
    """Raise ConfigError when DeepSpeed would ignore or reject a key of ``ds`` (the final DeepSpeed config, built
    from the JSON file ``source`` and ``deepspeed.overrides``; the message names which one the key came from). A
    no-op where DeepSpeed is not installed.
    """
    def origin_of(key: str) -> str:
        if not key:
            return "deepspeed"
        return "deepspeed.overrides" if _holds(overrides, tuple(key.split("."))) else f"deepspeed.config {source}"

    try:
        import pydantic
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return
    probe = _Recorder(copy.deepcopy(ds))
    probe.pop("train_batch_size", None)    # DeepSpeed derives it for the world it sees (1 before the group exists)
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as err:
        raise ConfigError(_pydantic_error(err, ds, origin_of)) from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{origin_of('')}: DeepSpeed rejects the config: {_one_line(err)}") from None
    known = probe.seen | set(_READ_BY_INITIALIZE)
    for key in ds:
        if key not in known:
            raise ConfigError(f"{origin_of(key)}: unknown DeepSpeed key {key!r}{_suggest(key, known, '')} "
                              f"(DeepSpeed would ignore it)")
