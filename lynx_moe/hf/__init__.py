"""Hugging Face transformers integration (``pip install 'lynx-moe[hf]'``).

- ``patch``: ``apply_`` / ``remove_`` / ``applied`` switch a policy on in a loaded MoE model
  by hooking its router modules; ``routing_stats`` / ``reset_stats`` read what it did.
- ``tiny``: tiny random-weight models of the six supported architectures, for tests and demos.

The patcher itself needs torch only; ``tiny`` imports transformers when called.
"""

from .patch import SUPPORTED, LayerStats, applied, apply_, find_routers, remove_, reset_stats, routing_stats
from .tiny import TINY_ARCHS, tiny_config, tiny_model

__all__ = ["SUPPORTED", "LayerStats", "find_routers", "apply_", "remove_", "applied", "routing_stats", "reset_stats",
           "TINY_ARCHS", "tiny_config", "tiny_model"]
