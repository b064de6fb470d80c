"""Where calibrated cost models live: one cached file per engine, model and machine.

``lynx bench --calibrate`` writes the cost model it fits (``lynx_moe.costmodel``) to
``cache_path(engine, model)`` as well as to any FILE it is given; ``lynx bench``, ``lynx eval``
and ``lynx serve`` then gate their policies with it by default (``--no-gate``: the ungated
policy; ``--gate FILE``: another calibration). A calibration is only valid for the engine,
the model (or ``--shape`` stack), the CPU and the thread count it was measured with, so all
four name the file. The folder is ``$LYNX_CACHE_DIR``, else ``~/.cache/lynx_moe``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..costmodel import CostModel, load_cost_model
from .machine import cpu_name

__all__ = ["cache_dir", "cache_path", "cached_gate", "choose_gate"]


def cache_dir() -> Path:
    return Path(os.environ.get("LYNX_CACHE_DIR") or Path.home() / ".cache" / "lynx_moe")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80] or "x"


def cache_path(engine: str, model: str, threads: int | None = None) -> Path:
    """The cached calibration of ``engine`` ("hf" or "vllm") for ``model`` (a folder, or a
    shape such as ``olmoe-1b-7b x4``) on this machine at ``threads`` (default: torch's)."""
    if Path(model).is_dir():
        model = str(Path(model).resolve())
    threads = torch.get_num_threads() if threads is None else threads
    name = f"{engine}-{_slug(model)}-{_slug(cpu_name())}-{os.cpu_count()}c-{threads}t.json"
    return cache_dir() / "gates" / name


def cached_gate(engine: str, model: str, threads: int | None = None) -> CostModel | None:
    """The cached calibration, None if there is none (a broken file: ValueError naming it)."""
    path = cache_path(engine, model, threads)
    return load_cost_model(path) if path.is_file() else None


def choose_gate(engine: str, model: str, gate_file: str | Path | None, no_gate: bool,
                threads: int | None = None) -> tuple[Path | None, str]:
    """The calibration file a command gates with, and a line saying so: ``gate_file`` if given,
    else the cached one, else none (ungated)."""
    if no_gate:
        return None, "ungated (--no-gate)"
    if gate_file is not None:
        load_cost_model(gate_file)   # ValueError naming the file
        return Path(gate_file), f"gated by {gate_file}"
    path = cache_path(engine, model, threads)
    if path.is_file():
        load_cost_model(path)
        return path, f"gated by the cached calibration {path} (--no-gate: the ungated policy)"
    return None, (f"ungated: no calibration of {engine} for this model and machine (lynx bench"
                  f"{' --engine vllm' if engine == 'vllm' else ''} --calibrate writes one)")
