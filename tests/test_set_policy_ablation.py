"""benchmarks/set_policy_ablation.py: its research policies obey the set contract and its
curve reader interpolates as documented (docs/algorithms.md, section 4c)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lynx_moe as lynx
from lynx_moe.routing import distinct_experts

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "set_policy_ablation.py"
_spec = importlib.util.spec_from_file_location("set_policy_ablation", _PATH)
ablation = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(ablation)   # registered first: dataclasses look their module up


def _logits(T=32, E=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) * 2 + torch.randn(E, generator=g)


@pytest.mark.parametrize("make", [ablation.Price, ablation.FillPrice], ids=["price", "fill_price"])
def test_pruning_keeps_native_experts_and_cuts_more_at_a_higher_price(make):
    x, K = _logits(), 8
    native = lynx.route(x, K, lynx.TopK()).ids
    counts = []
    for lam in (0.0, 1e-3, 1e-2, 1e9):
        r = lynx.route(x, K, make(lam, 2.0))
        assert set(r.ids.flatten().tolist()) <= set(native.flatten().tolist())
        assert (r.ids.sort(dim=-1).values.diff(dim=-1) > 0).all()          # no duplicate in a row
        counts.append(int(distinct_experts(r.ids[None], None, 64)[0]))
    assert counts[0] == int(distinct_experts(native[None], None, 64)[0])    # no price: native
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[1]


def test_capped_lies_between_mass_floor_and_oea():
    x, K = _logits(), 8

    def used(policy):
        return set(lynx.route(x, K, policy).ids.flatten().tolist())

    assert used(ablation.Capped(1.0, 3)) == used(lynx.OEA(3))            # no mass floor: OEA's count
    assert used(ablation.Capped(0.7, K)) == used(lynx.MassFloor(0.7))    # no cap: MassFloor
    capped = used(ablation.Capped(0.7, 3))
    assert capped <= used(lynx.OEA(3)) & used(lynx.MassFloor(0.7))
    assert capped != used(lynx.OEA(3)) and capped != used(lynx.MassFloor(0.7))


def test_non_voting_rows_stay_native():
    x, K = _logits(), 8
    vote = torch.arange(32) % 2 == 0
    r = lynx.route(x, K, ablation.FillPrice(1e-2, 2.0), decode_mask=vote)
    native = lynx.route(x, K, lynx.TopK())
    assert torch.equal(r.ids[~vote], native.ids[~vote]) and torch.equal(r.weights[~vote], native.weights[~vote])


def test_saved_at_reads_the_curve_linearly_from_native():
    rows = [{"ppl_delta_pct": 0.6, "saved": 0.3}, {"ppl_delta_pct": 0.2, "saved": 0.2}]
    assert ablation.saved_at(rows, 0.5) == pytest.approx(0.275)
    assert ablation.saved_at(rows, 0.1) == pytest.approx(0.1)
    assert ablation.saved_at(rows, 0.7) is None


def _oracle_setup(T=12, E=16, K=4, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, W = torch.randn(T, d, generator=g), torch.randn(E, d, d, generator=g)

    def experts(h, ids, w):   # what the oracle asks of an experts module: one expert per row here
        return torch.einsum("td,tdf->tf", h, W[ids[:, 0]]) * w
    ablation.OutputOracle.inputs[0] = (x, experts)
    return _logits(T, E, seed), K, torch.einsum("td,edf->tef", x, W).double()


def test_output_oracle_predicts_the_error_of_routing_inside_the_smaller_set():
    logits, K, y = _oracle_setup()
    policy = ablation.OutputOracle(0.1, 2.0).for_layer(0)
    prob = torch.softmax(logits.double(), -1)
    native = prob.topk(K, dim=-1)
    step = lynx.policies.Step(logits, native.indices, native.values.float(), None, float(len(logits)), K)
    keep = torch.zeros(logits.shape[1], dtype=torch.bool).scatter(0, native.indices.flatten(), True)

    def output(kept):   # the shared step by hand: top-k inside kept, weights rescaled to the native mass
        top = prob.masked_fill(~kept, -1).topk(K, dim=-1)
        w = top.values / top.values.sum(-1, keepdim=True) * native.values.sum(-1, keepdim=True)
        return (w[..., None] * y.gather(1, top.indices[..., None].expand(-1, -1, y.shape[-1]))).sum(1)

    y0 = output(keep)
    new = policy.without(step, policy.table(step), keep, torch.zeros(len(logits), dtype=torch.float64))
    for e in keep.nonzero().flatten().tolist():
        smaller = keep.clone()
        smaller[e] = False
        want = (output(smaller) - y0).norm(dim=-1) / y0.norm(dim=-1)
        assert torch.allclose(new[:, e], want, atol=1e-9)
    ablation.OutputOracle.inputs.clear()


@pytest.mark.parametrize("make", [ablation.OutputOracle, ablation.RowNormFillPrice, ablation.SlotNormFillPrice,
                                  ablation.PredictedSlotNorm],
                         ids=["output_oracle", "rownorm_fill_price", "slotnorm_fill_price", "predicted_slotnorm"])
def test_oracles_keep_native_experts_and_cut_more_at_a_higher_price(make):
    logits, K, _ = _oracle_setup(T=32, E=64, K=8, d=6)
    ablation.PredictedSlotNorm.fits = [torch.randn(3 * 64 + 2, 64, generator=torch.Generator().manual_seed(2)).double() * 0.01]
    native = lynx.route(logits, K, lynx.TopK()).ids
    routed = [lynx.route(logits, K, make(lam, 2.0).for_layer(0)).ids for lam in (0.0, 0.01, 1.0, 1e9)]
    assert all(set(r.flatten().tolist()) <= set(native.flatten().tolist()) for r in routed)
    counts = [int(distinct_experts(r[None], None, 64)[0]) for r in routed]
    assert counts[0] == int(distinct_experts(lynx.route(logits, K, lynx.TopK()).ids[None], None, 64)[0])
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[1] < counts[0]
    ablation.OutputOracle.inputs.clear()
