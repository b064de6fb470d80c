"""``lynx tune``: the policy that saves the most experts at a batch size within a perplexity budget.

    lynx tune --batch-size 32 --max-ppl-increase 0.5 --out lynx.json     # the reference model
    lynx tune --model PATH --batch-size 16 --max-ppl-increase 1 --out lynx.json --png frontier.png

Every candidate setting is measured on one half of the held-out text (``lynx_moe.measure.tune``),
then (unless ``--one-policy``) the frontier's settings one layer at a time, and the best
combination of one setting per layer; the winner and the authors' preset again on the other half. ``--out`` is a policy file that
``LYNX_POLICY_FILE`` / ``lynx serve --policy-file`` read (its ``default``) and that
``lynx.load_policy(FILE)`` turns into the policy ``lynx.apply_`` takes. Prints the frontier
and the test-split check, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..integrations.hf import moe_shape
from ..measure.data import default_data, load_texts
from ..measure.models import load_model
from ..measure.quality import EvalConfig
from ..measure.tune import tune
from . import UsageError
from .args import (add_data, add_json_only, add_model, add_policies, add_threads, progress_bar, resolve_policies,
                   set_threads, writable_dir)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    add_data(parser)
    parser.add_argument("--batch-size", type=int, required=True, metavar="B", help="decode rows per step")
    parser.add_argument("--max-ppl-increase", type=float, required=True, metavar="PCT",
                        help="largest perplexity increase allowed on the calibration split, in percent")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="policy file to write (JSON)")
    parser.add_argument("--png", type=Path, default=None, metavar="FILE", help="also plot the searched frontier")
    parser.add_argument("--ppl-per-domain", type=int, default=8, metavar="N",
                        help="held-out rows per domain and split (default 8)")
    add_policies(parser, "search only these settings (repeatable; default: lynx_moe.measure.tune.candidates_for)")
    parser.add_argument("--one-policy", action="store_true",
                        help="one setting for every layer (default: also search one setting per layer)")
    add_threads(parser)
    add_json_only(parser)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.ppl_per_domain < 1:
        raise UsageError("--batch-size and --ppl-per-domain must be >= 1")
    if not args.max_ppl_increase >= 0:
        raise UsageError(f"--max-ppl-increase must be a percentage >= 0, got {args.max_ppl_increase}")
    writable_dir(args.out.parent)
    set_threads(args)
    model, tokenizer = load_model(args.model)
    if args.model is None:
        from .. import reference_model_path
        args.model = reference_model_path()
    texts = load_texts(args.data or [default_data(args.model)])
    cfg = EvalConfig(batch_size=args.batch_size, ppl_per_domain=args.ppl_per_domain, gen_prompts=0)
    candidates = resolve_policies(args.policy, *moe_shape(model))
    result = tune(model, tokenizer, texts, batch_size=args.batch_size, max_ppl_increase=args.max_ppl_increase,
                  cfg=cfg, candidates=candidates, progress=progress_bar("tune", not args.json_only),
                  per_layer=not args.one_policy)
    result["model"] = str(args.model)
    if not args.json_only:
        print(f"{'policy':<40} {'saved':>6} {'distinct':>8} {'ppl change % [95% CI]':>26}   (calibration split, "
              f"batch {args.batch_size})")
        for r in sorted(result["searched"], key=lambda r: -r["saved"]):
            mark = " <- winner" if r["policy"] == result["winner"] else ""
            print(f"{r['policy'][:40]:<40} {100 * r['saved']:>5.1f}% {r['distinct']:>8.1f} "
                  f"{r['ppl_delta_pct']:>+8.3f} [{r['ppl_delta_lo']:+.3f}, {r['ppl_delta_hi']:+.3f}]{mark}")
        if result["per_layer"]:
            print("\nper layer, each setting on one layer alone (calibration split; the knapsack's cost is "
                  "ppl-per-KL x KL):")
            for r in result["per_layer"]:
                print(f"  layer {r['layer']:<3d} {r['policy'][:40]:<40} {100 * r['saved']:>5.1f}% of the layer's experts "
                      f"{r['ppl_delta_pct']:>+8.3f} %  KL {r['kl']:.5f}  cost {r['cost_pct']:+.3f} %")
    if result["winner"] is None:
        print(json.dumps(result))
        raise UsageError(result["reason"])
    args.out.write_text(json.dumps({"default": result["winner_spec"], "tuned": {
        k: result[k] for k in ("model", "batch_size", "max_ppl_increase", "calibration", "test")}}, indent=1) + "\n")
    if args.png is not None:
        from ..measure.plots import quality_vs_saved
        rows = [{"policy": r["policy"], "routing": {"saved": r["saved"]},
                 "perplexity": {"delta_pct": {"value": r["ppl_delta_pct"], "lo": r["ppl_delta_lo"],
                                              "hi": r["ppl_delta_hi"]}}} for r in result["searched"]]
        quality_vs_saved([{"policy": "native", "perplexity": {}}, *rows], args.png,
                         f"lynx tune: batch {args.batch_size}, calibration split")
    if not args.json_only:
        print(f"\ntest split (not used by the search), batch {args.batch_size}:")
        w = max(40, *(len(r["policy"]) for r in result["test"]))
        for r in result["test"]:
            print(f"{r['policy']:<{w}} {100 * r['saved']:>5.1f}% {r['distinct']:>8.1f} "
                  f"{r['ppl_delta_pct']:>+8.3f} [{r['ppl_delta_lo']:+.3f}, {r['ppl_delta_hi']:+.3f}]")
        print(f"wrote {args.out}: LYNX_POLICY_FILE={args.out} / lynx serve --policy-file {args.out} / "
              f"lynx.apply_(model, lynx.load_policy({str(args.out)!r}))")
    print(json.dumps(result))
    return 0
