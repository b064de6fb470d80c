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
  bf16 with random weights (``lynx_moe.shapes``), whose routers replay logits recorded from
  ``--replay-from`` (default: the reference model, same experts and top-k) on held-out text,
  so each step needs a realistic set of experts. ``--router random`` keeps the random routers.

    lynx bench --shape olmoe-1b-7b --layers 4 --batch-sizes 32 \\
        --policy affinity_binning:alpha=3,beta=4 --policy oea --policy xshare
    lynx bench --model PATH --batch-sizes 1,8,32 --json-only

Prints a table and ends with one JSON line (``--json-only``: only that line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ["add_arguments", "run", "time_decode"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import policy_arg, positive_ints
    parser.add_argument("--model", type=Path, default=None, metavar="PATH",
                        help="model folder (default: the reference model)")
    parser.add_argument("--shape", type=str, default=None, metavar="NAME",
                        help="benchmark a random-weight stack of this shape instead (see lynx_moe.shapes: "
                             "olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, olmoe-tiny)")
    parser.add_argument("--layers", type=int, default=4, metavar="N",
                        help="decoder layers of the --shape stack (default 4)")
    parser.add_argument("--router", choices=("replay", "random"), default="replay",
                        help="--shape routers: replay recorded logits (default) or keep random weights")
    parser.add_argument("--replay-from", type=Path, default=None, metavar="PATH",
                        help="model whose router logits the --shape stack replays (default: the reference model)")
    parser.add_argument("--data", type=Path, action="append", default=None, metavar="FILE",
                        help="held-out text JSONL file or folder (repeatable; default: MODEL/eval/heldout)")
    parser.add_argument("--policy", type=policy_arg, action="append", default=None, metavar="SPEC",
                        help="policy spec to compare with native (repeatable; default: the authors' "
                             "AffinityBinning preset for the model's shape)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 8, 16, 32, 64], metavar="B,B,...",
                        help="e.g. 1,8,32")
    parser.add_argument("--new-tokens", type=int, default=16, metavar="N",
                        help="timed decode steps per run (default 16)")
    parser.add_argument("--prompt-len", type=int, default=16, metavar="N",
                        help="prefilled tokens per sequence (default 16)")
    parser.add_argument("--repeats", type=int, default=3, metavar="R", help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, metavar="MIB",
                        help="buffer size of the copy-bandwidth measurement (default 1024 MiB; 0: skip)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="also write the results to OUT/bench.json")
    parser.add_argument("--json-only", action="store_true", help="print only the final JSON line")


def _check_args(args: argparse.Namespace) -> None:
    from .cli import UsageError
    for name in ("new_tokens", "prompt_len", "repeats", "layers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.bandwidth_mib < 0:
        raise UsageError("--bandwidth-mib must be >= 0")
    if args.shape is not None and args.model is not None:
        raise UsageError("give --model or --shape, not both")
    if args.shape is not None:
        from .shapes import get_shape
        try:
            get_shape(args.shape)
        except ValueError as e:
            raise UsageError(str(e)) from None


# ---------------------------------------------------------------------------------------
# Models and tokens

def _model_and_tokens(args, rows: int, length: int):
    """``(model, tokens [rows, length], replay or None, description)``."""
    from .cli import UsageError
    from .profile import default_data, load_model, load_texts, record_routing, token_batch
    if args.shape is None:
        model, tokenizer = load_model(args.model)
        path = args.model or _ref_path()
        texts = load_texts(args.data or [default_data(path)])
        tokens = token_batch(texts, tokenizer, rows, length, model.config.vocab_size)
        return model, tokens, None, {"model": str(path)}

    from .shapes import LogitReplay, build_stack, get_shape
    shape = get_shape(args.shape)
    desc = {**{f"shape_{k}": v for k, v in vars(shape).items()},
            "shape": args.shape, "layers": args.layers, "router": args.router}
    logits = None
    if args.router == "replay":
        # Record first: the reference model is small, the stack is not.
        src, tokenizer = load_model(args.replay_from)
        E = _num_experts(src.config)
        if (E, src.config.num_experts_per_tok) != (shape.experts, shape.top_k):
            raise UsageError(f"--replay-from has {E} experts top-{src.config.num_experts_per_tok} but "
                             f"{args.shape} has {shape.experts} top-{shape.top_k}; use --router random")
        path = args.replay_from or _ref_path()
        texts = load_texts(args.data or [default_data(path)])
        rec_tokens = token_batch(texts, tokenizer, rows, length, src.config.vocab_size)
        logits, _ = record_routing(src, rec_tokens, args.prompt_len, progress=not args.json_only)
        desc["replay_from"] = str(path)
        del src
    model = build_stack(shape, args.layers)
    # Token ids only feed the random embedding; 0 is the EOS/pad id (a finished row never votes).
    tokens = torch.randint(1, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    replay = LogitReplay(model, logits) if logits is not None else None
    return model, tokens, replay, desc


def _num_experts(cfg) -> int:
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    from .cli import UsageError
    raise UsageError(f"{type(cfg).__name__} names no routed-expert count: is this a MoE model?")


def _ref_path() -> Path:
    from . import reference_model_path
    return reference_model_path()


# ---------------------------------------------------------------------------------------
# Timing

def time_decode(model, tokens: torch.Tensor, cache, prompt_len: int, replay=None) -> list[float]:
    """Seconds of each decode step of ``tokens[:, prompt_len:]`` after ``cache`` (holding the
    prompt); the cache is rolled back to the prompt afterwards."""
    from .profile import decode_step
    times = []
    try:
        for i, s in enumerate(range(prompt_len, tokens.shape[1])):
            if replay is not None:
                replay.step = i
            t = time.perf_counter()
            decode_step(model, tokens[:, s:s + 1], cache)
            times.append(time.perf_counter() - t)
    finally:
        cache.crop(-(cache.get_seq_length() - prompt_len))
    return times


class _ExpertClock:
    """Wall time spent inside the routed-experts modules: the part of a step that a policy
    can shrink (two clock reads per layer, microseconds against milliseconds)."""

    def __init__(self, model) -> None:
        from .bandwidth import experts_modules
        self.seconds = 0.0
        self._start = 0.0
        self._handles = []
        for m in experts_modules(model):
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args) -> None:
        self._start = time.perf_counter()

    def _post(self, module, args, out) -> None:
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _bench_batch(model, tokens, prompt_len, replay, policies, repeats, progress) -> dict:
    """Interleaved rounds for one batch size; returns per-policy timings and distinct counts."""
    import lynx_moe as lynx
    from tqdm import tqdm

    from .profile import prefill
    B = tokens.shape[0]
    if replay is not None:
        replay.active = False  # prefill routes on the stack's own (identity) routers
    cache = prefill(model, tokens[:, :prompt_len])
    if replay is not None:
        replay.active = True
    names = ["native"] + [str(p) for p in policies]
    runs = {n: [] for n in names}
    experts = {n: [] for n in names}
    clock = _ExpertClock(model)
    distinct = {}
    bar = tqdm(total=(repeats + 1) * len(names), desc=f"batch {B}", file=sys.stderr,
               disable=not progress, leave=False)
    for round_ in range(repeats + 1):
        warm = round_ == 0
        for name, policy in zip(names, [lynx.TopK()] + list(policies)):
            if warm:  # untimed: count distinct experts (for native too, via the no-op policy)
                lynx.apply_(model, policy, stats=True)
            elif policy.kind != "native":
                lynx.apply_(model, policy, stats=False)
            try:
                clock.seconds = 0.0
                secs = time_decode(model, tokens, cache, prompt_len, replay)
                if warm:
                    distinct[name] = [s.distinct_policy for s in lynx.routing_stats(model)]
            finally:
                lynx.remove_(model)
            if not warm:
                runs[name].append(sum(secs) / len(secs))
                experts[name].append(clock.seconds / len(secs))
            bar.update()
    bar.close()
    clock.remove()
    return {"runs": runs, "experts": experts, "distinct": distinct}


def _summarise(B, res, step_bytes, context, bw) -> list[dict]:
    runs, out, totals = res["runs"], [], []
    native = runs["native"]
    for name, secs in runs.items():
        ms = [1000 * s for s in secs]
        speedups = [n / s for n, s in zip(native, secs)]
        distinct = res["distinct"][name]
        expert_b = step_bytes.experts_read(distinct)
        total_b = expert_b + step_bytes.other_read(B, context)
        totals.append(total_b)
        row = {"batch": B, "policy": name, "ms_per_step": round(statistics.median(ms), 2),
               "ms_min": round(min(ms), 2), "ms_max": round(max(ms), 2),
               "experts_ms_per_step": round(1000 * statistics.median(res["experts"][name]), 2),
               "tokens_per_s": round(B * 1000 / statistics.median(ms), 1),
               "speedup": round(statistics.median(speedups), 3),
               "distinct_mean": round(sum(distinct) / len(distinct), 2),
               "distinct_per_layer": [round(d, 2) for d in distinct],
               "expert_mb_per_step": round(expert_b / 1e6, 1), "total_mb_per_step": round(total_b / 1e6, 1)}
        if bw is not None:
            row["bound_ms"] = round(total_b / bw.gbps / 1e6, 4)
        out.append(row)
    # The speedup a purely memory-bound step would get: native bytes / policy bytes.
    for row, total_b in zip(out, totals):
        row["bound_speedup"] = round(totals[0] / total_b, 3)
    return out


def _header() -> str:
    return (f"{'B':>3} {'policy':<34} {'ms/step':>8} {'min-max':>13} {'experts':>8} {'tok/s':>8} {'speedup':>7} "
            f"{'distinct':>8} {'expert MB':>9} {'total MB':>8} {'bound ms':>8} {'bound x':>7}")


def _row(r: dict) -> str:
    return (f"{r['batch']:>3} {r['policy'][:34]:<34} {r['ms_per_step']:>8.1f} "
            f"{r['ms_min']:>6.1f}-{r['ms_max']:<6.1f} {r['experts_ms_per_step']:>8.1f} "
            f"{r['tokens_per_s']:>8.1f} {r['speedup']:>6.2f}x "
            f"{r['distinct_mean']:>8.1f} {r['expert_mb_per_step']:>9.1f} {r['total_mb_per_step']:>8.1f} "
            f"{r.get('bound_ms', float('nan')):>8.1f} {r['bound_speedup']:>6.2f}x")


def _conditions(load_before: float) -> dict:
    """What a reader needs to judge the numbers: versions, cores, and how busy the machine was
    (1-minute load average before and after; above the core count means contention)."""
    import platform

    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": _cpu_name() or platform.machine(), "cores": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run(args: argparse.Namespace) -> int:
    from .bandwidth import StepBytes, copy_bandwidth
    from .presets import for_shape
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows, length = max(args.batch_sizes), args.prompt_len + args.new_tokens
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model, tokens, replay, desc = _model_and_tokens(args, rows, length)
    cfg = model.config
    E = _num_experts(cfg)
    preset_name, preset = for_shape(E, cfg.num_experts_per_tok)
    policies = [p for p in (args.policy or [preset]) if p.kind != "native"]
    try:
        import lynx_moe as lynx
        for p in policies:
            lynx.apply_(model, p, stats=False)  # fails early on an unsupported model or top_k
            lynx.remove_(model)
    except ValueError as e:
        from .cli import UsageError
        raise UsageError(str(e)) from None
    try:
        step_bytes = StepBytes.of(model)
    except ValueError as e:
        from .cli import UsageError
        raise UsageError(str(e)) from None
    bw = copy_bandwidth(args.bandwidth_mib << 20) if args.bandwidth_mib else None
    setup_s = time.perf_counter() - t0
    results = []
    if not args.json_only:
        print(_header(), flush=True)
    for B in args.batch_sizes:
        res = _bench_batch(model, tokens[:B], args.prompt_len, replay, policies, args.repeats, not args.json_only)
        context = args.prompt_len + (args.new_tokens + 1) / 2   # mean tokens attended per timed step
        rows_b = _summarise(B, res, step_bytes, context, bw)
        results += rows_b
        if not args.json_only:
            print("\n".join(map(_row, rows_b)), flush=True)
    # Measured again after timing: a large drift means the machine got busier or quieter.
    bw_after = copy_bandwidth(args.bandwidth_mib << 20) if args.bandwidth_mib else None
    summary = {
        **desc, **_conditions(load_before), "experts": E, "top_k": cfg.num_experts_per_tok,
        "dtype": str(next(model.parameters()).dtype),
        "preset": preset_name, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "setup_s": round(setup_s, 1),
        "bandwidth_gbps": None if bw is None else round(bw.gbps, 2),
        "bandwidth": None if bw is None else bw.to_dict(),
        "bandwidth_after_gbps": None if bw_after is None else round(bw_after.gbps, 2),
        "dense_mb_per_step": round(step_bytes.dense / 1e6, 1),
        "expert_mb": round(step_bytes.expert[0] / 1e6, 2), "results": results,
    }
    if not args.json_only and bw is not None:
        print(f"copy bandwidth {bw.gbps:.1f} GB/s (min {bw.min_gbps:.1f}, max {bw.max_gbps:.1f}; "
              f"{summary['bandwidth_after_gbps']:.1f} after timing); one expert "
              f"{summary['expert_mb']} MB; dense weights {summary['dense_mb_per_step']} MB/step; "
              f"{summary['threads']} threads; load average {summary['load_avg_before']} -> "
              f"{summary['load_avg_after']} on {summary['cores']} cores")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0
