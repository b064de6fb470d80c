"""The transformers patcher (lynx_moe.integrations.hf) on tiny random-weight models of all six architectures.

Exactness is checked against an unmodified deep copy with ``torch.equal`` (atol=0). Run:
``OMP_WAIT_POLICY=PASSIVE pytest tests/test_hf.py -q``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import lynx_moe as lynx  # noqa: E402
from lynx_moe.integrations import hf  # noqa: E402
from lynx_moe.measure import models  # noqa: E402

ARCHS = models.TINY_ARCHS
EOS, PAD = 2, 0  # tiny models' special tokens


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    return models.tiny_model(arch)


def fresh(arch: str):
    return copy.deepcopy(_model(arch))


def routers(model) -> list[torch.nn.Module]:
    return [layer.router for layer in hf.moe_layers(model)]


def shape(model) -> tuple[int, int]:
    r = routers(model)[0]
    return int(r.num_experts), int(r.top_k)


def batch(B: int, seed: int = 0, length: int = 7) -> dict[str, torch.Tensor]:
    """Left-padded prompts: every other row is shorter by 1..length-2 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, B, 2):
        pad = 1 + b % (length - 2)
        ids[b, :pad], mask[b, :pad] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask}


def prefill_and_decode(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prefill call and of one decode call after it."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        dec = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return out.logits, dec.logits


def greedy(model, inputs, n: int = 5):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def assert_same(model, ref, inputs) -> None:
    for got, want in zip((*prefill_and_decode(model, inputs), *greedy(model, inputs)),
                         (*prefill_and_decode(ref, inputs), *greedy(ref, inputs))):
        assert torch.equal(got, want)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_router_returns_raw_logits(arch):
    # The patcher bins router output[0]; pin that it is F.linear of the input, not probabilities.
    model = _model(arch)
    seen = []
    handles = [r.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o[0]))) for r in routers(model)]
    try:
        with torch.no_grad():
            model(**batch(2))
    finally:
        for h in handles:
            h.remove()
    assert seen
    for m, x, logits in seen:
        x = x.reshape(-1, m.weight.shape[1])
        if arch == "deepseek_v3":
            want = F.linear(x.float(), m.weight.float())
        else:
            want = F.linear(x, m.weight, getattr(m, "bias", None))
        assert torch.equal(logits, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_is_exact(arch):
    ref = _model(arch)
    model = lynx.apply_(fresh(arch), lynx.TopK())
    assert_same(model, ref, batch(8))
    stats = lynx.routing_stats(model)
    assert len(stats) == len(routers(model)) and all(s.steps > 0 for s in stats)
    assert all(s.distinct_policy == s.distinct_native and s.changed_share == 0 for s in stats)


@pytest.mark.parametrize("arch", ARCHS)
def test_affinity_binning_prefill_exact_and_fewer_experts(arch):
    ref = _model(arch)
    _, policy = lynx.presets.for_shape(*shape(ref))
    model = lynx.apply_(fresh(arch), policy)
    inputs = batch(32, seed=1)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)  # prefill rows never vote
    lynx.reset_stats(model)
    seqs, _ = greedy(model, inputs, n=4)
    assert seqs.shape == (32, inputs["input_ids"].shape[1] + 4)
    for s in lynx.routing_stats(model):
        assert s.steps == 3 and s.decode_rows == 3 * 32 - _finished_rows(seqs, inputs)
        assert s.distinct_policy < s.distinct_native and 0 < s.changed_share <= 1


def _finished_rows(seqs, inputs) -> int:
    # Decode inputs are the generated tokens except the last; EOS/pad inputs do not vote.
    fed = seqs[:, inputs["input_ids"].shape[1]:-1]
    return int(((fed == EOS) | (fed == PAD)).sum())


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_remove_restores_and_apply_twice_is_harmless(arch):
    ref = _model(arch)
    model = fresh(arch)
    hooks = hook_count(model)
    inputs = batch(8, seed=2)
    lynx.apply_(model, lynx.OEA(k0=1))
    lynx.apply_(model, lynx.AffinityBinning(alpha=3.0, beta=2))
    assert hook_count(model) == hooks + 2 + len(routers(model))  # one set of hooks, not two
    assert not torch.equal(greedy(model, inputs)[1], greedy(ref, inputs)[1])
    lynx.apply_(model, lynx.TopK())  # replaces the policy
    assert_same(model, ref, inputs)
    assert lynx.remove_(model) is model and lynx.remove_(model) is model
    assert hook_count(model) == hooks and not hasattr(model, "_lynx_moe")
    assert_same(model, ref, inputs)


def test_applied_scope_restores_previous_policy():
    model, ref = fresh("mixtral"), _model("mixtral")
    inputs = batch(8, seed=3)
    with lynx.applied(model, lynx.AffinityBinning(alpha=0.7, beta=1)) as m:
        assert m is model and not torch.equal(greedy(model, inputs)[1], greedy(ref, inputs)[1])
    assert not hasattr(model, "_lynx_moe")
    assert_same(model, ref, inputs)
    lynx.apply_(model, lynx.TopK(), stats=False)
    with lynx.applied(model, lynx.OEA(k0=1)):
        pass
    assert model._lynx_moe.policy == lynx.TopK() and model._lynx_moe.stats is False
    lynx.remove_(model)


def test_padding_and_finished_rows_do_not_vote():
    model = lynx.apply_(fresh("qwen3_moe"), lynx.AffinityBinning(alpha=3.0, beta=2))
    inputs = batch(8, seed=4)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        nxt = torch.full((8, 1), 7)
        nxt[1], nxt[2], nxt[3] = EOS, PAD, EOS    # finished: just produced EOS / fed pad
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        mask[4, -1] = 0                           # a padding row
        lynx.reset_stats(model)
        model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert [s.decode_rows for s in lynx.routing_stats(model)] == [4, 4]


def test_rows_that_do_not_vote_keep_the_native_output():
    # Every sequence finished: the decode step must equal the unpatched model's bit for bit.
    ref, model = _model("olmoe"), lynx.apply_(fresh("olmoe"), lynx.AffinityBinning(alpha=3.0, beta=4))
    inputs = batch(8, seed=5)
    done = torch.tensor([[EOS], [PAD]] * 4)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(done)], dim=1)
    with torch.no_grad():
        got = [m(input_ids=done, attention_mask=mask, past_key_values=m(**inputs).past_key_values).logits
               for m in (model, ref)]
    assert torch.equal(*got)
    assert all(s.steps == 0 for s in lynx.routing_stats(model))


def test_stop_token_ids_override():
    model = lynx.apply_(fresh("mixtral"), lynx.TopK(), stop_token_ids=[7])
    inputs = batch(4, seed=6)
    with torch.no_grad():
        cache = model(**inputs).past_key_values
        mask = torch.cat([inputs["attention_mask"], torch.ones(4, 1, dtype=torch.long)], dim=1)
        model(input_ids=torch.tensor([[7], [EOS], [PAD], [9]]), attention_mask=mask, past_key_values=cache)
    assert lynx.routing_stats(model)[0].decode_rows == 3


def test_unsupported_model_raises_and_is_unchanged():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    dense = transformers.AutoModelForCausalLM.from_config(cfg)
    hooks = hook_count(dense)
    with pytest.raises(ValueError, match="Mixtral.*Qwen2-MoE.*Qwen3-MoE.*OLMoE.*DeepSeek-V3.*GPT-OSS"):
        lynx.apply_(dense, lynx.AffinityBinning())
    assert hook_count(dense) == hooks and not hasattr(dense, "_lynx_moe")


def test_bad_input_leaves_model_unchanged():
    model = fresh("mixtral")
    hooks = hook_count(model)
    with pytest.raises(ValueError, match="k0"):
        lynx.apply_(model, lynx.OEA(k0=3))           # Mixtral routes top-2
    with pytest.raises(ValueError, match="policy"):
        lynx.apply_(model, "affinity_binning")
    with pytest.raises(ValueError, match="apply_"):
        lynx.routing_stats(model)
    assert hook_count(model) == hooks
    lynx.apply_(model, lynx.TopK(), stats=False)
    with pytest.raises(ValueError, match="stats=True"):
        lynx.routing_stats(model)


def test_import_lynx_does_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, lynx_moe as lynx; lynx.apply_; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_counting_matches_the_core_functions():
    g = torch.Generator().manual_seed(7)
    for E, K in [(8, 2), (64, 8), (256, 8)]:
        own = torch.rand(32, E, generator=g).topk(K).indices
        ids = torch.where(torch.rand(32, K, generator=g) < 0.5, own, torch.rand(32, E, generator=g).topk(K).indices)
        vote = torch.rand(32, generator=g) > 0.3
        want = [1, int(vote.sum()), int(lynx.distinct_experts(own, vote, E)), int(lynx.distinct_experts(ids, vote, E)),
                int(lynx.changed_assignments(ids, own, vote))]
        assert hf._count(vote, own, ids, E).tolist() == want
        assert hf._count(torch.zeros(32, dtype=torch.bool), own, ids, E).tolist() == [0] * 5


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_bf16_and_eager_experts_keep_router_dtypes(arch):
    # Mixtral returns fp32 weights, Qwen3 casts them to the logits dtype, GPT-OSS softmaxes in it.
    ref = models.tiny_model(arch, dtype=torch.bfloat16)
    model = copy.deepcopy(ref)
    model.set_experts_implementation("eager")
    E, K = shape(model)

    def dtypes(m) -> set:
        seen = set()
        handles = [r.register_forward_hook(lambda _, a, o: seen.add(tuple(t.dtype for t in o))) for r in routers(m)]
        greedy(m, batch(8, seed=8), n=3)
        for h in handles:
            h.remove()
        return seen

    want = dtypes(ref)
    lynx.apply_(model, lynx.presets.for_shape(E, K)[1])
    assert dtypes(model) == want and len(want) == 1
    assert all(s.changed_share > 0 for s in lynx.routing_stats(model))
    lynx.apply_(model, lynx.TopK())
    ref.set_experts_implementation("eager")
    assert_same(model, ref, batch(8, seed=9))


def _router_io(model, inputs) -> list[tuple[torch.nn.Module, tuple]]:
    """(router, (logits, weights, ids)) of every router call in a prefill and one decode call."""
    seen = []
    handles = [r.register_forward_hook(lambda m, a, o: seen.append((m, o))) for r in routers(model)]
    try:
        prefill_and_decode(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in ARCHS] + [("olmoe", {"norm_topk_prob": True}),
                                                                       ("deepseek_v3", {"norm_topk_prob": False})])
def test_handler_reproduces_native_routing(arch, overrides):
    # The keywords given to lynx.route must describe the router's own semantics.
    model = models.tiny_model(arch, **overrides)
    for router, (logits, w, ids) in _router_io(model, batch(8, seed=10)):
        r = lynx.route(logits, ids.shape[1], lynx.TopK(), **hf._handler(router)(router))
        order, r_order = ids.sort(-1), r.ids.sort(-1)
        assert torch.equal(order.values, r_order.values)
        torch.testing.assert_close(w.float().gather(1, order.indices), r.weights.gather(1, r_order.indices))


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_router_output_is_route_or_own(arch):
    # Each decode row gets lynx.route's choice when that changes its expert set, else the router's own.
    model = fresh(arch)
    E, K = shape(model)
    policy = lynx.presets.for_shape(E, K)[1]
    own, final = [], []
    for r in routers(model):  # registered before apply_'s hook: sees the router's own output
        r.register_forward_hook(lambda m, a, o: own.append((m, o)))
    lynx.apply_(model, policy, stats=False)
    for r in routers(model):  # registered after: sees what the experts get
        r.register_forward_hook(lambda m, a, o: final.append(o))
    prefill_and_decode(model, batch(16, seed=11))
    decode = [(m, o, f) for (m, o), f in zip(own, final) if o[0].shape[0] == 16]
    assert len(decode) == len(routers(model))
    for router, (logits, w, ids), (logits2, w2, ids2) in decode:
        assert logits2 is logits
        r = lynx.route(logits, K, policy, **hf._handler(router)(router))
        same = (ids2.sort(-1).values == ids.sort(-1).values).all(-1)
        assert torch.equal(ids2[same], ids[same]) and torch.equal(w2[same], w[same])
        assert torch.equal(ids2[~same], r.ids[~same].to(ids.dtype))
        assert torch.equal(w2[~same], r.weights[~same].to(w.dtype)) and (~same).any()
        assert ids2.dtype == ids.dtype and w2.dtype == w.dtype


def test_deepcopy_of_a_patched_model_is_independent():
    ref = _model("olmoe")
    model = lynx.apply_(fresh("olmoe"), lynx.AffinityBinning(alpha=3.0, beta=4))
    twin = copy.deepcopy(model)
    inputs = batch(8, seed=12)
    assert torch.equal(greedy(twin, inputs)[1], greedy(model, inputs)[1])
    assert lynx.routing_stats(twin)[0].steps > 0  # the twin counts in its own state
    lynx.remove_(twin)
    assert_same(twin, ref, inputs)
    assert not torch.equal(greedy(model, inputs)[1], greedy(ref, inputs)[1])  # still patched


def test_outer_and_inner_model_cannot_both_be_patched():
    model = lynx.apply_(fresh("mixtral"), lynx.TopK())
    with pytest.raises(ValueError, match="remove_"):
        lynx.apply_(model.model, lynx.TopK())
    lynx.remove_(model)
    lynx.apply_(model.model, lynx.TopK())  # the inner model alone is fine: it gets the same kwargs
    greedy(model, batch(4, seed=13), n=3)
    assert [s.steps for s in lynx.routing_stats(model.model)] == [2, 2]


def test_static_cache_and_beam_search():
    ref, model = _model("qwen3_moe"), fresh("qwen3_moe")
    inputs = batch(4, seed=14)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    lynx.apply_(model, lynx.TopK())
    with torch.no_grad():
        got = model.generate(**inputs, cache_implementation="static", **kw)
        assert torch.equal(got, ref.generate(**inputs, cache_implementation="static", **kw))
        assert [s.steps for s in lynx.routing_stats(model)] == [3, 3]
        lynx.apply_(model, lynx.AffinityBinning(alpha=3.0, beta=2))
        model.generate(**inputs, num_beams=2, **kw)
    for s in lynx.routing_stats(model):  # 4 sequences x 2 beams, 3 decode steps
        assert s.decode_rows == 24 and s.distinct_policy < s.distinct_native


def test_reference_model_topk_exact_and_fewer_experts():
    # The trained reference model (if present): real, skewed router logits.
    try:
        path = lynx.reference_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = copy.deepcopy(ref)
    lynx.apply_(model, lynx.TopK())
    inputs = batch(8, seed=15)
    inputs["input_ids"] = inputs["input_ids"].clamp_max(ref.config.vocab_size - 1)
    assert_same(model, ref, inputs)
    lynx.apply_(model, lynx.presets.for_shape(*shape(model))[1])
    greedy(model, batch(32, seed=16), n=4)
    for s in lynx.routing_stats(model):
        assert s.steps == 3 and s.distinct_policy < s.distinct_native


def test_stats_survive_switching_between_inference_mode_and_no_grad():
    """Counts first made under inference_mode keep accumulating under no_grad (and back)."""
    model = models.tiny_model("olmoe")
    lynx.apply_(model, lynx.AffinityBinning(3.0, 4))
    ids = torch.randint(0, model.config.vocab_size, (4, 6))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert all(layer.steps == 6 for layer in lynx.routing_stats(model))
    lynx.remove_(model)


# --- per-request opt-out ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_isolated_rows_get_the_unpatched_models_output_whatever_their_batch(arch):
    """Rows flagged in ``lynx.isolated`` are routed natively and do not vote: their generations
    equal the unpatched model's on the same batch, bit for bit, while the policy still changes
    the other rows; their batch mates do not change them."""
    ref, model = fresh(arch), fresh(arch)
    inputs = batch(16, seed=3)
    native = greedy(ref, inputs, n=8)[0]
    flags = torch.zeros(16, dtype=torch.bool)
    flags[[0, 5, 9]] = True
    lynx.apply_(model, lynx.XShare(budget=shape(model)[1]))        # a deep cut: most rows change
    with lynx.isolated(model, flags):
        out = greedy(model, inputs, n=8)[0]
        mates = {**inputs, "input_ids": inputs["input_ids"].clone()}
        mates["input_ids"][~flags, -1] = (mates["input_ids"][~flags, -1] + 1) % 500 + 3   # other batch mates
        again = greedy(model, mates, n=8)[0]
    assert torch.equal(out[flags], native[flags]) and torch.equal(again[flags], native[flags])
    assert not torch.equal(out[~flags], native[~flags])
    # isolated rows never voted: at most the 13 others in each of the 2 x 7 decode calls
    assert all(0 < s.decode_rows <= 2 * 7 * 13 for s in lynx.routing_stats(model))


def test_isolated_needs_one_flag_per_sequence():
    model = lynx.apply_(fresh("olmoe"), lynx.OEA(k0=2))
    with pytest.raises(ValueError, match="one bool flag per sequence"):
        with lynx.isolated(model, torch.zeros(2, 2, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="3 row flags but this call has 4 sequences"):
        with lynx.isolated(model, [True, False, False]):
            greedy(model, batch(4), n=2)
    with pytest.raises(ValueError, match="no lynx_moe policy is applied"):
        with lynx.isolated(fresh("olmoe"), [True]):
            pass


def test_a_per_layer_policy_routes_each_layer_with_its_own():
    """``PerLayer``: layer 0 native, layer 1 cut, statistics per layer say so; a policy for
    another number of layers is refused with the model untouched."""
    model = models.tiny_model("olmoe", num_hidden_layers=2)
    ids = torch.randint(3, 500, (16, 5), generator=torch.Generator().manual_seed(0))
    lynx.apply_(model, lynx.parse_policy("per_layer(topk;batch_top_n:n=8)"))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    first, second = lynx.routing_stats(model)
    assert first.distinct_policy == first.distinct_native and first.changed_share == 0
    assert second.distinct_policy <= 8 < second.distinct_native
    with pytest.raises(ValueError, match="has 3 layers but the model has 2 MoE layers"):
        lynx.apply_(model, lynx.parse_policy("per_layer(topk;topk;topk)"))
    assert lynx.routing_stats(model)[1].distinct_policy == second.distinct_policy   # still applied as before
