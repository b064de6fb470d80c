"""vLLM general plugin: batch-aware expert selection inside vLLM's own MoE layers.

Enable it with an environment variable (read in every vLLM process); without one it does
nothing:

    LYNX_POLICY="affinity_binning:alpha=3,beta=4" python my_script.py   # uses vllm.LLM
    lynx serve MODEL --policy affinity_binning:alpha=3,beta=4           # sets it for the server
    LYNX_POLICY=preset ...           # the authors' preset for each layer's experts x top-k
    LYNX_POLICY_FILE=lynx.json ...   # per-model settings, see ``load_settings``
    LYNX_STATS_EVERY=200             # log distinct experts every N forward steps (0: never)
    LYNX_DEFAULT=off                 # requests are routed natively unless they ask for lynx
    LYNX_GATE_FILE=gate.json         # cut only where the calibrated cost model predicts a gain

Per request (``SamplingParams.extra_args``, or ``extra_body={"vllm_xargs": {...}}`` through
the OpenAI server): ``{"lynx": "off"}`` routes that request natively in every layer and keeps
it out of the vote, so its output is what vLLM gives without the plugin, whatever it is
batched with; ``{"lynx": "on"}`` opts in where ``LYNX_DEFAULT=off``. Other values are
refused when the request is made (a 400 from the server).

How it runs, per forward step (the design that survives a GPU, CUDA graphs and compilation):
1. Before the model runs, the model runner's input preparation (CPU side) computes one flag
   per row: the row votes when its request decodes (one new token on top of a cached
   context, vLLM's own decode split) and has not opted out. The flags are written into a
   persistent, fixed-size buffer on the device (``_Rows``: ``[2, max_num_batched_tokens]``,
   vote and valid), padding rows False. Dummy, profile and capture runs clear it.
2. Every MoE layer reads that buffer and runs ``reroute``: tensor code only, no host sync,
   no data-dependent shape or Python branch. It takes vLLM's own native ``(weights, ids)``
   (``route(..., native=)``; no second native top-k) and gives back vLLM's own tensors for
   every row the policy leaves alone, so ``topk`` is bit-identical to vLLM without the plugin.
   Under torch.compile it is traced into the graph; a captured CUDA graph replays it and
   reads the buffer's new contents at every replay.
3. Statistics (distinct experts native vs policy, changed assignments) accumulate in device
   tensors; they are read only by ``stats(llm)`` and by the periodic log, between steps.

Where rows are gathered across ranks (data parallel, prefill context parallel, sequence-
parallel MoE) the local flags do not describe the router's rows: every row is routed
natively, with a warning. Speculative-decoding steps feed several tokens per request, so
they do not vote either.

From the driver, through ``LLM.collective_rpc`` (methods this plugin adds to vLLM's worker):
``stats(llm)`` reads the statistics and ``set_policy(llm, spec)`` switches the policy at run
time (the interleaved benchmark; eager engines only, as a compiled or captured graph holds
the policy it was traced with).

Every line that touches vLLM's internals is in the section "The vLLM seam" below.

Legend: T router rows, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

import torch

from ..costmodel import CostModel, load_cost_model
from ..policies import Policy, TopK, parse_policy, policy_from_dict
from ..presets import PRESET, for_shape
from ..routing import distinct_experts, route
from .hf import config_moe_layers, config_moe_shape

__all__ = ["PRESET", "REQUEST_KEY", "SUPPORTED_VLLM", "Settings", "check_request", "check_spec", "load_settings",
           "parse_spec", "register", "reroute", "set_policy", "stats", "step_rows"]

SUPPORTED_VLLM = ("0.32.",)
_ENV_POLICY, _ENV_FILE, _ENV_EVERY, _ENV_DEFAULT = "LYNX_POLICY", "LYNX_POLICY_FILE", "LYNX_STATS_EVERY", "LYNX_DEFAULT"
_ENV_GATE = "LYNX_GATE_FILE"
REQUEST_KEY, REQUEST_VALUES = "lynx", ("on", "off")   # SamplingParams.extra_args["lynx"]

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
    requests_default: str = "on"                # "off": requests vote only with extra_args {"lynx": "on"}
    gate: CostModel | None = None               # lynx_moe.costmodel: cut only where it pays

    def spec_for(self, model: str | None) -> Spec | None:
        """The spec for a model name or path (first matching pattern), else the default."""
        if model:
            names = {model, Path(model.rstrip("/")).name}
            for pattern, spec in self.models:
                if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
                    return spec
        return self.default


def load_settings(environ: dict[str, str] | None = None) -> Settings | None:
    """Read ``LYNX_POLICY`` / ``LYNX_POLICY_FILE`` / ``LYNX_STATS_EVERY`` / ``LYNX_DEFAULT`` /
    ``LYNX_GATE_FILE``;
    None when neither policy variable is set. Raises ValueError naming the variable and the problem.

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
        unknown = sorted(set(data) - {"default", "models", "stats_every", "tuned"}) if isinstance(data, dict) else None
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
    requests_default = env.get(_ENV_DEFAULT, "on").strip().lower() or "on"
    if requests_default not in REQUEST_VALUES:
        raise ValueError(f"{_ENV_DEFAULT}: expected one of {', '.join(REQUEST_VALUES)} (the routing of requests "
                         f"that do not set extra_args {{{REQUEST_KEY!r}: ...}}), got {env[_ENV_DEFAULT]!r}")
    gate_file = env.get(_ENV_GATE, "").strip()
    try:
        gate = load_cost_model(gate_file) if gate_file else None
    except ValueError as e:
        raise ValueError(f"{_ENV_GATE}={gate_file!r}: {e}") from None
    return Settings(default, tuple(models), every, requests_default, gate)


def check_spec(spec: Spec | None, shape: tuple[int, int] | None, layers: int | None = None) -> None:
    """ValueError (the message ``apply_`` gives) when a policy cannot run on a model of this
    ``(experts, top-k)`` and number of MoE layers; a no-op for ``preset`` (chosen per layer) or
    an unknown shape."""
    if isinstance(spec, Policy):
        if layers is not None:
            spec.check_layers(layers)
        if shape is not None:
            spec.check_top_k(shape[1])


def check_request(extra_args: dict[str, Any] | None) -> None:
    """ValueError unless a request's ``extra_args["lynx"]`` is absent, "on" or "off"."""
    value = (extra_args or {}).get(REQUEST_KEY)
    if value is not None and value not in REQUEST_VALUES:
        raise ValueError(f"extra_args {REQUEST_KEY!r} (vllm_xargs through the OpenAI server) must be one of "
                         f"{', '.join(repr(v) for v in REQUEST_VALUES)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Which rows vote: once per forward step, on the host, into a persistent device buffer


def step_rows(num_scheduled: np.ndarray, num_computed: np.ndarray, num_prompt: np.ndarray,
              isolated: np.ndarray) -> np.ndarray:
    """One forward step's vote flag per row, from the scheduler's per-request counts.

    Rows are laid out request by request, ``num_scheduled[r]`` rows each. A request votes
    when it decodes: it feeds exactly one token and its whole prompt is already cached
    (``num_computed[r] >= num_prompt[r]``), and it is not ``isolated``. Prefill and
    chunked-prefill rows (a last chunk of one token too, whose output is the first generated
    token), the single row of a one-token prompt and speculative-decoding rows do not vote.
    """
    q = np.asarray(num_scheduled, dtype=np.int64)
    decodes = (q == 1) & (np.asarray(num_computed) >= np.asarray(num_prompt))
    votes = decodes & ~np.asarray(isolated, dtype=bool)
    return np.repeat(votes, np.maximum(q, 0))


class _Rows:
    """The per-step row flags every MoE layer reads: ``[2, size]`` bool (vote, valid), fixed
    size and address, on the device; a pinned host twin is written, then copied whole."""

    def __init__(self, size: int, device: torch.device) -> None:
        with torch.inference_mode(False):   # mutable runtime state, like vLLM's own step buffers
            on_cpu = device.type == "cpu"
            self.host = torch.zeros(2, size, dtype=torch.bool, pin_memory=not on_cpu and torch.cuda.is_available())
            self.device = self.host if on_cpu else torch.zeros(2, size, dtype=torch.bool, device=device)
        self.np = self.host.numpy()
        self.used = 0

    def write(self, vote: np.ndarray) -> tuple[int, int]:
        """Rows ``[0, len(vote))`` are this step's; the rest are padding. Returns (voters, valid)."""
        n, size = len(vote), self.np.shape[1]
        if n > size:
            raise RuntimeError(f"lynx-moe: a step of {n} rows exceeds the {size}-row flag buffer "
                               "(max_num_batched_tokens); please report this")
        end = max(n, self.used)
        self.np[0, :n], self.np[1, :n] = vote, True
        self.np[:, n:end] = False
        self.used = n
        if self.device is not self.host:   # the caller runs inside vLLM's input-prep synchronisation
            self.device.copy_(self.host, non_blocking=True)
        return int(vote.sum()), n

    def view(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self.device.shape[1]:
            raise RuntimeError(f"lynx-moe: a MoE layer saw {T} rows, more than the {self.device.shape[1]}-row "
                               "flag buffer (max_num_batched_tokens); please report this")
        return self.device[0, :T], self.device[1, :T]


# ---------------------------------------------------------------------------------------------
# The per-layer path: tensor code only


def reroute(logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, vote: torch.Tensor,
            valid: torch.Tensor, sums: torch.Tensor | None, *, policy: Policy, top_k: int, num_experts: int,
            native_kwargs: dict[str, Any], gate: CostModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``policy`` to one MoE layer of one step, given vLLM's native ``(weights, ids)``.

    ``vote``/``valid`` ``[T]`` come from the step's flag buffer. Rows that do not vote, and
    voting rows whose expert set the policy left alone, keep vLLM's own values (so ``topk``
    returns vLLM's tensors themselves). ``sums`` ``[4]`` int64, if given, accumulates on the
    device: steps with a voter, distinct experts native, distinct experts with the policy,
    changed assignments. ``gate``: keep the policy's routing only on steps where the cost model
    predicts a gain (``CostModel.pays``), else every row native; in eager mode it also raises a
    budget to the compute floor of the step's rows (``CostModel.at_floor``; under torch.compile
    the row count is symbolic and budgets stay as given). No host sync, no data-dependent
    shape: safe to trace and capture.
    """
    distinct = None   # [2]: distinct experts native / final, once counted
    if policy.kind == "native":
        new_w, new_ids, changed = weights, ids, torch.zeros((), dtype=torch.long, device=ids.device)
    else:
        if gate is not None and isinstance(logits.shape[0], int):   # eager: the step's rows are a plain int
            policy = gate.at_floor(policy, logits.shape[0])
        r = route(logits, top_k, policy, decode_mask=vote, valid_mask=valid, native=(weights, ids), **native_kwargs)
        kept = (r.ids[:, :, None] == ids[:, None, :].long()).any(dim=-1)          # [T, K]
        take = r.vote & ~kept.all(dim=-1)                                           # [T]
        new_ids = torch.where(take[:, None], r.ids.to(ids.dtype), ids)
        if gate is not None:   # one count serves the gate and the statistics
            cut = distinct_experts(torch.stack((ids, new_ids)), valid, num_experts)
            pays = gate.pays(valid.sum(), cut[0], cut[1])
            take = take & pays
            new_ids = torch.where(pays, new_ids, ids)
            distinct = torch.stack((cut[0], torch.where(pays, cut[1], cut[0])))
        new_w = torch.where(take[:, None], r.weights.to(weights.dtype), weights)
        changed = (~kept & take[:, None]).sum()
    if sums is not None:
        if distinct is None:
            distinct = distinct_experts(torch.stack((ids, new_ids)), valid, num_experts)
        voted = vote.any().long()
        sums.add_(torch.stack((voted, distinct[0], distinct[1], changed)) * voted)
    return new_w, new_ids


# ---------------------------------------------------------------------------------------------
# Per-layer semantics and the process state (Worker process)


@dataclasses.dataclass
class _Layer:
    """One router: its native routing semantics, or why lynx cannot re-route it."""

    index: int
    model: str | None
    router: Any
    sums: torch.Tensor | None = None      # [4] int64 on the device, see ``reroute``
    described: bool = False
    top_k: int = 0
    num_experts: int = 0
    scoring: str = "softmax"
    grouped: bool = False
    unsupported: str | None = None
    policy: Policy | None = None           # resolved from the settings / override, see _State.resolve

    def native_kwargs(self) -> dict[str, Any]:
        r = self.router
        kw: dict[str, Any] = {"renormalize": bool(r.renormalize), "scoring": self.scoring}
        if self.grouped:
            kw.update(e_score_correction_bias=r.e_score_correction_bias, num_expert_group=r.num_expert_group,
                      topk_group=r.topk_group, routed_scaling_factor=float(r.routed_scaling_factor))
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


class _State:
    """Everything the plugin holds in one process: settings, the step's row flags, the layers
    seen and their device statistics, host counters per step."""

    def __init__(self, settings: Settings, logger: Any) -> None:
        self.settings = settings
        self.log = logger
        self.override: Spec | None = None   # set by RPC; wins over the settings
        self.layers: list[_Layer] = []
        self.rows: _Rows | None = None      # None: route every row natively
        self.device: torch.device | None = None
        self._warned: set[str] = set()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.steps = self.decode_steps = self.mixed_steps = self.voting_rows = 0
        self._logged: tuple[int, list[list[int]]] = (0, [])   # decode steps and layer sums at the last log

    # -- setup ---------------------------------------------------------------------------------
    def bind(self, size: int, device: torch.device, gathered: str | None) -> None:
        """The model runner starts: allocate the flag buffer (or refuse, rows gathered across ranks)."""
        self.device = device
        if gathered:
            self.rows = None
            self.warn_once(f"rows are gathered across ranks ({gathered})")
        else:
            self.rows = _Rows(size, device)

    def add_layer(self, router: Any, model: str | None, shape: tuple[int, int] | None = None,
                  num_layers: int | None = None) -> int:
        """Register a router as vLLM builds the model; the first one of a model checks the
        configured policy against the model's top-k (ValueError: the model does not load)."""
        if not any(L.model == model for L in self.layers):
            check_spec(self.settings.spec_for(model), shape, num_layers)
        with torch.inference_mode(False):
            sums = torch.zeros(4, dtype=torch.long, device=self.device or "cpu")
        self.layers.append(_Layer(len(self.layers), model, router, sums))
        return len(self.layers) - 1

    def resolve(self, layer: _Layer) -> Policy:
        """The layer's policy from the override or the settings (cached on the layer)."""
        if not layer.described:
            _describe(layer)
        spec = self.override if self.override is not None else self.settings.spec_for(layer.model)
        if spec is None:
            policy: Policy = TopK()
        elif spec == PRESET:
            policy = for_shape(layer.num_experts, layer.top_k)[1]
        else:
            policy = spec  # type: ignore[assignment]
        try:
            same = [L for L in self.layers if L.model == layer.model]
            policy.check_layers(len(same))
            policy = policy.for_layer(same.index(layer))
            policy.check_top_k(layer.top_k)
        except ValueError as e:   # checked at load and in set_policy; a per-model glob can still miss
            self.warn_once(f"{policy} cannot run on a top-{layer.top_k} layer of {len(same)} MoE layers ({e})")
            policy = TopK()
        layer.policy = policy
        return policy

    def resolve_all(self) -> None:
        """Resolve every layer's policy between steps, so the forward pass (traced under
        torch.compile) only reads ``layer.policy``."""
        for layer in self.layers:
            if layer.policy is None:
                self.resolve(layer)

    def warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            self.log.warning("lynx-moe: routing natively where %s", reason)

    # -- per step (host, before the model runs) ------------------------------------------------
    def is_isolated(self, sampling_params: Any) -> bool:
        args = getattr(sampling_params, "extra_args", None) or {}
        return args.get(REQUEST_KEY, self.settings.requests_default) == "off"

    def new_step(self, num_scheduled: np.ndarray, num_computed: np.ndarray, num_prompt: np.ndarray,
                 isolated: np.ndarray) -> None:
        self.steps += 1
        self.resolve_all()
        if self.rows is None:
            return
        voters, valid = self.rows.write(step_rows(num_scheduled, num_computed, num_prompt, isolated))
        if voters:
            self.decode_steps += 1
            self.voting_rows += voters
            self.mixed_steps += voters < valid
        every = self.settings.stats_every
        if every and self.steps % every == 0:
            self._log_window()

    def clear_rows(self) -> None:
        """A dummy, profile or capture run: no row votes (its kernels still run the policy)."""
        self.resolve_all()
        if self.rows is not None:
            self.rows.write(np.zeros(0, dtype=bool))

    # -- per layer (the forward pass) ----------------------------------------------------------
    def apply(self, layer: _Layer, logits: torch.Tensor, w: torch.Tensor,
              ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        policy = layer.policy if layer.policy is not None else self.resolve(layer)
        if layer.unsupported or self.rows is None:
            if layer.unsupported:
                self.warn_once(layer.unsupported)
            elif self.device is None:   # never bound: not the V1 GPUModelRunner (or a subclass)
                self.warn_once("the model runner gives lynx no step flags (Model Runner V2? set "
                               "VLLM_USE_V2_MODEL_RUNNER=0 to use the V1 runner, which lynx supports)")
            return w, ids
        vote, valid = self.rows.view(logits.shape[0])
        return reroute(logits, w, ids, vote, valid, layer.sums, policy=policy, top_k=layer.top_k,
                       num_experts=layer.num_experts or logits.shape[1], native_kwargs=layer.native_kwargs(),
                       gate=self.settings.gate)

    # -- reading (between steps) ---------------------------------------------------------------
    def _sums(self) -> list[list[int]]:
        return torch.stack([L.sums for L in self.layers]).tolist() if self.layers else []

    def _log_window(self) -> None:
        last_steps, last = self._logged
        now = self._sums()
        if self.decode_steps == last_steps or not now:
            return
        self._logged = (self.decode_steps, now)
        per = [((n - n0) / (s - s0), (p - p0) / (s - s0)) for (s, n, p, _), (s0, n0, p0, _) in
               zip(now, last or [[0] * 4] * len(now)) if s > s0]
        if not per:
            return
        nat, pol = (sum(x[j] for x in per) / len(per) for j in (0, 1))
        self.log.info("lynx-moe: %d steps, %s: distinct experts per decode step (mean over %d layers) "
                      "native %.1f -> policy %.1f; per layer %s", self.steps, self.describe_policy(),
                      len(per), nat, pol, " ".join(f"{a:.0f}/{b:.0f}" for a, b in per))

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
        sums = self._sums()
        layers = []
        for L, (steps, nat, pol, changed) in zip(self.layers, sums):
            layers.append({"layer": L.index, "model": L.model, "num_experts": L.num_experts, "top_k": L.top_k,
                           "policy": str(L.policy) if L.policy is not None else None, "unsupported": L.unsupported,
                           "decode_steps": steps, "changed_assignments": changed,
                           "native_distinct_mean": nat / steps if steps else None,
                           "policy_distinct_mean": pol / steps if steps else None})
        seen = [x for x in layers if x["decode_steps"]]
        mean = (lambda key: sum(x[key] for x in seen) / len(seen) if seen else None)
        out = {"pid": os.getpid(), "policy": self.describe_policy(), "steps": self.steps,
               "decode_steps": self.decode_steps, "mixed_steps": self.mixed_steps, "voting_rows": self.voting_rows,
               "requests_default": self.settings.requests_default, "layers": layers,
               "native_distinct_mean": mean("native_distinct_mean"),
               "policy_distinct_mean": mean("policy_distinct_mean")}
        if reset:
            for L in self.layers:
                L.sums.zero_()
            self._reset_counters()
        return out

    def set_policy(self, spec: str | dict | None) -> str:
        new = None if spec is None else parse_spec(spec, "set_policy")
        if isinstance(new, Policy):
            for model in {L.model for L in self.layers}:   # refuse here rather than fail inside a forward pass
                same = [L for L in self.layers if L.model == model]
                new.check_layers(len(same))
                for i, layer in enumerate(same):
                    if not layer.described:
                        _describe(layer)
                    if not layer.unsupported:
                        new.for_layer(i).check_top_k(layer.top_k)
        self.override = new
        for layer in self.layers:
            self.resolve(layer)
        self._logged = (self.decode_steps, self._sums())
        return self.describe_policy()


# ---------------------------------------------------------------------------------------------
# The vLLM seam: every line that touches vLLM internals (0.32). For a newer vLLM, this is the
# section to change: the router method wrapped (``FusedMoERouter.select_experts``), the model
# runner's step preparation (``GPUModelRunner._prepare_inputs``: per-request scheduled and
# computed token counts, ``input_batch.req_ids``, ``requests[...].sampling_params``) and
# dummy run, the request validation hook (``SamplingParams._verify_extra_args``) and the
# worker class that carries the RPC methods.
#
# Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``), which vLLM 0.32+ picks on a GPU
# whenever Triton is present (``VllmConfig.use_v2_model_runner``), is not hooked yet: its
# layers then route natively with a warning. Hooking it is the same three calls on its own
# class: ``__init__`` (bind), ``prepare_inputs(scheduler_output, batch_req_state, ...)``
# (``batch_req_state.num_scheduled_tokens`` / ``req_ids`` and the input batch's
# ``num_computed_tokens_np`` / ``num_prompt_tokens`` give ``step_rows``' arguments) and
# ``_dummy_run`` (clear).

_STATE: _State | None = None


def _check_version() -> None:
    import vllm
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"lynx-moe's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)} "
            f"(pip install lynx-moe[vllm]); found vLLM {version}. Unset {_ENV_POLICY}/{_ENV_FILE} "
            "to run vLLM without lynx-moe.")


def _current_model() -> tuple[str | None, tuple[int, int] | None, int | None]:
    """The model being built (name or path), its ``(experts, top-k)`` and MoE layers from its config."""
    from vllm.config import get_current_vllm_config_or_none
    cfg = get_current_vllm_config_or_none()
    model_config = getattr(cfg, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else {}
    return getattr(model_config, "model", None), config_moe_shape(d), config_moe_layers(d)


def _gathered(vllm_config: Any) -> str | None:
    """Why the MoE layers' rows are not this rank's step rows, if they are not."""
    par = vllm_config.parallel_config
    if par.data_parallel_size > 1:
        return "data parallel"
    if getattr(par, "prefill_context_parallel_size", 1) > 1:
        return "prefill context parallel"
    if getattr(par, "use_sequence_parallel_moe", False):
        return "sequence-parallel MoE"
    return None


def _install(logger: Any) -> None:
    """Wrap vLLM's router, model runner and request validation once per process; add the RPC
    methods to the worker."""
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    if getattr(FusedMoERouter.select_experts, "__lynx_wrapped__", False):
        return
    router_init, select = FusedMoERouter.__init__, FusedMoERouter.select_experts
    runner_init, prepare, dummy = GPUModelRunner.__init__, GPUModelRunner._prepare_inputs, GPUModelRunner._dummy_run
    verify = SamplingParams._verify_extra_args

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        router_init(self, *args, **kwargs)
        self._lynx_layer = None if _STATE is None else _STATE.add_layer(self, *_current_model())

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, *, input_ids=None):
        w, ids = select(self, hidden_states, router_logits, topk_indices_dtype, input_ids=input_ids)
        state, index = _STATE, getattr(self, "_lynx_layer", None)
        if state is None or index is None:
            return w, ids
        w2, ids2 = state.apply(state.layers[index], router_logits, w, ids)
        if ids2 is not ids and self._routing_replay_out is not None:
            self._routing_replay_out[: ids2.shape[0]].copy_(ids2.to(torch.int16))
        return w2, ids2

    def runner_init_(self, vllm_config, device, *args: Any, **kwargs: Any) -> None:
        runner_init(self, vllm_config, device, *args, **kwargs)
        if _STATE is not None:
            _STATE.bind(self.max_num_tokens, torch.device(device), _gathered(vllm_config))

    def prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args: Any, **kwargs: Any):
        out = prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if _STATE is not None:
            batch = self.input_batch
            n = batch.num_reqs
            isolated = np.fromiter((_STATE.is_isolated(self.requests[r].sampling_params) for r in batch.req_ids[:n]),
                                   dtype=bool, count=n)
            _STATE.new_step(num_scheduled_tokens[:n], batch.num_computed_tokens_cpu[:n],
                            batch.num_prompt_tokens[:n], isolated)
        return out

    def dummy_run(self, *args: Any, **kwargs: Any):
        if _STATE is not None:
            _STATE.clear_rows()
        return dummy(self, *args, **kwargs)

    def verify_extra_args(self) -> None:
        verify(self)
        try:
            check_request(self.extra_args)
        except ValueError as e:
            from vllm.exceptions import VLLMValidationError
            raise VLLMValidationError(str(e), parameter="extra_args") from None

    select_experts.__lynx_wrapped__ = True  # type: ignore[attr-defined]
    FusedMoERouter.__init__ = __init__
    FusedMoERouter.select_experts = select_experts
    GPUModelRunner.__init__ = runner_init_
    GPUModelRunner._prepare_inputs = prepare_inputs
    GPUModelRunner._dummy_run = dummy_run
    SamplingParams._verify_extra_args = verify_extra_args
    WorkerBase.lynx_stats = lambda self, reset=False: _STATE.snapshot(bool(reset)) if _STATE else None
    WorkerBase.lynx_set_policy = lambda self, spec=None: _set_local_policy(spec)


def _set_local_policy(spec: str | dict | None) -> str:
    if _STATE is None:
        raise RuntimeError(f"lynx-moe is not enabled in this process: set {_ENV_POLICY} (e.g. 'topk')")
    return _STATE.set_policy(spec)


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
        for layer in _STATE.layers:
            layer.policy = None
    else:
        _STATE = _State(settings, logger)
    per_model = ", ".join(f"{k}: {v}" for k, v in settings.models)
    logger.info("lynx-moe: batch-aware expert selection enabled in pid %d: policy %s%s; decode rows only, "
                "requests %s by default, %s, stats every %s steps", os.getpid(),
                settings.default if settings.default is not None else TopK(),
                f"; per model {{{per_model}}}" if per_model else "", settings.requests_default,
                f"gated by the cost model {settings.gate.source or ''}".rstrip() if settings.gate else "no gate",
                settings.stats_every or "no")


# ---------------------------------------------------------------------------------------------
# Driver side


def stats(llm: Any, reset: bool = False) -> list[dict[str, Any]]:
    """Per-worker statistics (one dict per worker): distinct experts per layer per decode step,
    native vs policy, changed assignments; steps, decode steps, mixed steps and voting rows.
    ``reset`` zeroes the counters after reading."""
    return llm.collective_rpc("lynx_stats", args=(reset,))


def set_policy(llm: Any, spec: str | dict | Policy | None) -> list[str]:
    """Switch every worker's policy at run time (None: back to the configured one). A bad spec,
    a policy the model's top-k cannot run, or an engine that is not eager raises ValueError
    here, in the driver, with the message ``apply_`` gives; the engine is left as it was."""
    if isinstance(spec, Policy):
        spec = str(spec)
    model_config = llm.llm_engine.model_config
    if not model_config.enforce_eager:
        raise ValueError("set_policy needs an engine started with enforce_eager=True: compiled and captured "
                         f"graphs keep the policy they were traced with; set {_ENV_POLICY} before starting instead")
    if spec is not None:
        hf_config = model_config.hf_config.to_dict()
        check_spec(parse_spec(spec, "set_policy"), config_moe_shape(hf_config), config_moe_layers(hf_config))
    return llm.collective_rpc("lynx_set_policy", args=(spec,))
