"""Importing only defines and registers: nothing at import time may need CUDA, mamba-ssm, causal-conv1d, deepspeed
or triton, run autograd, or change loggers, thread counts, warning filters or the environment."""
import subprocess
import sys
import textwrap

from tests.helpers import RECORD_AUTOGRAD_CALLS


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_package_imports_and_runs_without_optional_packages():
    result = _run("""
        import sys
        for name in ("triton", "mamba_ssm", "causal_conv1d", "deepspeed", "selective_scan_cuda"):
            sys.modules[name] = None          # any import of these now raises ImportError
        import torch, timm
        import dartmamba
        from dartmamba import backends
        model = timm.create_model("vim_tiny_dart", img_size=32, patch_size=4, grid_size=4, embed_dim=16, depth=1,
                                  num_classes=3, dart_cfg=dict(trunk="tiny_cnn"))
        out = model(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 3)
        assert backends.choose("resample", "cpu") == "torch"
        cpp = next(b for b in backends.implementations("scan") if b.name == "cpp")
        assert backends.choose("scan", "cpu") == ("torch" if cpp.available() else "cpp")
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# The state an import could change, recorded before and after `import dartmamba, dartmamba_kernels, dartmamba_train`.
# The outside packages those import are imported first, so that only our own modules' import-time effects are seen
# (deepspeed, for one, sets its own logger's level when it is imported). Every module of the three packages is
# imported (pkgutil.walk_packages), not only the packages. Autograd is seen through Python's profiling hooks
# (tests.helpers.RECORD_AUTOGRAD_CALLS: calls of torch.autograd.backward / grad in any thread; nothing is replaced).
_IMPORT_PROBE = """
    import logging, os, sys, warnings
    import torch, timm, timm.data, timm.optim, yaml, safetensors
    for optional in ("deepspeed", "triton", "pydantic"):
        try:
            __import__(optional)
        except ImportError:
            pass
    import pkgutil, threading
    __RECORDER__
    def loggers():
        state = {"<root>": (logging.root.level, tuple(map(id, logging.root.handlers)))}
        for name, logger in logging.root.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                state[name] = (logger.level, logger.disabled, logger.propagate, tuple(map(id, logger.handlers)))
        return state

    def import_everything():
        import dartmamba, dartmamba_kernels, dartmamba_train
        for package in (dartmamba, dartmamba_kernels, dartmamba_train):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                __import__(info.name)

    before = dict(loggers=loggers(), threads=(torch.get_num_threads(), torch.get_num_interop_threads()),
                  environ=dict(os.environ), filters=list(warnings.filters), grad=torch.is_grad_enabled())
    if __IMPORT__:
        import_everything()
    __MORE__
    stop_recording()
    after_loggers = loggers()
    changed = {name: (before["loggers"][name], state) for name, state in after_loggers.items()
               if name in before["loggers"] and before["loggers"][name] != state}
    new_with_level = {name: state for name, state in after_loggers.items()
                      if name not in before["loggers"] and (state[0] != logging.NOTSET or state[3])}
    problems = []
    if autograd_calls:
        problems.append(f"autograd ran at import: {autograd_calls}")
    if changed or new_with_level:
        problems.append(f"loggers changed at import: {changed} {new_with_level}")
    if (torch.get_num_threads(), torch.get_num_interop_threads()) != before["threads"]:
        problems.append(f"thread counts changed at import: {before['threads']} -> "
                        f"{(torch.get_num_threads(), torch.get_num_interop_threads())}")
    env_changed = {k for k in set(os.environ) | set(before["environ"]) if os.environ.get(k) != before["environ"].get(k)}
    if env_changed:
        problems.append(f"environment variables changed at import: {sorted(env_changed)}")
    if list(warnings.filters) != before["filters"]:
        problems.append(f"warning filters changed at import: {warnings.filters[:3]}")
    if torch.is_grad_enabled() != before["grad"]:
        problems.append("grad mode changed at import")
    print("PROBLEMS:" + " | ".join(problems) if problems else "clean")
"""


def _probe(more: str = "pass", import_everything: bool = True) -> str:
    code = textwrap.dedent(_IMPORT_PROBE).replace("__RECORDER__", RECORD_AUTOGRAD_CALLS)
    code = code.replace("__IMPORT__", str(import_everything)).replace("__MORE__", more)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_importing_runs_no_autograd_and_changes_no_global_state():
    """`import dartmamba, dartmamba_kernels, dartmamba_train` and every module inside them runs no autograd and leaves loggers, thread counts, warning filters and the environment as they were."""
    assert _probe() == "clean"


def test_the_import_probe_sees_each_kind_of_side_effect():
    """The probe above is not blind: each kind of change, made inside the import block, is reported."""
    cases = {
        "x = torch.ones(2, requires_grad=True); (x * x).sum().backward()": "autograd ran at import",
        "x = torch.ones(2, requires_grad=True); torch.autograd.grad((x * x).sum(), x)": "autograd ran at import",
        "x = torch.ones(2, requires_grad=True); t = threading.Thread(target=lambda: (x * x).sum().backward()); "
        "t.start(); t.join()": "autograd ran at import",
        "logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)": "loggers changed at import",
        "torch.set_num_threads(max(1, torch.get_num_threads() + 1))": "thread counts changed at import",
        "os.environ['DARTMAMBA_PROBE_X'] = '1'": "environment variables changed at import",
        "warnings.simplefilter('ignore')": "warning filters changed at import",
    }
    for statement, expected in cases.items():
        outcome = _probe(statement, import_everything=False)
        assert outcome.startswith("PROBLEMS:") and expected in outcome, (statement, outcome)
