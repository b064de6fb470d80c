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
