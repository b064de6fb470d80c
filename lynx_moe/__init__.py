"""lynx-moe: batch-aware expert selection that makes MoE models decode faster in batches.

    import lynx_moe as lynx
    weights, ids = lynx.select_experts(router_logits, top_k=8,
                                       policy=lynx.AffinityBinning(alpha=3.0, beta=2))

``import lynx_moe`` loads torch only. The package has four parts, imported one way
(core <- integrations <- measure <- cli):

- the core, here: ``policies``, ``routing`` (``select_experts`` / ``route``), ``presets``;
- ``integrations``: ``hf`` (transformers models in place; ``apply_`` & co. are re-exported
  here, loaded on first use) and ``vllm`` (the vLLM plugin);
- ``measure``: the measurement library (models, data, decode loop, quality, speed, plots);
- ``cli``: the ``lynx`` command.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import presets
from .policies import (
    OEA,
    POLICIES,
    SER,
    SERE,
    AffinityBinning,
    BatchTopN,
    Confidence,
    MassFloor,
    PerLayer,
    Policy,
    SizePrice,
    StaticK,
    TopK,
    XShare,
    load_policy,
    parse_policy,
    policy_from_dict,
)
from .costmodel import CostModel, load_cost_model
from .routing import Routing, changed_assignments, distinct_experts, route, select_experts

__version__ = "0.1.0"

__all__ = [
    "Policy", "TopK", "AffinityBinning", "Confidence", "StaticK", "SER", "BatchTopN", "OEA",
    "MassFloor", "XShare", "SERE", "SizePrice", "PerLayer", "POLICIES", "parse_policy", "policy_from_dict", "load_policy", "presets",
    "select_experts", "route", "Routing", "distinct_experts", "changed_assignments",
    "reference_model_path", "CostModel", "load_cost_model",
    "apply_", "remove_", "applied", "isolated", "routing_stats", "reset_stats",
]

# Hugging Face patching loads on first use, so that ``import lynx_moe`` stays torch-only.
_HF_NAMES = ("apply_", "remove_", "applied", "isolated", "routing_stats", "reset_stats")


def __getattr__(name: str):
    if name in _HF_NAMES:
        from .integrations import hf
        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reference_model_path() -> Path:
    """The embedded reference MoE model (``models/lynx-ref-moe`` at the repository root),
    or ``$LYNX_REFERENCE_MODEL`` when set."""
    override = os.environ.get("LYNX_REFERENCE_MODEL")
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "models" / "lynx-ref-moe"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"reference model not found at {path}: run from a git checkout of lynx-moe "
            "(pip install -e .) or set LYNX_REFERENCE_MODEL to a model folder")
    return path
