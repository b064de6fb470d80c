"""``lynx frontier``: every policy's sweep of its own knob, at several batch sizes, on held-out
text that ``lynx tune`` never searches (``lynx_moe.measure.frontier``).

    lynx frontier --out reports/frontier-ref                  # the reference model, batch 8,16,32,64
    lynx frontier --model PATH --batch-sizes 32 --families oea,xshare,sere --out DIR
    lynx frontier --batch-sizes 32 --policy-file runs/tune32.json --out DIR   # a tuned file beside the peers

Prints one table per batch size (distinct experts saved, perplexity change with its paired 95 %
interval, KL to native), writes ``DIR/frontier.json`` and ``DIR/frontier.png`` (one panel per
batch size, one line per policy) and ends with one JSON line. SERE is included when the model
folder holds ``sere/similarity.safetensors`` (``lynx similarity``), SizePrice when it holds
``sizes/sizes.safetensors`` (``lynx sizes``); ``--policy-file`` adds the
policy of a ``lynx tune`` file (family ``tuned``), measured on the same rows as the peers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..integrations.hf import moe_shape
from ..measure.data import default_data, load_texts
from ..measure.frontier import at_target, families_for, frontier
from ..measure.models import load_model
from ..measure.quality import EvalConfig, check_policies
from ..measure.similarity import default_path
from ..measure.sizes import default_path as sizes_path
from ..policies import Policy, load_policy
from . import UsageError
from .args import (add_data, add_json_only, add_model, add_threads, positive_ints, progress_bar, set_threads,
                   writable_dir)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    add_data(parser)
    parser.add_argument("--batch-sizes", type=positive_ints, default=[8, 16, 32, 64], metavar="B,B,...",
                        help="decode rows per step (default 8,16,32,64)")
    parser.add_argument("--families", default=None, metavar="NAMES",
                        help="comma-separated policy families (default: all; see lynx_moe.measure.frontier)")
    parser.add_argument("--policy-file", type=Path, action="append", default=None, metavar="FILE",
                        help="also measure the policy of this file (lynx tune --out; repeatable): family 'tuned'")
    parser.add_argument("--ppl-per-domain", type=int, default=8, metavar="N",
                        help="held-out rows per domain, from the test split (default 8)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="write frontier.json and frontier.png")
    add_threads(parser)
    add_json_only(parser)


def _load(model, path: Path) -> Policy:
    """The policy of a tuned file, checked against the model before anything is measured."""
    try:
        policy = load_policy(path)
        check_policies(model, [policy])
    except ValueError as e:
        raise UsageError(f"--policy-file {path}: {e}") from None
    return policy


def run(args: argparse.Namespace) -> int:
    if args.ppl_per_domain < 1:
        raise UsageError("--ppl-per-domain must be >= 1")
    out = writable_dir(args.out)
    from ..measure.plots import frontier_plot, require
    require()
    set_threads(args)
    model, tokenizer = load_model(args.model)
    if args.model is None:
        from .. import reference_model_path
        args.model = reference_model_path()
    E, K = moe_shape(model)
    sim = default_path(args.model, "outputs")
    sizes = sizes_path(args.model)
    families = families_for(E, K, sim if sim.is_file() else None, sizes if sizes.is_file() else None)
    if args.families is not None:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = sorted(set(wanted) - set(families))
        if unknown or not wanted:
            raise UsageError(f"--families: unknown {unknown or wanted}; known: {', '.join(families)}")
        families = {f: families[f] for f in wanted}
    if args.policy_file:
        families["tuned"] = [_load(model, f) for f in args.policy_file]
    texts = load_texts(args.data or [default_data(Path(args.model))])
    cfg = EvalConfig(ppl_per_domain=args.ppl_per_domain, gen_prompts=0)
    rows = frontier(model, tokenizer, texts, families, args.batch_sizes, cfg,
                    progress=progress_bar("frontier", not args.json_only))
    summary = {"model": str(args.model), "experts": E, "top_k": K, "split": "test (odd held-out segments)",
               "ppl_per_domain": args.ppl_per_domain, "rows": rows, "at_0.5pct": at_target(rows, 0.5)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(summary, indent=1))
    summary["plot"] = str(frontier_plot(rows, out / "frontier.png",
                                        f"{Path(args.model).name}: each policy's knob, test split"))
    if not args.json_only:
        w = max(40, *(len(r["policy"]) for r in rows))   # whole specs (SERE's carry a path)
        for B in args.batch_sizes:
            print(f"\nbatch {B}:\n  {'policy':<{w}} {'saved':>6} {'distinct':>8} {'ppl change % [95% CI]':>26} {'KL':>7}")
            for r in (r for r in rows if r["batch"] == B):
                print(f"  {r['policy']:<{w}} {100 * r['saved']:>5.1f}% {r['distinct']:>8.1f} "
                      f"{r['ppl_delta_pct']:>+8.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] {r['kl']:>7.4f}")
            print("  saved at +0.5 % perplexity (best measured setting / curve, linear between settings):")
            for a in (a for a in summary["at_0.5pct"] if a["batch"] == B):
                curve = "-" if a["curve"] is None else f"{100 * a['curve']:.1f}"
                print(f"    {a['family']:<18} {100 * a['best']:5.1f} / {curve}")
        print(f"wrote {out / 'frontier.json'}, {summary['plot']}")
    print(json.dumps(summary))
    return 0
