"""``lynx lm-eval-compare NATIVE POLICY [POLICY ...]``: paired intervals between lm-eval runs.

Each argument is an lm-eval ``--output_path`` folder (or one ``samples_*.jsonl`` file) of a run
with ``--log_samples``: the first is the baseline (native routing), each further one a policy,
run on the same items. Prints per task and metric the baseline, the policy and the change with
its paired 95 % bootstrap interval (points for accuracies, per cent for perplexities), and ends
with one JSON line. The statistics are ``lynx_moe.measure.lm_eval_compare``'s.

    lynx lm-eval-compare runs/lm-eval/native runs/lm-eval/xshare
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import UsageError
from .args import add_count, add_json_only, check_counts

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                        help="lm-eval --output_path folders (with --log_samples): the baseline first, then policies")
    add_count(parser, "--resamples", 2000, "bootstrap resamples")
    add_json_only(parser)


def _fmt(row: dict) -> tuple[str, str, str]:
    c = row["change"]
    if row["kind"] == "perplexity":
        return (f"{row['native']:,.4g}", f"{row['policy']:,.4g}",
                f"{c.value * 100:+.2f} % [{c.lo * 100:+.2f}, {c.hi * 100:+.2f}]")
    return (f"{row['native']:.4f}", f"{row['policy']:.4f}",
            f"{c.value * 100:+.2f} pt [{c.lo * 100:+.2f}, {c.hi * 100:+.2f}]")


def run(args: argparse.Namespace) -> int:
    from ..measure.lm_eval_compare import compare, load_samples
    if len(args.runs) < 2:
        raise UsageError("need a baseline run and at least one policy run")
    check_counts(args, at_least_one=("resamples",))
    base = load_samples(args.runs[0])
    report = {}
    for run_path in args.runs[1:]:
        result = compare(base, load_samples(run_path), resamples=args.resamples)
        report[str(run_path)] = result
        if not args.json_only:
            print(f"{run_path} vs {args.runs[0]} (paired 95 % intervals)")
            print(f"  {'task':<28} {'metric':<26} {'items':>5} {'baseline':>10} {'policy':>10}  change")
            for task, rows in result.items():
                for metric, row in rows.items():
                    nat, pol, change = _fmt(row)
                    print(f"  {task:<28} {metric:<26} {row['items']:>5} {nat:>10} {pol:>10}  {change}")
    print(json.dumps({"baseline": str(args.runs[0]), "runs": {
        r: {t: {m: {"kind": row["kind"], "items": row["items"], "native": row["native"], "policy": row["policy"],
                    "change": row["change"].to_dict()} for m, row in rows.items()} for t, rows in res.items()}
        for r, res in report.items()}}))
    return 0
