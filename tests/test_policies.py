"""Policy configs: validation, round trips, presets, and select_experts' input checks."""

from __future__ import annotations

import json

import pytest
import torch

import lynx_moe as lynx

EVERY_POLICY = [lynx.TopK(), lynx.AffinityBinning(3.0, 2), lynx.AffinityBinning(1.0, None, protect_top1=True),
                lynx.Confidence(1, 0.5), lynx.StaticK(4), lynx.SER(2, 0.3), lynx.BatchTopN(16),
                lynx.OEA(2), lynx.MassFloor(0.7), lynx.XShare(16, 1), lynx.SERE(2, 0.3, "models/m/sere/similarity.safetensors"),
                lynx.SERE(1, -0.5), lynx.SizePrice(), lynx.SizePrice(1e-3, 1.0, 4, "models/m/sizes/sizes.safetensors"),
                lynx.PerLayer((lynx.AffinityBinning(3.0, 4), lynx.TopK(), lynx.OEA(3)))]


@pytest.mark.parametrize("policy", EVERY_POLICY, ids=str)
def test_round_trips(policy):
    assert lynx.policy_from_dict(policy.to_dict()) == policy
    assert lynx.policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert lynx.parse_policy(str(policy)) == policy


def test_parse_examples():
    assert lynx.parse_policy("affinity_binning:alpha=3,beta=2") == lynx.AffinityBinning(alpha=3.0, beta=2)
    assert lynx.parse_policy(" oea : k0 = 2 ") == lynx.OEA(k0=2)
    assert lynx.parse_policy("topk") == lynx.TopK()
    assert lynx.parse_policy("affinity_binning:alpha=1,beta=none").beta is None


@pytest.mark.parametrize("make, field", [
    (lambda: lynx.AffinityBinning(alpha=0), "alpha"),
    (lambda: lynx.AffinityBinning(alpha=float("nan")), "alpha"),
    (lambda: lynx.AffinityBinning(alpha=1.0, beta=0), "beta"),
    (lambda: lynx.AffinityBinning(alpha=1.0, beta=1.5), "beta"),
    (lambda: lynx.Confidence(alpha=-1), "alpha"),
    (lambda: lynx.Confidence(beta=-0.1), "beta"),
    (lambda: lynx.StaticK(0), "k"),
    (lambda: lynx.SER(k_min=0), "k_min"),
    (lambda: lynx.SER(threshold=1.5), "threshold"),
    (lambda: lynx.BatchTopN(0), "n"),
    (lambda: lynx.OEA(0), "k0"),
    (lambda: lynx.MassFloor(0.0), "mass"),
    (lambda: lynx.MassFloor(1.5), "mass"),
    (lambda: lynx.XShare(budget=0), "budget"),
    (lambda: lynx.XShare(k0=True), "k0"),
    (lambda: lynx.SERE(top_s=0), "top_s"),
    (lambda: lynx.SERE(rho=1.5), "rho"),
    (lambda: lynx.SERE(rho=float("nan")), "rho"),
    (lambda: lynx.SERE(similarity=""), "similarity"),
    (lambda: lynx.SERE(similarity=3), "similarity"),
    (lambda: lynx.SizePrice(lam=-1.0), "lam"),
    (lambda: lynx.SizePrice(lam=float("inf")), "lam"),
    (lambda: lynx.SizePrice(p=0.5), "p"),
    (lambda: lynx.SizePrice(rounds=0), "rounds"),
    (lambda: lynx.SizePrice(rounds=2.5), "rounds"),
    (lambda: lynx.SizePrice(sizes=" "), "sizes"),
])
def test_bad_fields_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        make()


@pytest.mark.parametrize("spec, message", [
    ("", "empty policy spec"),
    ("nope:x=1", "unknown policy 'nope'"),
    ("oea:k1=2", r"unknown field\(s\) \['k1'\]"),
    ("oea:k0", "expected field=value"),
    ("oea:k0=two", "cannot read value"),
    ("static_k:k=0", "^k:"),
    ("per_layer()", "cannot read|empty policy spec"),
    ("per_layer(oea:k0=2;per_layer(topk))", "^layers: must be one or more \\(non per-layer\\)"),
    ("oea(k0=2)", "only per_layer"),
    ("per_layer(oea:k0=2;oea:k0=0)", "^k0:"),
    ("sere:rho=-2", "^rho:"),
    ("sere:top_s=two", "cannot read value"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        lynx.parse_policy(spec)


def test_per_layer_gives_each_layer_its_policy_and_checks_the_model():
    p = lynx.parse_policy("per_layer(affinity_binning:alpha=3,beta=4;topk;oea:k0=3)")
    assert [p.for_layer(i) for i in range(3)] == [lynx.AffinityBinning(3.0, 4), lynx.TopK(), lynx.OEA(3)]
    assert lynx.OEA(2).for_layer(7) == lynx.OEA(2)                 # one policy: every layer's
    p.check_layers(3)
    with pytest.raises(ValueError, match="has 3 layers but the model has 4 MoE layers"):
        p.check_layers(4)
    with pytest.raises(ValueError, match=r"layers\[2\]: k0: OEA\(k0=3\) needs k0 <= top_k=2"):
        p.check_top_k(2)
    with pytest.raises(ValueError, match="routes one layer at a time"):
        lynx.select_experts(torch.randn(4, 64), 8, p)
    with pytest.raises(ValueError, match="'layers' must be a list"):
        lynx.policy_from_dict({"policy": "per_layer", "layers": "oea"})
    with pytest.raises(ValueError, match="^layers:"):
        lynx.PerLayer(())


def test_sere_spec_takes_its_similarity_file_as_text():
    p = lynx.parse_policy("sere:top_s=2,rho=0.2,similarity=models/lynx-ref-moe/sere/similarity.safetensors")
    assert p == lynx.SERE(2, 0.2, "models/lynx-ref-moe/sere/similarity.safetensors")
    assert lynx.parse_policy("sere:similarity=123").similarity == "123"       # text, not a number
    assert lynx.parse_policy("sere:similarity=none").similarity is None


def _similarity_file(path, tensor, key="similarity"):
    from safetensors.torch import save_file
    save_file({key: tensor}, str(path))
    return str(path)


def test_sere_binds_each_layers_matrix_from_its_file(tmp_path):
    sims = torch.rand(3, 8, 8) * 2 - 1
    f = _similarity_file(tmp_path / "s.safetensors", sims)
    p = lynx.SERE(2, 0.1, f)
    p.check_layers(3)
    bound = [p.for_layer(i) for i in range(3)]
    assert all(b == p for b in bound)                                      # the matrix is not config
    assert torch.equal(bound[2]._matrix, sims[2]) and str(bound[2]) == str(p)
    w, ids = lynx.select_experts(torch.randn(16, 8), 4, bound[1])
    assert ids.shape == (16, 4)
    per_layer = lynx.PerLayer((lynx.TopK(), p, lynx.OEA(1)))               # bound by its position
    assert torch.equal(per_layer.for_layer(1)._matrix, sims[1])
    with pytest.raises(ValueError, match="has 3 layers but the model has 4 MoE layers"):
        p.check_layers(4)
    with pytest.raises(ValueError, match="has 3 layers, no MoE layer 3"):
        p.for_layer(3)
    with pytest.raises(ValueError, match=r"the matrix is \[8, 8\] but the layer has E=6"):
        lynx.select_experts(torch.randn(4, 6), 2, bound[0])


@pytest.mark.parametrize("write, message", [
    (None, "not found: compute one with `lynx similarity MODEL`"),
    (lambda p: _similarity_file(p, torch.zeros(3, 8, 6)), r"must be \[layers, experts, experts\], got \[3, 8, 6\]"),
    (lambda p: _similarity_file(p, torch.zeros(8, 8)), r"must be \[layers, experts, experts\]"),
    (lambda p: _similarity_file(p, torch.zeros(1, 8, 8), key="other"), "no 'similarity' tensor"),
    (lambda p: p.write_bytes(b"not a safetensors file"), "not a readable safetensors file"),
    (lambda p: _similarity_file(p, torch.full((1, 4, 4), 2.0)), r"finite and in \[-1, 1\]"),
])
def test_sere_refuses_bad_similarity_files(tmp_path, write, message):
    path = tmp_path / "s.safetensors"
    if write is not None:
        write(path)
    with pytest.raises(ValueError, match=message):
        lynx.SERE(2, 0.1, str(path)).for_layer(0)


def test_size_price_binds_each_layers_fit_from_its_file(tmp_path):
    fits = torch.randn(3, 26, 8) * 0.05
    f = _similarity_file(tmp_path / "sizes.safetensors", fits, key="sizes")
    p = lynx.parse_policy(f"size_price:lam=0.01,sizes={f}")
    assert p == lynx.SizePrice(0.01, sizes=f)
    p.check_layers(3)
    bound = [p.for_layer(i) for i in range(3)]
    assert all(b == p for b in bound) and torch.equal(bound[2]._fit, fits[2])   # the fit is not config
    assert lynx.select_experts(torch.randn(16, 8), 4, bound[1])[1].shape == (16, 4)
    with pytest.raises(ValueError, match="has 3 layers but the model has 2 MoE layers"):
        p.check_layers(2)
    with pytest.raises(ValueError, match="has 3 layers, no MoE layer 5"):
        p.for_layer(5)


@pytest.mark.parametrize("write, message", [
    (None, "not found: compute one with `lynx sizes --model MODEL`"),
    (lambda p: _similarity_file(p, torch.zeros(2, 24, 8), key="sizes"),
     r"must be \[layers, 3 \* experts \+ 2, experts\], got \[2, 24, 8\]"),
    (lambda p: _similarity_file(p, torch.zeros(1, 26, 8)), "no 'sizes' tensor"),
    (lambda p: _similarity_file(p, torch.full((1, 26, 8), float("inf")), key="sizes"), "finite"),
])
def test_size_price_refuses_bad_sizes_files(tmp_path, write, message):
    path = tmp_path / "sizes.safetensors"
    if write is not None:
        write(path)
    with pytest.raises(ValueError, match=message):
        lynx.SizePrice(sizes=str(path)).for_layer(0)


def test_policy_from_dict_needs_name():
    with pytest.raises(ValueError, match="'policy' key"):
        lynx.policy_from_dict({"k0": 2})


def test_presets():
    assert lynx.presets.PRESETS["qwen3-30b-a3b"].policy == lynx.AffinityBinning(3.0, 2)
    assert lynx.presets.for_shape(64, 8) == ("qwen2-57b-a14b", lynx.AffinityBinning(3.0, 4))
    assert lynx.presets.for_shape(8, 2)[1] == lynx.AffinityBinning(0.7, 1)
    assert lynx.presets.for_shape(16, 1)[1] == lynx.AffinityBinning(1.0, None)
    with pytest.raises(ValueError):
        lynx.presets.for_shape(8, 9)


L = torch.randn(4, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(router_logits=torch.randn(8)), r"shape \[T, E\]"),
    (dict(router_logits=torch.randn(2, 4, 8)), r"shape \[T, E\]"),
    (dict(router_logits=torch.ones(4, 8, dtype=torch.long)), "float tensor"),
    (dict(top_k=0), r"top_k must be an integer in \[1, E=8\]"),
    (dict(top_k=9), r"top_k must be an integer in \[1, E=8\]"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(decode_mask=torch.ones(3, dtype=torch.bool)), r"decode_mask must be a bool tensor of shape \(4,\)"),
    (dict(valid_mask=torch.ones(4)), r"valid_mask must be a bool tensor"),
    (dict(policy="affinity_binning"), "policy must be a lynx_moe policy"),
    (dict(policy=lynx.StaticK(3)), "needs k <= the model's top_k=2"),
    (dict(policy=lynx.XShare(budget=1)), "needs budget >= top_k=2"),
    (dict(scoring="softplus"), "scoring must be one of"),
    (dict(scoring="softmax_topk", renormalize=False), "always normalises"),
    (dict(scoring="sigmoid", num_expert_group=3, topk_group=1), "must divide E=8"),
    (dict(scoring="sigmoid", num_expert_group=4), "give both or neither"),
    (dict(scoring="sigmoid", num_expert_group=4, topk_group=5), r"topk_group must be in \[1, num_expert_group=4\]"),
    (dict(num_expert_group=4, topk_group=1), "scoring='sigmoid'"),
    (dict(scoring="sigmoid", e_score_correction_bias=torch.zeros(7)), r"shape \(8,\)"),
])
def test_select_experts_rejects_bad_input(kwargs, message):
    args = dict(router_logits=L, top_k=2, policy=lynx.AffinityBinning())
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lynx.select_experts(**args)


def test_distinct_experts_rejects_bad_input():
    with pytest.raises(ValueError, match="integer tensor"):
        lynx.distinct_experts(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="valid_mask"):
        lynx.distinct_experts(torch.zeros(3, 2, dtype=torch.long), torch.ones(2, dtype=torch.bool))


def test_select_experts_defaults_to_native():
    w, ids = lynx.select_experts(L, 2)
    nw, nids = lynx.select_experts(L, 2, lynx.TopK())
    assert torch.equal(w, nw) and torch.equal(ids, nids)
