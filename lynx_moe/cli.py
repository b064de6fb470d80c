"""The ``lynx`` command line: one subcommand per module, loaded on demand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` and keeps
its heavy imports (transformers, vLLM, matplotlib) inside ``run``. Bad input raises
``UsageError``, which prints ``lynx <command>: error: ...`` and exits with status 2, like
argparse's own errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["UsageError", "main", "policy_arg", "positive_ints"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "policies": ("lynx_moe.cli_policies", "list the policies and the authors' presets"),
    "serve": ("lynx_moe.serve", "vLLM's OpenAI-compatible server with a routing policy enabled"),
    "bench": ("lynx_moe.bench", "decode speed of policies vs native routing, with the memory-bandwidth floor"),
    "profile": ("lynx_moe.profile", "distinct experts, load skew and bin overlap per layer on held-out text"),
    "eval": ("lynx_moe.evaluate", "quality of policies vs native routing in decode mode: perplexity, KL, agreement, task accuracy"),
    "lm-eval": ("lynx_moe.cli_lm_eval", "lm-evaluation-harness with the 'lynx-hf' model (a policy from model_args)"),
    "demo": ("lynx_moe.demo", "the whole story on the reference model: experts saved, speed, quality (< 10 min)"),
}


class UsageError(Exception):
    """Bad user input: reported as ``lynx <cmd>: error: <message>`` with exit status 2."""


def policy_arg(spec: str):
    """argparse ``type=`` for policy specs: a bad spec is an argparse error (exit 2)."""
    from .policies import parse_policy
    try:
        return parse_policy(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_ints(text: str) -> list[int]:
    """argparse ``type=`` for comma-separated positive integers, e.g. ``1,8,32``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers (>= 1), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lynx", description="Batch-aware MoE expert selection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Must be set before torch starts its OpenMP pool: spinning threads stall small ops
    # 10-25x on a busy 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UsageError as e:
        print(f"lynx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as ``python -m lynx_moe.cli``: dispatch through the imported module, so that the
    # UsageError subcommands raise is the one caught here.
    from lynx_moe.cli import main as _main
    sys.exit(_main())
