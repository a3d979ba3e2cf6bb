"""Every use of another package's private API, in one place: one module per outside package.

- :mod:`.torch_internals`: torch APIs that are not public (or not yet stable).
- :mod:`.timm`: timm internals.
- :mod:`.mamba_ssm`: mamba-ssm's compiled extension and its private Triton layer norm.
- :mod:`.causal_conv1d`: the causal-conv1d package.
- :mod:`.deepspeed`: DeepSpeed internals.

Each shim has a test in ``tests/compat/`` that fails loudly, naming the shim, when the package changes under it.
Nothing here imports an optional package at import time.
"""
