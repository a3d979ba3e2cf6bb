"""Unknown DeepSpeed keys are errors, found with DeepSpeed's own config code, before anything starts.

DeepSpeed ignores top-level keys it does not read (``bogus_key: 1`` passes silently) and reports unknown keys of
its pydantic sections (``zero_optimization.stagee``) as a multi-line ``ValidationError``. :func:`check_deepspeed_keys`
runs the installed DeepSpeed's ``DeepSpeedConfig`` on the run's config (no process group needed) and gets the keys
it looked up (:func:`dartmamba.compat.deepspeed.recorded_config_keys`): a top-level key it never looked up is
unknown; a pydantic error becomes one line naming the key, the closest valid spelling (from the pydantic model's
fields) and the valid keys. Both come from the installed DeepSpeed, so they stay true across its versions. Keys
inside non-pydantic sections (``activation_checkpointing``, ``flops_profiler``, ...) are not checked: DeepSpeed
reads some of them only when others are set.
"""
from __future__ import annotations

import difflib
import typing

from .config import ConfigError

__all__ = ["check_deepspeed_keys"]


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
        from dartmamba.compat.deepspeed import config_models

        fields = set()
        for model in config_models():
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
        import deepspeed  # noqa: F401
        import pydantic
    except ImportError:
        return
    from dartmamba.compat.deepspeed import recorded_config_keys

    # train_batch_size: DeepSpeed derives it for the world it sees (1 before the group exists)
    probe = {key: value for key, value in ds.items() if key != "train_batch_size"}
    try:
        known = recorded_config_keys(probe) | {"train_batch_size"}
    except pydantic.ValidationError as err:
        raise ConfigError(_pydantic_error(err, ds, origin_of)) from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{origin_of('')}: DeepSpeed rejects the config: {_one_line(err)}") from None
    for key in ds:
        if key not in known:
            raise ConfigError(f"{origin_of(key)}: unknown DeepSpeed key {key!r}{_suggest(key, known, '')} "
                              f"(DeepSpeed would ignore it)")
