"""The fused policy step (lynx_moe/fused.py: C++ on CPU, Triton on CUDA) against the torch
reference (``LYNX_FUSED=0``), decision for decision: same kept sets, ids and native ids, and
on the CPU the same weights bit for bit; the Triton kernels run under Triton's interpreter on
CPU tensors and agree in ids exactly, in weights to float32 rounding.

Random cases (the property tests' generators), awkward ones (ties from bf16 and quantised
logits, the float paths of AffinityBinning, grouped and biased routing, an engine's native
result), and router logits recorded from the reference models.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lynx_moe as lynx
from lynx_moe import fused

from .test_routing import cases, policies

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@contextlib.contextmanager
def fused_path(on: bool):
    """LYNX_FUSED for the calls inside, restored after (the suite may run with it forced off)."""
    old = os.environ.get("LYNX_FUSED")
    os.environ["LYNX_FUSED"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LYNX_FUSED", None)
        else:
            os.environ["LYNX_FUSED"] = old


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    if not fused.cpu_kernel_available():
        pytest.skip("the fused CPU kernel could not be built here (see the warning)")


def both(**kw) -> tuple[lynx.Routing, lynx.Routing]:
    with fused_path(False):
        ref = lynx.route(**kw)
    with fused_path(True):
        fast = lynx.route(**kw)
    return ref, fast


def assert_same(ref, fast, exact_weights: bool = True) -> None:
    assert torch.equal(fast.ids, ref.ids), "ids differ"
    assert torch.equal(fast.native_ids, ref.native_ids) and torch.equal(fast.vote, ref.vote)
    assert fast.weights.dtype == torch.float32 and fast.ids.dtype == torch.int64
    if exact_weights:
        assert torch.equal(fast.weights, ref.weights), (fast.weights - ref.weights).abs().max()
    else:
        torch.testing.assert_close(fast.weights, ref.weights, atol=1e-6, rtol=1e-5)


def test_every_set_policy_is_fused_on_cpu():
    """TopK needs no kernel; SERE (a substitution through a similarity matrix), MassFloor and
    SizePrice (not fused yet) run the reference."""
    for cls in set(lynx.POLICIES.values()) - {lynx.PerLayer}:   # PerLayer: fused per layer, entry by entry
        assert (fused.policy_args(cls()) is None) == (cls in (lynx.TopK, lynx.SERE, lynx.MassFloor, lynx.SizePrice)), cls
    assert fused.policy_args(lynx.AffinityBinning(1.0, 7)) is None   # beyond scalar pow: reference


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fused_matches_reference_on_random_cases(data):
    case = data.draw(cases())
    policy = data.draw(policies(case["top_k"], case["router_logits"].shape[1]))
    assert_same(*both(policy=policy, **case))


def _awkward_logits(T: int, E: int, style: str, g: torch.Generator) -> torch.Tensor:
    L = torch.randn(T, E, generator=g) + 2 * torch.randn(1, E, generator=g)
    if style == "quantised":   # many exact ties inside rows and across rows
        return (L * 2).round() / 2
    if style == "bf16":
        return L.bfloat16()
    if style == "non_finite":
        L[0] = float("nan")
        L[-1, : E // 2] = float("-inf")
        L[T // 2, 1] = float("inf")
    return L


AWKWARD_POLICIES = [lynx.AffinityBinning(3.0, 2), lynx.AffinityBinning(0.7, 1, True), lynx.AffinityBinning(1.0, None),
                    lynx.AffinityBinning(3.0, 4), lynx.AffinityBinning(8.0, 6), lynx.Confidence(1, 0.5),
                    lynx.Confidence(0, 1.0), lynx.OEA(2), lynx.XShare(16, 1), lynx.BatchTopN(16),
                    lynx.StaticK(2), lynx.SER(1, 0.3)]


@pytest.mark.parametrize("T, E, k", [(1, 64, 8), (3, 8, 2), (64, 128, 8), (512, 64, 8), (33, 160, 6)])
@pytest.mark.parametrize("style", ["plain", "quantised", "bf16", "non_finite"])
def test_fused_matches_reference_on_awkward_cases(T, E, k, style):
    """Ties, non-finite logits, and AffinityBinning's float paths (no clamp; T=512 with beta=4
    passes the exact-integer bound)."""
    g = torch.Generator().manual_seed(T * 1000 + E)
    L = _awkward_logits(T, E, style, g)
    decode = torch.rand(T, generator=g) > 0.3
    for scoring, renorm in [("softmax", True), ("softmax", False), ("softmax_topk", True), ("sigmoid", False)]:
        for policy in AWKWARD_POLICIES:
            for mask in (None, decode):
                assert_same(*both(router_logits=L, top_k=k, policy=policy, renormalize=renorm, scoring=scoring,
                                  decode_mask=mask))


@pytest.mark.parametrize("T", [1, 12, 64])
def test_fused_matches_reference_with_bias_groups_and_an_engines_native_result(T):
    g = torch.Generator().manual_seed(T)
    E, k = 64, 6
    L = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    grouped = {"num_expert_group": 8, "topk_group": 3, "routed_scaling_factor": 2.5}
    for kw in ({"e_score_correction_bias": bias}, {"e_score_correction_bias": bias, **grouped}):
        for policy in AWKWARD_POLICIES:
            case = dict(router_logits=L, top_k=k, policy=policy, renormalize=True, scoring="sigmoid", **kw)
            assert_same(*both(**case))
            nat = lynx.route(**{**case, "policy": lynx.TopK()})
            assert_same(*both(**case, native=(nat.weights, nat.ids)))
            # An engine's own (here: transposed, so strided) tensors pass through untouched.
            w_strided = nat.weights.t().contiguous().t()
            ref, fast = both(**case, native=(w_strided, nat.ids), decode_mask=torch.arange(T) % 2 == 0)
            assert_same(ref, fast)
            assert torch.equal(fast.weights[~fast.vote], w_strided[~fast.vote])


def test_fused_takes_strided_logits():
    L = torch.randn(64, 32).t()   # [32, 64], not contiguous
    for policy in AWKWARD_POLICIES:
        assert_same(*both(router_logits=L, top_k=8, policy=policy))


def _recorded(folder: str, steps: int = 3, rows: int = 24):
    """``(router logits [L, S, B, E], top_k, each layer's native routing keywords)`` recorded
    from a reference model's decode steps on random tokens."""
    pytest.importorskip("transformers")
    path = MODELS / folder
    if not (path / "model.safetensors").exists():
        pytest.skip(f"{folder} checkpoint missing")
    from lynx_moe.integrations import hf
    from lynx_moe.measure.decode import record_routing
    from lynx_moe.measure.models import load_model
    model, _ = load_model(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, model.config.vocab_size, (rows, 8 + steps), generator=g)
    logits, _ = record_routing(model, tokens, prompt_len=8)
    layers = hf.moe_layers(model)
    return logits, layers[0].top_k, [hf._handler(m.router)(m.router) for m in layers]


@pytest.mark.parametrize("folder", ["lynx-ref-moe", "lynx-ref-qwen3moe", "lynx-ref-dsv3"])
def test_fused_matches_reference_on_recorded_router_logits(folder):
    """OLMoE (raw top-k mass), Qwen3-MoE (normalised top-k), DeepSeek-V3 (grouped, biased
    sigmoid routing with a scaling factor), each with its own native keywords."""
    logits, k, native = _recorded(folder)
    L_, S, B, E = logits.shape
    _, preset = lynx.presets.for_shape(E, k)
    chosen = [preset, lynx.AffinityBinning(3.0, 2), lynx.AffinityBinning(1.0, None), lynx.Confidence(),
              lynx.OEA(2), lynx.XShare(max(k, E // 4), 1), lynx.BatchTopN(max(k, E // 4)), lynx.StaticK(k // 2),
              lynx.SER(2, 0.3)]
    decode = torch.arange(B) % 5 != 0
    for layer in range(L_):
        for step in range(S):
            for policy in chosen:
                for mask in (None, decode):
                    assert_same(*both(router_logits=logits[layer, step], top_k=k, policy=policy,
                                      decode_mask=mask, **native[layer]))


def test_forcing_the_reference():
    L = torch.randn(16, 32)
    args = (lynx.OEA(1), L, 4, True, "softmax", None, None, None, None, None, 1.0)
    with fused_path(False):
        assert not fused.enabled() and fused.route(*args) is None
    with fused_path(True):
        assert fused.enabled() and fused.route(*args) is not None
        assert fused.route(lynx.TopK(), *args[1:]) is None   # native routing is the reference's own


def test_gradients_stay_on_the_reference():
    L = torch.randn(8, 16, requires_grad=True)
    with fused_path(True):
        w, _ = lynx.select_experts(L, 4, lynx.AffinityBinning())
    w.sum().backward()
    assert L.grad is not None


def test_a_failed_build_warns_once_and_routes_with_the_reference(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'lynx_moe_inside': g++: not found")

    monkeypatch.setattr(fused, "_BUILD", {})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    L = torch.randn(8, 16)
    with fused_path(True), pytest.warns(RuntimeWarning, match=r"could not be built \(Error building.*g\+\+.*ninja"):
        w, ids = lynx.select_experts(L, 4, lynx.OEA(1))
    with fused_path(True), warnings.catch_warnings():
        warnings.simplefilter("error")   # once per process, not per call
        lynx.select_experts(L, 4, lynx.OEA(1))
    with fused_path(False):
        rw, rids = lynx.select_experts(L, 4, lynx.OEA(1))
    assert torch.equal(ids, rids) and torch.equal(w, rw)


def test_the_fused_operator_compiles_into_one_graph_node():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lynx.select_experts, fullgraph=True, backend=backend)
    L, decode = torch.randn(32, 64), torch.rand(32) > 0.2
    with fused_path(True):
        w, ids = fn(L, 8, lynx.AffinityBinning(3.0, 2), True, "softmax", decode, None)
        ew, eids = lynx.select_experts(L, 8, lynx.AffinityBinning(3.0, 2), True, "softmax", decode, None)
    assert torch.equal(ids, eids) and torch.equal(w, ew)
    assert any("lynx_moe.route" in g.code for g in graphs)


# --- Triton kernels (the CUDA path), under the interpreter on CPU tensors ------------------------

def test_triton_kernels_match_reference_under_the_interpreter():
    """In a child process: TRITON_INTERPRET must be set before triton is first imported (by torch
    or vLLM in this one), and would turn every later Triton kernel of the session into Python."""
    pytest.importorskip("triton", reason="triton is not installed (it comes with the vllm extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.triton_interpreted"], check=False, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "cases agree" in r.stdout


def test_triton_kernels_compile_for_a_gpu():
    """Without a GPU: every kernel variant compiles ahead of time to an sm_90 cubin (Triton's
    own LLVM and ptxas), so a kernel that the interpreter accepts but the compiler rejects
    fails here."""
    pytest.importorskip("triton", reason="triton is not installed (it comes with the vllm extra)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are Python here")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lynx_moe import triton_kernels as tk

    target = GPUTarget("cuda", 90, 32)
    pointers = {"sel_ptr": "*fp32", "natw_ptr": "*fp32", "nati_ptr": "*i64", "vote_ptr": "*i1",
                "head_ptr": "*fp32", "tail_ptr": "*fp32", "in_ptr": "*i32", "own_ptr": "*i32"}
    scalars = {"T": "i32", "E": "i32", "K": "i32", "p": "fp32", "n0": "i32", "n1": "i32", "flag": "i32"}
    for policy in (tk.AFFINITY, tk.CONFIDENCE, tk.TOP_MASS, tk.SER):   # each branch of _decide
        const = {"POLICY": policy, "HAS_VOTE": True, "BLOCK_T": 16, "BLOCK_E": 128}
        sig = {**pointers, **scalars, **dict.fromkeys(const, "constexpr")}
        assert triton.compile(ASTSource(fn=tk._decide, signature=sig, constexprs=const), target=target,
                              options={"enable_fp_fusion": False}).asm["cubin"]
    pointers = {"x_ptr": "*fp32", "sel_ptr": "*fp32", "natw_ptr": "*fp32", "nati_ptr": "*i64", "mass_ptr": "*fp32",
                "vote_ptr": "*i1", "in_ptr": "*i32", "own_ptr": "*i32", "w_ptr": "*fp32", "ids_ptr": "*i64"}
    for row_policy, sigmoid in ((False, False), (True, True)):
        const = {"ROW_POLICY": row_policy, "HAS_VOTE": True, "SIGMOID": sigmoid, "RENORMALIZE": False,
                 "SCALED": True, "GROUPED": True, "BLOCK_T": 16, "BLOCK_E": 128, "BLOCK_K": 8}
        sig = {**pointers, "T": "i32", "E": "i32", "K": "i32", "scale": "fp32", **dict.fromkeys(const, "constexpr")}
        assert triton.compile(ASTSource(fn=tk._route, signature=sig, constexprs=const), target=target,
                              options={"enable_fp_fusion": False}).asm["cubin"]


def test_the_operator_keeps_its_schema_and_fake_kernel():
    """torch.library's own checks: outputs never alias inputs (an engine's tensors go in),
    the fake kernel's shapes match, as torch.compile relies on."""
    L = torch.randn(12, 32)
    w, ids = torch.topk(torch.softmax(L, -1), 4)
    vote = torch.arange(12) % 3 != 0
    for native_w, native_ids in ((None, None), (w, ids)):
        args = (L, vote, native_w, native_ids, None, 4, 0, False, 0, 0, 1.0,
                *fused.policy_args(lynx.AffinityBinning(3.0, 2)))
        torch.library.opcheck(torch.ops.lynx_moe.route.default, args,
                              test_utils=("test_schema", "test_faketensor"))
