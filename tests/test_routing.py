"""Property tests of the policy core (lynx_moe.routing, lynx_moe.policies) on random logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lynx_moe as lynx

from . import reference_lynx

SET_POLICIES = ["affinity_binning", "confidence", "batch_top_n", "oea", "mass_floor", "xshare"]


@st.composite
def cases(draw, scorings=("softmax", "softmax_topk", "sigmoid")):
    T = draw(st.integers(1, 40))
    E = draw(st.integers(2, 70))
    k = draw(st.integers(1, min(E, 8)))
    scoring = draw(st.sampled_from(scorings))
    renormalize = True if scoring == "softmax_topk" else draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    g = torch.Generator().manual_seed(seed)
    # A shared "popularity" component makes batches skewed, as real router logits are.
    logits = (torch.randn(T, E, generator=g) + torch.randn(1, E, generator=g)) * scale
    masks = draw(st.sampled_from(["none", "decode", "valid", "both"]))
    decode = torch.rand(T, generator=g) > 0.3 if masks in ("decode", "both") else None
    valid = torch.rand(T, generator=g) > 0.2 if masks in ("valid", "both") else None
    return dict(router_logits=logits.to(dtype), top_k=k, renormalize=renormalize, scoring=scoring,
                decode_mask=decode, valid_mask=valid)


def similarity(E: int, seed: int, ties: bool = False) -> torch.Tensor:
    """A random symmetric [E, E] expert similarity in [-1, 1] with a unit diagonal; ``ties``
    rounds it to one decimal so that many primaries are equally similar."""
    a = torch.rand(E, E, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    m = ((a + a.T) / 2).fill_diagonal_(1.0)
    return torch.round(m, decimals=1) if ties else m


def size_fit(E: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """A random ``[3E+2, E]`` SizePrice fit: log output sizes that vary with the logits."""
    return torch.randn(3 * E + 2, E, generator=torch.Generator().manual_seed(seed)) * scale


@st.composite
def policies(draw, top_k: int, experts: int):
    name = draw(st.sampled_from(["topk", "static_k", "ser", "sere", "size_price", *SET_POLICIES]))
    if name == "size_price":
        return lynx.SizePrice(lam=draw(st.sampled_from([0.0, 1e-4, 1e-3, 1e-2, 1.0])), p=draw(st.sampled_from([1.0, 2.0])),
                              rounds=draw(st.sampled_from([1, 4, 16]))).bound(size_fit(experts, draw(st.integers(0, 999))))
    if name == "sere":
        sim = similarity(experts, draw(st.integers(0, 999)), ties=draw(st.booleans()))
        return lynx.SERE(draw(st.integers(1, top_k)), draw(st.sampled_from([-1.0, 0.0, 0.3, 0.7, 1.0]))).bound(sim)
    if name == "affinity_binning":
        return lynx.AffinityBinning(alpha=draw(st.sampled_from([0.5, 1.0, 3.0, 8.0])),
                                    beta=draw(st.sampled_from([None, 1, 2, 4])),
                                    protect_top1=draw(st.booleans()))
    if name == "confidence":
        return lynx.Confidence(alpha=draw(st.integers(0, 2)), beta=draw(st.sampled_from([0.0, 0.5, 1.0])))
    if name == "static_k":
        return lynx.StaticK(draw(st.integers(1, top_k)))
    if name == "ser":
        return lynx.SER(draw(st.integers(1, top_k)), draw(st.sampled_from([0.0, 0.3, 0.9])))
    if name == "batch_top_n":
        return lynx.BatchTopN(draw(st.integers(top_k, 20)))
    if name == "oea":
        return lynx.OEA(draw(st.integers(1, top_k)))
    if name == "mass_floor":
        return lynx.MassFloor(draw(st.sampled_from([0.1, 0.5, 0.7, 1.0])))
    if name == "xshare":
        return lynx.XShare(draw(st.integers(top_k, 20)), draw(st.integers(1, top_k)))
    return lynx.TopK()


def plain_native(logits: torch.Tensor, k: int, renormalize: bool, scoring: str):
    """What the model does natively, written out plainly."""
    x = logits.float()
    if scoring == "softmax":
        w, ids = torch.softmax(x, dim=-1).topk(k, dim=-1)
        return (w / w.sum(-1, keepdim=True) if renormalize else w), ids
    if scoring == "softmax_topk":
        v, ids = x.topk(k, dim=-1)
        return torch.softmax(v, dim=-1), ids
    w, ids = torch.sigmoid(x).topk(k, dim=-1)
    return (w / (w.sum(-1, keepdim=True) + 1e-20) if renormalize else w), ids


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.data())
def test_output_invariants(data):
    case = data.draw(cases())
    policy = data.draw(policies(case["top_k"], case["router_logits"].shape[1]))
    T, E = case["router_logits"].shape
    k = case["top_k"]
    r = lynx.route(policy=policy, **case)
    w, ids = r.weights, r.ids
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (T, k)
    assert ((ids >= 0) & (ids < E)).all()
    assert (torch.sort(ids, -1).values.diff(dim=-1) != 0).all(), "duplicate expert in a row"
    assert torch.isfinite(w).all() and (w >= 0).all()
    if case["renormalize"] and case["scoring"] != "sigmoid":
        torch.testing.assert_close(w.sum(-1), torch.ones(T), atol=1e-5, rtol=0)

    # Rows that do not vote are routed natively, bit for bit.
    nw, nids = plain_native(case["router_logits"], k, case["renormalize"], case["scoring"])
    off = ~r.vote
    assert torch.equal(ids[off], nids[off]) and torch.equal(w[off], nw[off])
    if isinstance(policy, lynx.TopK):
        assert torch.equal(ids, nids) and torch.equal(w, nw)

    # Never more experts than native routing would touch, except under the paper's rule
    # (AffinityBinning), whose picks may include an expert no row chose natively (see below).
    valid = case["valid_mask"]
    if not isinstance(policy, lynx.AffinityBinning):
        assert lynx.distinct_experts(ids, valid, E) <= lynx.distinct_experts(nids, valid, E)

    if isinstance(policy, (lynx.OEA, lynx.XShare)):
        v = r.vote
        top = nids[v, : policy.k0]
        assert (ids[v][:, :, None] == top[:, None, :]).any(dim=1).all(), "lost a protected top-k0 expert"
    if isinstance(policy, lynx.SERE):
        # Each voting row keeps its top-s (primaries); every expert it uses with weight is its
        # own native one or some voting row's primary; moved weights keep the row's native sum.
        v = r.vote
        primary = torch.zeros(E, dtype=torch.bool).scatter(0, nids[v, : policy.top_s].flatten(), True)
        top = nids[v, : policy.top_s]
        assert (ids[v][:, :, None] == top[:, None, :]).any(dim=1).all(), "lost a primary"
        native_row = (ids[:, :, None] == nids[:, None, :]).any(dim=-1)
        assert (native_row | primary[ids] | (w == 0))[v].all(), "a weighted expert that is neither native nor primary"
        torch.testing.assert_close(w.sum(-1), nw.sum(-1), atol=1e-5, rtol=1e-5)
    if isinstance(policy, lynx.XShare):
        forced = lynx.distinct_experts(nids[:, : policy.k0], r.vote, E)
        used = lynx.distinct_experts(ids, r.vote, E)
        assert used <= max(policy.budget, int(forced))


@FAST
@given(st.data())
def test_permuting_rows_permutes_outputs(data):
    case = data.draw(cases())
    policy = data.draw(policies(case["top_k"], case["router_logits"].shape[1]))
    T = case["router_logits"].shape[0]
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    w, ids = lynx.select_experts(policy=policy, **case)
    permuted = {key: (v[perm] if isinstance(v, torch.Tensor) else v) for key, v in case.items()}
    pw, pids = lynx.select_experts(policy=policy, **permuted)
    # Ids compared as sets per row: slot order inside a row is not part of the contract.
    assert torch.equal(torch.sort(pids, -1).values, torch.sort(ids[perm], -1).values)
    torch.testing.assert_close(torch.sort(pw, -1).values, torch.sort(w[perm], -1).values, atol=1e-6, rtol=0)


def _check_against_reference(case, alpha, beta) -> tuple[int, int]:
    """Compare one case with the reference; returns (rows matching, voting rows)."""
    r = lynx.route(policy=lynx.AffinityBinning(alpha, beta), **case)
    vote = r.vote.tolist()
    if not any(vote):
        return 0, 0
    L = case["router_logits"].numpy()
    keep, final = reference_lynx.affinity_binning(L, case["top_k"], alpha, beta, vote, r.native_ids.tolist())
    rows = [t for t in range(len(vote)) if vote[t]]
    probs = torch.softmax(case["router_logits"], -1)
    same = 0
    for t, want in zip(rows, final):
        if set(r.ids[t].tolist()) != set(want):
            continue
        same += 1
        mass = float(probs[t].topk(case["top_k"]).values.sum())
        ref_w = reference_lynx.weights(L[t], want, case["renormalize"], mass)
        got = dict(zip(r.ids[t].tolist(), r.weights[t].tolist()))
        np.testing.assert_allclose([got[e] for e in want], ref_w, atol=2e-6, rtol=1e-5)
    return same, len(rows)


@settings(max_examples=2000, deadline=None)
@given(st.data())
def test_affinity_binning_matches_reference(data):
    """Decision for decision against tests/reference_lynx.py, written from the spec. With a
    clamp (beta) the popularity sums are integers in float64, so ties are exact."""
    case = data.draw(cases(scorings=("softmax",)))
    case["router_logits"] = case["router_logits"].float()
    alpha = data.draw(st.sampled_from([0.5, 0.7, 1.0, 3.0, 8.0]))
    beta = data.draw(st.sampled_from([1, 2, 4]))
    same, rows = _check_against_reference(case, alpha, beta)
    assert same == rows


def test_affinity_binning_without_clamp_matches_reference_almost_always():
    """Without a clamp, bins go arbitrarily deep and popularity B**q underflows float64
    resolution (the reference uses exact fractions), so a tie the reference breaks by a
    popularity difference of ~B**-30 can go to the lower index instead. Such cases are rare."""
    same = rows = 0
    g = torch.Generator().manual_seed(7)
    for i in range(300):
        T, E, k = 32, 64, 8
        scale = (0.3, 1.0, 3.0)[i % 3]
        logits = ((torch.randn(T, E, generator=g) + torch.randn(1, E, generator=g)) * scale).bfloat16().float()
        case = dict(router_logits=logits, top_k=k, renormalize=True, scoring="softmax",
                    decode_mask=None, valid_mask=None)
        s, n = _check_against_reference(case, (0.5, 1.0, 3.0)[i % 3], None)
        same, rows = same + s, rows + n
    assert same / rows >= 0.99, f"{same}/{rows} rows agree"


def test_affinity_binning_can_pick_an_expert_no_row_chose_natively():
    """The paper's rule keeps each voting row's top-k by (bin, popularity), ties to the lower
    index: with one voter and every logit in its top bin (alpha 0.5: bins 2 logits wide) it
    keeps expert 0, which no row chose natively, so this step touches 2 experts, native 1.
    Faithful to the paper (and the reference); documented in docs/algorithms.md."""
    L = torch.tensor([[-0.31, -0.09, 0.29, -0.34, 0.25, -0.10, -0.03, 0.03, 0.18, 0.37],
                      [0.02, -0.02, 0.36, -0.24, 0.08, -0.14, -0.05, -0.01, 0.17, 0.42]])
    r = lynx.route(L, 1, lynx.AffinityBinning(0.5, None), renormalize=False, decode_mask=torch.tensor([True, False]))
    assert r.native_ids.tolist() == [[9], [9]] and r.ids.tolist() == [[0], [9]]
    keep, final = reference_lynx.affinity_binning(L.numpy(), 1, 0.5, None, [True, False], r.native_ids.tolist())
    assert final == [[0]]


def test_affinity_binning_worked_example():
    """A hand-checked batch: two rows share expert 1 in bin 0, so both move to it."""
    L = torch.tensor([[3.0, 2.9, -5.0, -5.0],     # bin 0 = {0, 1}
                      [-5.0, 2.9, 3.0, -5.0]])    # bin 0 = {1, 2}
    w, ids = lynx.select_experts(L, 1, lynx.AffinityBinning(alpha=1.0, beta=2))
    assert ids.flatten().tolist() == [1, 1]
    assert lynx.distinct_experts(ids) == 1
    _, native = lynx.select_experts(L, 1)
    assert native.flatten().tolist() == [0, 2]
    assert torch.equal(w, torch.ones(2, 1))


def test_ties_go_to_lower_expert_index():
    L = torch.zeros(1, 6)  # one row, all in bin 0, no popularity from other rows
    _, ids = lynx.select_experts(L, 2, lynx.AffinityBinning(alpha=1.0, beta=1))
    assert sorted(ids[0].tolist()) == [0, 1]


def test_renormalize_false_keeps_original_mass():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(16, 32, generator=g) + torch.randn(1, 32, generator=g) * 2
    w, ids = lynx.select_experts(L, 4, lynx.AffinityBinning(1.0, 2), renormalize=False)
    nw, _ = lynx.select_experts(L, 4, renormalize=False)
    torch.testing.assert_close(w.sum(-1), nw.sum(-1))


def test_non_finite_logits():
    L = torch.randn(6, 16)
    L[0] = float("nan")
    L[1, 3] = float("inf")
    L[2, :8] = float("-inf")
    L[3, 5] = float("nan")
    for scoring in ("softmax", "softmax_topk", "sigmoid"):
        for policy in (lynx.TopK(), lynx.AffinityBinning(), lynx.OEA(1), lynx.SER(1, 0.5),
                       lynx.SERE(1, 0.0).bound(similarity(16, 0)), lynx.SizePrice(1.0).bound(size_fit(16, 0))):
            w, ids = lynx.select_experts(L, 4, policy, scoring=scoring)
            assert torch.isfinite(w).all() and ((ids >= 0) & (ids < 16)).all()
            assert (torch.sort(ids, -1).values.diff(dim=-1) != 0).all()
            assert 3 in ids[1].tolist()  # +inf is the row's best expert
            assert 5 not in ids[3, :1].tolist()  # NaN is never a row's first choice


@FAST
@given(st.data())
def test_an_engines_native_result_is_reused_not_recomputed(data):
    """``native=(weights, ids)`` stands in for the second top-k: fed the native result of the
    same logits, every decision is unchanged; non-voting rows get the given tensors."""
    case = data.draw(cases())
    policy = data.draw(policies(case["top_k"], case["router_logits"].shape[1]))
    plain = lynx.route(policy=policy, **case)
    given = lynx.route(policy=lynx.TopK(), **case)
    r = lynx.route(policy=policy, native=(given.weights, given.ids), **case)
    assert torch.equal(r.ids, plain.ids) and torch.equal(r.native_ids, plain.native_ids)
    torch.testing.assert_close(r.weights, plain.weights, atol=1e-6, rtol=1e-5)
    fake_w = torch.full_like(given.weights, 0.5)   # an engine's own weights pass through untouched
    r = lynx.route(policy=policy, native=(fake_w, given.ids), **case)
    assert torch.equal(r.weights[~r.vote], fake_w[~r.vote])


def test_native_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"native must be \(weights, ids\), two tensors of shape \(4, 2\)"):
        lynx.route(torch.randn(4, 8), 2, lynx.OEA(1), native=(torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.long)))


def test_grouped_sigmoid_routing_matches_deepseek_v3_reference():
    g = torch.Generator().manual_seed(1)
    T, E, k, G, TG = 12, 32, 4, 8, 2
    L = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    kw = dict(e_score_correction_bias=bias, num_expert_group=G, topk_group=TG, routed_scaling_factor=2.5)
    w, ids = lynx.select_experts(L, k, lynx.TopK(), renormalize=True, scoring="sigmoid", **kw)
    # Plain reference (DeepSeek-V3 as described in the spec).
    s = torch.sigmoid(L)
    c = s + bias
    gs = c.view(T, G, E // G).topk(2, -1).values.sum(-1)
    gmask = torch.zeros(T, G).scatter(1, gs.topk(TG, -1).indices, 1.0).repeat_interleave(E // G, 1)
    ref_ids = c.masked_fill(gmask == 0, 0.0).topk(k, -1).indices
    ref_w = s.gather(1, ref_ids)
    ref_w = ref_w / (ref_w.sum(-1, keepdim=True) + 1e-20) * 2.5
    assert torch.equal(torch.sort(ids, -1).values, torch.sort(ref_ids, -1).values)
    torch.testing.assert_close(w, ref_w)
    # Policies stay inside each row's chosen groups and never exceed native.
    for policy in (lynx.AffinityBinning(1.0, 2), lynx.OEA(1), lynx.XShare(4, 1),
                   lynx.SERE(1, -1.0).bound(similarity(E, 1)), lynx.SizePrice(1.0).bound(size_fit(E, 1))):
        pw, pids = lynx.select_experts(L, k, policy, renormalize=True, scoring="sigmoid", **kw)
        assert lynx.distinct_experts(pids) <= lynx.distinct_experts(ids)
        assert gmask.gather(1, pids).bool().all(), f"{policy} left a row's groups"
        assert torch.isfinite(pw).all() and (pw >= 0).all()
        r = lynx.route(L, k, policy, renormalize=True, scoring="sigmoid", native=(w, ids), **kw)
        assert torch.equal(r.ids, pids) and torch.equal(r.weights, pw)


def test_mass_floor_worked_example():
    """Top-3 of 5 experts, mass=0.7: row 0 (weights .8/.1/.1) reaches 0.7 with its top-1 and
    keeps expert 0 only; row 1 (.4/.35/.25) needs its top-2 {3, 4}. The kept set is {0, 3, 4}:
    row 0 fills its other slots with 3 and 4, row 1 its third slot with 0."""
    w = torch.tensor([[0.8, 0.1, 0.1, 0.0, 0.0], [0.0, 0.0, 0.25, 0.4, 0.35]])
    L = torch.where(w > 0, w.log(), torch.tensor(-20.0))
    r = lynx.route(L, 3, lynx.MassFloor(0.7))
    assert sorted(set(r.ids.flatten().tolist())) == [0, 3, 4]
    assert r.ids[0, 0] == 0 and r.ids[1, :2].tolist() == [3, 4]
    assert torch.equal(lynx.route(L, 3, lynx.MassFloor(1.0)).ids, lynx.route(L, 3, lynx.TopK()).ids)


def test_sere_worked_example():
    """Three rows, top-2 of 6 experts, top_s=1: the primaries are the rows' top-1s {0, 3, 5}.
    Row 0's secondary 1 is most similar to primary 3 (0.9 >= rho) and moves there with its
    weight; row 1's secondary 4 is only 0.2 similar to every primary (a critical expert) and
    stays; row 2's secondary 0 is a primary itself and stays."""
    sim = torch.full((6, 6), 0.2).fill_diagonal_(1.0)
    sim[1, 3] = sim[3, 1] = 0.9
    L = torch.tensor([[4.0, 3.0, -9, -9, -9, -9],
                      [-9, -9, -9, 4.0, 3.0, -9],
                      [3.0, -9, -9, -9, -9, 4.0]])
    r = lynx.route(L, 2, lynx.SERE(top_s=1, rho=0.5).bound(sim))
    nat = lynx.route(L, 2, lynx.TopK())
    assert r.native_ids.tolist() == [[0, 1], [3, 4], [5, 0]]
    assert r.ids.tolist() == [[0, 3], [3, 4], [5, 0]]
    assert torch.equal(r.weights, nat.weights)       # each slot keeps its native weight
    assert lynx.distinct_experts(r.ids) == 4 and lynx.distinct_experts(nat.ids) == 5
    # rho above every similarity: native routing.
    assert torch.equal(lynx.route(L, 2, lynx.SERE(top_s=1, rho=0.95).bound(sim)).ids, nat.ids)


def test_sere_merges_slots_that_land_on_one_expert():
    """Row 0's secondaries 1 and 2 both stand in for its primary 0: that slot carries the
    three weights, the two freed slots become weight-0 fillers among the experts the batch
    already runs (3, 4: the lower indices of row 1's), so no id repeats within a row."""
    sim = torch.full((6, 6), 0.1).fill_diagonal_(1.0)
    sim[1, 0] = sim[2, 0] = 0.9
    L = torch.tensor([[4.0, 3.0, 2.0, -9, -9, -9],
                      [-9, -9, -9, 4.0, 3.0, 2.0]])
    r = lynx.route(L, 3, lynx.SERE(top_s=1, rho=0.5).bound(sim))
    assert r.ids.tolist() == [[0, 3, 4], [3, 4, 5]]
    torch.testing.assert_close(r.weights[0], torch.tensor([1.0, 0.0, 0.0]))
    assert lynx.distinct_experts(r.ids) == 4


def test_sere_needs_a_matrix_of_the_layers_size():
    with pytest.raises(ValueError, match="no similarity matrix.*lynx similarity MODEL"):
        lynx.select_experts(torch.randn(4, 8), 2, lynx.SERE())
    with pytest.raises(ValueError, match=r"the matrix is \[6, 6\] but the layer has E=8"):
        lynx.select_experts(torch.randn(4, 8), 2, lynx.SERE().bound(similarity(6, 0)))
    with pytest.raises(ValueError, match="finite and in"):
        lynx.SERE().bound(torch.full((8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"float tensor \[E, E\]"):
        lynx.SERE().bound(torch.ones(8, 6))


def test_size_price_worked_example():
    """Top-1 of 3 experts; rows 0 and 1 are mirror images (0.525 / 0.475 between two experts),
    row 2 is sure of expert 1. A freed slot costs its row sqrt(size**2 + the filler's size**2).
    With a fit that says expert 2's outputs are 10 times the others' (only the constant feature:
    log size 0, 0, log 10), removing expert 0 costs row 0 sqrt(0.525**2 + 0.475**2) = 0.71,
    removing 2 costs row 1 sqrt(5.25**2 + 0.475**2) = 5.3, removing 1 costs row 2 about its whole
    0.998. So expert 0 goes first and row 0 moves to expert 1; then nothing else is that cheap."""
    L = torch.tensor([[2.0, 1.9, -5.0], [-5.0, 1.9, 2.0], [-5.0, 2.0, -5.0]])
    fit = torch.zeros(11, 3)
    fit[-1] = torch.tensor([0.0, 0.0, 10.0]).log().clamp_min(0)
    prob = torch.softmax(L, -1)

    def cost(size, t, e, spare):   # one freed slot of row t, p = 2, over the step's mean native size
        mean = (size[0, L[0].argmax()] + size[1, L[1].argmax()] + size[2, 1]) / 3
        return float((size[t, e] ** 2 + size[t, spare] ** 2) / mean**2 / 3)

    sizes = prob * torch.tensor([1.0, 1.0, 10.0])
    cost0 = cost(sizes, 0, 0, 1)
    assert cost0 < cost(sizes, 2, 1, 0) < cost(sizes, 1, 2, 1)
    r = lynx.route(L, 1, lynx.SizePrice(lam=cost0 * 1.01).bound(fit))
    assert r.native_ids.tolist() == [[0], [2], [1]] and r.ids.tolist() == [[1], [2], [1]]
    assert torch.equal(lynx.route(L, 1, lynx.SizePrice(lam=cost0 * 0.99).bound(fit)).ids, r.native_ids)
    # Every size alike: experts 0 and 2 cost the same (0.71 each) and share no row's top 2, so
    # one round removes both; 1 (0.998) stays.
    alike = cost(prob, 0, 0, 1)
    assert alike == pytest.approx(cost(prob, 1, 2, 1)) and alike < cost(prob, 2, 1, 0)
    policy = lynx.SizePrice(lam=alike * 1.01, rounds=1).bound(torch.zeros(11, 3))
    assert lynx.route(L, 1, policy).ids.tolist() == [[1], [1], [1]]
    assert torch.equal(lynx.route(L, 1, lynx.SizePrice(lam=alike * 0.99).bound(torch.zeros(11, 3))).ids, r.native_ids)


def _size_price_reference(L: torch.Tensor, k: int, policy, fit: torch.Tensor, scoring: str = "softmax",
                          bias: torch.Tensor | None = None) -> tuple[list[int], bool]:
    """SizePrice's kept experts with every row voting, written as loops from the docstring, and
    whether a decision hung on a near tie (two costs, or a cost and lam, within 1e-4 of each
    other, relative), which float32 and float64 may break either way. Sizes come from the raw
    logits ``L``; rows rank experts by the biased scores (``bias``: sigmoid only), as they route."""
    T, E = L.shape
    score = torch.softmax(L.float(), -1) if scoring == "softmax" else torch.sigmoid(L.float())
    size = (score * (lynx.policies.size_features(L) @ fit).exp()).tolist()
    rank = L if bias is None else torch.logit((score + bias).clamp(1e-12, 1 - 1e-7))
    native = [sorted(range(E), key=lambda e: (-rank[t, e].item(), e))[:k] for t in range(T)]
    mean = sum(size[t][e] for t in range(T) for e in native[t]) / T
    keep = sorted({e for row in native for e in row})
    loss, fragile = [0.0] * T, False
    for _ in range(policy.rounds):
        near, delta = [], {}
        for t in range(T):
            order = sorted(keep, key=lambda e: (-rank[t, e].item(), e))
            near.append(set(order[:k + 1]))
            spare = size[t][order[k]] if len(order) > k else 0.0
            for e in order[:k]:
                delta[t, e] = (size[t][e] ** 2 + spare ** 2) ** 0.5 / mean
        cost = {e: sum((loss[t] + delta.get((t, e), 0.0)) ** policy.p - loss[t] ** policy.p for t in range(T)) / T
                for e in keep}
        cand = [e for e in keep if cost[e] <= policy.lam]
        close = [(cost[e], policy.lam) for e in keep] + [(cost[e], cost[f]) for e in cand for f in cand if e < f]
        fragile = fragile or any(a != b and abs(a - b) <= 1e-4 * max(a, b) for a, b in close)
        chosen = [e for e in cand if not any((cost[f], f) < (cost[e], e) and any(e in n and f in n for n in near)
                                             for f in cand)]
        chosen = sorted(chosen, key=lambda e: (cost[e], e))[:len(keep) - k]
        for t in range(T):
            loss[t] += sum(delta.get((t, e), 0.0) for e in chosen)
        keep = [e for e in keep if e not in chosen]
    return keep, fragile


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_size_price_matches_a_plain_reference(data):
    T, E = data.draw(st.integers(1, 24)), data.draw(st.integers(2, 24))
    k = data.draw(st.integers(1, min(E, 4)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    L = torch.randn(T, E, generator=g) + torch.randn(1, E, generator=g) * 2
    fit = size_fit(E, data.draw(st.integers(0, 999)), scale=0.2)
    policy = lynx.SizePrice(lam=data.draw(st.sampled_from([1e-3, 1e-2, 0.1])), p=data.draw(st.sampled_from([1.0, 2.0])),
                            rounds=data.draw(st.integers(1, 4)))
    scoring = data.draw(st.sampled_from(["softmax", "sigmoid", "biased sigmoid"]))
    # A correction bias that keeps every biased score inside (0, 1), away from logit's clamp.
    bias = -torch.rand(E, generator=g) * torch.sigmoid(L).amin(0) * 0.9 if scoring == "biased sigmoid" else None
    scoring = scoring.split()[-1]
    r = lynx.route(L, k, policy.bound(fit), scoring=scoring, e_score_correction_bias=bias)
    used = sorted(set(r.ids.flatten().tolist()))
    kept, fragile = _size_price_reference(L, k, policy, fit, scoring, bias)
    assume(not fragile)
    assert used == kept


def test_size_price_lam_is_per_row():
    """Every row twice: the same experts are kept (the price is a mean over voting rows)."""
    g = torch.Generator().manual_seed(3)
    L = torch.randn(16, 32, generator=g) + torch.randn(1, 32, generator=g) * 2
    policy = lynx.SizePrice(2e-3).bound(size_fit(32, 3))
    once, twice = lynx.route(L, 4, policy), lynx.route(L.repeat(2, 1), 4, policy)
    assert torch.equal(twice.ids, once.ids.repeat(2, 1))
    assert lynx.distinct_experts(once.ids) < lynx.distinct_experts(once.native_ids)


def test_size_price_needs_a_fit_of_the_layers_size():
    with pytest.raises(ValueError, match="no size fit.*lynx sizes --model MODEL"):
        lynx.select_experts(torch.randn(4, 8), 2, lynx.SizePrice())
    with pytest.raises(ValueError, match=r"the fit is \[20, 6\] but the layer has E=8"):
        lynx.select_experts(torch.randn(4, 8), 2, lynx.SizePrice().bound(size_fit(6, 0)))
    with pytest.raises(ValueError, match="finite"):
        lynx.SizePrice().bound(torch.full((26, 8), float("nan")))
    with pytest.raises(ValueError, match=r"float tensor \[3E\+2, E\]"):
        lynx.SizePrice().bound(torch.ones(8, 8))


def test_distinct_and_changed():
    ids = torch.tensor([[0, 1], [1, 2], [5, 6]])
    assert int(lynx.distinct_experts(ids)) == 5
    assert int(lynx.distinct_experts(ids, torch.tensor([True, True, False]), num_experts=8)) == 3
    native = torch.tensor([[0, 1], [3, 2], [5, 6]])
    assert int(lynx.changed_assignments(ids, native)) == 1


@pytest.mark.parametrize("policy", [lynx.TopK(), lynx.AffinityBinning(3.0, 2), lynx.Confidence(),
                                    lynx.StaticK(2), lynx.SER(2, 0.5), lynx.BatchTopN(8),
                                    lynx.OEA(2), lynx.MassFloor(0.7), lynx.XShare(8, 1),
                                    lynx.SERE(2, 0.2).bound(similarity(64, 0)),
                                    lynx.SizePrice(1e-3).bound(size_fit(64, 0))],
                         ids=str)
def test_compiles_fullgraph_without_host_sync(policy):
    """fullgraph=True fails on any graph break: .item(), data-sized nonzero(), Python loops
    over data. The eager backend checks tracing without paying for C++ code generation."""
    torch._dynamo.reset()
    fn = torch.compile(lynx.select_experts, fullgraph=True, backend="eager")
    L = torch.randn(32, 64)
    decode = torch.rand(32) > 0.2
    w, ids = fn(L, 8, policy, True, "softmax", decode, None)
    ew, eids = lynx.select_experts(L, 8, policy, True, "softmax", decode, None)
    assert torch.equal(ids, eids) and torch.equal(w, ew)
