"""The Triton kernels (lynx_moe/triton_kernels.py) against the torch reference on CPU tensors,
under Triton's interpreter. Run by tests/test_fused.py in a child process:

    TRITON_INTERPRET=1 python -m tests.triton_interpreted

(the interpreter is chosen when triton is first imported). Ids and kept sets must be the
reference's exactly, weights to float32 rounding. Exits non-zero on the first disagreement.
"""

from __future__ import annotations

import os
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lynx_moe as lynx
from lynx_moe import fused, routing

from .test_routing import cases, policies

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (before triton is imported)")

from lynx_moe import triton_kernels  # after the check

TAKEN = [0]


def triton_route(router_logits, top_k, policy, renormalize=True, scoring="softmax", decode_mask=None,
                 valid_mask=None, **native):
    """route() with fused.route's CUDA path (the reference's native routing, then the Triton
    kernels) on CPU tensors; None if the kernels do not take the call."""
    taken = []

    def cuda_path(policy_, x, k, renormalize_, scoring_, vote, given, bias, n_group, topk_group, scale):
        args = fused.policy_args(policy_)
        if args is None or not triton_kernels.takes(x.shape[0], x.shape[1], args[0], args[2]):
            return None
        taken.append(True)
        return fused.triton_route(triton_kernels.launch, args, x, k, renormalize_, scoring_, vote, given, bias,
                                  n_group, topk_group, scale)

    real, fused.route = fused.route, cuda_path
    try:
        r = routing.route(router_logits, top_k, policy, renormalize, scoring, decode_mask, valid_mask, **native)
    finally:
        fused.route = real
    return r if taken else None


def reference(*args, **kwargs):
    os.environ["LYNX_FUSED"] = "0"
    try:
        return routing.route(*args, **kwargs)
    finally:
        os.environ.pop("LYNX_FUSED")


def check(ref, got, what) -> None:
    assert torch.equal(got.ids, ref.ids), f"{what}: ids differ\n{got.ids}\n{ref.ids}"
    assert torch.equal(got.native_ids, ref.native_ids) and torch.equal(got.vote, ref.vote), what
    torch.testing.assert_close(got.weights, ref.weights, atol=1e-6, rtol=1e-5, msg=what)
    TAKEN[0] += 1


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def random_cases(data):
    case = data.draw(cases())
    policy = data.draw(policies(case["top_k"], case["router_logits"].shape[1]))
    got = triton_route(policy=policy, **case)
    if got is None:   # TopK, SERE, MassFloor, SizePrice (not fused), or AffinityBinning's float path (the reference's own)
        T, E = case["router_logits"].shape
        assert isinstance(policy, (lynx.TopK, lynx.SERE, lynx.MassFloor, lynx.SizePrice)) or (isinstance(policy, lynx.AffinityBinning) and (
            policy.beta is None or not triton_kernels.takes(T, E, 0, policy.beta))), policy
        return
    check(reference(policy=policy, **case), got, f"{policy} {case}")


DECODE_POLICIES = [lynx.AffinityBinning(3.0, 2), lynx.AffinityBinning(0.7, 1, True), lynx.AffinityBinning(3.0, 4),
                   lynx.Confidence(), lynx.OEA(2), lynx.XShare(32, 1), lynx.BatchTopN(32), lynx.StaticK(4),
                   lynx.SER(2, 0.3)]


def decode_batches() -> None:
    """A decode-sized batch (bf16 ties, some rows not voting), plain and DeepSeek-style grouped."""
    g = torch.Generator().manual_seed(5)
    T, E, k = 48, 128, 8
    L = (torch.randn(T, E, generator=g) + 2 * torch.randn(1, E, generator=g)).bfloat16()
    decode = torch.rand(T, generator=g) > 0.25
    bias = torch.randn(E, generator=g) * 0.1
    grouped = {"e_score_correction_bias": bias, "num_expert_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}
    for policy in DECODE_POLICIES:
        for renorm in (True, False):
            check(reference(L, k, policy, renorm, decode_mask=decode),
                  triton_route(L, k, policy, renorm, decode_mask=decode), f"{policy} plain")
        check(reference(L, k, policy, True, "sigmoid", decode, **grouped),
              triton_route(L, k, policy, True, "sigmoid", decode, **grouped), f"{policy} grouped")


if __name__ == "__main__":
    decode_batches()
    random_cases()
    print(f"{TAKEN[0]} cases agree")
