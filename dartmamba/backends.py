"""One registry that owns the implementations of every op with several backends, and one dispatch that chooses.

An op (``"scan"``, ``"conv1d"``, ``"rmsnorm"``, ``"partition"``, ``"resample"``, ``"posembed"``, ...) has backends
registered next to their implementations, in preference order. Each registration holds

- the callable itself (every backend of an op takes the same arguments),
- the device types it serves (``("cuda",)``, :data:`ANY_DEVICE`, ...),
- an availability check (``None`` when usable, else the reason; it runs once per process and is a constant under
  ``torch.compile``),
- an optional ``supports(*args, **kwargs)`` check of the inputs (shapes, dtypes, grad mode): ``None`` when the
  backend can take them, else the reason it cannot; it reads metadata only, never tensor values (no host sync);
- its **capabilities**: the layout modes of the op it handles itself (e.g. the scan's ``"reverse"``,
  ``"low_rank_delta"``, ``"any_strides"``). An op declares its modes once with :func:`declare_modes`, each with
  one generic adapter that emulates it (flip the sequences, multiply out the low-rank factor, make the sequences
  unit-stride); a backend registered without a mode gets that adapter wrapped around it at registration, so every
  backend takes every mode and callers never test which backend or device they run on.

:func:`dispatch` chooses and calls, with one rule for every op:

- a backend **forced** by the ``backend=`` argument, :func:`set_backend` / :func:`use_backend`, or the environment
  variable ``DARTMAMBA_<OP>_BACKEND`` (in that order of precedence) runs, or raises
  :class:`BackendUnavailableError` naming the op, the backend and the reason it cannot (device, availability or
  inputs);
- ``"auto"`` takes the first registered backend whose device, availability and ``supports`` all pass; passing over
  a backend that is *missing* on a device it targets (a CUDA extension that does not import) warns once per process
  when the registration gives a ``fallback_warning``.

Registering a backend::

    backends.register("scan", "torch", selective_scan_torch, devices=backends.ANY_DEVICE)
    backends.register("scan", "cpp", scan_cpp, devices=("cpu",), available=cpu_kernels_unavailable,
                      capabilities={"reverse", "low_rank_delta", "any_strides"})
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

__all__ = ["ANY_DEVICE", "Backend", "BackendUnavailableError", "register", "dispatch", "resolve", "choose",
           "implementations", "backend_names", "ops", "set_backend", "get_backend", "use_backend", "allow_device",
           "cached_check", "cuda_extension_check", "module_check", "declare_modes", "capabilities"]

ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")    # "meta": shapes only (sizes, FLOP counts)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here (missing package, wrong device, inputs it does not take)."""


@dataclass
class Backend:
    """One registered implementation of an op."""

    op: str
    name: str
    fn: Callable
    devices: tuple[str, ...]
    available: Callable[[], str | None]                 # None when usable, else the reason (cached)
    supports: Callable[..., str | None] | None = None   # None when it takes the inputs, else the reason
    fallback_warning: str | None = None                 # warned once when "auto" passes over it as unavailable
    capabilities: frozenset[str] = frozenset()         # the op's modes this backend handles itself
    raw: Callable | None = None                         # as registered; ``fn`` adds the adapters of missing modes

    def __post_init__(self):
        if self.raw is None:
            self.raw = self.fn

    def cannot_run(self, device_type: str, args: tuple = (), kwargs: dict | None = None,
                   check_inputs: bool = True) -> str | None:
        """Why this backend cannot run on ``device_type`` with these inputs (a phrase that completes
        "<op> backend '<name>' ..."), or None when it can."""
        if device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, got a {device_type} tensor"
        reason = self.available()
        if reason is not None:
            return f"is not available: {reason}"
        if check_inputs and self.supports is not None:
            reason = self.supports(*args, **(kwargs or {}))
            if reason is not None:
                return f"cannot take these inputs: {reason}"
        return None


@dataclass
class _Op:
    backends: list[Backend] = field(default_factory=list)
    forced: str | None = None
    modes: dict[str, Callable[[Callable], Callable]] = field(default_factory=dict)   # mode -> adapter


_OPS: dict[str, _Op] = {}
_WARNED: set[tuple[str, str]] = set()


# ----------------------------------------------------------------------------------------------------------------
# Availability checks
# ----------------------------------------------------------------------------------------------------------------
def cached_check(check: Callable[[], str | None]) -> Callable[[], str | None]:
    """Wrap an availability check (``None`` when usable, else the reason) so it runs once per process.

    Under ``torch.compile`` the wrapped check is not traced: dynamo calls it at trace time and takes its result as a
    constant (``torch.compiler.assume_constant_result``), so probing an optional extension never breaks a graph.
    Wrapping twice is harmless (the wrapper is returned as is).
    """
    if getattr(check, "_dartmamba_cached", False):
        return check
    cache: dict[str, str | None] = {}

    @functools.wraps(check)
    def cached() -> str | None:
        if "reason" not in cache:
            cache["reason"] = check()
        return cache["reason"]

    cached._dartmamba_cached = True
    wrapped = torch.compiler.assume_constant_result(cached)
    wrapped._dartmamba_cached = True
    return wrapped


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


def module_check(module: str, what: str) -> Callable[[], str | None]:
    """A :func:`cached_check` that imports ``module`` (e.g. ``"dartmamba_kernels.resample"``): ``None`` when it
    imports, else the reason, naming ``what``."""

    def check() -> str | None:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a missing or broken triton must not break the torch path
            return f"cannot import {what} ({type(exc).__name__}: {exc})"
        return None

    check.__name__ = f"{module.rsplit('.', 1)[-1]}_unavailable"
    return cached_check(check)


def _always_available() -> None:
    return None


# ----------------------------------------------------------------------------------------------------------------
# Registration and settings
# ----------------------------------------------------------------------------------------------------------------
def declare_modes(op: str, adapters: dict[str, Callable[[Callable], Callable]]) -> None:
    """Declare the layout modes of ``op`` and the generic adapter of each: ``adapter(fn)`` returns ``fn`` taking that
    mode too (emulated, e.g. by flipping). Adapters apply outermost first in the dict's order. Backends registered
    already are wrapped again."""
    entry = _OPS.setdefault(op, _Op())
    entry.modes = dict(adapters)
    entry.backends = [_adapted(entry, b.op, b.name, b.raw, devices=b.devices, available=b.available,
                               supports=b.supports, fallback_warning=b.fallback_warning,
                               capabilities=b.capabilities) for b in entry.backends]


def _adapted(entry: _Op, op: str, name: str, fn: Callable, *, capabilities, **fields) -> Backend:
    capabilities = frozenset(capabilities or ())
    unknown = sorted(capabilities - set(entry.modes))
    if unknown:
        raise ValueError(f"{op} backend {name!r}: capabilities must be among the op's modes "
                         f"{sorted(entry.modes)}, got {unknown}")
    call = fn
    for mode, adapter in reversed(entry.modes.items()):
        if mode not in capabilities:
            call = adapter(call)
    return Backend(op, name, call, raw=fn, capabilities=capabilities, **fields)


def register(op: str, name: str, fn: Callable, *, devices: tuple[str, ...],
             available: Callable[[], str | None] | None = None, supports: Callable[..., str | None] | None = None,
             fallback_warning: str | None = None, capabilities=()) -> Callable:
    """Register ``fn`` as backend ``name`` of ``op``; registration order is the preference order of ``"auto"``.

    ``capabilities``: the op's modes (see :func:`declare_modes`) ``fn`` handles itself; the others are adapted.
    Registering a name again replaces that backend in place (its preference is kept). Returns the callable that
    runs (``fn`` with the adapters of the modes it lacks).
    """
    if name == "auto":
        raise ValueError(f"{op}: 'auto' is not a backend name")
    entry = _OPS.setdefault(op, _Op())
    backend = _adapted(entry, op, name, fn, devices=tuple(devices),
                       available=cached_check(available or _always_available), supports=supports,
                       fallback_warning=fallback_warning, capabilities=capabilities)
    for i, old in enumerate(entry.backends):
        if old.name == name:
            entry.backends[i] = backend
            break
    else:
        entry.backends.append(backend)
    return backend.fn


def ops() -> list[str]:
    """Every op with registered backends."""
    return sorted(_OPS)


def implementations(op: str) -> list[Backend]:
    """The registered backends of ``op`` in preference order."""
    return list(_op(op).backends)


def backend_names(op: str) -> list[str]:
    return list(dict.fromkeys(b.name for b in _op(op).backends))


def _op(op: str) -> _Op:
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    return _OPS[op]


def _check_name(op: str, name: str, source: str) -> None:
    if name not in backend_names(op):
        raise ValueError(f"{source} must be one of {['auto', *backend_names(op)]}, got {name!r}")


def set_backend(op: str, name: str | None) -> None:
    """Force ``name`` for ``op`` everywhere (``None`` or ``"auto"`` restores automatic choice)."""
    entry = _op(op)
    if name in (None, "auto"):
        entry.forced = None
        return
    _check_name(op, name, f"backend for {op!r}")
    entry.forced = name


def get_backend(op: str) -> str:
    """The process-wide setting of ``op``: a forced name (:func:`set_backend`, then the environment) or ``"auto"``."""
    entry = _op(op)
    if entry.forced is not None:
        return entry.forced
    variable = f"DARTMAMBA_{op.upper()}_BACKEND"
    env = os.environ.get(variable)
    if env and env != "auto":
        _check_name(op, env, variable)
        return env
    return "auto"


@contextlib.contextmanager
def use_backend(op: str, name: str | None) -> Iterator[None]:
    """Force ``name`` for ``op`` inside the block."""
    entry = _op(op)
    previous = entry.forced
    set_backend(op, name)
    try:
        yield
    finally:
        entry.forced = previous


@contextlib.contextmanager
def allow_device(op: str, name: str, device_type: str, prefer: bool = False) -> Iterator[None]:
    """Let backend ``name`` of ``op`` also serve ``device_type`` inside the block (e.g. the Triton kernels on CPU
    tensors under ``TRITON_INTERPRET=1``, for tests and smoke runs). On that device it comes last in preference
    order (it runs when forced), or first with ``prefer=True`` (``"auto"`` takes it); other devices are unchanged."""
    entry = _op(op)
    _check_name(op, name, f"backend for {op!r}")
    saved = list(entry.backends)
    backend = next(b for b in saved if b.name == name)
    extra = dataclasses.replace(backend, devices=(device_type,))
    entry.backends = [extra, *saved] if prefer else [*saved, extra]
    try:
        yield
    finally:
        entry.backends = saved


# ----------------------------------------------------------------------------------------------------------------
# Choice
# ----------------------------------------------------------------------------------------------------------------
def _warn_fallback(op: str, backend: Backend, reason: str) -> None:
    if backend.fallback_warning and (op, backend.name) not in _WARNED:
        _WARNED.add((op, backend.name))
        warnings.warn(f"{backend.fallback_warning} ({reason})", RuntimeWarning, stacklevel=4)


def resolve(op: str, device: torch.device | str, *args, backend: str | None = None, check_inputs: bool = True,
            **kwargs) -> Backend:
    """The backend :func:`dispatch` would run ``op`` with for these inputs on ``device`` (see the module docstring).

    ``check_inputs=False`` skips the ``supports`` checks (which backend a device gets in general).
    """
    entry = _op(op)
    device_type = torch.device(device).type
    name = backend if backend not in (None, "auto") else get_backend(op)
    if name != "auto":
        _check_name(op, name, f"backend for {op!r}")
        named = [b for b in entry.backends if b.name == name]
        chosen = next((b for b in named if device_type in b.devices), named[0])
        reason = chosen.cannot_run(device_type, args, kwargs, check_inputs)
        if reason is not None:
            raise BackendUnavailableError(f"{op} backend {name!r} {reason}")
        return chosen
    for candidate in entry.backends:
        if device_type not in candidate.devices:
            continue
        missing = candidate.available()
        if missing is not None:
            _warn_fallback(op, candidate, missing)
            continue
        if check_inputs and candidate.supports is not None and candidate.supports(*args, **kwargs) is not None:
            continue
        return candidate
    raise BackendUnavailableError(f"no {op} backend runs on {device_type} tensors with these inputs "
                                  f"(registered: {backend_names(op)})")


def dispatch(op: str, device: torch.device | str, *args, backend: str | None = None, **kwargs):
    """Run ``op`` on its chosen backend: ``resolve(op, device, *args, backend=backend, **kwargs).fn(*args,
    **kwargs)`` (the backend with the adapters of the modes it lacks).

    ``device`` is the device of the op's inputs (the choice depends on its type only).
    """
    return resolve(op, device, *args, backend=backend, **kwargs).fn(*args, **kwargs)


def choose(op: str, device: torch.device | str, requested: str | None = None) -> str:
    """The name of the backend ``op`` gets on ``device`` in general (inputs not considered): for reports."""
    return resolve(op, device, backend=requested, check_inputs=False).name


def capabilities(op: str, device: torch.device | str, requested: str | None = None) -> frozenset[str]:
    """The modes the backend ``op`` gets on ``device`` in general handles itself (the rest are adapted): lets a
    layer choose between two equivalent formulations by what the chosen backend does natively."""
    return resolve(op, device, backend=requested, check_inputs=False).capabilities
