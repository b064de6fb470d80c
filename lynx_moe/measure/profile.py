"""Which experts a model's layers touch when real text decodes in batches (``lynx profile``).

Lynx can only save time where a batch's rows spread over many experts, so this is the first
thing to look at on a model. ``profile_stats`` takes a routing recording
(``measure.decode.record_routing``: router logits and top-k ids of every layer and decode step
at the largest batch size; smaller batches are the disjoint row groups of that recording, since
native routing has no cross-row effects) and reports per layer and batch size: mean / spread of
distinct experts per step, expert load skew, how often a row's rank-j expert lies in the same
AffinityBinning bin as its top-1 (bin width ``1/alpha``), and, for each policy, the distinct
experts that policy would keep on the same logits (offline).

Legend: L layers, S steps, R recorded rows, B batch rows, G groups of B rows, E experts, K top-k.
"""

from __future__ import annotations

import torch

from ..routing import distinct_experts, route

__all__ = ["profile_stats"]


def _spread(x: torch.Tensor) -> dict:
    x = x.double().flatten()
    return {"mean": round(x.mean().item(), 3), "std": round(x.std(unbiased=False).item(), 3),
            "min": round(x.min().item(), 3), "max": round(x.max().item(), 3)}


def profile_stats(logits: torch.Tensor, ids: torch.Tensor, batch_sizes: list[int], alpha: float,
                  policies: list = ()) -> dict:
    """Per-layer statistics of a recording (see the module docstring); batch size ``B`` uses
    the ``rows // B`` disjoint groups of ``B`` recorded rows."""
    L, S, R, E = logits.shape
    K = ids.shape[-1]
    top = logits.gather(-1, ids)                                           # [L, S, R, K] native order
    same_bin = torch.ceil(alpha * (top - top[..., :1])) >= 0              # rank j in the top-1's bin
    layers = []
    for layer in range(L):
        by_batch = {}
        for B in batch_sizes:
            groups = ids[layer, :, : R // B * B].reshape(S, R // B, B * K)     # [S, G, B*K]
            counts = torch.zeros(S, R // B, E).scatter_add_(-1, groups, torch.ones_like(groups, dtype=torch.float))
            distinct = distinct_experts(groups.reshape(S, R // B, B, K), num_experts=E)  # [S, G]
            mean_load = B * K / E
            entry = {"groups": R // B, "distinct": _spread(distinct),
                     "load_max_over_mean": round((counts.amax(-1) / mean_load).mean().item(), 3),
                     "load_cv": round((counts.std(-1, unbiased=False) / mean_load).mean().item(), 3)}
            for p in policies:
                d = [int(distinct_experts(route(logits[layer, s, g * B:(g + 1) * B], K, p).ids, num_experts=E))
                     for s in range(S) for g in range(R // B)]
                entry.setdefault("policy_distinct", {})[str(p)] = _spread(torch.tensor(d))
            by_batch[str(B)] = entry
        share = torch.bincount(ids[layer].flatten(), minlength=E).double() / ids[layer].numel()
        layers.append({
            "layer": layer, "batch": by_batch,
            "same_bin_by_rank": [round(v, 4) for v in same_bin[layer].double().mean((0, 1)).tolist()],
            "same_bin_mean": round(same_bin[layer].double().sum(-1).mean().item(), 3),
            "expert_share": [round(v, 5) for v in share.tolist()],
        })
    return {"layers": layers, "num_experts": E, "top_k": K, "steps": S, "rows": R, "alpha": alpha}
