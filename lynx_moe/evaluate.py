"""``lynx eval``: how much quality each routing policy costs against native routing.

Every quality figure is measured in decode mode (``lynx_moe.scoring``): sequences go in
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
The measuring is in ``lynx_moe.quality`` (per policy) and ``lynx_moe.scoring`` (decode loops).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .quality import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate", "expand_sweep", "load_inputs", "check_policies", "require_plots",
           "decode_speed", "format_table", "add_arguments", "run"]

DEFAULT_SWEEP = "affinity_binning:alpha=1|3,beta=1|2|4"


# ---------------------------------------------------------------------------------------
# Sweep grids

def _values(field: str, text: str) -> list[str]:
    if "|" in text:
        return [v.strip() for v in text.split("|") if v.strip()]
    if ".." not in text:
        return [text.strip()]
    lo_s, hi_s = (v.strip() for v in text.split("..", 1))
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise ValueError(f"{field}: bad range {text!r}; expected e.g. 1..4 or 0.5..4") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{field}: range {text!r} must have 0 < lo <= hi")
    if lo.is_integer() and hi.is_integer() and "." not in lo_s + hi_s:
        return [str(v) for v in range(int(lo), int(hi) + 1)]
    vals, v = [], lo
    while v < hi * (1 - 1e-9):
        vals.append(f"{v:g}")
        v *= 2
    return vals + [f"{hi:g}"]


def expand_sweep(spec: str, max_points: int = 64) -> list:
    """Policies of a grid spec, e.g. ``affinity_binning:alpha=0.5..4,beta=2|4`` (8 settings)."""
    from .policies import parse_policy
    name, _, rest = spec.strip().partition(":")
    fields = [item.split("=", 1) for item in rest.split(",") if item.strip()] if rest else []
    if any(len(f) != 2 for f in fields):
        raise ValueError(f"bad sweep spec {spec!r}: expected name:field=values,...")
    grids = [[(k.strip(), v) for v in _values(k.strip(), vals)] for k, vals in fields]
    combos = list(itertools.product(*grids))
    if len(combos) > max_points:
        raise ValueError(f"sweep {spec!r} has {len(combos)} settings; at most {max_points}")
    return [parse_policy(name + (":" + ",".join(f"{k}={v}" for k, v in c) if c else "")) for c in combos]


# ---------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import policy_arg
    parser.add_argument("--model", type=Path, default=None, metavar="PATH",
                        help="model folder (default: the reference model)")
    parser.add_argument("--policy", type=policy_arg, action="append", default=None, metavar="SPEC",
                        help="policy spec to compare with native (repeatable; default: the authors' "
                             "AffinityBinning preset for the model's shape)")
    parser.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, default=None, metavar="GRID",
                        help="also evaluate a grid of settings, e.g. 'affinity_binning:alpha=0.5..4,beta=1..4' "
                             f"(lo..hi: integers or doublings; a|b: a list; default grid {DEFAULT_SWEEP!r})")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="decode rows per step (default 32)")
    parser.add_argument("--tasks", default="all", metavar="NAMES",
                        help="comma-separated task names, 'all' (default) or 'none'")
    parser.add_argument("--limit", type=int, default=200, metavar="N", help="items per task (default 200)")
    parser.add_argument("--ppl-rows", type=int, default=16, metavar="N",
                        help="held-out rows per domain (default 16; 0: skip)")
    parser.add_argument("--ppl-tokens", type=int, default=64, metavar="N",
                        help="scored decode steps per held-out row (default 64)")
    parser.add_argument("--prefix", type=int, default=16, metavar="N",
                        help="prefilled tokens per held-out row (default 16)")
    parser.add_argument("--gen-prompts", type=int, default=64, metavar="N",
                        help="greedy-agreement prompts (default 64; 0: skip)")
    parser.add_argument("--gen-tokens", type=int, default=32, metavar="N", help="greedy-agreement tokens (default 32)")
    parser.add_argument("--data", type=Path, action="append", default=None, metavar="FILE",
                        help="held-out text JSONL file or folder (default: MODEL/eval/heldout)")
    parser.add_argument("--eval-dir", type=Path, default=None, metavar="DIR",
                        help="folder of lm-eval YAML tasks (default: MODEL/eval, else the reference model's)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--speed", type=int, nargs="?", const=3, default=0, metavar="ROUNDS",
                        help="also time decode steps of every policy at --batch-size (lynx bench: interleaved "
                             "rounds, default 3) and report the speedup over native")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write eval.json (and the sweep plot) here")
    parser.add_argument("--json-only", action="store_true", help="print only the final JSON line")


def _config(args) -> EvalConfig:
    from .cli import UsageError
    for name in ("batch_size", "ppl_tokens", "prefix", "gen_tokens", "limit"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("ppl_rows", "gen_prompts", "speed"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    return EvalConfig(batch_size=args.batch_size, prefix=args.prefix, ppl_tokens=args.ppl_tokens,
                      ppl_per_domain=args.ppl_rows, limit=args.limit, gen_prompts=args.gen_prompts,
                      gen_tokens=args.gen_tokens)


def load_inputs(model_path: Path | None, data: list[Path] | None, eval_dir: Path | None, task_names: str):
    """``(model, tokenizer, path, texts or None, tasks)`` for ``lynx eval`` / ``lynx demo``;
    UsageError for a bad model, data or task name."""
    from .cli import UsageError
    from .profile import default_data, load_model, load_texts
    from .tasks import load_tasks, select_tasks
    model, tokenizer = load_model(model_path)
    path = Path(model_path) if model_path else _ref_path()
    if tokenizer is None:
        raise UsageError(f"--model {path}: no tokenizer there (lynx eval needs one to read text and tasks)")
    names = [t.strip() for t in task_names.split(",") if t.strip()]
    tasks = []
    if names != ["none"]:
        eval_dir = eval_dir or _default_eval_dir(path)
        try:
            tasks = select_tasks(load_tasks(eval_dir) if eval_dir else {}, names or ["all"])
        except ValueError as e:
            raise UsageError(f"--tasks: {e} (in {eval_dir})") from None
    texts = load_texts(data or [default_data(path)])
    return model, tokenizer, path, texts, tasks


def _default_eval_dir(path: Path) -> Path | None:
    candidates = [path / "eval"]
    try:
        candidates.append(_ref_path() / "eval")
    except FileNotFoundError:
        pass
    return next((c for c in candidates if c.is_dir() and any(c.glob("*.yaml"))), None)


def _ref_path() -> Path:
    from . import reference_model_path
    return reference_model_path()


def check_policies(model, policies: list) -> None:
    """UsageError when a policy cannot run on ``model`` (unsupported model, top_k too small)."""
    import lynx_moe as lynx
    from .cli import UsageError
    for p in policies:
        try:
            lynx.apply_(model, p, stats=False)
        except ValueError as e:
            raise UsageError(f"{p}: {e}") from None
        finally:
            lynx.remove_(model)


def require_plots() -> None:
    """UsageError naming the ``plot`` extra if matplotlib is missing (checked before a long run)."""
    from .cli import UsageError
    from .plots import require
    try:
        require()
    except ImportError as e:
        raise UsageError(str(e)) from None


def decode_speed(path: Path, policies: list, batch: int, repeats: int = 3, threads: int | None = None) -> dict:
    """Decode speed of native and ``policies`` at one batch size: ``lynx bench``'s JSON summary
    (interleaved timed rounds of 16 teacher-forced steps after a 16-token prompt)."""
    from . import bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--model", str(path), "--batch-sizes", str(batch), "--new-tokens", "16", "--prompt-len", "16",
            "--repeats", str(repeats), "--bandwidth-mib", "256", "--json-only"]
    argv += [a for p in policies for a in ("--policy", str(p))]
    if threads:
        argv += ["--threads", str(threads)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench.run(parser.parse_args(argv))
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ci(d: dict) -> str:
    return f"{d['value']:+.2f} [{d['lo']:+.2f},{d['hi']:+.2f}]"


def format_table(results: list[dict]) -> str:
    """Quality table: one row per policy; then one row per task with each policy's delta."""
    speed = "speed" in results[0]
    lines = [f"{'policy':<36} {'distinct':>8} {'saved':>6} {'ppl':>8} {'ppl change % [95% CI]':>24} "
             f"{'KL':>7} {'top1':>6} {'greedy':>6} {'1st div':>7}" + (f" {'speedup':>7} {'bound':>6}" if speed else "")]
    for i, r in enumerate(results):
        rt, p, g = r["routing"], r.get("perplexity"), r.get("greedy")
        label = r["policy"] if i == 0 else f"[{i}] {r['policy']}"
        lines.append(f"{label[:36]:<36} {rt['distinct']:>8.1f} {100 * rt['saved']:>5.1f}% "
                     + (f"{p['ppl']:>8.2f} {_ci(p['delta_pct']):>24} {p['kl']:>7.4f} {100 * p['top1_agreement']:>5.1f}%"
                        if p else f"{'-':>8} {'-':>24} {'-':>7} {'-':>6}")
                     + (f" {100 * g['agreement']:>5.1f}% {g['first_divergence']:>7.1f}" if g else f" {'-':>6} {'-':>7}")
                     + (f" {_x(r['speed']['speedup']):>7} {_x(r['speed']['bound_speedup']):>6}" if speed else ""))
    if "perplexity" in results[0] and len(results) > 1:
        lines.append("perplexity by domain: native, then the change in % for policy [1], [2], ... (rows above)")
        for d, ppl in results[0]["perplexity"]["by_domain"].items():
            changes = [100 * (r["perplexity"]["by_domain"][d] / ppl - 1) for r in results[1:]]
            lines.append(f"  {d[:14]:<14} {ppl:>9.2f} " + " ".join(f"[{i + 1}] {c:+.2f}" for i, c in enumerate(changes)))
    for name, t in results[0].get("tasks", {}).items():
        lines.append(f"task {name} (n={t['n']}, {t['metric']}, chance {100 * t['chance']:.1f}%, native "
                     f"{100 * t['acc_native']:.1f}%): change, points [95% CI]")
        for r in results[1:]:
            tr = r["tasks"][name]
            lines.append(f"  {r['policy'][:34]:<34} {_ci(tr['delta_points']):>24}   acc {100 * tr['acc']:.1f}%"
                         f"   distinct {tr['routing']['distinct']:.1f}")
    if "tasks_pooled" in results[0]:
        t = results[0]["tasks_pooled"]
        lines.append(f"all task items pooled (n={t['n']}, native {100 * t['acc_native']:.1f}%): change, points [95% CI]")
        for r in results[1:]:
            lines.append(f"  {r['policy'][:34]:<34} {_ci(r['tasks_pooled']['delta_points']):>24}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .cli import UsageError
    from .presets import for_shape
    cfg = _config(args)
    sweep = []
    if args.sweep is not None:
        try:
            sweep = expand_sweep(args.sweep)
        except ValueError as e:
            raise UsageError(f"--sweep: {e}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if sweep and args.out is not None:
        require_plots()
    model, tokenizer, path, texts, tasks = load_inputs(args.model, args.data, args.eval_dir, args.tasks)
    from .hf import find_routers
    routers = find_routers(model)
    if not routers:
        raise UsageError(f"--model {path}: no MoE router that lynx_moe can patch")
    E, K = int(routers[0][1].num_experts), int(routers[0][1].top_k)
    preset_name, preset = for_shape(E, K)
    policies = list(args.policy or ([] if sweep else [preset])) + sweep
    check_policies(model, policies)
    if cfg.ppl_per_domain == 0 and not tasks:
        raise UsageError("nothing to evaluate: --ppl-rows 0 and --tasks none")
    results = evaluate(model, tokenizer, policies, texts if cfg.ppl_per_domain else None, tasks, cfg,
                       progress=not args.json_only)
    dtype = str(next(model.parameters()).dtype)
    if args.speed:
        del model   # the benchmark loads its own copy
        bench = decode_speed(path, policies, cfg.batch_size, args.speed, args.threads)
        by_policy = {b["policy"]: b for b in bench["results"]}
        for r in results:
            b = by_policy.get(r["policy"], {})
            r["speed"] = {k: b.get(k) for k in ("ms_per_step", "tokens_per_s", "speedup", "bound_speedup",
                                                 "experts_ms_per_step")}
        summary_bench = {k: v for k, v in bench.items() if k != "results"}
    summary = {"model": str(path), "experts": E, "top_k": K, "preset": preset_name, "config": asdict(cfg),
               "threads": torch.get_num_threads(), "dtype": dtype,
               "tasks": {t.name: {k: results[0]["tasks"][t.name][k] for k in ("kind", "metric", "n", "chance")}
                         | {"source": t.source} for t in tasks},
               "results": results}
    if args.speed:
        summary["bench"] = summary_bench
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if sweep:
            from .plots import quality_vs_saved
            summary["plots"] = [str(quality_vs_saved(results, args.out / "sweep.png",
                                                     title=f"{path.name}: {args.sweep} at batch {cfg.batch_size}"))]
        (args.out / "eval.json").write_text(json.dumps(summary, indent=1))
    if not args.json_only:
        print(f"{path}: {E} experts top-{K}, batch {cfg.batch_size}, {results[0].get('eval_seconds')} s")
        print(format_table(results))
        if args.out is not None:
            print(f"wrote {args.out / 'eval.json'}" + "".join(f", {p}" for p in summary.get("plots", [])))
    print(json.dumps(summary))
    return 0
