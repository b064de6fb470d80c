"""Microseconds per ``select_experts`` call: each policy on the torch reference path and on the
fused path (``lynx_moe/fused.py``), beside native top-k (``TopK``), in one process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/policy_speed.py [--threads 1] [--repeats 7]
        [--rows 1,8,64,256] [--shapes 8x2,64x8,128x8]

For every (E, k), T rows and policy, native, reference (``LYNX_FUSED=0``) and fused calls are
timed interleaved (native, reference, fused, native, ...), each measurement the median of a
burst of calls; the table shows the median over repeats and the median ratio of each path to
the native call timed beside it (min over repeats in the JSON too). Router logits are random
with a shared per-expert offset, so batches are skewed like real ones. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # after OMP_WAIT_POLICY

import lynx_moe as lynx
from lynx_moe import fused

SHAPES = "8x2,64x8,128x8"
ROWS = "1,8,32,64,256"


def policies_for(E: int, k: int) -> dict[str, lynx.Policy]:
    _, preset = lynx.presets.for_shape(E, k)
    return {
        "affinity_binning": preset,
        "confidence": lynx.Confidence(),
        "static_k": lynx.StaticK(max(1, k // 2)),
        "ser": lynx.SER(max(1, k // 4), 0.3),
        "batch_top_n": lynx.BatchTopN(max(k, E // 4)),
        "oea": lynx.OEA(max(1, k // 4)),
        "xshare": lynx.XShare(max(k, E // 4), 1),
        # a random size fit: SizePrice's cost does not depend on it (a fixed number of rounds)
        "size_price": lynx.SizePrice().bound(torch.randn(3 * E + 2, E, generator=torch.Generator().manual_seed(0)) * 0.05),
    }


def burst_us(fn, calls: int, fused_on: bool) -> float:
    os.environ["LYNX_FUSED"] = "1" if fused_on else "0"
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(logits: torch.Tensor, k: int, policy: lynx.Policy, repeats: int, calls: int) -> dict:
    native = lambda: lynx.select_experts(logits, k, lynx.TopK())
    run = lambda: lynx.select_experts(logits, k, policy)
    for on in (False, True):   # warm-up (and the first-use build of the fused kernel)
        burst_us(run, 3, on)
    base, ref, fast = [], [], []
    for _ in range(repeats):
        base.append(burst_us(native, calls, True))
        ref.append(burst_us(run, calls, False))
        fast.append(burst_us(run, calls, True))
    ratios = lambda xs: [x / b for x, b in zip(xs, base)]
    return {"native_us": round(statistics.median(base), 1), "reference_us": round(statistics.median(ref), 1),
            "fused_us": round(statistics.median(fast), 1),
            "reference_ratio": round(statistics.median(ratios(ref)), 2),
            "fused_ratio": round(statistics.median(ratios(fast)), 2),
            "fused_ratio_min": round(min(ratios(fast)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50, help="calls per burst")
    ap.add_argument("--rows", default=ROWS, help=f"comma-separated T values (default {ROWS})")
    ap.add_argument("--shapes", default=SHAPES, help=f"comma-separated ExK shapes (default {SHAPES})")
    args = ap.parse_args()
    rows = [int(t) for t in args.rows.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.set_num_threads(args.threads)
    had = os.environ.get("LYNX_FUSED")
    fused_cpu = fused.cpu_kernel_available()
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, fused CPU kernel "
          f"{'built' if fused_cpu else 'NOT available'}, median of {args.repeats} interleaved bursts of "
          f"{args.calls} calls; ratios to the native call timed beside each")
    print(f"{'E x k':>8} {'T':>4} {'policy':>17} {'native us':>10} {'ref us':>8} {'fused us':>9} "
          f"{'ref x':>6} {'fused x':>8}")
    for E, k in shapes:
        for T in rows:
            logits = torch.randn(T, E, generator=g) + 2 * torch.randn(1, E, generator=g)
            for name, policy in policies_for(E, k).items():
                r = dict(E=E, k=k, T=T, policy=str(policy), fused=fused.policy_args(policy) is not None,
                         **measure(logits, k, policy, args.repeats, args.calls))
                results.append(r)
                print(f"{E:>4} x {k:<2} {T:>4} {name:>17} {r['native_us']:>10.1f} {r['reference_us']:>8.1f} "
                      f"{r['fused_us']:>9.1f} {r['reference_ratio']:>6.2f} {r['fused_ratio']:>8.2f}")
    if had is None:
        os.environ.pop("LYNX_FUSED", None)
    else:
        os.environ["LYNX_FUSED"] = had
    target = next((r for r in results if r["E"] == 128 and r["k"] == 8 and r["T"] == 64
                   and r["policy"].startswith("affinity_binning")), None)
    worst = max((r for r in results if r["T"] <= 256 and r["fused"]), key=lambda r: r["fused_ratio"], default=None)
    if target:
        print(f"target AffinityBinning T=64 E=128 k=8: fused {target['fused_us']} us = {target['fused_ratio']}x "
              f"native (goal <= 2x); reference {target['reference_ratio']}x")
    if worst:
        print(f"slowest fused policy at T <= 256: {worst['policy']} E={worst['E']} T={worst['T']}: "
              f"{worst['fused_ratio']}x native (goal <= 3x)")
    print(json.dumps({"benchmark": "policy_speed", "threads": args.threads, "repeats": args.repeats,
                      "calls": args.calls, "fused_cpu_kernel": fused_cpu, "target": target,
                      "worst_fused": worst, "results": results}))


if __name__ == "__main__":
    main()
