"""``lynx lm-eval ARGS...``: lm-evaluation-harness's command line with the ``lynx-hf`` model.

Registers ``lynx_moe.measure.lm_eval.LynxHFLM`` as ``lynx-hf`` (lm-eval 0.4.13 cannot discover
third-party models) and hands every argument to lm-eval unchanged, so ``lynx lm-eval -h`` is
lm-eval's help. Without ``--device`` on a machine without CUDA, ``--device cpu`` is added.

    lynx lm-eval --model lynx-hf --model_args "pretrained=PATH,policy=oea:k0=2" \\
        --tasks lynx_ref_next_word --include_path models/lynx-ref-moe/eval --batch_size 32

Inside ``policy=`` separate the spec's fields with ``;`` or ``+`` (lm-eval splits model_args
on commas). Add ``decode_scoring=true`` to score loglikelihood (multiple-choice, perplexity)
requests in decode mode, where the policy acts; by default lm-eval runs them as a prefill,
which is routed natively (see ``lynx_moe.measure.lm_eval``). Run with ``--log_samples``, two runs
(native, a policy) are compared item by item by ``lynx lm-eval-compare``.
"""

from __future__ import annotations

import argparse

from .args import add_passthrough, run_passthrough, tool_main

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_passthrough(parser, "lm-eval")


def run(args: argparse.Namespace) -> int:
    cli_evaluate = tool_main("lm_eval.__main__", "cli_evaluate", "lm-eval", "eval")
    from ..measure.lm_eval import register
    register()
    argv = list(args.passthrough)
    if not any(a == "--device" or a.startswith("--device=") for a in argv):
        import torch
        if not torch.cuda.is_available():
            argv += ["--device", "cpu"]
    return run_passthrough("lm_eval", argv, cli_evaluate)
