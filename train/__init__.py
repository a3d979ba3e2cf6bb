"""dartmamba's training package (installed as ``dartmamba_train``; the source folder is ``train/``).

- :mod:`.config`: the typed run config, YAML recipes with ``_base_``, ``key=value`` overrides.
- :mod:`.distributed`: process group for one process or a launcher's many.
- :mod:`.data`: ImageFolder (timm) and the cluttered canvas (:mod:`dartmamba.data`), seeded per sample.
- :mod:`.engine`: DeepSpeed engine, timm optimizer / scheduler / mixup / EMA, compile, consolidated weights.
- :mod:`.checkpoint`: atomic DeepSpeed checkpoints + safetensors, resume (architecture and digests verified).
- :mod:`.deepspeed_keys`: unknown DeepSpeed keys found with DeepSpeed's own config code.
- :mod:`.lock`: one run per output directory (an OS lock held by rank 0).
- :mod:`.logs`: progress bar, steps.csv, summary.csv, TensorBoard.
- :mod:`.loop`: the checks before a run (``preflight``) and the run itself; :mod:`.cli`: the command line;
  :mod:`.demo`: the embedded demo.

Nothing here imports deepspeed at import time.
"""
