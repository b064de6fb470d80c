"""``lynx demo``: the whole story on the embedded reference model in one command.

    lynx demo                 # about 2 minutes on a quiet 2-core CPU (measured 125 s)
    lynx demo --full          # larger samples, two more AffinityBinning settings (the former
                              # default: 266 s on a quiet machine, 518 s on a fresh clone)
    lynx demo --out reports/my-demo

At batch 32 it compares native routing with the authors' AffinityBinning preset for the
model's shape (64 experts top-8: alpha 3, beta 4) and two peers (OEA, XShare; ``--full`` adds
two more AffinityBinning settings), and reports for each:
- distinct experts per MoE layer and decode step, and the share saved against native;
- decode tokens/s and the speedup over native (interleaved timed rounds on the same prompts,
  so a busy machine slows every policy alike; ``lynx_moe.measure.speed``);
- quality in decode mode (``lynx_moe.measure.quality``): perplexity change with a 95 %
  interval, greedy agreement with native, accuracy change per task with a 95 % paired-
  bootstrap interval. A task whose native accuracy is not clearly above chance in this scoring
  (below 1.5x chance) is scored natively only and left out: a change on a task the model
  cannot do is noise (on the reference model: next_sentence, 17-23 % against 25 % chance).

It prints a compact table and writes a report folder (default ``reports/demo-<UTC time>/``):
``summary.json`` (everything, including the full eval and bench results and the machine's
conditions), ``distinct_per_layer.png`` and ``quality_vs_saved.png`` (one point per policy).
The reference model is tiny (~18 M parameters), so its absolute speedups are smaller than a
real model's, whose experts dominate the bytes read per step; the distinct-expert savings and
quality deltas are the part that carries over (see ``lynx bench --shape``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from .. import reference_model_path
from ..integrations.hf import moe_shape
from ..measure.data import load_inputs
from ..measure.machine import conditions
from ..measure.quality import EvalConfig, check_policies, evaluate
from ..measure.speed import speed_on_text
from ..policies import parse_policy
from ..presets import for_shape
from . import UsageError
from .args import add_count, add_threads, check_counts, progress_bar, set_threads, writable_dir

__all__ = ["add_arguments", "run", "demo_policies"]

PEERS = ("oea:k0=2", "xshare:budget=24")
EXTRA = ("affinity_binning:alpha=3,beta=2", "affinity_binning:alpha=1,beta=2")
ABOVE_CHANCE = 1.5   # a task counts when native accuracy >= this x chance

# (default, full) sample sizes; the default run stays under 3 minutes on 2 cores.
SIZES = {
    "default": dict(ppl_per_domain=4, ppl_tokens=48, limit=48, gen_prompts=32, gen_tokens=24, bench_repeats=3),
    "full": dict(ppl_per_domain=8, ppl_tokens=64, limit=96, gen_prompts=64, gen_tokens=32, bench_repeats=3),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report folder (default reports/demo-<UTC time>)")
    parser.add_argument("--full", action="store_true",
                        help="larger samples and two more AffinityBinning settings (about 3x the time)")
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)  # tests and other models
    add_count(parser, "--batch-size", 32, "decode rows per step", "B")
    add_threads(parser)


def demo_policies(num_experts: int, top_k: int, full: bool) -> tuple[str, list]:
    """``(preset name, policies)``: the authors' preset for the shape, then the peers (and, in
    the full run, two more AffinityBinning settings). Peers a model's top-k cannot run are left out."""
    name, preset = for_shape(num_experts, top_k)
    out = [preset]
    for spec in PEERS + (EXTRA if full else ()):
        p = parse_policy(spec)
        try:
            p.check_top_k(top_k)
        except ValueError:
            continue
        if p not in out:
            out.append(p)
    return name, out


def _model_path(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    try:
        return reference_model_path()
    except FileNotFoundError as e:
        raise UsageError(f"{e}. The reference model is built by the training pipeline "
                         "(python -m training.train, see training/); or run this demo on another "
                         "model with LYNX_REFERENCE_MODEL=PATH") from None


def _rows(results: list[dict], bench: dict) -> list[dict]:
    speed = {r["policy"]: r for r in bench["results"]}
    rows = []
    for r in results:
        b = speed.get(r["policy"], {})
        rows.append({
            "policy": r["policy"], "distinct": r["routing"]["distinct"], "saved": r["routing"]["saved"],
            "tokens_per_s": b.get("tokens_per_s"), "speedup": b.get("speedup"),
            "experts_ms_per_step": b.get("experts_ms_per_step"), "bound_speedup": b.get("bound_speedup"),
            "ppl": r["perplexity"]["ppl"], "ppl_change_pct": r["perplexity"]["delta_pct"],
            "greedy_agreement": r["greedy"]["agreement"],
            "tasks": {t: v["delta_points"] for t, v in r.get("tasks", {}).items()},
            "tasks_pooled": r.get("tasks_pooled", {}).get("delta_points")})
    return rows


def _table(rows: list[dict], tasks: dict) -> str:
    """Compact: the pooled task change with its interval, then each task's change (intervals are
    in summary.json)."""
    short = {t: t.removeprefix("lynx_ref_")[:12] for t in tasks}
    w = max(34, *(len(r["policy"]) for r in rows))
    head = (f"{'policy':<{w}} {'distinct':>8} {'saved':>6} {'tok/s':>6} {'speedup':>7} {'bound':>6} {'ppl':>7} "
            f"{'ppl chg % [CI]':>21} {'greedy':>6} {'tasks pts [CI]':>19}" + "".join(f" {short[t]:>12}" for t in tasks))
    lines = [head]
    for r in rows:
        p, q = r["ppl_change_pct"], r["tasks_pooled"]
        line = (f"{r['policy']:<{w}} {r['distinct']:>8.1f} {100 * r['saved']:>5.1f}% "
                f"{r['tokens_per_s'] or 0:>6.0f} {r['speedup'] or 0:>6.2f}x {r['bound_speedup'] or 0:>5.2f}x "
                f"{r['ppl']:>7.2f} {p['value']:>+6.2f} [{p['lo']:+.2f},{p['hi']:+.2f}] "
                f"{100 * r['greedy_agreement']:>5.1f}%")
        line += f" {q['value']:>+5.1f} [{q['lo']:+.1f},{q['hi']:+.1f}]".rjust(20) if q else f" {'-':>19}"
        line += "".join(f" {r['tasks'][t]['value']:>+12.1f}" for t in tasks)
        lines.append(line)
    lines.append("tasks (accuracy points; 'tasks' pools the items of the tasks shown): " + "; ".join(
        f"{short[t]} {v['metric']} n={v['n']} chance {100 * v['chance']:.0f}% native {100 * v['acc_native']:.1f}%"
        for t, v in tasks.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    check_counts(args, at_least_one=("batch_size",))
    set_threads(args)
    from ..measure.plots import distinct_per_layer, quality_vs_saved, require
    require()
    path = _model_path(args.model)
    out = writable_dir(args.out or Path("reports") / time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime()))
    start = conditions()
    model, tokenizer, path, texts, tasks = load_inputs(path, None, None, ["all"])
    E, K = moe_shape(model)
    preset_name, policies = demo_policies(E, K, args.full)
    check_policies(model, policies)
    size = SIZES["full" if args.full else "default"]
    cfg = EvalConfig(batch_size=args.batch_size, **{k: v for k, v in size.items() if k != "bench_repeats"})
    print(f"lynx demo: {path} ({E} experts top-{K}), batch {cfg.batch_size}; native vs "
          f"{', '.join(map(str, policies))} (preset {preset_name})", flush=True)
    print("1/2 quality in decode mode (perplexity, greedy agreement, tasks) ...", flush=True)
    results = evaluate(model, tokenizer, policies, texts, tasks, cfg, progress=progress_bar("eval"),
                       min_over_chance=ABOVE_CHANCE)
    t_eval = time.perf_counter() - t0
    print(f"    {t_eval:.0f} s; 2/2 decode speed (interleaved timed rounds) ...", flush=True)
    bench = speed_on_text(model, tokenizer, texts, policies, cfg.batch_size, size["bench_repeats"],
                          progress_bar("speed"))
    rows = _rows(results, bench)
    title = f"{path.name}, batch {cfg.batch_size}"
    out.mkdir(parents=True, exist_ok=True)
    plots = [distinct_per_layer(results, out / "distinct_per_layer.png", title=f"{title}: distinct experts "
                                "per layer and decode step (legend: mean)"),
             quality_vs_saved(results, out / "quality_vs_saved.png", title=title)]
    task_info = results[0].get("tasks", {})
    shown = {t: v for t, v in task_info.items() if not v.get("at_chance")}
    summary = {"model": str(path), "experts": E, "top_k": K, "preset": preset_name,
               "full": args.full, "seconds": round(time.perf_counter() - t0, 1), "eval_seconds": round(t_eval, 1),
               "conditions": {"start": start, "end": conditions()}, "config": asdict(cfg),
               "table": rows, "tasks": {t: {k: v[k] for k in ("kind", "metric", "n", "chance", "acc_native")}
                                        | {"shown": t in shown} for t, v in task_info.items()},
               "plots": [str(p) for p in plots], "eval": results, "bench": bench}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(_table(rows, shown))
    hidden = [f"{t} ({100 * v['acc_native']:.0f}% native, chance {100 * v['chance']:.0f}%)"
              for t, v in task_info.items() if t not in shown]
    if hidden:
        print(f"left out (native accuracy below {ABOVE_CHANCE}x chance in decode-mode scoring, so every "
              f"change would be noise; scored natively only): {'; '.join(hidden)}")
    print(f"distinct: experts per MoE layer and decode step (mean over layers); speedup: native ms/step over "
          f"the policy's, measured (median of {size['bench_repeats']} interleaved rounds); bound: the speedup of "
          f"a purely memory-bound step (bytes read, native / policy); intervals: 95 % paired bootstrap. "
          f"{summary['seconds']:.0f} s in all.\nThe reference model is tiny, so routing overhead weighs more "
          f"against the expert bytes saved than in a real model: see lynx bench --shape olmoe-1b-7b.")
    print(_verdict(rows[1]))
    print(f"report: {out}/  (summary.json, {', '.join(p.name for p in plots)})")
    return 0


def _verdict(r: dict) -> str:
    """One line on the preset against the paper's claim."""
    p = r["ppl_change_pct"]
    q = r["tasks_pooled"]
    acc = (f"; accuracy over the tasks shown {q['value']:+.1f} points [{q['lo']:+.1f}, {q['hi']:+.1f}]"
           if q else "")
    return (f"preset {r['policy']}: {100 * r['saved']:.0f}% fewer distinct experts per step, "
            f"{r['speedup'] or 0:.2f}x measured ({r['bound_speedup'] or 0:.2f}x memory-bound), perplexity "
            f"{p['value']:+.2f}% [{p['lo']:+.2f}, {p['hi']:+.2f}]{acc}. The paper reports at most 1 point lost "
            f"at up to 1.3x throughput on large models.")
