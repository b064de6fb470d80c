"""``lynx policies``: list the policies, their fields and the authors' presets."""

from __future__ import annotations

import argparse
import dataclasses

from ..policies import POLICIES, parse_policy
from ..presets import PRESETS

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", type=str, default=None,
                        help="parse a policy spec, print its canonical form, and exit")


def run(args: argparse.Namespace) -> int:
    if args.spec is not None:
        print(parse_policy(args.spec))   # a bad spec: ValueError, reported as a usage error
        return 0
    print("policies (spec: name:field=value,...):")
    for name, cls in POLICIES.items():
        if cls.kind == "per_layer":
            continue
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        print(f"  {name:18s} {fields or '(no fields)'}")
    print("  one policy per MoE layer: per_layer(SPEC;SPEC;...)")
    print("authors' AffinityBinning presets (experts x top-k):")
    for name, p in PRESETS.items():
        print(f"  {name:26s} {p.num_experts:>3d} x {p.top_k}  {p.policy}")
    return 0
