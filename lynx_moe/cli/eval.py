"""``lynx eval``: how much quality each routing policy costs against native routing.

Every quality figure is measured in decode mode (``lynx_moe.measure.decode``): sequences go in
batches of ``--batch-size`` rows, a short prefix is prefilled and every scored token is
predicted by a decode step through the KV cache, so each MoE layer sees B decode rows per step
as in batched serving. Why not a normal forward: the policies only act on decode steps (a
prefill is routed natively), so a prefill-only evaluation would compare native with native and
report no loss at all, whatever the policy does. Native routing is run on the same batches in
the same way, batch by batch, so every difference is the policy's.

Reported per policy, with the distinct experts per MoE layer and decode step beside them:
- perplexity of held-out text per domain and overall, its relative change with a 95 % interval
  (paired bootstrap over sequences), KL(native || policy) of the next-token distributions and
  the share of steps whose most likely token matches native's;
- greedy agreement: greedy continuations of held-out prompts, share of tokens identical to
  native's and mean steps until the first divergence;
- accuracy on the model's tasks (multiple choice: highest summed log-likelihood of the
  choice tokens, teacher-forced in decode mode; short answer: greedy, exact match), its delta
  against native with a paired-bootstrap 95 % interval, and the chance level.

    lynx eval --policy affinity_binning:alpha=3,beta=4 --policy oea:k0=2 --limit 100
    lynx eval --sweep "affinity_binning:alpha=0.5..4,beta=2|4" --tasks none --out runs/sweep
    lynx eval --model PATH --policy xshare:budget=16 --json-only

Prints a table and ends with one JSON line. ``--sweep`` grid syntax: ``lo..hi`` is every
integer between integer ends, else doublings from ``lo`` up to ``hi``; ``a|b|c`` lists values.
The measuring is in ``lynx_moe.measure.quality`` (per policy) and ``lynx_moe.measure.decode``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .. import reference_model_path
from ..costmodel import load_cost_model
from ..integrations.hf import moe_shape
from ..measure.gates import choose_gate
from ..measure.data import load_inputs
from ..measure.quality import DEFAULT_SWEEP, EvalConfig, check_policies, evaluate, expand_sweep
from ..measure.speed import speed_on_text
from ..presets import for_shape
from . import UsageError
from .args import (add_count, add_data, add_gate, add_json_only, add_model, add_policies, add_threads,
                   check_counts, progress_bar, resolve_policies, set_threads, writable_dir)

__all__ = ["add_arguments", "run", "format_table"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    add_policies(parser)
    parser.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, default=None, metavar="GRID",
                        help="also evaluate a grid of settings, e.g. 'affinity_binning:alpha=0.5..4,beta=1..4' "
                             f"(lo..hi: integers or doublings; a|b: a list; default grid {DEFAULT_SWEEP!r})")
    add_count(parser, "--batch-size", 32, "decode rows per step", "B")
    parser.add_argument("--tasks", default="all", metavar="NAMES",
                        help="comma-separated task names, 'all' (default) or 'none'")
    add_count(parser, "--limit", 200, "items per task")
    add_count(parser, "--ppl-rows", 16, "held-out rows per domain, 0: skip")
    add_count(parser, "--ppl-tokens", 64, "scored decode steps per held-out row")
    add_count(parser, "--prefix", 16, "prefilled tokens per held-out row")
    add_count(parser, "--gen-prompts", 64, "greedy-agreement prompts, 0: skip")
    add_count(parser, "--gen-tokens", 32, "greedy-agreement tokens")
    add_data(parser)
    parser.add_argument("--eval-dir", type=Path, default=None, metavar="DIR",
                        help="folder of lm-eval YAML tasks (default: MODEL/eval, else the reference model's)")
    add_threads(parser)
    parser.add_argument("--speed", type=int, nargs="?", const=3, default=0, metavar="ROUNDS",
                        help="also time decode steps of every policy at --batch-size (as lynx bench: "
                             "interleaved rounds, default 3) and report the speedup over native")
    add_gate(parser, "hf")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write eval.json (and the sweep plot) here")
    add_json_only(parser)


def _config(args) -> EvalConfig:
    check_counts(args, at_least_one=("batch_size", "ppl_tokens", "prefix", "gen_tokens", "limit"),
                 at_least_zero=("ppl_rows", "gen_prompts", "speed"))
    gate_file, args.gate_note = choose_gate("hf", str(args.model or reference_model_path()), args.gate,
                                            args.no_gate, args.threads)
    return EvalConfig(batch_size=args.batch_size, prefix=args.prefix, ppl_tokens=args.ppl_tokens,
                      ppl_per_domain=args.ppl_rows, limit=args.limit, gen_prompts=args.gen_prompts,
                      gen_tokens=args.gen_tokens, gate=load_cost_model(gate_file) if gate_file else None)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ci(d: dict) -> str:
    return f"{d['value']:+.2f} [{d['lo']:+.2f},{d['hi']:+.2f}]"


def format_table(results: list[dict]) -> str:
    """Quality table: one row per policy; then one row per task with each policy's delta."""
    speed = "speed" in results[0]
    w = max(36, *(len(r["policy"]) + 5 for r in results))   # whole policy names, aligned
    lines = [f"{'policy':<{w}} {'distinct':>8} {'saved':>6} {'ppl':>8} {'ppl change % [95% CI]':>24} "
             f"{'KL':>7} {'top1':>6} {'greedy':>6} {'1st div':>7}" + (f" {'speedup':>7} {'bound':>6}" if speed else "")]
    for i, r in enumerate(results):
        rt, p, g = r["routing"], r.get("perplexity"), r.get("greedy")
        label = r["policy"] if i == 0 else f"[{i}] {r['policy']}"
        lines.append(f"{label:<{w}} {rt['distinct']:>8.1f} {100 * rt['saved']:>5.1f}% "
                     + (f"{p['ppl']:>8.2f} {_ci(p['delta_pct']):>24} {p['kl']:>7.4f} {100 * p['top1_agreement']:>5.1f}%"
                        if p else f"{'-':>8} {'-':>24} {'-':>7} {'-':>6}")
                     + (f" {100 * g['agreement']:>5.1f}% {g['first_divergence']:>7.1f}" if g else f" {'-':>6} {'-':>7}")
                     + (f" {_x(r['speed']['speedup']):>7} {_x(r['speed']['bound_speedup']):>6}" if speed else ""))
    if "perplexity" in results[0] and len(results) > 1:
        lines.append("perplexity by domain: native, then the change in % for policy [1], [2], ... (rows above)")
        for d, ppl in results[0]["perplexity"]["by_domain"].items():
            changes = [100 * (r["perplexity"]["by_domain"][d] / ppl - 1) for r in results[1:]]
            lines.append(f"  {d:<14} {ppl:>9.2f} " + " ".join(f"[{i + 1}] {c:+.2f}" for i, c in enumerate(changes)))
    for name, t in results[0].get("tasks", {}).items():
        if t.get("at_chance"):
            lines.append(f"task {name} (n={t['n']}): native {100 * t['acc_native']:.1f}% is at chance "
                         f"({100 * t['chance']:.1f}%): scored natively only")
            continue
        lines.append(f"task {name} (n={t['n']}, {t['metric']}, chance {100 * t['chance']:.1f}%, native "
                     f"{100 * t['acc_native']:.1f}%): change, points [95% CI]")
        for r in results[1:]:
            tr = r["tasks"][name]
            lines.append(f"  {r['policy']:<{w - 2}} {_ci(tr['delta_points']):>24}   acc {100 * tr['acc']:.1f}%"
                         f"   distinct {tr['routing']['distinct']:.1f}")
    if "tasks_pooled" in results[0]:
        t = results[0]["tasks_pooled"]
        lines.append(f"all task items pooled (n={t['n']}, native {100 * t['acc_native']:.1f}%): change, points [95% CI]")
        for r in results[1:]:
            lines.append(f"  {r['policy']:<{w - 2}} {_ci(r['tasks_pooled']['delta_points']):>24}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    sweep = []
    if args.sweep is not None:
        try:
            sweep = expand_sweep(args.sweep)
        except ValueError as e:
            raise UsageError(f"--sweep: {e}") from None
    set_threads(args)
    if sweep and args.out is not None:
        from ..measure.plots import require
        require()
    out = writable_dir(args.out) if args.out is not None else None
    model, tokenizer, path, texts, tasks = load_inputs(args.model, args.data, args.eval_dir,
                                                       [t.strip() for t in args.tasks.split(",") if t.strip()])
    E, K = moe_shape(model)
    preset_name, preset = for_shape(E, K)
    policies = list(resolve_policies(args.policy, E, K) or ([] if sweep else [preset])) + sweep
    check_policies(model, policies)
    if cfg.ppl_per_domain == 0 and not tasks:
        raise UsageError("nothing to evaluate: --ppl-rows 0 and --tasks none")
    results = evaluate(model, tokenizer, policies, texts if cfg.ppl_per_domain else None, tasks, cfg,
                       progress=progress_bar("eval batches x policies", not args.json_only))
    summary = {"model": str(path), "experts": E, "top_k": K, "preset": preset_name, "config": asdict(cfg),
               "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype),
               "tasks": {t.name: {k: results[0]["tasks"][t.name][k] for k in ("kind", "metric", "n", "chance")}
                         | {"source": t.source} for t in tasks},
               "results": results}
    if args.speed:
        bench = speed_on_text(model, tokenizer, texts, policies, cfg.batch_size, args.speed,
                              progress_bar("speed runs", not args.json_only), gate=cfg.gate)
        by_policy = {b["policy"]: b for b in bench["results"]}
        for r in results:
            b = by_policy.get(r["policy"], {})
            r["speed"] = {k: b.get(k) for k in ("ms_per_step", "tokens_per_s", "speedup", "bound_speedup",
                                                 "experts_ms_per_step")}
        summary["bench"] = {k: v for k, v in bench.items() if k != "results"}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if sweep:
            from ..measure.plots import quality_vs_saved
            summary["plots"] = [str(quality_vs_saved(results, out / "sweep.png",
                                                     title=f"{path.name}: {args.sweep} at batch {cfg.batch_size}"))]
        (out / "eval.json").write_text(json.dumps(summary, indent=1))
    if not args.json_only:
        print(f"{path}: {E} experts top-{K}, batch {cfg.batch_size}, {results[0].get('eval_seconds')} s; "
              f"policies {args.gate_note}")
        print(format_table(results))
        if out is not None:
            print(f"wrote {out / 'eval.json'}" + "".join(f", {p}" for p in summary.get("plots", [])))
    print(json.dumps(summary))
    return 0
