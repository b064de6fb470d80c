"""Served decode speed: `lynx serve` under vLLM's own load generator, native vs policies.

    python benchmarks/serve_bench.py                                   # the reference model
    python benchmarks/serve_bench.py --shape olmoe-1b-7b --layers 4    # realistic shape, replayed routing
    python benchmarks/serve_bench.py --policy preset --policy affinity_binning:alpha=3,beta=2 --concurrency 1,8,16,32

For each policy (native first) one `lynx serve` starts (eager, bf16); then, per concurrency,
`vllm bench serve` (run as `lynx vllm bench serve`) sends the conventions vLLM users and the
Lynx/XShare authors use: random dataset, fixed input/output lengths (`--input-len` 128,
`--output-len` 64), `--ignore-eos`, temperature 0, `--max-concurrency C`, `--num-warmups min(C, 8)`
first, `--prompts-per-concurrency` x C prompts. Reported per policy and concurrency: output
tok/s, TPOT p50/p99 (ms), TTFT p50, and distinct experts per decode step native -> policy,
averaged over the plugin's periodic log lines (`--stats-every` steps each) printed during
that run.

With `--shape`, the model is a random-weight causal LM at that shape carrying the reference
tokenizer, and its MoE gates replay router logits recorded from the reference model on
held-out text (as `lynx bench --shape` does): a `sitecustomize` on the server's PYTHONPATH
calls `lynx_moe.measure.vllm_speed.patch_gates_for_replay` in each server process.

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LYNX = [sys.executable, "-c", "import sys; from lynx_moe.cli import main; sys.exit(main())"]
LOG_LINE = re.compile(r"distinct experts per decode step .*? native ([\d.]+) -> policy ([\d.]+)")


def parse_args(argv=None) -> argparse.Namespace:
    from lynx_moe.cli.args import positive_ints
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the reference model)")
    p.add_argument("--shape", default=None, help="serve a random-weight model of this shape, replayed routing")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--policy", action="append", default=None,
                   help="repeatable (default: preset and affinity_binning:alpha=3,beta=2)")
    p.add_argument("--concurrency", type=positive_ints, default=[1, 8, 16, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts-per-concurrency", type=int, default=4)
    p.add_argument("--stats-every", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lynx-serve-bench"))
    p.add_argument("--kv-cache-gib", default="2")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(args) -> tuple[str, dict, dict]:
    """(model dir, extra server env, description)."""
    from lynx_moe import reference_model_path
    if args.shape is None:
        path = str(args.model or reference_model_path())
        return path, {}, {"model": path, "routing": "own"}
    from lynx_moe.measure.vllm_speed import build_shape_model, record_bank
    args.workdir.mkdir(parents=True, exist_ok=True)
    bank = args.workdir / "replay.pt"
    src, shape = record_bank(None, 64, 16, 2 * args.output_len, bank)
    model = build_shape_model(args.shape, args.layers, args.workdir / f"{args.shape}-L{args.layers}-tok",
                              tokenizer_from=reference_model_path())
    site = Path(tempfile.mkdtemp(prefix="lynx-replay-site-"))
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('LYNX_BENCH_REPLAY'):\n"
        "    from lynx_moe.measure.vllm_speed import patch_gates_for_replay\n"
        "    patch_gates_for_replay(os.environ['LYNX_BENCH_REPLAY'])\n")
    env = {"LYNX_BENCH_REPLAY": str(bank), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return str(model), env, {"shape": args.shape, "layers": args.layers, "routing": f"replayed from {src}",
                             "replay_shape": shape}


def _serve(model: str, policy: str, port: int, args, env: dict, log: Path) -> subprocess.Popen:
    cmd = [*LYNX, "serve", model, "--policy", policy, "--stats-every", str(args.stats_every), "--port", str(port),
           "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", str(args.input_len + args.output_len + 64),
           "--max-num-seqs", str(max(args.concurrency))]
    server = subprocess.Popen(cmd, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib, **env},
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"lynx serve exited ({server.returncode}); see {log}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"lynx serve did not become healthy in 600 s; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(2)


def _bench(model: str, served: str, port: int, C: int, args, out: Path) -> dict:
    cmd = [*LYNX, "vllm", "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
           "--model", served, "--tokenizer", model, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--ignore-eos", "--temperature", "0", "--max-concurrency", str(C), "--num-warmups", str(min(C, 8)),
           "--num-prompts", str(args.prompts_per_concurrency * C), "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    from lynx_moe.measure.machine import conditions
    model, env, desc = _prepare(args)
    policies = ["topk", *(args.policy or ["preset", "affinity_binning:alpha=3,beta=2"])]
    served = Path(model).name
    before = conditions()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lynx-serve-bench-") as tmp:
        for policy in policies:
            port, log = _free_port(), Path(tmp) / f"serve-{len(rows)}.log"
            server = _serve(model, policy, port, args, env, log)
            try:
                for C in args.concurrency:
                    mark = len(log.read_text())
                    r = _bench(model, served, port, C, args, Path(tmp) / f"bench-{policy}-{C}.json".replace(":", "_"))
                    windows = [tuple(map(float, m.groups())) for m in LOG_LINE.finditer(log.read_text()[mark:])]
                    row = {"policy": policy, "concurrency": C, "completed": r["completed"],
                           "output_tok_s": round(r["output_throughput"], 1),
                           "tpot_p50_ms": round(r["p50_tpot_ms"], 1), "tpot_p99_ms": round(r["p99_tpot_ms"], 1),
                           "ttft_p50_ms": round(r["p50_ttft_ms"], 1),
                           "native_distinct": round(sum(w[0] for w in windows) / len(windows), 1) if windows else None,
                           "policy_distinct": round(sum(w[1] for w in windows) / len(windows), 1) if windows else None}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            finally:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
    native = {r["concurrency"]: r["output_tok_s"] for r in rows if r["policy"] == "topk"}
    for r in rows:
        r["speedup"] = round(r["output_tok_s"] / native[r["concurrency"]], 3)
    print(f"lynx serve + vllm bench serve: random {args.input_len} in / {args.output_len} out, ignore-eos, "
          f"temperature 0; {desc.get('model') or desc['shape']}; routing {desc['routing']}")
    print(f"{'policy':<34} {'conc':>4} {'out tok/s':>9} {'speedup':>7} {'TPOT p50':>8} {'p99':>7} {'TTFT p50':>8} "
          f"{'distinct native->policy':>24}")
    for r in rows:
        d = f"{r['native_distinct']} -> {r['policy_distinct']}"
        print(f"{r['policy'][:34]:<34} {r['concurrency']:>4} {r['output_tok_s']:>9.1f} {r['speedup']:>6.2f}x "
              f"{r['tpot_p50_ms']:>8.1f} {r['tpot_p99_ms']:>7.1f} {r['ttft_p50_ms']:>8.1f} {d:>24}")
    print(json.dumps({"bench": "serve", **desc, "input_len": args.input_len, "output_len": args.output_len,
                      "conditions": {"before": before, "after": conditions()}, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
