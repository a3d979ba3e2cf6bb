"""dartmamba.ops._jit: loading the kernels quiets torch's extension logger for that call only, and runs every
after_load registration once with the library's namespace."""
import logging

from dartmamba.ops import _jit


def test_loading_scopes_the_logger_and_runs_the_registrations(monkeypatch):
    logger = logging.getLogger("torch.utils.cpp_extension")
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        _check_loading(monkeypatch, logger)
    finally:
        logger.setLevel(previous)


def _check_loading(monkeypatch, logger):
    seen = []

    def fake_load():
        seen.append(("level during load", logger.level))
        return "dartmamba_cpu_probe"

    monkeypatch.setattr(_jit, "_LOADED", {})
    monkeypatch.setattr(_jit, "_AFTER_LOAD", [])
    monkeypatch.setattr(_jit, "_load", fake_load)
    _jit.after_load(lambda namespace: seen.append(("registered", namespace)))
    _jit.cpu_kernels()
    _jit.cpu_kernels()                                              # cached: neither runs again
    assert seen == [("level during load", logging.ERROR), ("registered", "dartmamba_cpu_probe")]
    assert logger.level == logging.INFO                             # restored
    _jit.after_load(lambda namespace: seen.append(("late", namespace)))
    assert seen[-1] == ("late", "dartmamba_cpu_probe")              # registered after the load: at once
