"""``lynx lm-eval ARGS...``: lm-evaluation-harness's command line with the ``lynx-hf`` model.

Registers ``lynx_moe.measure.lm_eval.LynxHFLM`` as ``lynx-hf`` (lm-eval 0.4.13 cannot discover
third-party models) and hands every argument to lm-eval unchanged, so ``lynx lm-eval -h`` is
lm-eval's help. Without ``--device`` on a machine without CUDA, ``--device cpu`` is added.

    lynx lm-eval --model lynx-hf --model_args "pretrained=PATH,policy=oea:k0=2" \\
        --tasks lynx_ref_next_word --include_path models/lynx-ref-moe/eval --batch_size 32

Inside ``policy=`` separate the spec's fields with ``;`` or ``+`` (lm-eval splits model_args
on commas). Add ``decode_scoring=true`` to score loglikelihood (multiple-choice, perplexity)
requests in decode mode, where the policy acts; by default lm-eval runs them as a prefill,
which is routed natively (see ``lynx_moe.measure.lm_eval``).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments (see lynx lm-eval -h)")
    # Everything after the command belongs to lm-eval, options included: with no prefix
    # characters argparse takes "--model ..." and "-h" as positional values.
    parser.prefix_chars = "\0"


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ImportError("lynx lm-eval needs lm-eval: pip install 'lynx-moe[eval]'") from None

    from ..measure.lm_eval import register
    register()
    argv = list(args.lm_eval_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not any(a == "--device" or a.startswith("--device=") for a in argv):
        import torch
        if not torch.cuda.is_available():
            argv += ["--device", "cpu"]
    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0
