"""The policy core: router logits of one MoE layer in, ``(topk_weights, topk_ids)`` out.

    weights, ids = select_experts(router_logits, top_k=8, policy=AffinityBinning(3.0, 2),
                                  renormalize=True, scoring="softmax",
                                  decode_mask=None, valid_mask=None)

Native routing (``scoring``):
- ``"softmax"``: softmax over E (fp32) -> top-k -> divide by the sum if ``renormalize``
  (Mixtral, Qwen2/3-MoE, OLMoE);
- ``"softmax_topk"``: top-k on the logits, softmax over the k (GPT-OSS; always normalised);
- ``"sigmoid"``: sigmoid scores, top-k, renormalise if asked (Llama-4 style). With
  ``e_score_correction_bias``, ``num_expert_group``/``topk_group`` and
  ``routed_scaling_factor`` it is DeepSeek-V3's grouped routing: the biased scores choose
  groups (sum of each group's best two) and experts, the unbiased scores give the weights,
  times the scaling factor.

Policies act only on rows that vote: ``decode_mask & valid_mask``. Every other row gets
exactly the native routing and does not influence the others. A set policy decides
``keep[E]``; each voting row then takes its best ``top_k`` experts inside ``keep`` (by its
selection logits; for grouped routing only inside its natively chosen groups; equal logits
go to the row's native experts first, then to the lower index). A row with
fewer than ``top_k`` such experts fills the remaining slots with its own native experts, so
a step never touches an expert that native routing would not have touched. A row policy
(StaticK, SER) keeps a prefix of each row's native experts; the other slots get weight 0 and
ids of experts the batch already uses (then the row's next native ones), never a duplicate.

Weights keep the native semantics: with ``renormalize`` they sum to 1; otherwise they are
rescaled to the row's original native top-k mass (the paper's rule). A voting row whose
experts did not change gets its native weights bit for bit.

Non-finite logits: NaN and -inf count as the lowest float32 value, +inf as the highest, so
ids stay in ``[0, E)``, without duplicates, and weights stay finite. No host sync and no Python
loop over rows or experts: the function compiles with ``torch.compile(fullgraph=True)``.

Legend: T router rows, E experts, K top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .policies import Policy, Step, TopK

__all__ = ["SCORINGS", "Routing", "route", "select_experts", "distinct_experts", "changed_assignments"]

SCORINGS = ("softmax", "softmax_topk", "sigmoid")
_F32 = torch.finfo(torch.float32)


class Routing(NamedTuple):
    """Everything one routing call decided (``route``'s result)."""

    weights: torch.Tensor     # [T, K] float32
    ids: torch.Tensor         # [T, K] int64
    native_ids: torch.Tensor  # [T, K] int64: what native routing chose on the same logits
    vote: torch.Tensor        # [T] bool: rows the policy acted on


def _row_mask(mask: torch.Tensor | None, T: int, name: str, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (T,):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape ({T},) (one flag per router row), got {got}")
    return mask


def _validate(logits, top_k, policy, renormalize, scoring, bias, n_group, topk_group) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dim()}-d {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"router_logits must be a float tensor of shape [T, E], got {got}")
    E = logits.shape[1]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an integer in [1, E={E}], got {top_k!r}")
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a lynx_moe policy (e.g. lynx.AffinityBinning()), got {policy!r}")
    policy.check_top_k(top_k)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "softmax_topk" and not renormalize:
        raise ValueError("scoring='softmax_topk' always normalises over the k chosen logits; pass renormalize=True")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (E,)):
        raise ValueError(f"e_score_correction_bias must be a tensor of shape ({E},)")
    if (n_group is None) != (topk_group is None):
        raise ValueError("num_expert_group and topk_group go together: give both or neither")
    if n_group is not None:
        if scoring != "sigmoid":
            raise ValueError("grouped routing (num_expert_group) is supported with scoring='sigmoid'")
        if not (isinstance(n_group, int) and n_group >= 1 and E % n_group == 0):
            raise ValueError(f"num_expert_group must divide E={E}, got {n_group!r}")
        if not (isinstance(topk_group, int) and 1 <= topk_group <= n_group):
            raise ValueError(f"topk_group must be in [1, num_expert_group={n_group}], got {topk_group!r}")
        if topk_group * (E // n_group) < top_k:
            raise ValueError(f"topk_group={topk_group} groups of {E // n_group} experts cannot hold top_k={top_k}")


def _native(x, top_k, renormalize, scoring, bias, n_group, topk_group, scale):
    """Native routing on sanitised fp32 logits, with the model's own op order.

    Returns (weights [T, K], ids [T, K], selection logits [T, E], mass [T]); the selection
    logits are -inf outside a row's chosen groups; mass is the native top-k weight before
    renormalisation, used by the paper's rule when ``renormalize`` is False.
    """
    if scoring == "softmax":
        probs = torch.softmax(x, dim=-1)
        w, ids = torch.topk(probs, top_k, dim=-1)
        mass = w.sum(dim=-1)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids, x, mass
    if scoring == "softmax_topk":
        vals, ids = torch.topk(x, top_k, dim=-1)
        w = torch.softmax(vals, dim=-1)
        return w, ids, x, torch.ones_like(x[:, 0])
    scores = torch.sigmoid(x)
    choice = scores if bias is None else scores + bias.float()
    # Policies bin and rank by the score that chooses (biased, if any), in logit space.
    sel = x if bias is None else torch.logit(choice.clamp(1e-12, 1 - 1e-7))
    if n_group is not None:
        T, E = x.shape
        size = E // n_group
        group_scores = choice.view(T, n_group, size).topk(min(2, size), dim=-1).values.sum(-1)
        groups = torch.topk(group_scores, topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, groups, True)
        allowed = allowed[:, :, None].expand(T, n_group, size).reshape(T, E)
        choice = choice.masked_fill(~allowed, 0.0)
        sel = sel.masked_fill(~allowed, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    w = scores.gather(1, ids)
    mass = w.sum(dim=-1)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale, ids, sel, mass


def _tiered_topk(sel: torch.Tensor, tiers: list[torch.Tensor], k: int) -> torch.Tensor:
    """Top-k ids by tier first (earlier masks win), then by ``sel`` inside a tier.

    Tiers are separated by offsets larger than each row's finite span (float64, exact).
    Entries in no tier or with -inf ``sel`` come last; equal keys go to the lower index.
    """
    s = sel.double()
    finite = torch.isfinite(s)
    hi = torch.where(finite, s, -torch.inf).max(dim=-1, keepdim=True).values
    lo = torch.where(finite, s, torch.inf).min(dim=-1, keepdim=True).values
    s = s - torch.where(torch.isfinite(hi), hi, 0.0)   # row values now in [-(hi - lo), 0]
    gap = 2 * (hi - lo).nan_to_num(0.0, 0.0, 0.0).clamp_min(0) + 1
    key = torch.full_like(s, -torch.inf)
    for i in range(len(tiers) - 1, -1, -1):  # a few tiers, not rows or experts
        key = torch.where(tiers[i] & finite, s - i * gap, key)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]


def _weights(x, ids, real, renormalize, scoring, mass, scale):
    """Native weight rule applied to chosen ids; slots with ``real`` False get 0."""
    chosen = x.gather(1, ids)
    if scoring == "sigmoid":
        raw = torch.sigmoid(chosen) * real
        total = raw.sum(dim=-1, keepdim=True) + 1e-20
    else:
        top = torch.where(real, chosen, -torch.inf).max(dim=-1, keepdim=True).values
        raw = torch.exp(chosen - top) * real
        total = raw.sum(dim=-1, keepdim=True)
    w = raw / total
    if not renormalize:
        w = w * mass[:, None]
    return w * scale


def route(
    router_logits: torch.Tensor,
    top_k: int,
    policy: Policy,
    renormalize: bool = True,
    scoring: str = "softmax",
    decode_mask: torch.Tensor | None = None,
    valid_mask: torch.Tensor | None = None,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """Like ``select_experts`` but also returns what native routing chose and which rows
    voted, so callers can count what the policy changed without routing twice."""
    _validate(router_logits, top_k, policy, renormalize, scoring, e_score_correction_bias,
              num_expert_group, topk_group)
    T, E = router_logits.shape
    dev = router_logits.device
    decode = _row_mask(decode_mask, T, "decode_mask", dev)
    valid = _row_mask(valid_mask, T, "valid_mask", dev)
    x = torch.nan_to_num(router_logits.float(), nan=_F32.min, posinf=_F32.max, neginf=_F32.min)
    scale = float(routed_scaling_factor)
    nat_w, nat_ids, sel, mass = _native(x, top_k, renormalize, scoring, e_score_correction_bias,
                                        num_expert_group, topk_group, scale)
    nat_ids = nat_ids.long()
    vote = decode & valid
    if policy.kind == "native":
        return Routing(nat_w, nat_ids, nat_ids, vote)

    n_votes = vote.sum().double().clamp_min(1)
    step = Step(sel, nat_ids, nat_w, vote, n_votes, top_k)
    native_set = torch.zeros_like(x, dtype=torch.bool).scatter(1, nat_ids, True)    # [T, E]
    if policy.kind == "set":
        keep = policy.keep(step)[None, :].expand(T, E)                             # [T, E]
        # Kept native experts first: they are the row's best inside keep anyway, and this
        # way equal logits are resolved in favour of what the row had natively.
        ids = _tiered_topk(sel, [keep & native_set, keep, native_set], top_k)
        real = torch.ones_like(ids, dtype=torch.bool)
    else:
        counts = policy.counts(step)                                               # [T]
        own = torch.zeros_like(native_set).scatter(
            1, nat_ids, torch.arange(top_k, device=dev)[None, :] < counts[:, None])
        used = (own & vote[:, None]).any(dim=0, keepdim=True).expand(T, E)
        ids = _tiered_topk(sel, [own, used, native_set], top_k)
        real = own.gather(1, ids)
    w = _weights(x, ids, real, renormalize, scoring, mass, scale)

    # Rows whose expert set did not change keep native weights bit for bit.
    same = (_sorted(ids) == _sorted(nat_ids)).all(dim=-1) & real.all(dim=-1)
    use_policy = vote & ~same
    ids = torch.where(use_policy[:, None], ids, nat_ids)
    w = torch.where(use_policy[:, None], w, nat_w)
    return Routing(w, ids, nat_ids, vote)


def _sorted(ids: torch.Tensor) -> torch.Tensor:
    return torch.sort(ids, dim=-1).values


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    policy: Policy | None = None,
    renormalize: bool = True,
    scoring: str = "softmax",
    decode_mask: torch.Tensor | None = None,
    valid_mask: torch.Tensor | None = None,
    **native: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route one MoE layer's rows: ``[T, E]`` logits -> ``(weights f32 [T, K], ids i64 [T, K])``.

    ``native`` takes DeepSeek-style keywords: ``e_score_correction_bias``,
    ``num_expert_group``, ``topk_group``, ``routed_scaling_factor``. See the module docstring.
    """
    r = route(router_logits, top_k, TopK() if policy is None else policy, renormalize, scoring,
              decode_mask, valid_mask, **native)
    return r.weights, r.ids


def distinct_experts(ids: torch.Tensor, valid_mask: torch.Tensor | None = None,
                     num_experts: int | None = None) -> torch.Tensor:
    """Number of experts that receive at least one valid row (a 0-d int64 tensor).

    Pass ``num_experts`` to avoid a host sync (otherwise ``ids.max()`` is read).
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError("ids must be an integer tensor of shape [T, K]")
    valid = _row_mask(valid_mask, ids.shape[0], "valid_mask", ids.device)
    if ids.numel() == 0:
        return torch.zeros((), dtype=torch.long, device=ids.device)
    E = int(ids.max()) + 1 if num_experts is None else num_experts
    hit = torch.zeros(E + 1, dtype=torch.bool, device=ids.device)
    hit = hit.scatter(0, torch.where(valid[:, None], ids.long(), E).flatten(), True)
    return hit[:E].sum()


def changed_assignments(ids: torch.Tensor, native_ids: torch.Tensor,
                        valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Number of (row, slot) assignments whose expert is not among the row's native ones."""
    valid = _row_mask(valid_mask, ids.shape[0], "valid_mask", ids.device)
    kept = (ids[:, :, None] == native_ids[:, None, :]).any(dim=-1)        # [T, K]
    return ((~kept) & valid[:, None]).sum()
