"""``lynx profile``: which experts a model's layers touch when real text decodes in batches.

Lynx can only save time where a batch's rows spread over many experts, so this is the first
thing to look at on a model. Held-out text (the reference model's test split by default) is
fed one token per step through the KV cache (teacher forcing), so each MoE layer sees
``B`` decode rows per step, exactly as in batched serving. Router logits and top-k ids of
every layer and step are recorded once at the largest batch size; smaller batches are the
disjoint row groups of that recording (native routing has no cross-row effects). Reported
per layer and batch size: mean / spread of distinct experts per step, expert load skew, how
often a row's rank-j expert lies in the same AffinityBinning bin as its top-1 (bin width
``1/alpha`` of the authors' preset for the model's shape), and, for each ``--policy``, the
distinct experts that policy would keep on the same logits (offline).

    lynx profile --batch-sizes 1,8,32,64 --out runs/profile
    lynx profile --model PATH --data heldout.jsonl --steps 16 --json-only

Writes ``profile.json``, ``distinct_experts.png`` and ``expert_load.png`` under ``--out``;
prints a table and one JSON line. Legend: L layers, S steps, B batch rows, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import reference_model_path
from ..integrations.hf import moe_shape
from ..measure.data import default_data, load_texts, token_batch
from ..measure.decode import record_routing
from ..measure.models import load_model
from ..measure.profile import profile_stats
from ..presets import for_shape
from .args import (add_count, add_data, add_json_only, add_model, add_policies, add_threads, check_counts,
                   positive_ints, resolve_policies, set_threads, writable_dir)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    add_data(parser)
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 8, 32, 64], metavar="B,B,...",
                        help="e.g. 1,8,32,64")
    add_count(parser, "--steps", 32, "decode steps per sequence")
    add_count(parser, "--prompt-len", 16, "tokens prefilled before decoding")
    add_policies(parser, "also count the distinct experts this policy keeps (offline, on the recorded "
                         "logits; repeatable; default: the authors' AffinityBinning preset for the shape)")
    parser.add_argument("--out", type=Path, default=Path("runs/profile"), metavar="DIR",
                        help="output folder (default runs/profile)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_threads(parser)
    add_json_only(parser)


def _table(stats: dict, batch_sizes: list[int]) -> str:
    pols = sorted({p for ly in stats["layers"] for e in ly["batch"].values() for p in e.get("policy_distinct", {})})
    head = f"{'layer':>5} {'B':>4} {'distinct mean±std':>18} {'min-max':>8} {'load max/mean':>13} {'load cv':>7}"
    widths = [max(len(p), 8) for p in pols]
    head += "".join(f"  {p:>{w}}" for p, w in zip(pols, widths))
    lines = [head]
    for ly in stats["layers"]:
        for B in batch_sizes:
            e = ly["batch"][str(B)]
            d = e["distinct"]
            row = (f"{ly['layer']:>5} {B:>4} {d['mean']:>11.1f} ± {d['std']:<4.1f} {d['min']:>3.0f}-{d['max']:<4.0f}"
                   f" {e['load_max_over_mean']:>13.2f} {e['load_cv']:>7.2f}")
            row += "".join(f"  {e['policy_distinct'][p]['mean']:>{w}.1f}" for p, w in zip(pols, widths))
            lines.append(row)
    if pols:
        lines.insert(0, "distinct experts per step, native and (offline, on the same logits) per policy:")
    lines.append(f"share of rows whose rank-j expert is in the top-1's bin (alpha={stats['alpha']}), j=1..K:")
    for ly in stats["layers"]:
        lines.append(f"  layer {ly['layer']}: " + " ".join(f"{v:.2f}" for v in ly["same_bin_by_rank"])
                     + f"  (mean {ly['same_bin_mean']:.2f} of {stats['top_k']} in bin 0)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    check_counts(args, at_least_one=("steps", "prompt_len"))
    set_threads(args)
    if not args.no_plots:
        from ..measure.plots import require
        require()
    out = writable_dir(args.out)
    path = args.model or reference_model_path()
    model, tokenizer = load_model(path)
    data = args.data or [default_data(path)]
    texts = load_texts(data)
    rows = max(args.batch_sizes)
    tokens = token_batch(texts, tokenizer, rows, args.prompt_len + args.steps, model.config.vocab_size)
    logits, ids = record_routing(model, tokens, args.prompt_len)
    E, K = moe_shape(model)
    preset_name, preset = for_shape(E, K)
    policies = resolve_policies(args.policy, E, K) or [preset]
    policies = [p for p in policies if p.kind != "native"]
    if policies and "deepseek" in str(getattr(model.config, "model_type", "")):
        # The offline count routes with softmax scoring; DeepSeek's grouped, biased sigmoid
        # routing would pick other experts. ``lynx bench`` runs the real patched router.
        print("lynx profile: policy counts are skipped for DeepSeek-style routing", file=sys.stderr)
        policies = []
    stats = profile_stats(logits, ids, args.batch_sizes, preset.alpha, policies)
    stats.update({"model": str(path), "data": [str(d) for d in data], "preset": preset_name,
                  "prompt_len": args.prompt_len, "threads": torch.get_num_threads()})
    out.mkdir(parents=True, exist_ok=True)
    if args.no_plots:
        stats["plots"] = []
    else:
        from ..measure.plots import profile_plots
        stats["plots"] = [str(p) for p in profile_plots(stats, args.batch_sizes, out)]
    (out / "profile.json").write_text(json.dumps(stats, indent=1))
    if not args.json_only:
        print(f"{stats['model']}: {len(stats['layers'])} MoE layers, {E} experts top-{K}; {args.steps} decode "
              f"steps x {rows} rows of {', '.join(sorted(texts))}; bins of 1/{preset.alpha:g} ({preset_name} preset)")
        print(_table(stats, args.batch_sizes))
        print(f"wrote {out / 'profile.json'}" + "".join(f", {p}" for p in stats["plots"]))
    summary = {k: v for k, v in stats.items() if k != "layers"}
    summary["distinct_mean"] = {str(B): round(sum(ly["batch"][str(B)]["distinct"]["mean"] for ly in stats["layers"])
                                              / len(stats["layers"]), 3) for B in args.batch_sizes}
    print(json.dumps(summary))
    return 0
