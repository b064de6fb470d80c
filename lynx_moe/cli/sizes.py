"""``lynx sizes``: a model's expert output-size fits for the ``size_price`` policy, computed once.

    lynx sizes --model models/lynx-ref-moe                 # -> MODEL/sizes/sizes.safetensors
    lynx eval --model PATH --policy size_price:lam=0.001,sizes=PATH/sizes/sizes.safetensors

Runs every expert on the hidden states that reach its layer over the calibration half of the
held-out text and fits, per layer, ``log |f_e(x)|`` on the router logits
(``lynx_moe.measure.sizes``). Prints each layer's R^2 on held-out calibration tokens, ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..measure.data import default_data, load_texts
from ..measure.models import load_model
from ..measure.sizes import default_path, save_sizes, size_fits
from .args import add_count, add_data, add_json_only, add_model, add_threads, check_counts, set_threads, writable_dir

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="file to write (default: MODEL/sizes/sizes.safetensors)")
    add_count(parser, "--rows", 16, "calibration rows of 128 tokens")
    add_data(parser)
    add_threads(parser)
    add_json_only(parser)


def run(args: argparse.Namespace) -> int:
    check_counts(args, at_least_one=("rows",))
    set_threads(args)
    if args.model is None:
        from .. import reference_model_path
        args.model = reference_model_path()
    out = args.out or default_path(args.model)
    writable_dir(out.parent)
    model, tokenizer = load_model(args.model)
    texts = load_texts(args.data or [default_data(args.model)])
    fits, meta, r2 = size_fits(model, tokenizer, texts, rows=args.rows)
    save_sizes(out, fits, {**meta, "model": str(args.model)})
    if not args.json_only:
        print(f"{meta['inputs']}; {fits.shape[0]} MoE layers x {fits.shape[2]} experts")
        print(f"{'layer':>5} {'R^2 (top-2k slots, held out)':>30}")
        for i, v in enumerate(r2):
            print(f"{i:>5} {v:>30.3f}")
        print(f"wrote {out}: lynx eval --model {args.model} --policy size_price:lam=0.001,sizes={out}")
    print(json.dumps({"model": str(args.model), "out": str(out), "experts": fits.shape[2],
                      "r2": [round(v, 4) for v in r2], "tokens": int(meta["tokens"])}))
    return 0
