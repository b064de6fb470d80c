"""``lynx sizes`` (lynx_moe.measure.sizes) and SizePrice with its file in transformers and in the
vLLM plugin's per-layer resolution, on tiny random-weight models."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import lynx_moe as lynx  # noqa: E402
from lynx_moe.measure import models  # noqa: E402
from lynx_moe.measure.sizes import expert_norms, fit_sizes, size_fits  # noqa: E402

from .cli_helpers import run_cli  # noqa: E402

TEXT = "The fox ran over the hill and the dog slept under the old oak tree by the river. " * 6


def test_expert_norms_of_known_experts():
    class Scaled(torch.nn.Module):
        def forward(self, x, idx, w):
            return x * torch.tensor([1.0, 2.0, -3.0])[idx] * w
    x = torch.randn(300, 5)
    torch.testing.assert_close(expert_norms(Scaled(), 3, x), x.double().norm(dim=-1, keepdim=True) * torch.tensor([1.0, 2, 3]).double())


def test_size_fit_recovers_a_linear_law_and_weighs_the_near_slots():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 6, generator=g, dtype=torch.float64)
    A = torch.randn(6, 5, generator=g, dtype=torch.float64)
    near = torch.rand(400, 5, generator=g) < 0.3
    assert torch.allclose(fit_sizes(X, X @ A, near, 1e-12), A, atol=1e-6)
    # Targets off the law only on far slots: the near slots' weight pulls the fit towards A.
    noisy = torch.where(near, X @ A, X @ A + 3 * torch.randn(400, 5, generator=g, dtype=torch.float64))
    fit = fit_sizes(X, noisy, near, 1e-12)
    plain = torch.linalg.lstsq(X, noisy).solution
    assert (fit - A).norm() < 0.5 * (plain - A).norm()


def test_lynx_sizes_writes_a_file_size_price_routes_with(olmoe_dir, tmp_path, capsys):
    out = tmp_path / "sizes.safetensors"
    code, stdout, err = run_cli(["sizes", "--model", str(olmoe_dir), "--out", str(out), "--rows", "4",
                                 "--data", str(olmoe_dir / "heldout.jsonl"), "--json-only"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["experts"], len(summary["r2"]), summary["tokens"]) == (64, 2, 512)
    fits = lynx.policies.read_sizes(out)
    assert fits.shape == (2, 194, 64) and torch.isfinite(fits).all()

    # SizePrice with the file, through apply_ (for_layer binds each layer's fit): fewer experts.
    model = models.tiny_model("olmoe")
    lynx.apply_(model, lynx.SizePrice(lam=1.0, sizes=str(out)))
    ids = torch.randint(3, 500, (16, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for s in lynx.routing_stats(model):
        assert s.steps > 0 and s.distinct_policy < s.distinct_native


def test_size_fits_runs_every_softmax_and_sigmoid_architecture(tmp_path):
    """Fits on every tiny architecture but GPT-OSS, and SizePrice routes each model with its fits."""
    from lynx_moe.measure.sizes import save_sizes
    texts = {"a": [TEXT] * 4}
    ids = torch.randint(3, 100, (16, 3), generator=torch.Generator().manual_seed(0))
    for arch in models.TINY_ARCHS:
        model = models.tiny_model(arch)
        layers = lynx.integrations.hf.moe_layers(model)
        if lynx.integrations.hf.native_routing(layers[0].router)["scoring"] == "softmax_topk":   # GPT-OSS
            with pytest.raises(ValueError, match="score with a softmax over all experts.*or a sigmoid"):
                size_fits(model, None, texts, rows=2, length=32)
            continue
        fits, meta, r2 = size_fits(model, None, texts, rows=2, length=32)
        E = layers[0].num_experts
        assert fits.shape == (len(layers), 3 * E + 2, E) and torch.isfinite(fits).all(), arch
        assert len(r2) == len(layers) and meta["tokens"] == "64"
        lynx.apply_(model, lynx.SizePrice(lam=1.0, sizes=str(save_sizes(tmp_path / f"{arch}.safetensors", fits, meta))))
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        stats = lynx.routing_stats(model)
        assert all(s.steps > 0 for s in stats) and sum(s.distinct_policy for s in stats) < sum(s.distinct_native for s in stats), arch


def test_bad_calibration_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="need held-out text"):
        size_fits(models.tiny_model("olmoe"), None, {}, rows=2, length=32)
    with pytest.raises(ValueError, match="rows and length must be >= 1"):
        size_fits(models.tiny_model("olmoe"), None, {"a": [TEXT]}, rows=0)
    code, _, err = run_cli(["sizes", "--model", str(tmp_path)], capsys)
    assert code == 2 and "not a model folder" in err


def test_a_sizes_file_gives_each_vllm_layer_its_own_fit(tmp_path):
    """The plugin resolves each layer with ``for_layer``: SizePrice loads that layer's fit there."""
    from safetensors.torch import save_file

    from lynx_moe.integrations.vllm import Settings, _State
    fits = torch.randn(2, 194, 64) * 0.05
    save_file({"sizes": fits}, str(tmp_path / "s.safetensors"))
    state = _State(Settings(default=lynx.SizePrice(1e-3, sizes=str(tmp_path / "s.safetensors"))), None)
    for _ in range(2):
        state.add_layer(object(), "m", (64, 8), 2)
    for layer in state.layers:   # what _describe would read from vLLM's router
        layer.num_experts, layer.top_k, layer.described = 64, 8, True
    state.resolve_all()
    assert [torch.equal(L.policy._fit, fits[i]) for i, L in enumerate(state.layers)] == [True, True]


@pytest.mark.parametrize("name", ["lynx-ref-moe", "lynx-ref-qwen3moe", "lynx-ref-dsv3"])
def test_the_reference_models_ship_their_sizes_files(name):
    from lynx_moe.integrations.hf import config_moe_layers, config_moe_shape
    from lynx_moe.measure.sizes import default_path
    folder = lynx.reference_model_path().parent / name
    L, (E, _) = config_moe_layers(str(folder)), config_moe_shape(str(folder))
    assert lynx.policies.read_sizes(default_path(folder)).shape == (L, 3 * E + 2, E)
    lynx.SizePrice(sizes=str(default_path(folder))).check_layers(L)
