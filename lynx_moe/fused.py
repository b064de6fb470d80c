"""Fused policy step: native routing, a policy's decision and the shared "route each voting
row inside keep" step in one call, for ``routing.route``.

The torch code in ``routing.py``/``policies.py`` is ~35 small ops, each paying dispatch
(150-300 us per call on a CPU, 35 launches on a GPU). After its checks, ``route`` asks
``route(...)`` here for the whole step; ``None`` means no fused kernel takes the call and
the reference runs, so the reference stays both the specification and the fallback.

- CPU: one C++ torch operator, ``torch.ops.lynx_moe.route`` (``csrc/inside.cpp``), compiled
  on first use by ``torch.utils.cpp_extension`` (needs g++ and ninja) and cached in torch's
  extension folder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). If it
  cannot be built, one warning says why and the reference runs.
- CUDA: the reference's native routing, then two Triton launches (``triton_kernels.py``),
  when triton is installed.
- ``LYNX_FUSED=0`` in the environment forces the reference everywhere (read on every call).

Decisions are the reference's, bit for bit (native and final ids, kept sets and, on the CPU,
weights); see ``csrc/inside.cpp`` for how. Every policy but TopK (native routing itself),
SERE and MassFloor is fused on the CPU, except AffinityBinning with ``beta > 6``; on CUDA see
``triton_kernels.py``. Calls that need gradients stay on the reference (the fused weights
carry none).

Legend: T router rows, E experts, K top-k.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .policies import (
    OEA,
    SER,
    AffinityBinning,
    BatchTopN,
    Confidence,
    Policy,
    StaticK,
    XShare,
)

__all__ = ["cpu_kernel_available", "enabled", "policy_args", "route", "triton_available", "triton_route"]

# Policy and scoring codes, as in csrc/inside.cpp.
AFFINITY, CONFIDENCE, OEA_CODE, TOP_MASS, STATIC_K, SER_CODE = range(6)
SCORINGS = {"softmax": 0, "softmax_topk": 1, "sigmoid": 2}
_BUILD: dict[str, bool] = {}   # the one C++ build of this process: "cpu" -> loaded


def enabled() -> bool:
    """False when ``LYNX_FUSED=0`` forces the reference path."""
    return os.environ.get("LYNX_FUSED", "1").strip() != "0"


def policy_args(policy: Policy) -> tuple[int, float, int, int, bool] | None:
    """``(code, p, n0, n1, flag)`` of a policy for the fused kernels, or None if not fused."""
    if isinstance(policy, AffinityBinning):
        if policy.beta is not None and policy.beta > 6:   # powers beyond scalar pow: see inside.cpp
            return None
        return AFFINITY, float(policy.alpha), -1 if policy.beta is None else policy.beta, 0, policy.protect_top1
    if isinstance(policy, Confidence):
        return CONFIDENCE, float(policy.beta), policy.alpha, 0, False
    if isinstance(policy, OEA):
        return OEA_CODE, 0.0, policy.k0, 0, False
    if isinstance(policy, XShare):
        return TOP_MASS, 0.0, policy.budget, policy.k0, False
    if isinstance(policy, BatchTopN):
        return TOP_MASS, 0.0, policy.n, 0, False
    if isinstance(policy, StaticK):
        return STATIC_K, 0.0, policy.k, 0, False
    if isinstance(policy, SER):
        return SER_CODE, float(policy.threshold), policy.k_min, 0, False
    return None


def _build_cpu() -> bool:
    from torch.utils import cpp_extension

    src = Path(__file__).with_name("csrc") / "inside.cpp"
    # AVX2 where this CPU has it (a build of its own name, so a shared cache never serves it to a
    # CPU without). Same results: IEEE operations and no contraction either way.
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    name = "lynx_moe_inside_" + re.sub(r"\W", "_", torch.__version__) + ("_avx2" if avx2 else "")
    flags = ["-O3", "-ffp-contract=off"] + (["-mavx2"] if avx2 else [])
    try:
        cpp_extension.load(name=name, sources=[str(src)], extra_cflags=flags, is_python_module=False,
                           with_cuda=False)
    except Exception as e:   # noqa: BLE001 (whatever stops the build, the reference still runs)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"lynx_moe: the fused CPU routing kernel could not be built ({first}); it needs a "
                      "C++ compiler (g++) and ninja (pip install ninja). Using the reference torch path "
                      "(same decisions, slower); LYNX_FUSED=0 skips the attempt.", RuntimeWarning, stacklevel=3)
        return False
    return True


@torch._dynamo.assume_constant_result
def cpu_kernel_available() -> bool:
    """Whether ``torch.ops.lynx_moe.route`` runs here (builds it on the first call)."""
    if "cpu" not in _BUILD:
        _BUILD["cpu"] = _build_cpu()
        if _BUILD["cpu"]:
            _register_fake()
    return _BUILD["cpu"]


@torch._dynamo.assume_constant_result
def triton_available() -> bool:
    """Whether triton imports here; registers the CUDA operator ``lynx_moe::inside_triton``."""
    if "cuda" not in _BUILD:
        try:
            from . import triton_kernels
        except ImportError:
            _BUILD["cuda"] = False
        else:
            _register_triton(triton_kernels.launch)
            _BUILD["cuda"] = True
    return _BUILD["cuda"]


def _triton_takes(shape: torch.Size, args: tuple) -> bool:
    from .triton_kernels import takes
    return takes(shape[0], shape[1], args[0], args[2])


def _register_triton(launch) -> None:
    # An operator, so that torch.compile traces one node and CUDA graphs capture two launches.
    @torch.library.custom_op("lynx_moe::inside_triton", mutates_args=(), device_types="cuda")
    def inside_triton(x: torch.Tensor, sel: torch.Tensor, native_w: torch.Tensor, native_ids: torch.Tensor,
                      mass: torch.Tensor, vote: torch.Tensor | None, policy: int, p: float, n0: int, n1: int,
                      flag: bool, sigmoid: bool, renormalize: bool, scale: float,
                      grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return launch(x, sel, native_w, native_ids, mass, vote, policy, p, n0, n1, flag, sigmoid,
                      renormalize, scale, grouped)

    @inside_triton.register_fake
    def _(x, sel, native_w, native_ids, mass, vote, policy, p, n0, n1, flag, sigmoid, renormalize, scale,
          grouped):
        return torch.empty_like(native_w, dtype=torch.float32), torch.empty_like(native_ids, dtype=torch.long)


def _register_fake() -> None:
    @torch.library.register_fake("lynx_moe::route")
    def _(x, vote, native_w, native_ids, bias, top_k, scoring, renormalize, n_group, topk_group, scale,
          policy, p, n0, n1, flag):
        T = x.shape[0]
        return (x.new_empty(T, top_k), x.new_empty(T, top_k, dtype=torch.long),
                x.new_empty(T, top_k, dtype=torch.long))


def route(policy: Policy, x: torch.Tensor, top_k: int, renormalize: bool, scoring: str,
          vote: torch.Tensor | None, native: tuple[torch.Tensor, torch.Tensor] | None,
          bias: torch.Tensor | None, n_group: int | None, topk_group: int | None,
          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(weights f32 [T, K], ids i64 [T, K], native ids i64 [T, K])`` of ``routing.route``
    after its checks, or None when no fused kernel takes the call (then the reference runs).

    ``x [T, E]``: the sanitised fp32 logits; ``vote [T]`` (None: every row votes); the rest
    are ``route``'s arguments (``native``: an engine's own ``(weights, ids)``). Rows that do
    not vote get exactly the native weights and ids."""
    args = policy_args(policy)
    if args is None or not enabled() or (x.requires_grad and torch.is_grad_enabled()):
        return None
    device = x.device.type
    if device == "cpu" and cpu_kernel_available():
        given_w, given_ids = (None, None) if native is None else native
        return torch.ops.lynx_moe.route.default(x, vote, given_w, given_ids, bias, top_k, SCORINGS[scoring],
                                                renormalize, n_group or 0, topk_group or 0, scale, *args)
    if device == "cuda" and triton_available() and _triton_takes(x.shape, args):
        return triton_route(torch.ops.lynx_moe.inside_triton.default, args, x, top_k, renormalize, scoring,
                            vote, native, bias, n_group, topk_group, scale)
    return None


def triton_route(launch, args, x, top_k, renormalize, scoring, vote, native, bias, n_group, topk_group, scale):
    """The CUDA path: native routing as the reference does it, then ``launch`` (the Triton
    operator; the tests pass ``triton_kernels.launch`` to run it under the interpreter)."""
    from .routing import _native

    nat_w, nat_ids, sel, mass = _native(x, top_k, renormalize, scoring, bias, n_group, topk_group, scale, native)
    nat_ids = nat_ids.long()
    w, ids = launch(x, sel, nat_w, nat_ids, mass, vote, *args, scoring == "sigmoid", renormalize, scale,
                    n_group is not None)
    return w, ids, nat_ids
