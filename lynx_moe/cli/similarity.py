"""``lynx similarity``: a model's expert similarity matrices for the SERE policy, computed once.

    lynx similarity --model models/lynx-ref-moe                  # -> MODEL/sere/similarity.safetensors
    lynx similarity --model PATH --method weights                # data-free: from the weights alone
    lynx eval --model PATH --policy sere:top_s=2,rho=0.2,similarity=PATH/sere/similarity.safetensors

``outputs`` (default) runs every expert on the hidden states that reach its layer over held-out
text (the last quarter of each domain's segments); ``weights`` on seeded Gaussian inputs. The
computation is ``lynx_moe.measure.similarity``. Prints per-layer statistics, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..measure.data import default_data, load_texts
from ..measure.models import load_model
from ..measure.similarity import METHODS, default_path, expert_similarity, save_similarity
from .args import add_count, add_data, add_json_only, add_model, add_threads, check_counts, set_threads, writable_dir

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--method", choices=METHODS, default="outputs",
                        help="outputs: expert outputs on held-out text (default); weights: on Gaussian inputs, no data")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="file to write (default: MODEL/sere/similarity.safetensors, "
                             "MODEL/sere/similarity_weights.safetensors for --method weights)")
    add_count(parser, "--tokens", 4096, "calibration inputs per layer")
    add_data(parser)
    add_threads(parser)
    add_json_only(parser)


def run(args: argparse.Namespace) -> int:
    check_counts(args, at_least_one=("tokens",))
    set_threads(args)
    if args.model is None:
        from .. import reference_model_path
        args.model = reference_model_path()
    out = args.out or default_path(args.model, args.method)
    writable_dir(out.parent)
    model, tokenizer = load_model(args.model)
    texts = load_texts(args.data or [default_data(args.model)]) if args.method == "outputs" else None
    sims, meta = expert_similarity(model, tokenizer, texts, method=args.method, tokens=args.tokens)
    save_similarity(out, sims, {**meta, "model": str(args.model)})
    L, E = sims.shape[0], sims.shape[1]
    off = ~torch.eye(E, dtype=torch.bool)
    layers = []
    for i in range(L):
        vals = sims[i][off]
        best = sims[i].masked_fill(~off, -2.0).amax(dim=1)   # each expert's closest other expert
        layers.append({"layer": i, "mean": round(vals.mean().item(), 4), "max": round(vals.max().item(), 4),
                       "closest_median": round(best.median().item(), 4)})
    if not args.json_only:
        print(f"{args.method}: {meta['inputs']}; {L} MoE layers x {E} experts")
        print(f"{'layer':>5} {'mean':>7} {'max':>7} {'closest (median)':>17}")
        for r in layers:
            print(f"{r['layer']:>5} {r['mean']:>7.3f} {r['max']:>7.3f} {r['closest_median']:>17.3f}")
        print(f"wrote {out}: lynx eval --model {args.model} --policy sere:top_s=2,rho=R,similarity={out}")
    print(json.dumps({"model": str(args.model), "method": args.method, "out": str(out), "layers": layers,
                      "experts": E, "tokens": int(meta["tokens"])}))
    return 0
