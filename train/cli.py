"""Command line: ``dartmamba-train`` / ``python -m dartmamba_train.train`` / ``deepspeed train/train.py``.

    dartmamba-train --config vim_tiny_dart data.root=/data/imagenet train.epochs=300
    dartmamba-train --config demo/vim_dart output.dir=outputs/demo/vim_dart
    dartmamba-train --config myconfigs/my_recipe.yaml --print-config
    deepspeed train/train.py --config vim_tiny_dart data.root=/data/imagenet     # several processes

``--config`` takes a recipe name (``vim_tiny_dart``, ``demo/vim_dart``: a recipe shipped in the package
``dartmamba_configs``, the checkout's ``configs/``) or a path to a YAML file; paths inside a YAML are relative to it.

Overrides are ``dotted.key=value`` (values read as YAML). The config is checked completely (unknown keys, types,
ranges, data paths, the model's name and arguments, the DeepSpeed JSON and its keys, the checkpoints to start or
resume from, the batch against the data set) before any process group starts or a file is written; a problem is
one line on stderr and exit status 2. A second run into an output.dir in use stops the same way, and so does a
fresh run into an output.dir holding a previous run's checkpoints (``resume=auto`` continues that run,
``output.overwrite=true`` moves its files aside into ``previous-<UTC time>/`` and starts over). So does every file
of the run that cannot be written or read: output.dir a file or read-only, a full disk during a save (the bytes
needed and free; the previous checkpoint stays in charge), a corrupt ``steps.csv``, ``trainer_state.json`` or
DeepSpeed ``.pt`` file (resume=auto passes over a damaged checkpoint to the newest intact one).

Exit status 75 (``EX_TEMPFAIL``): preempted by SIGTERM / SIGUSR1 (``train.preempt_signals``); a checkpoint of the
current update was saved and ``resume=auto`` continues exactly (``train.preempt_requeue=true`` also runs ``scontrol
requeue`` under SLURM). ``--submit slurm|local`` submits the run through submitit instead (docs/cluster.md).

Exit status 3: the training diverged (a NaN or inf loss or weights, with ``train.nonfinite=stop``); one line names
the update, its learning rate and the last finite checkpoint. Nothing non-finite is ever saved.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dartmamba-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a recipe name (e.g. demo/vim_dart) or a YAML file; omitted: the built-in "
                                         "defaults")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; leave it out otherwise")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    from .submit import add_submit_arguments

    add_submit_arguments(parser)            # --submit slurm|local and its job options (train/submit.py)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .distributed import record_default_threads

    record_default_threads()        # before anything could call torch.set_num_threads (see .distributed)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from .config import ConfigError, config_to_dict, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"dartmamba-train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
        return 0
    if args.submit:
        from .submit import submit

        return submit(args, cfg)
    from .checkpoint import CheckpointError
    from .lock import OutputDirLocked
    from .loop import TrainingDiverged, preflight, run

    try:
        checked = preflight(cfg)
    except ConfigError as err:
        print(f"dartmamba-train: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError) as err:
        print(f"dartmamba-train: {err}", file=sys.stderr)
        return 2
    from dartmamba.hub import HubFileUnavailable

    try:
        run(cfg, local_rank=args.local_rank, checked=checked)
    # output.dir in use; a Hub file missing offline; a run file unreadable or unwritable (a full disk, a corrupt
    # checkpoint file): one line each
    except (OutputDirLocked, HubFileUnavailable, CheckpointError) as err:
        print(f"dartmamba-train: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"dartmamba-train: {err}", file=sys.stderr)
        return 3
    return 0
