"""``lynx similarity`` (lynx_moe.measure.similarity) and SERE with its file in transformers and
in the vLLM plugin's per-layer resolution, on tiny random-weight models."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import lynx_moe as lynx  # noqa: E402
from lynx_moe.measure import models  # noqa: E402
from lynx_moe.measure.similarity import calibration_texts, cosine_similarity, expert_similarity  # noqa: E402

from .cli_helpers import run_cli  # noqa: E402

TEXT = "The fox ran over the hill and the dog slept under the old oak tree by the river. " * 6


def test_cosine_similarity_of_known_experts():
    """Experts that are scaled copies of each other have similarity 1, negated ones -1."""
    class Scaled(torch.nn.Module):
        def forward(self, x, idx, w):
            return x * torch.tensor([1.0, 2.0, -1.0])[idx] * w
    sim = cosine_similarity(Scaled(), 3, torch.randn(700, 5))
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]]))


def test_calibration_reads_the_last_quarter_of_each_domain():
    texts = {"a": [str(i) for i in range(8)], "b": ["x"]}
    assert calibration_texts(texts) == {"a": ["6", "7"], "b": ["x"]}


@pytest.mark.parametrize("method", ["outputs", "weights"])
def test_lynx_similarity_writes_a_file_sere_routes_with(olmoe_dir, tmp_path, capsys, method):
    out = tmp_path / f"{method}.safetensors"
    code, stdout, err = run_cli(["similarity", "--model", str(olmoe_dir), "--method", method, "--out", str(out),
                                 "--tokens", "256", "--data", str(olmoe_dir / "heldout.jsonl"), "--json-only"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["method"], summary["experts"], len(summary["layers"])) == (method, 64, 2)
    sims = lynx.policies.read_similarity(out)
    assert sims.shape == (2, 64, 64) and torch.equal(sims, sims.transpose(1, 2))
    assert torch.equal(torch.diagonal(sims, dim1=1, dim2=2), torch.ones(2, 64))

    # SERE with the file, through apply_ (for_layer binds each layer's matrix): fewer experts.
    model = models.tiny_model("olmoe")
    lynx.apply_(model, lynx.SERE(top_s=2, rho=-1.0, similarity=str(out)))
    ids = torch.randint(3, 500, (16, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for s in lynx.routing_stats(model):
        assert s.steps > 0 and s.distinct_policy < s.distinct_native


def test_expert_similarity_runs_every_architecture():
    texts = {"a": [TEXT] * 4}
    for arch in models.TINY_ARCHS:
        model = models.tiny_model(arch)
        sims, meta = expert_similarity(model, None, texts, method="outputs", tokens=64, length=32)
        layers = lynx.integrations.hf.moe_layers(model)
        assert sims.shape == (len(layers), layers[0].num_experts, layers[0].num_experts), arch
        assert bool(((sims >= -1) & (sims <= 1)).all()) and meta["tokens"] == "64"


def test_bad_calibration_input(olmoe_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="method must be one of"):
        expert_similarity(models.tiny_model("olmoe"), None, None, method="cka")
    with pytest.raises(ValueError, match="needs held-out text"):
        expert_similarity(models.tiny_model("olmoe"), None, None, method="outputs")
    code, _, err = run_cli(["similarity", "--model", str(tmp_path), "--method", "weights"], capsys)
    assert code == 2 and "not a model folder" in err


def test_a_sere_file_gives_each_vllm_layer_its_own_matrix(tmp_path):
    """The plugin resolves each layer with ``for_layer``: SERE loads that layer's matrix there."""
    from safetensors.torch import save_file

    from lynx_moe.integrations.vllm import Settings, _State, reroute
    sims = torch.rand(2, 64, 64) * 2 - 1
    save_file({"similarity": sims}, str(tmp_path / "s.safetensors"))
    state = _State(Settings(default=lynx.SERE(2, 0.1, str(tmp_path / "s.safetensors"))), None)
    for _ in range(2):
        state.add_layer(object(), "m", (64, 8), 2)
    for layer in state.layers:   # what _describe would read from vLLM's router
        layer.num_experts, layer.top_k, layer.described = 64, 8, True
    state.resolve_all()
    assert [torch.equal(L.policy._matrix, sims[i]) for i, L in enumerate(state.layers)] == [True, True]
    # The layer path with that policy: fewer experts, each row's native weight sum kept.
    logits = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    w, ids = lynx.select_experts(logits, 8, renormalize=False)
    every, sums = torch.ones(32, dtype=torch.bool), torch.zeros(4, dtype=torch.long)
    new_w, new_ids = reroute(logits, w, ids, every, every, sums, policy=state.layers[1].policy, top_k=8,
                             num_experts=64, native_kwargs={"renormalize": False, "scoring": "softmax"})
    assert sums[2] < sums[1] and not torch.equal(new_ids, ids)
    torch.testing.assert_close(new_w.sum(-1), w.sum(-1))
    with pytest.raises(ValueError, match="has 2 layers but the model has 3 MoE layers"):
        _State(Settings(default=lynx.SERE(2, 0.1, str(tmp_path / "s.safetensors"))), None).add_layer(
            object(), "m", (64, 8), 3)
