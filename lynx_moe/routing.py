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
a step never touches an expert that native routing would not have touched, as long as
``keep`` holds only natively chosen experts (every set policy but the paper's AffinityBinning,
whose picks can include a row's top-bin expert that no row chose: docs/algorithms.md). A row policy
(StaticK, SER) keeps a prefix of each row's native experts; the other slots get weight 0 and
ids of experts the batch already uses (then the row's next native ones), never a duplicate.
A substitute policy (SERE) names each slot's expert, a native one or a stand-in inside the
row's groups; each slot's native weight moves with it, slots that name one expert merge into
one (weights added), and each freed slot becomes such a weight-0 filler.

Weights keep the native semantics: with ``renormalize`` they sum to 1; otherwise they are
rescaled to the row's original native top-k mass (the paper's rule). They are recomputed
for every voting row, so an unchanged row may differ from native in the last bit (moved
native weights keep both rules by construction).

Non-finite logits: NaN and -inf count as the lowest float32 value, +inf as the highest, so
ids stay in ``[0, E)``, without duplicates, and weights stay finite. No host sync and no Python
loop over rows or experts: the function compiles with ``torch.compile(fullgraph=True)``.

Legend: T router rows, E experts, K top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fused
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
    if E > 4096:
        raise ValueError(f"at most 4096 experts are supported, got E={E}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an integer in [1, E={E}], got {top_k!r}")
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a lynx_moe policy (e.g. lynx.AffinityBinning()), got {policy!r}")
    if policy.kind == "per_layer":
        raise ValueError(f"{policy} routes one layer at a time: pass policy.for_layer(i) for the i-th MoE layer")
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


def _native(x, top_k, renormalize, scoring, bias, n_group, topk_group, scale, given=None):
    """Native routing on sanitised fp32 logits, with the model's own op order.

    Returns (weights [T, K], ids [T, K], selection logits [T, E], mass [T]); the selection
    logits are -inf outside a row's chosen groups; mass is the native top-k weight before
    renormalisation, used by the paper's rule when ``renormalize`` is False. ``given``: the
    engine's own ``(weights, ids)`` of these logits, returned instead of a second top-k.
    """
    if given is not None and n_group is None:
        w, ids = given[0].float(), given[1].long()
        sel = x if scoring != "sigmoid" or bias is None else torch.logit(
            (torch.sigmoid(x) + bias.float()).clamp(1e-12, 1 - 1e-7))
        if renormalize:
            return w, ids, sel, torch.ones_like(x[:, 0])   # mass is only read without renormalisation
        probs = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
        return w, ids, sel, probs.gather(1, ids).sum(dim=-1)
    if given is not None:   # grouped: the row's groups are needed, so route and keep the engine's result
        _, _, sel, mass = _native(x, top_k, renormalize, scoring, bias, n_group, topk_group, scale)
        return given[0].float(), given[1].long(), sel, mass
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


def _tiered_topk(sel: torch.Tensor, tier: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids by ``tier`` (small ints, higher first), then by ``sel``, then lower index.

    One exact float64 key (integers below 2**53), so ``topk`` needs no stable sort: the
    tier times 2**44, plus the float32's order (its bits read as a monotone integer) times
    2**12, plus the reversed index (E <= 4096)."""
    E = sel.shape[1]
    bits = sel.contiguous().view(torch.int32)
    order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).double()   # negative floats: flip magnitude
    rev = torch.arange(E - 1, -1, -1, dtype=torch.float64, device=sel.device)
    key = (tier * 2.0**32 + order) * 2.0**12 + rev
    return torch.topk(key, k, dim=-1).indices


def _weights(x, ids, real, renormalize, scoring, mass, scale):
    """Native weight rule applied to chosen ids; slots with ``real`` False get 0."""
    chosen = x.gather(1, ids)
    if scoring == "sigmoid":
        raw = torch.sigmoid(chosen)
        if real is not None:
            raw = raw * real
        w = raw / (raw.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        top = chosen if real is None else chosen.masked_fill(~real, -torch.inf)
        raw = torch.exp(chosen - top.amax(dim=-1, keepdim=True))
        if real is not None:
            raw = raw * real
        w = raw / raw.sum(dim=-1, keepdim=True)
    if not renormalize:
        w = w * mass[:, None]
    return w if scale == 1.0 else w * scale


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
    native: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Routing:
    """Like ``select_experts`` but also returns what native routing chose and which rows
    voted, so callers can count what the policy changed without routing twice.

    ``native``: an engine's own native result ``(weights [T, K], ids [T, K])`` for these
    logits (e.g. vLLM's router output). It is used instead of a second native top-k: rows
    that do not vote get exactly it, and voting rows rank its ids as their native experts."""
    _validate(router_logits, top_k, policy, renormalize, scoring, e_score_correction_bias,
              num_expert_group, topk_group)
    T, E = router_logits.shape
    dev = router_logits.device
    if native is not None and not (len(native) == 2 and all(
            isinstance(t, torch.Tensor) and t.shape == (T, top_k) for t in native)):
        raise ValueError(f"native must be (weights, ids), two tensors of shape ({T}, {top_k})")
    everyone = decode_mask is None and valid_mask is None
    vote = _row_mask(decode_mask, T, "decode_mask", dev) & _row_mask(valid_mask, T, "valid_mask", dev)
    x = torch.nan_to_num(router_logits.float(), nan=_F32.min, posinf=_F32.max, neginf=_F32.min)
    scale = float(routed_scaling_factor)
    # The whole step in one fused call where a kernel takes it (same decisions; LYNX_FUSED=0: never).
    fast = fused.route(policy, x, top_k, renormalize, scoring, None if everyone else vote, native,
                       e_score_correction_bias, num_expert_group, topk_group, scale)
    if fast is not None:
        return Routing(*fast, vote)
    nat_w, nat_ids, sel, mass = _native(x, top_k, renormalize, scoring, e_score_correction_bias,
                                        num_expert_group, topk_group, scale, native)
    nat_ids = nat_ids.long()
    if policy.kind == "native":
        return Routing(nat_w, nat_ids, nat_ids, vote)

    if everyone:
        step = Step(sel, nat_ids, nat_w, None, float(T), top_k, x, scoring)
    else:
        step = Step(sel, nat_ids, nat_w, vote, vote.sum().double().clamp_min(1), top_k, x, scoring)
    native_set = torch.zeros_like(x, dtype=torch.bool).scatter(1, nat_ids, True)    # [T, E]
    if policy.kind == "set":
        keep = policy.keep(step)[None, :]                                          # [1, E]
        # Tiers: kept native experts (a row's best inside keep anyway; this way equal logits
        # go to what the row had), other kept experts, then native ones for rows that keep
        # holds fewer than top_k of.
        tier = keep.double() * 2 + native_set
    elif policy.kind == "substitute":
        sub = policy.substitute(step)                                              # [T, K]
        own = torch.zeros_like(native_set).scatter(1, sub, True)
        used = (own if everyone else own & vote[:, None]).any(dim=0, keepdim=True)
        # The row's experts first (a slot that now shares one leaves a filler: weight 0, an
        # expert the batch already runs, then the row's next native one).
        tier = own.double() * 4 + used * 2 + native_set
    else:
        counts = policy.counts(step)                                               # [T]
        own = torch.zeros_like(native_set).scatter(
            1, nat_ids, torch.arange(top_k, device=dev)[None, :] < counts[:, None])
        used = (own if everyone else own & vote[:, None]).any(dim=0, keepdim=True)
        # Own experts first; fillers (weight 0) prefer experts the batch already runs.
        tier = own.double() * 4 + used * 2 + native_set
    if num_expert_group is not None:
        tier = tier * torch.isfinite(sel)   # never leave the row's native groups
    ids = _tiered_topk(sel, tier, top_k)
    if policy.kind == "substitute":   # each slot's native weight goes to its expert, summed
        w = ((ids[:, :, None] == sub[:, None, :]) * nat_w[:, None, :]).sum(dim=-1)
    else:
        real = own.gather(1, ids) if policy.kind == "row" else None   # False: a weight-0 filler
        w = _weights(x, ids, real, renormalize, scoring, mass, scale)
    if not everyone:
        ids = torch.where(vote[:, None], ids, nat_ids)
        w = torch.where(vote[:, None], w, nat_w)
    return Routing(w, ids, nat_ids, vote)


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
    """Number of experts that receive at least one valid row: ``ids [..., T, K]`` -> ``[...]``
    int64 (0-d for one ``[T, K]`` step; leading dims are independent steps or id sets, e.g.
    native and policy ids stacked, all counted in one scatter).

    ``valid_mask [T]`` applies to every leading index. Pass ``num_experts`` to avoid a host
    sync (otherwise ``ids.max()`` is read). This is the one distinct-expert counter of the
    package: the HF and vLLM statistics and ``lynx profile`` all use it.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2 or ids.is_floating_point():
        raise ValueError("ids must be an integer tensor of shape [T, K] (or [..., T, K])")
    *lead, T, K = ids.shape
    valid = _row_mask(valid_mask, T, "valid_mask", ids.device)
    if ids.numel() == 0:
        return torch.zeros(lead, dtype=torch.long, device=ids.device)
    E = int(ids.max()) + 1 if num_experts is None else num_experts
    flat = torch.where(valid[:, None], ids.long(), E).reshape(-1, T * K)              # [N, T*K]
    hit = torch.zeros(flat.shape[0], E + 1, dtype=torch.bool, device=ids.device).scatter_(1, flat, True)
    return hit[:, :E].sum(dim=1).reshape(lead)


def changed_assignments(ids: torch.Tensor, native_ids: torch.Tensor,
                        valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Number of (row, slot) assignments whose expert is not among the row's native ones."""
    valid = _row_mask(valid_mask, ids.shape[0], "valid_mask", ids.device)
    kept = (ids[:, :, None] == native_ids[:, None, :]).any(dim=-1)        # [T, K]
    return ((~kept) & valid[:, None]).sum()
