"""The Lynx authors' published AffinityBinning settings, per model.

``PRESETS["qwen3-30b-a3b"]`` is ``AffinityBinning(alpha=3, beta=2)``. For a model they did not
tune, ``for_shape(num_experts, top_k)`` returns the preset of the published model with the
same routing shape (or the nearest expert count), which is where tuning should start.
"""

from __future__ import annotations

from typing import NamedTuple

from .policies import AffinityBinning

__all__ = ["PRESET", "Preset", "PRESETS", "for_shape"]

PRESET = "preset"   # a policy spec meaning "the authors' preset for this layer's shape" (CLIs, LYNX_POLICY)


class Preset(NamedTuple):
    num_experts: int
    top_k: int
    policy: AffinityBinning


PRESETS: dict[str, Preset] = {
    "mixtral-8x7b": Preset(8, 2, AffinityBinning(alpha=0.7, beta=1)),
    "mixtral-8x22b": Preset(8, 2, AffinityBinning(alpha=1.0, beta=1)),
    "qwen2-57b-a14b": Preset(64, 8, AffinityBinning(alpha=3.0, beta=4)),
    "qwen3-30b-a3b": Preset(128, 8, AffinityBinning(alpha=3.0, beta=2)),
    "qwen3-235b-a22b": Preset(128, 8, AffinityBinning(alpha=3.0, beta=2)),
    "qwen3-235b-a22b-thinking": Preset(128, 8, AffinityBinning(alpha=1.0, beta=2)),
    "gpt-oss-120b": Preset(128, 4, AffinityBinning(alpha=3.0, beta=2)),
    "deepseek-coder-v2": Preset(160, 6, AffinityBinning(alpha=1.0, beta=2)),
    "llama-4": Preset(16, 1, AffinityBinning(alpha=1.0, beta=None)),
}


def for_shape(num_experts: int, top_k: int) -> tuple[str, AffinityBinning]:
    """The published preset closest to ``num_experts`` x ``top_k``: same shape if there is
    one, else the nearest expert count (ties: nearest top_k, then the first listed)."""
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got {num_experts} experts, top_k {top_k}")
    name = min(PRESETS, key=lambda n: (abs(PRESETS[n].num_experts - num_experts),
                                       abs(PRESETS[n].top_k - top_k)))
    return name, PRESETS[name].policy
