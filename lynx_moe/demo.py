"""``lynx demo``: placeholder, being written (issue 6)."""
import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None)


def run(args) -> int:
    from .cli import UsageError
    raise UsageError("not written yet")
