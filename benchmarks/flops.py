"""FLOPs of Vim / DeiT, fixed grid or DART, per part, at any token count; counted on fake tensors (no GPU, no
memory), so the full Ti/S/B x 121..1568 table takes about a minute on a laptop CPU.

Numbers are multiply-adds (GFLOPs in fvcore's convention, the one behind published figures), per image, forward.
The tokenizer is counted: scorer trunk and head, bilinear resampling (4 taps per output element; the official
counts ignore grid_sample), positional-embedding re-binning, patch projection; the backbone includes the
selective scan (see dartmamba/flops.py for the formulas). The "published" column is the DART README's figure where
one exists.

Examples:
  python -m benchmarks.flops                                   # Ti/S/B x fixed/DART x Vim/DeiT at 196 tokens
  python -m benchmarks.flops --families vim --sizes s --tokens 196 392 784 1568
  python -m benchmarks.flops --model vim_small_dart --model-kwargs '{"num_tokens": 392}'
  python -m benchmarks.flops --dart-kwargs '{"dart_cfg": {"scorer_input_size": 448}}'   # scorer on the full input
"""
from __future__ import annotations

import argparse
import json
import sys

if __package__ in (None, ""):
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (FAMILIES, SIZE_ALIASES, TOKENIZERS, cell_model, markdown_table,  # noqa: E402
                               parse_json_arg, write_csv, write_json)

# DART README (ImageNet-1K table), GFLOPs by (family, size, tokenizer, tokens)
PUBLISHED = {
    ("deit", "tiny", "fixed", 196): 1.26, ("deit", "tiny", "dart", 196): 1.32,
    ("deit", "small", "fixed", 196): 4.61, ("deit", "small", "dart", 196): 4.84,
    ("deit", "small", "fixed", 576): 15.5, ("deit", "small", "dart", 392): 10.1,
    ("deit", "base", "fixed", 196): 17.6,
    ("vim", "tiny", "fixed", 196): 1.60, ("vim", "tiny", "dart", 196): 1.68,
    ("vim", "small", "fixed", 196): 5.30, ("vim", "small", "dart", 196): 5.55,
    ("vim", "tiny", "fixed", 784): 5.95, ("vim", "tiny", "dart", 392): 3.29,
    ("vim", "small", "fixed", 784): 19.6, ("vim", "small", "dart", 392): 10.9,
}

PART_COLUMNS = [("gflops_scorer_trunk", "scorer trunk", ".3f"), ("gflops_scorer_head", "scorer head", ".4f"),
                ("gflops_resample", "resample", ".4f"), ("gflops_posembed", "pos-embed", ".4f"),
                ("gflops_embed", "embed", ".3f"), ("gflops_backbone", "backbone", ".3f"),
                ("gflops_scan", "(scan)", ".3f"), ("gflops_head", "head", ".4f")]
COLUMNS = ([("family", "family", ""), ("size", "size", ""), ("tokenizer", "tokenizer", ""), ("tokens", "tokens", "d"),
            ("model", "model", ""), ("input_size", "input", ""), ("gflops", "GFLOPs", ".3f"),
            ("published", "published", ".2f")] + PART_COLUMNS)


def flops_row(family: str, size: str, tokenizer: str, tokens: int, overrides: dict | None = None) -> dict:
    """One cell's FLOP row: the cell, the model it runs, total and per-part GFLOPs (multiply-adds)."""
    from dartmamba.flops import count_model_flops

    name, kwargs = cell_model(family, size, tokenizer, tokens, overrides=overrides)
    report = count_model_flops(name, **kwargs)
    size = SIZE_ALIASES[size]
    row = {"family": family, "size": size, "tokenizer": tokenizer, **report.as_row(), "tokens": report.num_tokens,
           "kwargs": json.dumps(kwargs, sort_keys=True),
           "published": PUBLISHED.get((family, size, tokenizer, tokens))}
    return row


def exponent_rows(rows: list[dict], value: str = "gflops", lo: int = 196, hi: int = 1568) -> list[dict]:
    """Fitted exponent of ``value`` against tokens over [lo, hi], per (family, size, tokenizer)."""
    from dartmamba.flops import fit_exponent

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["family"], row["size"], row["tokenizer"]), []).append(row)
    out = []
    for key, group in groups.items():
        pts = [(r["tokens"], r[value]) for r in group if r.get(value) not in (None, "")]
        try:
            exp = fit_exponent([t for t, _ in pts], [v for _, v in pts], lo, hi)
        except ValueError:
            continue
        out.append({"family": key[0], "size": key[1], "tokenizer": key[2], "exponent": exp,
                    "points": len([t for t, _ in pts if lo <= t <= hi])})
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", default=["ti", "s", "b"])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=TOKENIZERS)
    parser.add_argument("--tokens", type=int, nargs="+", default=[196])
    parser.add_argument("--model", default=None, help="count one registered model instead of the grid of cells")
    parser.add_argument("--model-kwargs", default=None, help="JSON kwargs for --model, or for every cell")
    parser.add_argument("--dart-kwargs", default=None, help="JSON kwargs for DART cells only")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None, help="also write the markdown table(s) to this file")
    parser.add_argument("--title", default="", help="appended to the table's heading")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dartmamba.flops import count_model_flops

    common = parse_json_arg(args.model_kwargs)
    dart_extra = parse_json_arg(args.dart_kwargs, "--dart-kwargs")
    if args.model:
        report = count_model_flops(args.model, **common)
        rows = [{"family": "-", "size": "-", "tokenizer": "-", **report.as_row(),
                 "kwargs": json.dumps(common, sort_keys=True)}]
    else:
        rows = []
        for family in args.families:
            for size in args.sizes:
                for tokenizer in args.tokenizers:
                    for tokens in args.tokens:
                        overrides = {**common, **(dart_extra if tokenizer == "dart" else {})}
                        rows.append(flops_row(family, size, tokenizer, tokens, overrides or None))
                        r = rows[-1]
                        print(f"{r['model']} {r['kwargs']}: {r['gflops']:.3f} GFLOPs", flush=True)
    text = ["### Forward GFLOPs per image (multiply-add = 1; tokenizer and selective scan counted)"
            + (f": {args.title}" if args.title else ""), "",
            markdown_table(rows, COLUMNS)]
    exps = exponent_rows(rows) if len(set(r["tokens"] for r in rows)) > 1 else []
    if exps:
        text += ["", "### GFLOPs ~ tokens^k, fitted from 196 to 1568 tokens", "",
                 markdown_table(exps, [("family", "family", ""), ("size", "size", ""), ("tokenizer", "tokenizer", ""),
                                       ("exponent", "k", ".3f"), ("points", "points", "d")])]
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        write_json(args.json, {"rows": rows, "exponents": exps})
    if args.md:
        from benchmarks.common import atomic_write_text
        atomic_write_text(args.md, "\n".join(text) + "\n")
    print()
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
