"""Switch an expert-selection policy on in a loaded transformers MoE model, in place.

    lynx.apply_(model, lynx.AffinityBinning(alpha=3.0, beta=2))   # idempotent; returns model
    out = model.generate(**batch, max_new_tokens=64)
    lynx.routing_stats(model)      # per MoE layer: distinct experts per decode step, native vs policy
    lynx.remove_(model)            # exactly the original behaviour back

Only the routing step changes. Each supported router module (``mlp.gate`` / ``mlp.router``)
gets a forward hook that re-routes the router's own logits with ``lynx_moe.route`` under the
architecture's native semantics (``_HANDLERS``) and returns ``(logits, weights, ids)`` in the
router's own dtypes; expert execution (``grouped_mm``, ``eager``, ...) stays transformers'.

Which rows vote. The MoE block sees ``[T, D]`` rows and no attention mask, so a forward
pre-hook on the model given to ``apply_`` reads the call's ``input_ids`` / ``attention_mask``
and leaves per-row flags on a small state object that the router hooks read (a forward hook
clears them again). A call is a decode step when every sequence brings one new token and there
is a past (``attention_mask`` longer than the query, else ``past_key_values`` non-empty). In a
decode step a row votes unless its mask position is 0 (padding), it is flagged in ``isolated``
(a per-request opt-out), or its input token is an EOS or pad token: ``generate`` feeds a finished sequence the pad token (the EOS when no pad is set), and
a sequence whose last token is EOS has just finished. Prefill, chunked and speculative calls
(query length > 1) and calls of an inner module alone are routed natively. Rows that do not vote, and
voting rows whose expert set the policy did not change, get the router's own output bit for bit,
so with ``TopK`` the model is exactly the original.

Counting (``stats=True``): per layer and decode step, distinct experts among the voting rows
for the router's own choice and for the final choice, plus changed (row, slot) assignments,
accumulated in one small tensor per layer (no host sync until ``routing_stats``). Rows that
do not vote (finished sequences) still run their native experts and are not counted.

Checked with greedy and beam search, dynamic and static caches, ``grouped_mm`` and ``eager``
experts, fp32 and bf16; a deep copy of a patched model carries its own patch. Not checked:
``torch.compile``d forwards (the hooks keep Python state), accelerate ``device_map`` splits.

Legend: B sequences, T router rows (B x query length), E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..costmodel import CostModel
from ..policies import Policy
from ..routing import distinct_experts, route

__all__ = ["SUPPORTED", "MoeLayer", "moe_layers", "native_routing", "moe_shape", "config_moe_shape", "config_moe_layers", "LayerStats", "apply_", "remove_",
           "applied", "isolated", "routing_stats", "reset_stats"]

_STATE = "_lynx_moe"  # attribute of the patched model (its _State) and of each patched router (its _Layer)


# Router class -> lynx.route keywords reproducing its native routing (read at call time, so a
# changed ``norm_topk_prob`` or a moved bias buffer is followed). All six routers return the
# raw logits as their first output in transformers 5.19 (tests/test_hf.py checks the installed one).
def _softmax(renormalize: bool | None) -> Callable[[nn.Module], dict[str, Any]]:
    def native(m: nn.Module) -> dict[str, Any]:
        norm = m.norm_topk_prob if renormalize is None else renormalize
        return {"renormalize": bool(norm), "scoring": "softmax"}
    return native


def _deepseek_v3(m: nn.Module) -> dict[str, Any]:
    return {"renormalize": bool(m.norm_topk_prob), "scoring": "sigmoid",
            "e_score_correction_bias": m.e_score_correction_bias,
            "num_expert_group": int(m.num_group), "topk_group": int(m.topk_group),
            "routed_scaling_factor": float(m.routed_scaling_factor)}


def _gpt_oss(m: nn.Module) -> dict[str, Any]:
    return {"renormalize": True, "scoring": "softmax_topk"}


_HANDLERS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter": _softmax(True),
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter": _softmax(None),
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter": _softmax(None),
    "transformers.models.olmoe.modeling_olmoe.OlmoeTopKRouter": _softmax(None),
    "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter": _deepseek_v3,
    "transformers.models.gpt_oss.modeling_gpt_oss.GptOssTopKRouter": _gpt_oss,
}
SUPPORTED = ("Mixtral", "Qwen2-MoE", "Qwen3-MoE", "OLMoE", "DeepSeek-V3", "GPT-OSS")


def _handler(module: nn.Module) -> Callable[[nn.Module], dict[str, Any]] | None:
    cls = type(module)
    return _HANDLERS.get(f"{cls.__module__}.{cls.__qualname__}")


class LayerStats(NamedTuple):
    """Decode-step counts of one MoE layer since ``apply_`` / ``reset_stats``."""

    layer: str              # router module name, e.g. "model.layers.3.mlp.gate"
    steps: int              # decode steps in which at least one row voted
    decode_rows: int        # voting rows summed over those steps
    distinct_native: float  # mean distinct experts per step, the router's own choice
    distinct_policy: float  # mean distinct experts per step, after the policy
    changed_share: float    # share of voting (row, slot) assignments the policy changed


# The hooks are module-level functions that find their state through an attribute of the
# module they are on (model -> _State, router -> _Layer -> _State), not closures: a deep copy
# of a patched model then carries its own, working patch (and its own handles).
@dataclass(eq=False)
class _Layer:
    name: str
    router: nn.Module
    native: Callable[[nn.Module], dict[str, Any]]
    state: _State
    policy: Policy                   # this layer's: ``state.policy.for_layer(i)``
    # steps with votes, voting rows, distinct native, distinct policy, changed slots
    counts: torch.Tensor | None = None


@dataclass(eq=False)
class _State:
    policy: Policy
    stats: bool
    stop_ids: torch.Tensor                   # [S] int64 on the CPU; per-device copies below
    gate: CostModel | None = None            # cut only on steps where the cost model predicts a gain
    layers: list[_Layer] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    vote: torch.Tensor | None = None         # [T] bool during a decode call, else None
    isolated: torch.Tensor | None = None     # [B] bool: rows that never vote (``isolated``), moved once
    _stop_on: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def stop_ids_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._stop_on:
            self._stop_on[device] = self.stop_ids.to(device)
        return self._stop_on[device]


def _stop_token_ids(model: nn.Module) -> list[int]:
    """EOS and pad ids from the model's generation config (else its config)."""
    ids: list[int] = []
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        if cfg is None:
            continue
        for attr in ("eos_token_id", "pad_token_id"):
            v = getattr(cfg, attr, None)
            ids += [v] if isinstance(v, int) else list(v or [])
        if ids:
            break
    return sorted(set(ids))


def _decode_votes(state: _State, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Per-row vote flags [B] for a decode call, None for any other call."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    x = input_ids if isinstance(input_ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != 1:
        return None
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if mask is not None:
        past = mask.shape[1] - 1
    else:
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    if past <= 0:  # a one-token prompt is a prefill
        return None
    vote = mask[:, -1] != 0 if mask is not None else torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if isinstance(input_ids, torch.Tensor) and state.stop_ids.numel():
        vote = vote & ~torch.isin(input_ids[:, -1], state.stop_ids_on(input_ids.device))
    if state.isolated is not None:
        if state.isolated.shape != vote.shape:
            raise ValueError(f"lynx.isolated got {state.isolated.numel()} row flags but this call has "
                             f"{vote.numel()} sequences (batch x beams): give one flag per sequence")
        if state.isolated.device != vote.device:   # once per block, not once per decode step
            state.isolated = state.isolated.to(vote.device)
        vote = vote & ~state.isolated
    return vote


def _model_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state: _State = getattr(module, _STATE)
    state.vote = _decode_votes(state, args, kwargs)


def _model_post_hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    getattr(module, _STATE).vote = None


def _router_hook(module: nn.Module, args: tuple, out: Any) -> Any:
    layer: _Layer = getattr(module, _STATE)
    state, vote = layer.state, layer.state.vote
    if vote is None or (not state.stats and layer.policy.kind == "native"):
        return None
    logits, own_w, own_ids = out                                         # [T, E], [T, K], [T, K]
    if logits.dim() != 2 or logits.shape[0] != vote.shape[0]:
        return None  # not one row per sequence: leave it native
    vote = vote.to(logits.device, non_blocking=True)  # a no-op unless layers sit on other devices
    ids = own_ids
    result = None
    if layer.policy.kind != "native":
        policy = layer.policy if state.gate is None else state.gate.at_floor(layer.policy, logits.shape[0])
        r = route(logits, own_ids.shape[1], policy, decode_mask=vote, **layer.native(module))
        new_ids = r.ids.to(own_ids.dtype)
        moved = vote & (new_ids.sort(dim=-1).values != own_ids.sort(dim=-1).values).any(dim=-1)
        if state.gate is not None:   # every row of the call computes: rows = T
            cut = torch.where(moved[:, None], new_ids, own_ids)
            distinct = distinct_experts(torch.stack([own_ids, cut]), None, logits.shape[1])
            moved = moved & state.gate.pays(logits.shape[0], distinct[0], distinct[1])
        ids = torch.where(moved[:, None], new_ids, own_ids)
        result = (logits, torch.where(moved[:, None], r.weights.to(own_w.dtype), own_w), ids)
    if state.stats:
        step = _count(vote, own_ids, ids, logits.shape[1])
        # Out of place: counts made under torch.inference_mode() cannot be updated in place later.
        layer.counts = step if layer.counts is None else layer.counts + step
    return result


def _count(vote: torch.Tensor, own_ids: torch.Tensor, ids: torch.Tensor, E: int) -> torch.Tensor:
    """[5] int64: step has votes, voting rows, distinct experts own / final, changed slots
    (``changed_assignments`` on the voting rows); this runs on every decode call of every layer."""
    distinct = distinct_experts(torch.stack([own_ids, ids]), vote, E)                          # [2]
    moved = ((ids[:, :, None] != own_ids[:, None, :]).all(dim=-1) & vote[:, None]).sum()       # [T, K] -> []
    n = vote.sum()
    return torch.cat([(n > 0).long()[None], n[None], distinct, moved[None]])


class MoeLayer(NamedTuple):
    """One MoE layer of a transformers model, as ``apply_`` sees it."""

    name: str                   # router module name, e.g. "model.layers.3.mlp.gate"
    router: nn.Module
    experts: nn.Module | None   # the routed experts beside the router (``mlp.experts``)
    num_experts: int            # E
    top_k: int                  # K


def native_routing(router: nn.Module) -> dict[str, Any]:
    """The ``lynx.route`` keywords that reproduce a supported router's native routing
    (``scoring``, ``renormalize``, ...); ValueError for a router lynx_moe does not know."""
    handler = _handler(router)
    if handler is None:
        raise ValueError(f"{type(router).__name__} is not a router lynx_moe knows ({', '.join(SUPPORTED)})")
    return handler(router)


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE layer ``apply_`` would patch, in layer order; empty for an unsupported model.
    The one place that knows where transformers keeps routers and experts."""
    modules = dict(model.named_modules())
    return [MoeLayer(name, m, getattr(modules.get(name.rpartition(".")[0]), "experts", None),
                     int(m.num_experts), int(m.top_k))
            for name, m in modules.items() if _handler(m) is not None]


def config_moe_shape(model: str | dict) -> tuple[int, int] | None:
    """``(experts, top-k)`` from a model config (a dict, or a local model folder's
    ``config.json``); None when there is none or it names no routed experts. Used to check a
    policy before a framework loads any weights (``moe_shape`` reads a loaded model)."""
    cfg = model
    if not isinstance(cfg, dict):
        try:
            cfg = json.loads((Path(model).expanduser() / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
    cfg = cfg.get("text_config") or cfg
    E = next((cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts")
              if isinstance(cfg.get(k), int)), None)
    K = cfg.get("num_experts_per_tok")
    return (E, K) if isinstance(E, int) and isinstance(K, int) else None


def config_moe_layers(model: str | dict) -> int | None:
    """Number of MoE layers from a model config (dict or folder), None when unknown: every
    decoder layer, less DeepSeek's leading dense ones (``first_k_dense_replace``,
    ``moe_layer_freq``) and Qwen-MoE's dense ones (``mlp_only_layers``, ``decoder_sparse_step``)."""
    cfg = model
    if not isinstance(cfg, dict):
        try:
            cfg = json.loads((Path(model).expanduser() / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
    cfg = cfg.get("text_config") or cfg
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or config_moe_shape(cfg) is None:
        return None
    first, freq = cfg.get("first_k_dense_replace") or 0, cfg.get("moe_layer_freq") or 1
    dense, step = set(cfg.get("mlp_only_layers") or []), cfg.get("decoder_sparse_step") or 1
    return sum(1 for i in range(n) if i >= first and i % freq == 0 and i not in dense and (i + 1) % step == 0)


def moe_shape(model: nn.Module) -> tuple[int, int]:
    """``(experts, top-k)`` of the model's MoE layers (read from its routers, so it works for
    every supported architecture whatever its config calls them); ValueError if it has none."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(_unsupported(model))
    return layers[0].num_experts, layers[0].top_k


def _unsupported(model: nn.Module) -> str:
    return (f"{type(model).__name__} has no MoE router that lynx_moe can patch; "
            f"supported architectures: {', '.join(SUPPORTED)} (transformers 5.x)")


def apply_(model: nn.Module, policy: Policy, *, stats: bool = True,
           stop_token_ids: Iterable[int] | None = None, gate: CostModel | None = None) -> nn.Module:
    """Route ``model``'s decode steps with ``policy``, in place; returns ``model``.

    Applying again replaces the policy (and starts fresh statistics). ``stats=False`` skips
    the counting. ``stop_token_ids``: tokens that mark a finished sequence (default: the EOS and
    pad ids of ``model.generation_config``); pass them if you give ``generate`` other ones.
    ``gate``: a calibrated ``lynx_moe.costmodel.CostModel``; a decode step keeps the policy's
    routing only where it predicts a gain (``lynx bench --calibrate FILE``, ``load_cost_model``).
    Raises ValueError, leaving the model as it was, for a model without a supported router.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a lynx_moe policy (e.g. lynx.AffinityBinning()), got {policy!r}")
    routers = [(layer.name, layer.router) for layer in moe_layers(model)]
    if not routers:
        raise ValueError(_unsupported(model))
    mine = getattr(model, _STATE, None)
    policy.check_layers(len(routers))
    for i, (name, router) in enumerate(routers):
        policy.for_layer(i).check_top_k(int(router.top_k))
        owner = getattr(router, _STATE, None)
        if owner is not None and owner.state is not mine:
            raise ValueError(f"{name} is already patched through another module (an outer or inner "
                             "model): lynx.remove_ that one first")
    stop = _stop_token_ids(model) if stop_token_ids is None else [int(t) for t in stop_token_ids]
    remove_(model)
    if gate is not None and not isinstance(gate, CostModel):
        raise ValueError(f"gate must be a lynx_moe.costmodel.CostModel (load_cost_model(FILE)), got {gate!r}")
    state = _State(policy, bool(stats), torch.tensor(stop, dtype=torch.long), gate)
    setattr(model, _STATE, state)
    state.handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
    state.handles.append(model.register_forward_hook(_model_post_hook, with_kwargs=True, always_call=True))
    for i, (name, router) in enumerate(routers):
        layer = _Layer(name, router, _handler(router), state, policy.for_layer(i))
        state.layers.append(layer)
        setattr(router, _STATE, layer)
        state.handles.append(router.register_forward_hook(_router_hook))
    return model


def remove_(model: nn.Module) -> nn.Module:
    """Undo ``apply_``: the model behaves exactly as before. A no-op on an unpatched model."""
    state: _State | None = getattr(model, _STATE, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        for layer in state.layers:
            delattr(layer.router, _STATE)
        delattr(model, _STATE)
    return model


@contextlib.contextmanager
def applied(model: nn.Module, policy: Policy, **kwargs: Any) -> Iterator[nn.Module]:
    """``apply_`` for the ``with`` block; afterwards the model is as before (a policy that was
    already applied comes back, with fresh statistics)."""
    before: _State | None = getattr(model, _STATE, None)
    apply_(model, policy, **kwargs)
    try:
        yield model
    finally:
        remove_(model)
        if before is not None:
            apply_(model, before.policy, stats=before.stats, stop_token_ids=before.stop_ids.tolist(), gate=before.gate)


@contextlib.contextmanager
def isolated(model: nn.Module, rows: Any) -> Iterator[nn.Module]:
    """Inside the block, the sequences flagged True in ``rows`` (``[B]`` bool, one per sequence of
    each call: batch x beams for beam search) are routed natively and do not vote, in every layer
    and step: their outputs are exactly the unpatched model's, whatever they are batched with
    (no request is changed by others against its will). The others keep the policy::

        with lynx.isolated(model, [True, False, False, True]):
            model.generate(**batch)
    """
    state = _state(model)
    mask = torch.as_tensor(rows, dtype=torch.bool).cpu()
    if mask.dim() != 1:
        raise ValueError(f"rows must be one bool flag per sequence ([B]), got shape {tuple(mask.shape)}")
    before, state.isolated = state.isolated, mask
    try:
        yield model
    finally:
        state.isolated = before


def _state(model: nn.Module) -> _State:
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("no lynx_moe policy is applied to this model: call lynx.apply_(model, policy) first")
    return state


def routing_stats(model: nn.Module) -> list[LayerStats]:
    """Per MoE layer, the decode steps counted since ``apply_`` or ``reset_stats`` (one host
    sync). Means are over steps in which at least one row voted."""
    state = _state(model)
    if not state.stats:
        raise ValueError("statistics are off for this model: apply_(model, policy, stats=True)")
    out = []
    for layer in state.layers:
        c = [0] * 5 if layer.counts is None else layer.counts.tolist()
        steps, rows, nat, pol, changed = c
        k = int(layer.router.top_k)
        out.append(LayerStats(layer.name, steps, rows, nat / max(steps, 1), pol / max(steps, 1),
                              changed / max(rows * k, 1)))
    return out


def reset_stats(model: nn.Module) -> None:
    """Zero the counts of ``routing_stats``."""
    for layer in _state(model).layers:
        layer.counts = None
