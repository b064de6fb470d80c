"""Load and faults against `lynx serve`: nothing lost, nothing corrupted (`lynx_moe.measure.load`).

    python benchmarks/serve_load.py                                   # 400 requests, concurrency 32, topk
    python benchmarks/serve_load.py --policy batch_top_n:n=8 --compare opted_out

One `lynx serve` (eager, bf16, the reference model unless `--model`) on 127.0.0.1 gets the mix of
`lynx_moe.measure.load`: completions and chats, streaming and not, clients hanging up after the
first chunk, prompts over max_model_len, invalid sampling values and invalid `vllm_xargs`.
`--compare all` (with `--policy topk`) checks every valid answer against the same request sent
alone before the load; `--compare opted_out` checks only requests with `{"lynx": "off"}`, which
must be batch-invariant under any policy. Prints the report and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LYNX = [sys.executable, "-c", "import sys; from lynx_moe.cli import main; sys.exit(main())"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--policy", default="topk")
    p.add_argument("--compare", choices=("all", "opted_out", "none"), default="all")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=256)
    args = p.parse_args(argv)
    from lynx_moe import reference_model_path
    from lynx_moe.measure.load import load_run
    model = str(args.model or reference_model_path())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkdtemp(prefix="lynx-load-")) / "serve.log"
    cmd = [*LYNX, "serve", model, "--policy", args.policy, "--stats-every", "100", "--port", str(port),
           "--enforce-eager", "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.concurrency)]
    server = subprocess.Popen(cmd, env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ},
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"lynx serve exited; see {log}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        served = Path(model).name
        report = load_run(f"http://127.0.0.1:{port}", served, args.requests, args.concurrency,
                          max_model_len=args.max_model_len, compare=None if args.compare == "none" else args.compare)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = None
    tracebacks = log.read_text().split("shutdown")[0].count("Traceback")
    report.update(policy=args.policy, server_exit=code, tracebacks_before_shutdown=tracebacks, server_log=str(log))
    lat = report["latency_ms"]
    print(f"lynx serve --policy {args.policy}: {report['requests']} requests at concurrency {report['concurrency']} "
          f"in {report['wall_s']} s; kinds {report['kinds']}; {report['streams']} streamed, {report['chats']} chat, "
          f"{report['opted_out']} opted out")
    print(f"failures {len(report['failures'])}, mismatches {len(report['mismatches'])} of "
          f"{report['compared_requests']} compared; server up after: {report['server_up_after']}, exit {code}, "
          f"tracebacks {tracebacks}; valid-request latency ms p50 {lat.get('p50')} p90 {lat.get('p90')} "
          f"p99 {lat.get('p99')} max {lat.get('max')}")
    for f in report["failures"][:10]:
        print("  failed:", f)
    print(json.dumps(report))
    return 0 if not report["failures"] and not report["mismatches"] and report["server_up_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
