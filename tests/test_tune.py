"""``lynx tune``: the search, the policy file it writes, and that file in HF and in the vLLM settings."""

from __future__ import annotations

import json

import pytest
import torch

import lynx_moe as lynx
from lynx_moe.cli import main


def test_tune_writes_a_file_that_loads_everywhere(tmp_path, capsys):
    out = tmp_path / "lynx.json"
    code = main(["tune", "--batch-size", "8", "--max-ppl-increase", "100", "--out", str(out), "--ppl-per-domain", "1",
                 "--policy", "affinity_binning:alpha=3,beta=4", "--policy", "batch_top_n:n=8", "--json-only"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Within +100 % everything fits, so the winner is the deeper cut; it is checked on the test split.
    assert result["winner"] == "batch_top_n:n=8"
    assert {r["policy"] for r in result["test"]} == {"batch_top_n:n=8", "affinity_binning:alpha=3.0,beta=4"}
    assert all(r["saved"] > 0 for r in result["test"])
    policy = lynx.load_policy(out)
    assert policy == lynx.BatchTopN(8)
    from lynx_moe.measure.models import tiny_model
    model = lynx.apply_(tiny_model("olmoe"), policy)
    with torch.no_grad():
        model.generate(input_ids=torch.randint(3, 500, (8, 5)), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert all(s.distinct_policy <= 8 for s in lynx.routing_stats(model))
    from lynx_moe.integrations.vllm import load_settings   # the plugin reads the same file
    assert load_settings({"LYNX_POLICY_FILE": str(out)}).default == policy


def test_tune_refuses_bad_targets_and_files(tmp_path):
    assert main(["tune", "--batch-size", "8", "--max-ppl-increase", "-1", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["tune", "--batch-size", "0", "--max-ppl-increase", "1", "--out", str(tmp_path / "x.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": {}}')
    with pytest.raises(ValueError, match="no 'default' policy"):
        lynx.load_policy(bad)
    bad.write_text('{"default": "affinity_binning:alpha=-1"}')
    with pytest.raises(ValueError, match="default: alpha"):
        lynx.load_policy(bad)


def test_pick_per_layer_is_the_best_combination_within_the_budget():
    from lynx_moe.measure.tune import frontier, pick_per_layer
    options = [[(10.0, 0.2), (15.0, 0.4)], [(8.0, 0.1), (12.0, 0.35)], [(5.0, -0.1)]]
    # 15 + 8 + 5 at 0.4 + 0.1 + 0 (a negative change counts as 0): the best within 0.5
    assert pick_per_layer(options, 0.5) == [1, 0, 0]
    assert pick_per_layer(options, 0.15) == [None, 0, 0]
    assert pick_per_layer(options, 0.0) == [None, None, None]
    rows = [{"policy": p, "saved": s, "ppl_delta_pct": d} for p, s, d in
            [("a", 0.4, 1.0), ("b", 0.3, 1.2), ("c", 0.2, 0.1), ("d", 0.1, 0.2)]]
    assert [r["policy"] for r in frontier(rows)] == ["a", "c"]


def test_ppl_per_kl_is_the_slope_through_the_origin():
    from lynx_moe.measure.tune import ppl_per_kl
    rows = [{"kl": 0.001, "ppl_delta_pct": 0.1}, {"kl": 0.002, "ppl_delta_pct": 0.2},
            {"kl": 0.0, "ppl_delta_pct": 0.0}]
    assert abs(ppl_per_kl(rows) - 100.0) < 1e-9
    # (1 * 0.15 + 2 * 0.2) / (1 + 4) per 0.001 nat: the least-squares slope, not the mean ratio
    rows[0]["ppl_delta_pct"] = 0.15
    assert abs(ppl_per_kl(rows) - 110.0) < 1e-9
    assert ppl_per_kl([{"kl": 0.0, "ppl_delta_pct": 0.3}]) == 0.0


def test_a_per_layer_policy_file_loads_in_hf_and_in_the_vllm_settings(tmp_path):
    policy = lynx.parse_policy("per_layer(oea:k0=2;batch_top_n:n=8)")
    path = tmp_path / "lynx.json"
    path.write_text(json.dumps({"default": policy.to_dict()}))
    assert lynx.load_policy(path) == policy
    from lynx_moe.integrations.vllm import load_settings
    assert load_settings({"LYNX_POLICY_FILE": str(path)}).default == policy
    from lynx_moe.measure.models import tiny_model
    model = lynx.apply_(tiny_model("olmoe"), lynx.load_policy(path))
    with torch.no_grad():
        model.generate(input_ids=torch.randint(3, 500, (16, 5)), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    first, second = lynx.routing_stats(model)
    assert second.distinct_policy <= 8 < first.distinct_policy
