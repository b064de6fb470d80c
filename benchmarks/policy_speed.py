"""Microseconds per ``select_experts`` call, each policy against native top-k (``TopK``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/policy_speed.py [--threads 1] [--repeats 7]

For T in {1, 8, 32, 64, 256} rows and (E, k) in {(8, 2), (64, 8), (128, 8)}: every policy and
the native baseline are timed interleaved in one process (baseline, policy, baseline, ...),
each measurement the median of a burst of calls; the table shows the median over repeats and
the ratio to the baseline timed next to it. Router logits are random with a shared
per-expert offset, so batches are skewed like real ones. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

import lynx_moe as lynx  # noqa: E402

SHAPES = [(8, 2), (64, 8), (128, 8)]
ROWS = [1, 8, 32, 64, 256]


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
    }


def burst_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50, help="calls per burst")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"median of {args.repeats} interleaved bursts of {args.calls} calls")
    print(f"{'E x k':>8} {'T':>4} {'policy':>17} {'native us':>10} {'policy us':>10} {'ratio':>6}")
    for E, k in SHAPES:
        for T in ROWS:
            logits = torch.randn(T, E, generator=g) + 2 * torch.randn(1, E, generator=g)
            native = lambda: lynx.select_experts(logits, k, lynx.TopK())  # noqa: E731
            for name, policy in policies_for(E, k).items():
                run = lambda: lynx.select_experts(logits, k, policy)  # noqa: E731
                run(), native()  # warm-up
                base, pol = [], []
                for _ in range(args.repeats):
                    base.append(burst_us(native, args.calls))
                    pol.append(burst_us(run, args.calls))
                b, p = statistics.median(base), statistics.median(pol)
                ratio = statistics.median(x / y for x, y in zip(pol, base))
                results.append(dict(E=E, k=k, T=T, policy=str(policy), native_us=round(b, 1),
                                    policy_us=round(p, 1), ratio=round(ratio, 2)))
                print(f"{E:>4} x {k:<2} {T:>4} {name:>17} {b:>10.1f} {p:>10.1f} {ratio:>6.2f}")
    target = next(r for r in results if r["E"] == 128 and r["k"] == 8 and r["T"] == 64
                  and r["policy"].startswith("affinity_binning"))
    print(f"target AffinityBinning T=64 E=128 k=8: {target['policy_us']} us "
          f"({target['ratio']}x native; target < 150 us and < 3x)")
    print(json.dumps({"benchmark": "policy_speed", "threads": args.threads, "repeats": args.repeats,
                      "target": target, "results": results}))


if __name__ == "__main__":
    main()
