"""Command line: ``dartmamba-train`` / ``python train/train.py`` / ``deepspeed train/train.py``.

    deepspeed train/train.py --config configs/vim_tiny_dart.yaml data.root=/data/imagenet train.epochs=300
    python train/train.py --config configs/demo/vim_dart.yaml output.dir=outputs/demo/vim_dart
    dartmamba-train --config configs/demo/vim_dart.yaml --print-config

Overrides are ``dotted.key=value`` (values read as YAML). The config is checked completely (unknown keys, types,
ranges, data paths) before any process group, model or data loader is created.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dartmamba-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/); omitted: the built-in defaults")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; leave it out otherwise")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
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
    from .loop import preflight, run

    try:
        preflight(cfg)
    except FileNotFoundError as err:
        print(f"dartmamba-train: {err}", file=sys.stderr)
        return 2

    from dartmamba.hub import HubFileUnavailable

    try:
        run(cfg, local_rank=args.local_rank)
    except HubFileUnavailable as err:      # e.g. the pretrained scorer trunk, offline and not in the cache
        print(f"dartmamba-train: {err}", file=sys.stderr)
        return 2
    return 0
