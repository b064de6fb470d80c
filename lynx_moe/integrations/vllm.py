"""vLLM general plugin: batch-aware expert selection inside vLLM's own MoE layers.

Enable it with an environment variable (read in every vLLM process); without one it does
nothing:

    LYNX_POLICY="affinity_binning:alpha=3,beta=4" python my_script.py   # uses vllm.LLM
    lynx serve MODEL --policy affinity_binning:alpha=3,beta=4           # sets it for the server
    LYNX_POLICY=preset ...           # the authors' preset for each layer's experts x top-k
    LYNX_POLICY_FILE=lynx.json ...   # per-model settings, see ``load_settings``
    LYNX_STATS_EVERY=200             # log distinct experts every N forward steps (0: never)

Why this seam: in vLLM 0.32 every modular MoE path, on every model, routes through
``FusedMoERouter.select_experts`` in the Worker process (the CPU router ignores
``custom_routing_function`` on grouped models). The plugin wraps that method: vLLM routes
first, then ``lynx.route`` re-routes with the layer's own semantics (renormalize, scoring,
grouped top-k, score bias, scaling factor read from the router). Rows that do not vote,
rows whose expert set the policy left alone, and every row under ``TopK`` keep vLLM's own
result untouched.

Phase awareness: a row votes when it is a valid decode token. The forward context's
attention metadata gives, per request, ``query_start_loc`` and ``seq_lens``; a request is
decoding when it feeds one token on top of an existing context (query length 1, seq_len
> 1), which is vLLM's own decode split (``split_decodes_and_prefills``, threshold 1). Rows at
or beyond ``num_actual_tokens`` and rows flagged by ``ForwardContext.is_padding`` are padding.
Without attention metadata (profiling and dummy runs) and under data/sequence parallel MoE
(where rows are gathered across ranks) every row is routed natively.

From the driver, through ``LLM.collective_rpc`` (methods this plugin adds to vLLM's worker):
``stats(llm)`` reads distinct experts per layer per decode step, native vs policy, and
``set_policy(llm, spec)`` switches the policy at run time (the interleaved benchmark).

Under ``torch.compile`` the re-routing runs as an opaque custom op (``lynx_moe::vllm_route``)
so its Python bookkeeping stays out of the graph and run-time switches still apply.

Legend: T router rows, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..policies import Policy, TopK, parse_policy, policy_from_dict
from ..presets import for_shape
from ..routing import distinct_experts, route
from .hf import config_moe_shape

__all__ = ["register", "Settings", "load_settings", "parse_spec", "check_spec", "decode_and_valid_masks", "stats",
           "set_policy", "PRESET", "SUPPORTED_VLLM"]

SUPPORTED_VLLM = ("0.32.",)
PRESET = "preset"   # a spec meaning "the authors' preset for this layer's shape"
_ENV_POLICY, _ENV_FILE, _ENV_EVERY = "LYNX_POLICY", "LYNX_POLICY_FILE", "LYNX_STATS_EVERY"

Spec = Policy | str   # a Policy or PRESET


def parse_spec(value: Any, where: str = "policy") -> Spec:
    """A spec string, ``"preset"`` or a policy dict -> Policy or PRESET; ValueError names ``where``.

    ``"preset"`` stands for ``lynx.presets.for_shape(E, K)``, chosen per layer."""
    try:
        if isinstance(value, str) and value.strip().lower() == PRESET:
            return PRESET
        if isinstance(value, dict):
            return policy_from_dict(value)
        if isinstance(value, str):
            return parse_policy(value)
        raise ValueError(f"expected a policy spec string or a policy dict, got {value!r}")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the environment asks for: a default spec, per-model specs, the log period."""

    default: Spec | None = None
    models: tuple[tuple[str, Spec], ...] = ()   # (pattern, spec): exact, basename or glob
    stats_every: int = 200

    def spec_for(self, model: str | None) -> Spec | None:
        """The spec for a model name or path (first matching pattern), else the default."""
        if model:
            names = {model, Path(model.rstrip("/")).name}
            for pattern, spec in self.models:
                if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
                    return spec
        return self.default


def load_settings(environ: dict[str, str] | None = None) -> Settings | None:
    """Read ``LYNX_POLICY`` / ``LYNX_POLICY_FILE`` / ``LYNX_STATS_EVERY``; None when neither
    policy variable is set. Raises ValueError naming the variable and the problem.

    The file is JSON: ``{"default": "topk", "models": {"lynx-ref-moe": "affinity_binning:
    alpha=3,beta=4", "Qwen3-*": {"policy": "oea", "k0": 4}}, "stats_every": 100}``. Model
    keys match the served model's name or path, its last path component, or a glob.
    ``LYNX_POLICY``, when also set, replaces the file's default.
    """
    env = os.environ if environ is None else environ
    spec_text, file_name = env.get(_ENV_POLICY, "").strip(), env.get(_ENV_FILE, "").strip()
    if not spec_text and not file_name:
        return None
    default: Spec | None = None
    models: list[tuple[str, Spec]] = []
    every_raw: Any = env.get(_ENV_EVERY)
    if file_name:
        try:
            data = json.loads(Path(file_name).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{_ENV_FILE}={file_name!r}: cannot read it as JSON: {e}") from None
        unknown = sorted(set(data) - {"default", "models", "stats_every"}) if isinstance(data, dict) else None
        if unknown is None or unknown or not isinstance(data.get("models", {}), dict):
            raise ValueError(f"{_ENV_FILE}={file_name!r}: expected an object with keys 'default', "
                             f"'models' (an object: model -> policy) and 'stats_every'; got {unknown or data!r}")
        if data.get("default") is not None:
            default = parse_spec(data["default"], f"{_ENV_FILE} default")
        models = [(k, parse_spec(v, f"{_ENV_FILE} model {k!r}")) for k, v in data.get("models", {}).items()]
        every_raw = every_raw if every_raw is not None else data.get("stats_every")
    if spec_text:
        default = parse_spec(spec_text, f"{_ENV_POLICY}={spec_text!r}")
    every = 200 if every_raw is None else every_raw
    try:
        every = int(every)
        if every < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{_ENV_EVERY}: expected an integer >= 0 (0: no log), got {every_raw!r}") from None
    return Settings(default, tuple(models), every)


def check_spec(spec: Spec | None, shape: tuple[int, int] | None) -> None:
    """ValueError (the message ``apply_`` gives) when a policy cannot run on a model of this
    ``(experts, top-k)``; a no-op for ``preset`` (chosen per layer) or an unknown shape."""
    if isinstance(spec, Policy) and shape is not None:
        spec.check_top_k(shape[1])


# ---------------------------------------------------------------------------------------------
# Which rows vote


def decode_and_valid_masks(
    num_rows: int,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_actual_tokens: int | None = None,
    is_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(decode[T], valid[T])`` for one forward step, from attention metadata.

    Rows are laid out request by request: request ``r`` owns rows ``query_start_loc[r]``
    up to ``query_start_loc[r+1]``. A request decodes when it feeds exactly one token on top
    of an existing context (``seq_lens[r] > 1``); prefill and chunked-prefill rows, and the
    single row of a one-token prompt, do not. Rows at or beyond ``num_actual_tokens`` (or
    beyond the last request) and rows flagged in ``is_padding`` are not valid.
    """
    qsl = query_start_loc.to("cpu", torch.long)
    q = qsl[1:] - qsl[:-1]                                                        # [R]
    lens = seq_lens.to("cpu", torch.long)[: q.numel()]
    req_decode = (q == 1) & (lens > 1)
    row_decode = torch.repeat_interleave(req_decode, q.clamp_min(0))             # [rows of requests]
    n = int(qsl[-1]) if qsl.numel() else 0
    if num_actual_tokens is not None:
        n = min(n, int(num_actual_tokens))
    n = min(n, num_rows, row_decode.numel())
    valid = torch.arange(num_rows) < n
    if is_padding is not None:
        pad = is_padding.to("cpu", torch.bool)[:num_rows]
        valid[: pad.numel()] &= ~pad
    decode = torch.zeros(num_rows, dtype=torch.bool)
    decode[:n] = row_decode[:n]
    return decode & valid, valid


# ---------------------------------------------------------------------------------------------
# Per-layer semantics and statistics (Worker process)


@dataclasses.dataclass
class _Layer:
    """One router: its native routing semantics, or why lynx cannot re-route it."""

    index: int
    model: str | None
    router: Any
    described: bool = False
    top_k: int = 0
    num_experts: int = 0
    scoring: str = "softmax"
    grouped: bool = False
    unsupported: str | None = None
    # statistics over steps where at least one row voted
    steps: int = 0
    native_sum: int = 0
    policy_sum: int = 0
    changed: int = 0
    voters: int = 0
    mixed: int = 0        # steps where some valid rows voted and others (prefill) did not

    def native_kwargs(self) -> dict[str, Any]:
        r = self.router
        kw: dict[str, Any] = dict(renormalize=bool(r.renormalize), scoring=self.scoring)
        if self.grouped:
            kw.update(e_score_correction_bias=r.e_score_correction_bias,
                      num_expert_group=r.num_expert_group, topk_group=r.topk_group,
                      routed_scaling_factor=float(r.routed_scaling_factor))
        return kw


def _describe(layer: _Layer) -> None:
    """Read the router's semantics (once, at its first call: subclasses set them after
    ``FusedMoERouter.__init__``, where the layer was registered)."""
    router = layer.router
    layer.top_k, layer.num_experts = int(router.top_k), int(getattr(router, "global_num_experts", 0))
    scoring = getattr(router, "scoring_func", "softmax")
    grouped = bool(getattr(router, "use_grouped_topk", False))
    if getattr(router, "eplb_state", None) is not None:
        layer.unsupported = "expert-parallel load balancing (ids are physical replicas)"
    elif getattr(router, "custom_routing_function", None) is not None:
        layer.unsupported = "a model-specific custom_routing_function"
    elif not hasattr(router, "renormalize"):
        layer.unsupported = f"router class {type(router).__name__}"
    elif grouped and (scoring != "sigmoid" or getattr(router, "e_score_correction_bias", None) is None):
        layer.unsupported = f"grouped top-k with scoring {scoring!r} and no score bias"
    elif not grouped and scoring != "softmax":
        layer.unsupported = f"scoring {scoring!r}"
    layer.scoring, layer.grouped, layer.described = scoring, grouped, True


class _Rows(NamedTuple):
    """One forward step's rows: who votes, and the facts every layer's statistics need."""

    decode: torch.Tensor   # [T] bool, valid decode rows
    valid: torch.Tensor    # [T] bool
    voters: int
    mixed: bool            # some valid rows are prefill rows


def _distinct(id_sets: tuple[torch.Tensor, ...], valid: torch.Tensor, E: int) -> list[int]:
    """Distinct experts over the valid rows of each ``[T, K]`` id tensor (one host read)."""
    return distinct_experts(torch.stack(id_sets), valid, E).tolist()


class _State:
    """Everything the plugin holds in one process: settings, the layers seen, statistics."""

    def __init__(self, settings: Settings, logger: Any) -> None:
        self.settings = settings
        self.log = logger
        self.override: Spec | None = None   # set by RPC; wins over the settings
        self.layers: list[_Layer] = []
        self.steps = 0
        self._last_meta: Any = None
        self._rows: _Rows | None = None
        self._warned: set[str] = set()
        self._window: dict[int, list[int]] = {}

    def add_layer(self, router: Any, model: str | None, shape: tuple[int, int] | None = None) -> int:
        """Register a router as vLLM builds the model; the first one of a model checks the
        configured policy against the model's top-k (ValueError: the model does not load)."""
        if not any(L.model == model for L in self.layers):
            check_spec(self.settings.spec_for(model), shape)
        self.layers.append(_Layer(len(self.layers), model, router))
        return len(self.layers) - 1

    def policy_for(self, layer: _Layer) -> Policy:
        spec = self.override if self.override is not None else self.settings.spec_for(layer.model)
        if spec is None:
            return TopK()
        if spec == PRESET:
            return for_shape(layer.num_experts, layer.top_k)[1]
        return spec  # type: ignore[return-value]

    def warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            self.log.warning("lynx-moe: routing natively where %s", reason)

    def rows(self, T: int, device: torch.device) -> _Rows | None:
        """Which of this step's ``T`` rows vote, computed once per forward step (every MoE layer
        of a step sees the same rows); None: route every row natively."""
        from vllm.forward_context import get_forward_context, is_forward_context_available
        if not is_forward_context_available():
            return None
        fc = get_forward_context()
        meta = fc.attn_metadata
        if meta is None or fc.dp_metadata is not None or isinstance(meta, list):
            if fc.dp_metadata is not None:
                self.warn_once("rows are gathered across data/sequence-parallel ranks")
            return None
        if meta is not self._last_meta:   # a new forward step
            self._last_meta, self._rows = meta, None
            self.steps += 1
            self._maybe_log()
        if self._rows is not None and self._rows.decode.shape[0] == T:
            return self._rows
        first = next((m for m in meta.values() if hasattr(m, "query_start_loc") and hasattr(m, "seq_lens")), None)
        if first is None:
            self.warn_once("the attention metadata has no query_start_loc/seq_lens")
            return None
        decode, valid = decode_and_valid_masks(
            T, first.query_start_loc, first.seq_lens,
            getattr(first, "num_actual_tokens", None), fc.is_padding)
        self._rows = _Rows(decode.to(device), valid.to(device), int(decode.sum()), bool((valid & ~decode).any()))
        return self._rows

    def apply(self, layer: _Layer, logits: torch.Tensor, w: torch.Tensor,
              ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-route one layer; returns vLLM's own tensors wherever the policy changes nothing."""
        if not layer.described:
            _describe(layer)
        if layer.unsupported:
            self.warn_once(layer.unsupported)
            return w, ids
        rows = self.rows(logits.shape[0], logits.device)
        if rows is None or rows.voters == 0:
            return w, ids
        policy = self.policy_for(layer)
        try:
            policy.check_top_k(layer.top_k)
        except ValueError as e:   # e.g. static_k:k=4 on a top-2 layer: serve natively, say so once
            self.warn_once(f"{policy} cannot run on a top-{layer.top_k} layer ({e})")
            return w, ids
        E = layer.num_experts or logits.shape[1]
        if policy.kind == "native":
            [native_d] = _distinct((ids,), rows.valid, E)
            self._record(layer, native_d, native_d, 0, rows)
            return w, ids
        r = route(logits, layer.top_k, policy, decode_mask=rows.decode, valid_mask=rows.valid,
                  **layer.native_kwargs())
        # Compare with vLLM's own choice: a row whose expert set is unchanged keeps vLLM's result.
        kept = (r.ids[:, :, None] == ids[:, None, :].long()).any(dim=-1)           # [T, K]
        take = r.vote & ~kept.all(dim=-1)                                           # [T]
        new_ids = torch.where(take[:, None], r.ids.to(ids.dtype), ids)
        new_w = torch.where(take[:, None], r.weights.to(w.dtype), w)
        native_d, policy_d = _distinct((ids, new_ids), rows.valid, E)
        self._record(layer, native_d, policy_d, int((~kept & take[:, None]).sum()), rows)
        return new_w, new_ids

    def _record(self, layer: _Layer, native_d: int, policy_d: int, changed: int, rows: _Rows) -> None:
        layer.steps += 1
        layer.mixed += rows.mixed
        layer.native_sum += native_d
        layer.policy_sum += policy_d
        layer.changed += changed
        layer.voters += rows.voters
        acc = self._window.setdefault(layer.index, [0, 0, 0])
        acc[0] += 1
        acc[1] += native_d
        acc[2] += policy_d

    def _maybe_log(self) -> None:
        every = self.settings.stats_every
        if not every or self.steps % every or not self._window:
            return
        per = [(n / s, p / s) for s, n, p in (self._window[i] for i in sorted(self._window))]
        nat, pol = (sum(x[j] for x in per) / len(per) for j in (0, 1))
        self.log.info("lynx-moe: %d steps, %s: distinct experts per decode step (mean over %d layers) "
                      "native %.1f -> policy %.1f; per layer %s", self.steps, self.describe_policy(),
                      len(per), nat, pol, " ".join(f"{a:.0f}/{b:.0f}" for a, b in per))
        self._window.clear()

    def describe_policy(self) -> str:
        spec = self.override if self.override is not None else self.settings.default
        extra = f" (+{len(self.settings.models)} per-model)" if self.settings.models and self.override is None else ""
        if spec == PRESET:   # say what the preset means for the model's layers
            for L in self.layers:
                if not L.described:
                    _describe(L)
            meant = sorted({str(for_shape(L.num_experts, L.top_k)[1]) for L in self.layers})
            spec = f"preset = {' / '.join(meant)}" if meant else PRESET
        return f"{spec if spec is not None else TopK()}{extra}"

    def snapshot(self, reset: bool) -> dict[str, Any]:
        layers = [{"layer": L.index, "model": L.model, "num_experts": L.num_experts, "top_k": L.top_k,
                   "policy": str(self.policy_for(L)) if L.described else None, "unsupported": L.unsupported,
                   "decode_steps": L.steps, "mixed_steps": L.mixed, "voting_rows": L.voters, "changed_assignments": L.changed,
                   "native_distinct_mean": L.native_sum / L.steps if L.steps else None,
                   "policy_distinct_mean": L.policy_sum / L.steps if L.steps else None}
                  for L in self.layers]
        seen = [x for x in layers if x["decode_steps"]]
        mean = (lambda key: sum(x[key] for x in seen) / len(seen) if seen else None)
        out = {"pid": os.getpid(), "policy": self.describe_policy(), "steps": self.steps, "layers": layers,
               "native_distinct_mean": mean("native_distinct_mean"),
               "policy_distinct_mean": mean("policy_distinct_mean")}
        if reset:
            for L in self.layers:
                L.steps = L.native_sum = L.policy_sum = L.changed = L.voters = L.mixed = 0
            self._window.clear()
        return out


# ---------------------------------------------------------------------------------------------
# Installation into vLLM

_STATE: _State | None = None


def _check_version() -> None:
    import vllm
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"lynx-moe's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)} "
            f"(pip install lynx-moe[vllm]); found vLLM {version}. Unset {_ENV_POLICY}/{_ENV_FILE} "
            "to run vLLM without lynx-moe.")


def _current_model() -> tuple[str | None, tuple[int, int] | None]:
    """The model being built (name or path) and its ``(experts, top-k)`` from its config."""
    from vllm.config import get_current_vllm_config_or_none
    cfg = get_current_vllm_config_or_none()
    model_config = getattr(cfg, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    shape = config_moe_shape(hf_config.to_dict()) if hasattr(hf_config, "to_dict") else None
    return getattr(model_config, "model", None), shape


def _install(logger: Any) -> None:
    """Wrap ``FusedMoERouter.__init__`` (to learn each layer and its model) and
    ``select_experts`` (to re-route), once per process; add the RPC methods to the worker."""
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter
    from vllm.v1.worker.worker_base import WorkerBase

    if getattr(FusedMoERouter.select_experts, "__lynx_wrapped__", False):
        return
    init, select = FusedMoERouter.__init__, FusedMoERouter.select_experts
    op = _route_op()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._lynx_layer = None if _STATE is None else _STATE.add_layer(self, *_current_model())

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, *, input_ids=None):
        w, ids = select(self, hidden_states, router_logits, topk_indices_dtype, input_ids=input_ids)
        state, index = _STATE, getattr(self, "_lynx_layer", None)
        if state is None or index is None:
            return w, ids
        if torch.compiler.is_compiling():
            return op(router_logits, w, ids, index)
        w2, ids2 = state.apply(state.layers[index], router_logits, w, ids)
        if ids2 is not ids and self._routing_replay_out is not None:
            self._routing_replay_out[: ids2.shape[0]].copy_(ids2.to(torch.int16))
        return w2, ids2

    select_experts.__lynx_wrapped__ = True  # type: ignore[attr-defined]
    FusedMoERouter.__init__ = __init__
    FusedMoERouter.select_experts = select_experts
    WorkerBase.lynx_stats = lambda self, reset=False: _STATE.snapshot(bool(reset)) if _STATE else None
    WorkerBase.lynx_set_policy = lambda self, spec=None: _set_local_policy(spec)


def _route_op():
    """The compiled-graph form of ``_State.apply``: an opaque custom op (defined once)."""
    if hasattr(torch.ops.lynx_moe, "vllm_route"):
        return torch.ops.lynx_moe.vllm_route

    @torch.library.custom_op("lynx_moe::vllm_route", mutates_args=())
    def vllm_route(logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, i = _STATE.apply(_STATE.layers[layer], logits, weights, ids)
        return (w.clone() if w is weights else w), (i.clone() if i is ids else i)

    @vllm_route.register_fake
    def _(logits, weights, ids, layer):
        return torch.empty_like(weights), torch.empty_like(ids)

    return vllm_route


def _set_local_policy(spec: str | dict | None) -> str:
    if _STATE is None:
        raise RuntimeError(f"lynx-moe is not enabled in this process: set {_ENV_POLICY} (e.g. 'topk')")
    new = None if spec is None else parse_spec(spec, "set_policy")
    if isinstance(new, Policy):
        for layer in _STATE.layers:   # refuse here rather than fail inside a forward pass
            if not layer.described:
                _describe(layer)
            if not layer.unsupported:
                new.check_top_k(layer.top_k)
    _STATE.override = new
    _STATE._window.clear()
    return _STATE.describe_policy()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: a no-op unless a policy is configured; safe
    to call repeatedly and in every vLLM process. A bad setting raises ValueError."""
    global _STATE
    settings = load_settings()
    if settings is None:
        return
    _check_version()
    from vllm.logger import init_logger
    logger = init_logger("vllm.lynx_moe")
    _install(logger)
    if _STATE is not None:
        if _STATE.settings == settings:
            return
        _STATE.settings = settings   # keep the layers already registered
    else:
        _STATE = _State(settings, logger)
    per_model = ", ".join(f"{k}: {v}" for k, v in settings.models)
    logger.info("lynx-moe: batch-aware expert selection enabled in pid %d: policy %s%s; decode rows only, "
                "stats every %s steps", os.getpid(), settings.default if settings.default is not None else TopK(),
                f"; per model {{{per_model}}}" if per_model else "", settings.stats_every or "no")


# ---------------------------------------------------------------------------------------------
# Driver side


def stats(llm: Any, reset: bool = False) -> list[dict[str, Any]]:
    """Per-worker statistics (one dict per worker): distinct experts per layer per decode step,
    native vs policy, changed assignments. ``reset`` zeroes the counters after reading."""
    return llm.collective_rpc("lynx_stats", args=(reset,))


def set_policy(llm: Any, spec: str | dict | Policy | None) -> list[str]:
    """Switch every worker's policy at run time (None: back to the configured one). A bad spec,
    or a policy the model's top-k cannot run, raises ValueError here, in the driver, with the
    message ``apply_`` gives; the engine is left as it was."""
    if isinstance(spec, Policy):
        spec = str(spec)
    if spec is not None:
        parsed = parse_spec(spec, "set_policy")
        hf_config = llm.llm_engine.model_config.hf_config
        check_spec(parsed, config_moe_shape(hf_config.to_dict()))
    return llm.collective_rpc("lynx_set_policy", args=(spec,))
