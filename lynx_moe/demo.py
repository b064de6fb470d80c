"""``lynx demo``: the whole story on the embedded reference model in one command.

    lynx demo                 # 4.5 minutes on a quiet 2-core CPU (measured 266 s; 14 min when
                              # the machine ran 4 other benchmarks at load 8-13)
    lynx demo --quick         # smaller samples, 3 policies: 84 s
    lynx demo --out reports/my-demo

At batch 32 it compares native routing with the authors' AffinityBinning preset for the
model's shape (64 experts top-8: alpha 3, beta 4) and peers (OEA, XShare; the full run adds
two more AffinityBinning settings), and reports for each:
- distinct experts per MoE layer and decode step, and the share saved against native;
- decode tokens/s and the speedup over native (``lynx bench``: interleaved timed rounds on the
  same prompts, so a busy machine slows every policy alike);
- quality in decode mode (``lynx eval``): perplexity change with a 95 % interval, greedy
  agreement with native, accuracy change per task with a 95 % paired-bootstrap interval and
  the chance level.

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
import os
import time
from dataclasses import asdict
from pathlib import Path

__all__ = ["add_arguments", "run", "demo_policies"]

PEERS = ("oea:k0=2", "xshare:budget=24")
EXTRA = ("affinity_binning:alpha=3,beta=2", "affinity_binning:alpha=1,beta=2")

# (quick, full) sample sizes; chosen so the whole demo stays under 10 minutes on 2 cores.
SIZES = {
    "quick": dict(ppl_per_domain=4, ppl_tokens=48, limit=32, gen_prompts=32, gen_tokens=24, bench_repeats=2),
    "full": dict(ppl_per_domain=8, ppl_tokens=64, limit=96, gen_prompts=64, gen_tokens=32, bench_repeats=3),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report folder (default reports/demo-<UTC time>)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller samples and fewer policies (about a third of the time)")
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)  # tests and other models
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="decode rows per step (default 32)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's choice)")


def demo_policies(num_experts: int, top_k: int, quick: bool) -> tuple[str, list]:
    """``(preset name, policies)``: the authors' preset for the shape, then the peers (and, in
    the full run, two more AffinityBinning settings). Peers a model's top-k cannot run are left out."""
    from .policies import parse_policy
    from .presets import for_shape
    name, preset = for_shape(num_experts, top_k)
    out = [preset]
    for spec in PEERS + (() if quick else EXTRA):
        p = parse_policy(spec)
        try:
            p.check_top_k(top_k)
        except ValueError:
            continue
        if p not in out:
            out.append(p)
    return name, out


def _model_path(arg: Path | None) -> Path:
    from .cli import UsageError
    if arg is not None:
        return arg
    from . import reference_model_path
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
    short = {t: t.removeprefix("lynx_ref_")[:10] for t in tasks}
    head = (f"{'policy':<34} {'distinct':>8} {'saved':>6} {'tok/s':>6} {'speedup':>7} {'bound':>6} {'ppl':>7} "
            f"{'ppl chg % [CI]':>21} {'greedy':>6} {'tasks pts [CI]':>19}" + "".join(f" {short[t]:>10}" for t in tasks))
    lines = [head]
    for r in rows:
        p, q = r["ppl_change_pct"], r["tasks_pooled"]
        line = (f"{r['policy'][:34]:<34} {r['distinct']:>8.1f} {100 * r['saved']:>5.1f}% "
                f"{r['tokens_per_s'] or 0:>6.0f} {r['speedup'] or 0:>6.2f}x {r['bound_speedup'] or 0:>5.2f}x "
                f"{r['ppl']:>7.2f} {p['value']:>+6.2f} [{p['lo']:+.2f},{p['hi']:+.2f}] "
                f"{100 * r['greedy_agreement']:>5.1f}%")
        line += f" {q['value']:>+5.1f} [{q['lo']:+.1f},{q['hi']:+.1f}]".rjust(20) if q else f" {'-':>19}"
        line += "".join(f" {r['tasks'][t]['value']:>+10.1f}" for t in tasks)
        lines.append(line)
    lines.append("tasks (accuracy points; 'tasks' pools every item): " + "; ".join(
        f"{short[t]} {v['metric']} n={v['n']} chance {100 * v['chance']:.0f}% native {100 * v['acc_native']:.1f}%"
        for t, v in tasks.items()))
    return "\n".join(lines)


def _conditions() -> dict:
    import platform

    import torch
    return {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()], "machine": platform.machine(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli import UsageError
    from .evaluate import check_policies, decode_speed, load_inputs, require_plots
    from .plots import distinct_per_layer, quality_vs_saved
    from .quality import EvalConfig, evaluate
    t0 = time.perf_counter()
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    require_plots()
    path = _model_path(args.model)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = args.out or Path("reports") / f"demo-{stamp}"
    conditions = {"start": _conditions()}
    model, tokenizer, path, texts, tasks = load_inputs(path, None, None, "all")
    cfg_e, cfg_k = int(model.config.num_experts), int(model.config.num_experts_per_tok)
    preset_name, policies = demo_policies(cfg_e, cfg_k, args.quick)
    check_policies(model, policies)
    size = SIZES["quick" if args.quick else "full"]
    cfg = EvalConfig(batch_size=args.batch_size, **{k: v for k, v in size.items() if k != "bench_repeats"})
    print(f"lynx demo: {path} ({cfg_e} experts top-{cfg_k}), batch {cfg.batch_size}; native vs "
          f"{', '.join(map(str, policies))} (preset {preset_name})", flush=True)
    print("1/2 quality in decode mode (perplexity, greedy agreement, tasks) ...", flush=True)
    results = evaluate(model, tokenizer, policies, texts, tasks, cfg, progress=True)
    t_eval = time.perf_counter() - t0
    del model
    print(f"    {t_eval:.0f} s; 2/2 decode speed (interleaved timed rounds) ...", flush=True)
    bench = decode_speed(path, policies, cfg.batch_size, size["bench_repeats"], args.threads)
    rows = _rows(results, bench)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{path.name}, batch {cfg.batch_size}"
    plots = [distinct_per_layer(results, out / "distinct_per_layer.png", title=f"{title}: distinct experts "
                                "per layer and decode step (legend: mean)"),
             quality_vs_saved(results, out / "quality_vs_saved.png", title=title)]
    conditions["end"] = _conditions()
    task_info = results[0].get("tasks", {})
    summary = {"model": str(path), "experts": cfg_e, "top_k": cfg_k, "preset": preset_name,
               "quick": args.quick, "seconds": round(time.perf_counter() - t0, 1), "eval_seconds": round(t_eval, 1),
               "conditions": conditions, "config": asdict(cfg),
               "table": rows, "tasks": {t: {k: v[k] for k in ("kind", "metric", "n", "chance", "acc_native")}
                                        for t, v in task_info.items()},
               "plots": [str(p) for p in plots], "eval": results, "bench": bench}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(_table(rows, task_info))
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
    acc = (f"; accuracy over all task items {q['value']:+.1f} points [{q['lo']:+.1f}, {q['hi']:+.1f}]"
           if q else "")
    return (f"preset {r['policy']}: {100 * r['saved']:.0f}% fewer distinct experts per step, "
            f"{r['speedup'] or 0:.2f}x measured ({r['bound_speedup'] or 0:.2f}x memory-bound), perplexity "
            f"{p['value']:+.2f}% [{p['lo']:+.2f}, {p['hi']:+.2f}]{acc}. The paper reports at most 1 point lost "
            f"at up to 1.3x throughput on large models.")
