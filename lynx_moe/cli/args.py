"""Arguments several subcommands share, and the checks they run before any work starts."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..presets import PRESET, for_shape
from . import UsageError

__all__ = ["policy_arg", "resolve_policies", "positive_ints", "add_model", "add_data", "add_policies", "add_threads",
           "add_json_only", "add_count", "set_threads", "check_counts", "writable_dir", "progress_bar", "add_passthrough",
           "run_passthrough", "tool_main"]


def policy_arg(spec: str):
    """argparse ``type=`` for policy specs: a bad spec is an argparse error (exit 2).
    ``preset`` stays a string until the model's shape is known (``resolve_policies``)."""
    from ..policies import parse_policy
    if spec.strip() == PRESET:
        return PRESET
    try:
        return parse_policy(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_policies(policies: list | None, experts: int, top_k: int) -> list | None:
    """``--policy`` values with ``preset`` replaced by the authors' preset for this shape."""
    if policies is None:
        return None
    return [for_shape(experts, top_k)[1] if p == PRESET else p for p in policies]


def positive_ints(text: str) -> list[int]:
    """argparse ``type=`` for comma-separated positive integers, e.g. ``1,8,32``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers (>= 1), got {text!r}")
    return values


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, metavar="PATH",
                        help="model folder (default: the reference model)")


def add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, action="append", default=None, metavar="FILE",
                        help="held-out text: a JSONL file with a 'text' field per line, or a folder of them "
                             "(repeatable; default: MODEL/eval/heldout)")


def add_policies(parser: argparse.ArgumentParser,
                 what: str = "policy spec to compare with native (repeatable; 'preset': the authors' "
                             "AffinityBinning preset for the model's shape, the default)") -> None:
    parser.add_argument("--policy", type=policy_arg, action="append", default=None, metavar="SPEC", help=what)


def add_count(parser: argparse.ArgumentParser, flag: str, default: int, help: str, metavar: str = "N") -> None:
    """An integer option whose help ends with its default (range checks: ``check_counts``)."""
    parser.add_argument(flag, type=int, default=default, metavar=metavar, help=f"{help} (default {default})")


def add_gate(parser: argparse.ArgumentParser, engine: str) -> None:
    """``--gate FILE`` / ``--no-gate``; without either, the cached calibration of this engine,
    model and machine gates the policies if there is one (``lynx_moe.measure.gates``)."""
    flag = " --engine vllm" if engine == "vllm" else ""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gate", type=Path, default=None, metavar="FILE",
                       help=f"gate every policy with the cost model in FILE (lynx bench{flag} --calibrate FILE): a "
                            "step keeps the policy's routing only where it predicts a gain (default: the cached "
                            f"calibration of this model and machine, written by lynx bench{flag} --calibrate, if any)")
    group.add_argument("--no-gate", action="store_true", help="never gate: the ungated policy")


def add_json_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-only", action="store_true", help="print only the final JSON line")


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's choice)")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def check_counts(args: argparse.Namespace, at_least_one: tuple[str, ...] = (),
                 at_least_zero: tuple[str, ...] = ()) -> None:
    """UsageError naming the option when a count is out of range."""
    for names, low in ((at_least_one, 1), (at_least_zero, 0)):
        for name in names:
            value = getattr(args, name)
            if value < low:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def writable_dir(path: Path, option: str = "--out") -> Path:
    """Check, before a long run, that ``path`` can be created (or written to) as a folder, so a
    bad location is reported now and not after minutes of work. Leaves nothing behind: the
    command creates the folder when it writes its results."""
    path = Path(path)
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(f"{ancestor} is a file")
        tempfile.TemporaryDirectory(dir=ancestor).cleanup()
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write there ({e.strerror or e})") from None
    return path


def progress_bar(desc: str, enabled: bool = True):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (None if disabled); a
    finished bar closes, and the next call opens a new one."""
    if not enabled:
        return None
    from tqdm import tqdm
    state: dict = {"bar": None}

    def progress(done: int, total: int) -> None:
        if state["bar"] is None:
            state["bar"] = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.total, bar.n = total, done
        bar.refresh()
        if done >= total:
            bar.close()
            state["bar"] = None
    return progress


def add_passthrough(parser: argparse.ArgumentParser, tool: str) -> None:
    """Every argument after the command belongs to ``tool``, options and ``-h`` included."""
    parser.add_argument("passthrough", nargs=argparse.REMAINDER, help=f"{tool}'s own arguments")
    # With no prefix characters argparse takes "--model ..." and "-h" as positional values.
    parser.prefix_chars = "\0"


def tool_main(module: str, name: str, needs: str, extra: str) -> Callable[[], object]:
    """Another tool's command-line entry point, or an ImportError naming the extra to install."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        raise ImportError(f"this command needs {needs}: pip install 'lynx-moe[{extra}]'") from None


def run_passthrough(prog: str, argv: list[str], main: Callable[[], object]) -> int:
    """Run another tool's command-line ``main`` in this process as ``prog argv...``; its exit
    status is ours."""
    argv = argv[1:] if argv[:1] == ["--"] else argv
    old = sys.argv
    sys.argv = [prog, *argv]
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0
