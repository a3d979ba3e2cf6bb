"""One place that chooses the implementation of every op with several backends.

Each op (``"resample"``, ``"scan"``, ``"conv1d"``, ``"rmsnorm"``, ...) registers its backends with an
availability check and a preference order. ``choose(op, tensor)`` returns the backend to run for a tensor's
device; ``"auto"`` takes the first available backend in preference order for that device. A backend can be
forced globally with :func:`set_backend`, temporarily with :func:`use_backend`, or from the environment with
``DARTMAMBA_<OP>_BACKEND=<name>`` (e.g. ``DARTMAMBA_SCAN_BACKEND=reference``). Forcing a backend that is not
available raises :class:`BackendUnavailableError` naming the reason.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here (missing package, wrong device)."""


@dataclass
class _Backend:
    name: str
    devices: tuple[str, ...]                    # device types it runs on ("cuda", "cpu")
    available: Callable[[], str | None]         # None when usable, else the reason it is not
    fallback_warning: str | None = None         # warned once when "auto" passes over it on a device it targets


@dataclass
class _Op:
    backends: list[_Backend] = field(default_factory=list)
    forced: str | None = None


_OPS: dict[str, _Op] = {}
_WARNED: set[tuple[str, str]] = set()


def cached_check(check: Callable[[], str | None]) -> Callable[[], str | None]:
    """Wrap an availability check (``None`` when usable, else the reason) so it runs once per process.

    Under ``torch.compile`` the wrapped check is not traced: dynamo calls it at trace time and takes its result as a
    constant (``torch.compiler.assume_constant_result``), so probing an optional extension never breaks a graph.
    """
    cache: dict[str, str | None] = {}

    @functools.wraps(check)
    def cached() -> str | None:
        if "reason" not in cache:
            cache["reason"] = check()
        return cache["reason"]

    return torch.compiler.assume_constant_result(cached)


def cuda_extension_check(load: Callable[[], object], what: str, package: str) -> Callable[[], str | None]:
    """A :func:`cached_check` for an optional CUDA extension: ``None`` when CUDA is available and ``load()`` imports
    the extension, else the reason, naming ``what`` failed and the pip ``package`` of the ``cuda`` extra."""

    def check() -> str | None:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        try:
            load()
        except Exception as exc:  # a missing or mismatched build (undefined symbols) must not break the other paths
            return (f"cannot import {what} ({type(exc).__name__}: {exc}); install the `cuda` extra "
                    f"(pip install {package})")
        return None

    check.__name__ = f"{package.replace('-', '_')}_unavailable"
    return cached_check(check)


def register_backend(op: str, name: str, devices: tuple[str, ...], available: Callable[[], str | None] = lambda: None,
                     fallback_warning: str | None = None) -> None:
    """Register a backend; registration order is the preference order for "auto"."""
    entry = _OPS.setdefault(op, _Op())
    entry.backends = [b for b in entry.backends if b.name != name]
    entry.backends.append(_Backend(name, devices, available, fallback_warning))


def backend_names(op: str) -> list[str]:
    return [b.name for b in _op(op).backends]


def _op(op: str) -> _Op:
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    return _OPS[op]


def set_backend(op: str, name: str | None) -> None:
    """Force ``name`` for ``op`` everywhere (``None`` or ``"auto"`` restores automatic choice)."""
    entry = _op(op)
    if name in (None, "auto"):
        entry.forced = None
        return
    if name not in backend_names(op):
        raise ValueError(f"backend for {op!r} must be one of {['auto', *backend_names(op)]}, got {name!r}")
    entry.forced = name


def get_backend(op: str) -> str:
    entry = _op(op)
    env = os.environ.get(f"DARTMAMBA_{op.upper()}_BACKEND")
    if entry.forced is not None:
        return entry.forced
    if env and env != "auto":
        if env not in backend_names(op):
            raise ValueError(f"DARTMAMBA_{op.upper()}_BACKEND must be one of "
                             f"{['auto', *backend_names(op)]}, got {env!r}")
        return env
    return "auto"


@contextlib.contextmanager
def use_backend(op: str, name: str | None) -> Iterator[None]:
    entry = _op(op)
    previous = entry.forced
    set_backend(op, name)
    try:
        yield
    finally:
        entry.forced = previous


def choose(op: str, device: torch.device | str, requested: str | None = None) -> str:
    """The backend to run ``op`` on ``device``: ``requested`` (if given) > forced setting > automatic."""
    entry = _op(op)
    device_type = torch.device(device).type
    name = requested if requested not in (None, "auto") else get_backend(op)
    if name != "auto":
        backend = next((b for b in entry.backends if b.name == name), None)
        if backend is None:
            raise ValueError(f"backend for {op!r} must be one of {['auto', *backend_names(op)]}, got {name!r}")
        if device_type not in backend.devices:
            raise BackendUnavailableError(
                f"{op} backend {name!r} runs on {'/'.join(backend.devices)} tensors, got a {device_type} tensor")
        reason = backend.available()
        if reason is not None:
            raise BackendUnavailableError(f"{op} backend {name!r} is not available: {reason}")
        return name
    for backend in entry.backends:
        if device_type not in backend.devices:
            continue
        reason = backend.available()
        if reason is None:
            return backend.name
        if backend.fallback_warning and (op, backend.name) not in _WARNED:
            _WARNED.add((op, backend.name))
            warnings.warn(f"{backend.fallback_warning} ({reason})", RuntimeWarning, stacklevel=3)
    raise BackendUnavailableError(f"no {op} backend runs on {device_type} tensors")
