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
