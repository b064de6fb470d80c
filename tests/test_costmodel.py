"""The cost model (fit, file, prediction) and the gate in both integrations' layer paths."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lynx_moe as lynx
from lynx_moe.costmodel import CostModel, fit, load_cost_model

MEMORY_BOUND = CostModel(per_expert_ms=1.0, per_row_ms=0.0, fixed_ms=1.0)
COMPUTE_BOUND = CostModel(per_expert_ms=1.0, per_row_ms=100.0, fixed_ms=1.0)


def test_fit_recovers_a_known_model():
    true = CostModel(per_expert_ms=4.0, per_row_ms=8.0, fixed_ms=10.0)
    points = [(R, D, true.predict(R, D)) for R in (8, 32) for D in (8, 16, 24, 34, 47)]
    got = fit(points)
    assert got.per_expert_ms == pytest.approx(4.0, rel=1e-3)
    assert got.per_row_ms == pytest.approx(8.0, rel=1e-2)
    assert got.fixed_ms == pytest.approx(10.0, abs=0.05)
    assert got.compute_floor(32) == pytest.approx(64.0, rel=1e-2)


def test_fit_picks_the_form_that_fits_and_a_sum_model_has_no_floor():
    """Timings where loads and FLOPs add up (vLLM's CPU kernel on one thread) get the "sum"
    form; roofline timings keep "max". Under "sum" every expert removed pays, at any batch."""
    true = CostModel(per_expert_ms=3.9, per_row_ms=29.3, fixed_ms=3.3, form="sum")
    points = [(R, D, true.predict(R, D)) for R in (8, 16, 32) for D in (10, 18, 33)]
    got = fit(points)
    assert got.form == "sum" and got.per_expert_ms == pytest.approx(3.9, rel=1e-6)
    assert got.per_row_ms == pytest.approx(29.3, rel=1e-6) and got.fixed_ms == pytest.approx(3.3, abs=1e-6)
    roofline = CostModel(per_expert_ms=4.0, per_row_ms=8.0, fixed_ms=10.0)
    assert fit([(R, D, roofline.predict(R, D)) for R in (8, 32) for D in (8, 16, 24, 34, 47)]).form == "max"
    assert got.compute_floor(32) == 0.0 and got.at_floor(lynx.XShare(8, 1), 32) == lynx.XShare(8, 1)
    rows = torch.tensor([32.0])
    assert bool(got.pays(rows, torch.tensor([47.0]), torch.tensor([10.0])))       # 1121 vs 977 ms
    assert not bool(got.pays(rows, torch.tensor([47.0]), torch.tensor([45.0])))   # 8 ms: under 3 %
    with pytest.raises(ValueError, match="form must be 'max' or 'sum'"):
        CostModel(1.0, 1.0, form="min")


def test_bad_models_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="per_row_ms must be a finite number >= 0"):
        CostModel(per_expert_ms=1.0, per_row_ms=-1.0)
    with pytest.raises(ValueError, match="at least 3"):
        fit([(8, 8, 10.0)])
    bad = tmp_path / "gate.json"
    bad.write_text(json.dumps({"policy": "topk"}))
    with pytest.raises(ValueError, match="not a lynx cost-model file"):
        load_cost_model(bad)
    good = tmp_path / "good.json"
    COMPUTE_BOUND.save(good)
    assert load_cost_model(good) == COMPUTE_BOUND
    old = json.loads(good.read_text())
    del old["cost_model"]["form"]                     # a file from before the "sum" form: the roofline
    good.write_text(json.dumps(old))
    assert load_cost_model(good).form == "max"


def test_pays_is_tensor_code():
    rows, native, policy = torch.tensor(32), torch.tensor(47), torch.tensor(20)
    assert bool(MEMORY_BOUND.pays(rows, native, policy))
    assert not bool(COMPUTE_BOUND.pays(rows, native, policy))
    assert not bool(MEMORY_BOUND.pays(rows, native, native))      # no cut, no gain


def _layer_inputs(T=32, E=64, K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + torch.randn(1, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, -1)
    return logits, w, ids.to(torch.int32)


@pytest.mark.parametrize("policy", [lynx.AffinityBinning(3.0, 2), lynx.XShare(16, 1), lynx.BatchTopN(8)], ids=str)
def test_the_vllm_gate_never_cuts_a_step_the_model_calls_compute_bound(policy):
    from lynx_moe.integrations.vllm import reroute
    logits, w, ids = _layer_inputs()
    vote = valid = torch.ones(32, dtype=torch.bool)
    kw = {"policy": policy, "top_k": 8, "num_experts": 64, "native_kwargs": {"renormalize": False}}
    gw, gids = reroute(logits, w, ids, vote, valid, None, gate=COMPUTE_BOUND, **kw)
    assert torch.equal(gids, ids) and torch.equal(gw, w)          # exactly native
    mw, mids = reroute(logits, w, ids, vote, valid, None, gate=MEMORY_BOUND, **kw)
    uw, uids = reroute(logits, w, ids, vote, valid, None, **kw)
    assert torch.equal(mids, uids) and torch.equal(mw, uw)        # a gain: the ungated policy
    assert lynx.distinct_experts(mids) < lynx.distinct_experts(ids)


def test_the_hf_gate_never_cuts_a_step_the_model_calls_compute_bound():
    from lynx_moe.measure.models import tiny_model
    base = tiny_model("olmoe")
    inputs = {"input_ids": torch.randint(3, 512, (16, 6), generator=torch.Generator().manual_seed(0))}

    def run(**kw):
        model = copy.deepcopy(base)
        if kw:
            lynx.apply_(model, lynx.BatchTopN(8), **kw)
        with torch.no_grad():
            seqs = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        return seqs, (lynx.routing_stats(model) if kw else None)

    native, _ = run()
    gated, stats = run(gate=COMPUTE_BOUND)
    assert torch.equal(gated, native)
    assert all(s.distinct_policy == s.distinct_native for s in stats)
    open_, stats = run(gate=MEMORY_BOUND)
    ungated, _ = run(stats=True)
    assert torch.equal(open_, ungated)
    assert all(s.distinct_policy < s.distinct_native for s in stats)
    with pytest.raises(ValueError, match="gate must be a lynx_moe.costmodel.CostModel"):
        lynx.apply_(copy.deepcopy(base), lynx.TopK(), gate="gate.json")


def test_a_budget_is_raised_to_the_compute_floor_and_no_further():
    """Below the compute floor (here 1.5 x rows experts) fewer experts buy nothing: a gated
    budgeted policy keeps at least that many; other policies are left as they are."""
    gate = lynx.CostModel(per_expert_ms=1.0, per_row_ms=1.5, fixed_ms=0.0, min_gain=0.0)
    assert gate.at_floor(lynx.XShare(budget=8, k0=1), 16) == lynx.XShare(budget=24, k0=1)
    assert gate.at_floor(lynx.BatchTopN(40), 16) == lynx.BatchTopN(40)        # already above the floor
    assert gate.at_floor(lynx.OEA(2), 16) == lynx.OEA(2)
    assert lynx.CostModel(0.0, 1.0).at_floor(lynx.BatchTopN(8), 16) == lynx.BatchTopN(8)   # no memory term
    from lynx_moe.measure.models import tiny_model
    inputs = {"input_ids": torch.randint(3, 512, (16, 6), generator=torch.Generator().manual_seed(1))}
    for gated, low, high in ((None, 0, 8), (gate, 9, 24)):
        model = lynx.apply_(tiny_model("olmoe"), lynx.BatchTopN(8), gate=gated)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        for s in lynx.routing_stats(model):
            assert low < s.distinct_policy <= high < s.distinct_native, s
