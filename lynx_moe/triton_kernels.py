"""Triton kernels of the fused policy step (``fused.py``'s CUDA path): two launches per call.

1. ``_decide`` (one program): the policy's decision from the voting rows, ``in[E]`` (keep for
   set policies, the experts the batch uses for row policies) and, for row policies, how many
   native experts each row keeps. It loops over row blocks itself: a decision needs every row.
2. ``_route`` (one program per block of rows): each voting row's tiered top-K inside ``in``
   (the reference's one key: tier, float order of the selection logit, reversed index), then
   its weights; rows that do not vote copy the native weights and ids.

Every parameter (alpha, beta, k0, budget, threshold, K, E, T) is a runtime argument; only the
policy kind and the block sizes are compile-time. Decisions follow ``routing``/``policies``
exactly; weights agree to float32 rounding (Triton's exp, not torch's). What stays on the
torch reference here: AffinityBinning without a clamp or beyond exact float64 integers (its
float path), E > 4096. Confidence's half sums come from torch (the reference's own
reduction order). BatchTopN/XShare sum each expert's float64 mass in a fixed order of their
own; the CUDA reference sums with atomics in no fixed order, so only masses equal to within
float64 rounding could rank differently.

Without a GPU the kernels run under Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1`` before triton is imported; ``tests/test_fused.py`` does this).

Legend: T router rows, E experts, K top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch", "takes"]

# Policy codes, as in fused.py.
AFFINITY, CONFIDENCE, OEA, TOP_MASS, STATIC_K, SER = range(6)
_MAX_E = 4096


@triton.jit
def _votes(vote_ptr, t, T, HAS_VOTE: tl.constexpr):
    """[BLOCK_T] bool: the rows of the block that vote."""
    if HAS_VOTE:
        return tl.load(vote_ptr + t, mask=t < T, other=0) != 0
    return t < T


@triton.jit
def _row_block(sel_ptr, vote_ptr, t0, T, E, HAS_VOTE: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_E: tl.constexpr):
    """Rows t0.. of the selection logits: (t, e, live [BT, BE], sel [BT, BE], vote [BT])."""
    t = t0 + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    live = (t < T)[:, None] & (e < E)[None, :]
    sel = tl.load(sel_ptr + t[:, None] * E + e[None, :], mask=live, other=float("-inf"))
    return t, e, live, sel, _votes(vote_ptr, t, T, HAS_VOTE)


@triton.jit
def _bins(sel, t, T, alpha, beta, B, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """AffinityBinning's level = clamp(ceil(alpha * (L - rowmax)), -beta) + beta and
    H = B**level (float64, exact), as in csrc/inside.cpp: ceil(y) for y <= 0 is y truncated."""
    top = tl.where(t < T, tl.max(sel, axis=1), 0.0)   # rows past T: no NaN
    y = alpha * (sel - top[:, None])
    level = tl.maximum(tl.maximum(y, -beta - 1.0).to(tl.int32) + beta, 0)
    h = tl.full((BLOCK_T, BLOCK_E), 1.0, dtype=tl.float64)
    for j in range(beta):
        h = tl.where(level > j, h * B, h)
    return level, h


@triton.jit
def _first_of_rows(ids_ptr, t, e, vote, counts, T, K, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """[BLOCK_T, BLOCK_E] bool: each voting row's first counts[t] native experts."""
    hit = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for j in range(K):
        idj = tl.load(ids_ptr + t * K + j, mask=t < T, other=-1)
        hit = hit | ((e[None, :] == idj[:, None]) & (j < counts)[:, None])
    return hit & vote[:, None]

@triton.jit
def _decide(sel_ptr, natw_ptr, nati_ptr, vote_ptr, head_ptr, tail_ptr, in_ptr, own_ptr,
            T, E, K, p, n0, n1, flag,
            POLICY: tl.constexpr, HAS_VOTE: tl.constexpr, BLOCK_T: tl.constexpr,
            BLOCK_E: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    keep = tl.zeros((BLOCK_E,), dtype=tl.int32)
    # B: the number of voting rows (>= 1), as the reference counts it.
    n_votes = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        n_votes += _votes(vote_ptr, t0 + tl.arange(0, BLOCK_T), T, HAS_VOTE).to(tl.int32)
    B = tl.maximum(tl.sum(n_votes, axis=0), 1).to(tl.float64)
    if POLICY == 0:   # AffinityBinning, exact integers (``takes`` checks the bound)
        beta = n0
        top_power = B
        for _ in range(beta):
            top_power = top_power * B   # B**(beta + 1), an exact integer
        S = tl.zeros((BLOCK_E,), dtype=tl.float64)   # popularity: integers, any order is exact
        for t0 in range(0, T, BLOCK_T):
            t, e, live, sel, vote = _row_block(sel_ptr, vote_ptr, t0, T, E, HAS_VOTE, BLOCK_T, BLOCK_E)
            if tl.max(vote.to(tl.int32), axis=0) > 0:   # blocks of prefill rows cost nothing
                level, h = _bins(sel, t, T, p, beta, B, BLOCK_T, BLOCK_E)
                S += tl.sum(tl.where(live & vote[:, None], h, 0.0), axis=0)
        for t0 in range(0, T, BLOCK_T):
            t, e, live, sel, vote = _row_block(sel_ptr, vote_ptr, t0, T, E, HAS_VOTE, BLOCK_T, BLOCK_E)
            if tl.max(vote.to(tl.int32), axis=0) > 0:
                level, h = _bins(sel, t, T, p, beta, B, BLOCK_T, BLOCK_E)
                h = tl.where(vote[:, None], h, 0.0)
                key = (level.to(tl.float64) * top_power + (S[None, :] - h)) * E + (E - 1 - e)[None, :]
                key = tl.where(live, key, -1.0)
                for _ in range(K):   # the row's top-K by the exact key (unique: reversed index)
                    best = tl.max(key, axis=1)
                    hit = key == best[:, None]
                    keep = tl.maximum(keep, tl.max((hit & vote[:, None]).to(tl.int32), axis=0))
                    key = tl.where(hit, -1.0, key)
                if flag:
                    ones = tl.full((BLOCK_T,), 1, dtype=tl.int32)
                    first = _first_of_rows(nati_ptr, t, e, vote, ones, T, K, BLOCK_T, BLOCK_E)
                    keep = tl.maximum(keep, tl.max(first.to(tl.int32), axis=0))
    elif POLICY == 3:   # BatchTopN (n1 = 0) / XShare (n1 = k0)
        mass = tl.zeros((BLOCK_E,), dtype=tl.float64)
        forced = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for t0 in range(0, T, BLOCK_T):
            t, e, live, sel, vote = _row_block(sel_ptr, vote_ptr, t0, T, E, HAS_VOTE, BLOCK_T, BLOCK_E)
            for j in range(K):
                idj = tl.load(nati_ptr + t * K + j, mask=t < T, other=-1)
                wj = tl.load(natw_ptr + t * K + j, mask=t < T, other=0.0)
                wj = tl.where(vote, wj, wj * 0.0)
                mass += tl.sum(tl.where(e[None, :] == idj[:, None], wj[:, None].to(tl.float64), 0.0), axis=0)
            counts = tl.full((BLOCK_T,), 0, dtype=tl.int32) + n1
            first = _first_of_rows(nati_ptr, t, e, vote, counts, T, K, BLOCK_T, BLOCK_E)
            forced = tl.maximum(forced, tl.max(first.to(tl.int32), axis=0))
        # Forced experts first, then the best unforced by (mass, lower index), zero mass never.
        room = n0 - tl.sum(forced, axis=0)
        cand = (forced == 0) & (mass > 0) & (e < E)
        for i in range(n0):
            best = tl.max(tl.where(cand, mass, -1.0), axis=0)
            pick = tl.min(tl.where(cand & (mass == best), e, BLOCK_E), axis=0)
            take = ((room > i) & (best > 0.0)).to(tl.int32)
            keep = tl.maximum(keep, tl.where(e == pick, take, 0))
            cand = cand & (e != pick)
        keep = tl.maximum(keep, forced)
    else:   # union of each voting row's first counts[t] native experts
        for t0 in range(0, T, BLOCK_T):
            t, e, live, sel, vote = _row_block(sel_ptr, vote_ptr, t0, T, E, HAS_VOTE, BLOCK_T, BLOCK_E)
            if POLICY == 1:   # Confidence, from torch's half sums
                head = tl.load(head_ptr + t, mask=t < T, other=1.0)
                tail = tl.load(tail_ptr + t, mask=t < T, other=0.0)
                c = tl.where(head > 0, (head - tail) / tl.maximum(head, 1e-30), 1.0)
                v = tl.floor(c * (K * 1.0) * p) + n0 * 1.0
                counts = tl.minimum(tl.maximum(v, 1.0), K * 1.0).to(tl.int32)
            elif POLICY == 5:   # SER: the top n0, then every weight above p * the top-1's
                w0 = tl.load(natw_ptr + t * K, mask=t < T, other=0.0)
                counts = tl.full((BLOCK_T,), 0, dtype=tl.int32) + n0
                for j in range(n0, K):
                    wj = tl.load(natw_ptr + t * K + j, mask=t < T, other=0.0)
                    counts += (wj > p * w0).to(tl.int32)
            else:   # OEA (k0 = n0), StaticK (k = n0)
                counts = tl.full((BLOCK_T,), 0, dtype=tl.int32) + n0
            if POLICY >= 4:
                tl.store(own_ptr + t, counts, mask=t < T)
            first = _first_of_rows(nati_ptr, t, e, vote, counts, T, K, BLOCK_T, BLOCK_E)
            keep = tl.maximum(keep, tl.max(first.to(tl.int32), axis=0))
    tl.store(in_ptr + e, keep, mask=e < E)

@triton.jit
def _route(x_ptr, sel_ptr, natw_ptr, nati_ptr, mass_ptr, vote_ptr, in_ptr, own_ptr, w_ptr, ids_ptr,
           T, E, K, scale, ROW_POLICY: tl.constexpr, HAS_VOTE: tl.constexpr, SIGMOID: tl.constexpr,
           RENORMALIZE: tl.constexpr, SCALED: tl.constexpr, GROUPED: tl.constexpr,
           BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    t0 = tl.program_id(0) * BLOCK_T
    t, e, live, sel, vote = _row_block(sel_ptr, vote_ptr, t0, T, E, HAS_VOTE, BLOCK_T, BLOCK_E)
    x = tl.load(x_ptr + t[:, None] * E + e[None, :], mask=live, other=0.0)
    kept = tl.load(in_ptr + e, mask=e < E, other=0)
    if ROW_POLICY:
        counts = tl.load(own_ptr + t, mask=t < T, other=0)
    else:
        counts = tl.zeros((BLOCK_T,), dtype=tl.int32)
    native = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    own = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for j in range(K):
        idj = tl.load(nati_ptr + t * K + j, mask=t < T, other=-1)
        at = e[None, :] == idj[:, None]
        native = native | at
        own = own | (at & (j < counts)[:, None])
    tier = own.to(tl.int64) * 4 + (kept != 0).to(tl.int64)[None, :] * 2 + native.to(tl.int64)
    if GROUPED:
        tier = tl.where(tl.abs(sel) < float("inf"), tier, 0)   # False for NaN too
    bits = sel.to(tl.int32, bitcast=True)
    order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    key = (tier * 4294967296 + order) * 4096 + (E - 1 - e)[None, :]
    key = tl.where(live, key, -9223372036854775807)
    slot = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    val = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    real = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int1)
    for j in range(K):
        best = tl.max(key, axis=1)
        hit = key == best[:, None]
        here = slot[None, :] == j
        ids = tl.where(here, tl.sum(tl.where(hit, e[None, :], 0), axis=1).to(tl.int64)[:, None], ids)
        val = tl.where(here, tl.sum(tl.where(hit, x, 0.0), axis=1)[:, None], val)
        real = real | (here & (tl.max((hit & own).to(tl.int32), axis=1) != 0)[:, None])
        key = tl.where(hit, -9223372036854775807, key)
    slots = (t < T)[:, None] & (slot < K)[None, :]
    if not ROW_POLICY:
        real = slots
    if SIGMOID:
        raw = tl.where(real, tl.sigmoid(val), 0.0)
        w = raw / tl.where(t < T, tl.sum(raw, axis=1) + 1e-20, 1.0)[:, None]
    else:
        top = tl.max(tl.where(real, val, float("-inf")), axis=1)
        raw = tl.where(real, tl.exp(val - top[:, None]), 0.0)
        w = raw / tl.where(t < T, tl.sum(raw, axis=1), 1.0)[:, None]
    if not RENORMALIZE:
        w = w * tl.load(mass_ptr + t, mask=t < T, other=0.0)[:, None]
    if SCALED:
        w = w * scale
    at = t[:, None] * K + slot[None, :]
    nat_w = tl.load(natw_ptr + at, mask=slots, other=0.0)
    nat_i = tl.load(nati_ptr + at, mask=slots, other=0)
    tl.store(w_ptr + at, tl.where(vote[:, None], w, nat_w), mask=slots)
    tl.store(ids_ptr + at, tl.where(vote[:, None], ids, nat_i), mask=slots)


def takes(T: int, E: int, policy: int, n0: int) -> bool:
    """Whether these kernels take a call of this shape (host-side ints only, no sync):
    E <= 4096, and AffinityBinning only with a clamp inside the exact-integer bound that
    policies.AffinityBinning.keep uses (otherwise its float path: the reference)."""
    if E > _MAX_E:
        return False
    return policy != AFFINITY or (n0 >= 0 and (n0 + 1) * float(T) ** (n0 + 1) * E < 2**52)


def launch(x: torch.Tensor, sel: torch.Tensor, native_w: torch.Tensor, native_ids: torch.Tensor,
           mass: torch.Tensor, vote: torch.Tensor | None, policy: int, p: float, n0: int, n1: int,
           flag: bool, sigmoid: bool, renormalize: bool, scale: float,
           grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the two kernels on the tensors' device (CUDA, or CPU under the interpreter).
    Arguments as ``torch.ops.lynx_moe.inside``; only for calls that ``takes``."""
    T, E = x.shape
    K = native_ids.shape[1]
    assert takes(T, E, policy, n0)
    x, sel = x.contiguous(), sel.contiguous()
    native_w, native_ids, mass = native_w.float().contiguous(), native_ids.contiguous(), mass.contiguous()
    vote_arg = (vote if vote is not None else mass).contiguous()
    head = tail = mass
    if policy == CONFIDENCE:   # the reference's own reduction order
        head, tail = native_w[:, : K // 2].sum(dim=-1), native_w[:, K // 2:].sum(dim=-1)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T = max(1, min(triton.next_power_of_2(T), 4096 // BLOCK_E))
    keep = torch.empty(E, dtype=torch.int32, device=x.device)
    own = torch.empty(T, dtype=torch.int32, device=x.device)
    _decide[(1,)](sel, native_w, native_ids, vote_arg, head, tail, keep, own, T, E, K, float(p), n0, n1,
                 int(flag), POLICY=policy, HAS_VOTE=vote is not None,
                 BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, enable_fp_fusion=False)
    w = torch.empty(T, K, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, K, dtype=torch.int64, device=x.device)
    _route[(triton.cdiv(T, BLOCK_T),)](
        x, sel, native_w, native_ids, mass, vote_arg, keep, own, w, ids, T, E, K, float(scale),
        ROW_POLICY=policy >= STATIC_K, HAS_VOTE=vote is not None, SIGMOID=sigmoid,
        RENORMALIZE=renormalize, SCALED=scale != 1.0, GROUPED=grouped, BLOCK_T=BLOCK_T,
        BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(K), enable_fp_fusion=False)
    return w, ids
