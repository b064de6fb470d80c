"""Decode speed of each policy against native routing, side by side (``lynx bench``'s library).

What it measures. For each batch size the batch is prefilled once (untimed); then every run
times the decode steps of the same teacher-forced tokens and rolls the KV cache back to the
prompt (``measure.decode``). Runs are interleaved in rounds (native, policy 1, policy 2, ...,
native, ...) so slow drift of a shared machine hits all of them alike; an untimed warm-up
round comes first and also counts the distinct experts per layer and step
(``routing_stats``). Timed policy runs have statistics off; timed native runs are the
unpatched model. Per batch size and policy: median and min-max ms per step over the rounds,
the time inside the routed-experts modules, tokens/s, speedup (median over rounds of native /
policy in the same round), mean distinct experts per MoE layer per step, expert MB read per
step, and the memory-bandwidth floor of a step: the bytes it must read (``StepBytes``:
experts used + dense weights + KV cache) over the copy bandwidth measured at the start.

    model, tokens, replay, desc = model_inputs(path, rows=32, length=32)      # or shape_inputs(...)
    summary = decode_speed(model, tokens, prompt_len=16, policies=[...], batch_sizes=[8, 32])

Legend: B batch rows, S timed steps, L MoE layers.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..integrations import hf
from ..policies import Policy, TopK
from ..presets import for_shape
from .data import default_data, load_texts, token_batch
from .decode import decode_steps, prefill, record_routing
from .machine import conditions, copy_bandwidth
from .models import load_model
from .shapes import LogitReplay, build_stack, get_shape

__all__ = ["StepBytes", "model_inputs", "shape_inputs", "time_decode", "decode_speed", "speed_on_text"]


@dataclasses.dataclass(frozen=True)
class StepBytes:
    """Bytes a decode step reads, by kind (from a transformers MoE model)."""

    expert: list[int]      # bytes of one expert, per MoE layer
    dense: int             # every non-expert weight read each step (incl. the LM head, if any)
    embed_row: int         # bytes of one embedding row (each sequence reads one per step)
    kv_per_token: int      # K and V bytes of one cached token, summed over layers

    @classmethod
    def of(cls, model: torch.nn.Module) -> "StepBytes":
        # fused expert weights ``[E, ...]`` (transformers 5's experts modules): bytes of one = total / E
        experts = [layer.experts for layer in hf.moe_layers(model) if hasattr(layer.experts, "gate_up_proj")]
        if not experts:
            raise ValueError(f"no fused MoE experts modules (gate_up_proj) found in {type(model).__name__}")
        expert = [sum(p.numel() * p.element_size() for p in m.parameters()) // m.gate_up_proj.shape[0]
                  for m in experts]
        expert_ids = {id(p) for m in experts for p in m.parameters()}
        embed = model.get_input_embeddings()
        skip = expert_ids | {id(embed.weight)}
        dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and head.weight is embed.weight:
            dense += embed.weight.numel() * embed.weight.element_size()  # tied head is read in full
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = embed.weight.element_size()
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize
        return cls(expert, dense, embed.weight.shape[1] * itemsize, kv)

    def experts_read(self, distinct: list[float]) -> float:
        """Expert bytes of one step given the (mean) distinct experts of each MoE layer."""
        if len(distinct) != len(self.expert):
            raise ValueError(f"need one distinct count per MoE layer ({len(self.expert)}), got {len(distinct)}")
        return float(sum(d * b for d, b in zip(distinct, self.expert)))

    def other_read(self, batch: int, context: float) -> float:
        """Non-expert bytes of one step: dense weights, embedding rows and the KV cache of
        ``batch`` sequences holding ``context`` tokens each (mean over the timed steps)."""
        return float(self.dense + batch * (self.embed_row + context * self.kv_per_token))

    def total(self, distinct: list[float], batch: int, context: float) -> float:
        return self.experts_read(distinct) + self.other_read(batch, context)


# ---------------------------------------------------------------------------------------
# What is timed

def model_inputs(path: Path | None, rows: int, length: int, data: list[Path] | None = None):
    """``(model, tokens [rows, length], None, description)`` for a model folder (default: the
    reference model) on its held-out text."""
    model, tokenizer = load_model(path)
    if path is None:
        from .. import reference_model_path
        path = reference_model_path()
    tokens = token_batch(load_texts(data or [default_data(path)]), tokenizer, rows, length, model.config.vocab_size)
    return model, tokens, None, {"model": str(path)}


def shape_inputs(shape_name: str, layers: int, rows: int, length: int, prompt_len: int, *,
                 router: str = "replay", replay_from: Path | None = None, data: list[Path] | None = None):
    """``(stack, tokens, replay or None, description)`` for a realistic-shape stack
    (``measure.shapes``) whose routers replay logits recorded from ``replay_from`` (default: the
    reference model; same experts and top-k) on held-out text; ``router="random"`` keeps the
    stack's random routers."""
    shape = get_shape(shape_name)
    desc = {**{f"shape_{k}": v for k, v in vars(shape).items()},
            "shape": shape_name, "layers": layers, "router": router}
    logits = None
    if router == "replay":
        # Record first: the reference model is small, the stack is not.
        src, rec_tokens, _, src_desc = model_inputs(replay_from, rows, length, data)
        E, K = hf.moe_shape(src)
        if (E, K) != (shape.experts, shape.top_k):
            raise ValueError(f"the replay model has {E} experts top-{K} but {shape_name} has "
                             f"{shape.experts} top-{shape.top_k}; use --router random")
        logits, _ = record_routing(src, rec_tokens, prompt_len)
        desc["replay_from"] = src_desc["model"]
        del src
    elif router != "random":
        raise ValueError(f"router must be 'replay' or 'random', got {router!r}")
    model = build_stack(shape, layers)
    # Token ids only feed the random embedding; 0 is the EOS/pad id (a finished row never votes).
    tokens = torch.randint(1, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    replay = LogitReplay(model, logits) if logits is not None else None
    return model, tokens, replay, desc


# ---------------------------------------------------------------------------------------
# Timing

def time_decode(model, pre, feed: torch.Tensor, replay: LogitReplay | None = None) -> list[float]:
    """Seconds of each decode step of ``feed [B, S]`` after the prompt in ``pre``."""
    times = []
    before = None if replay is None else (lambda j: setattr(replay, "step", j))
    t = time.perf_counter()
    for _ in decode_steps(model, pre, feed, before_step=before):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times


class _ExpertClock:
    """Wall time spent inside the routed-experts modules: the part of a step that a policy
    can shrink (two clock reads per layer, microseconds against milliseconds)."""

    def __init__(self, model) -> None:
        self.seconds = 0.0
        self._start = 0.0
        self._handles = []
        for layer in hf.moe_layers(model):
            if layer.experts is not None:
                self._handles.append(layer.experts.register_forward_pre_hook(self._pre))
                self._handles.append(layer.experts.register_forward_hook(self._post))

    def _pre(self, module, args) -> None:
        self._start = time.perf_counter()

    def _post(self, module, args, out) -> None:
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _bench_batch(model, tokens, prompt_len, replay, policies, repeats, progress, gate=None) -> dict:
    """Interleaved rounds for one batch size; returns per-policy timings and distinct counts."""
    B = tokens.shape[0]
    if replay is not None:
        replay.active = False  # prefill routes on the stack's own (identity) routers
    pre = prefill(model, tokens.tolist(), [prompt_len] * B, pad_id=0)
    if replay is not None:
        replay.active = True
    feed = tokens[:, prompt_len:]
    names = ["native"] + [str(p) for p in policies]
    runs = {n: [] for n in names}
    experts = {n: [] for n in names}
    clock = _ExpertClock(model)
    distinct = {}
    done, total = 0, (repeats + 1) * len(names)
    try:
        for round_ in range(repeats + 1):
            warm = round_ == 0
            for name, policy in zip(names, [TopK()] + list(policies)):
                if warm:  # untimed: count distinct experts (for native too, via the no-op policy)
                    hf.apply_(model, policy, stats=True, gate=gate)
                elif policy.kind != "native":
                    hf.apply_(model, policy, stats=False, gate=gate)
                try:
                    clock.seconds = 0.0
                    secs = time_decode(model, pre, feed, replay)
                    if warm:
                        distinct[name] = [s.distinct_policy for s in hf.routing_stats(model)]
                finally:
                    hf.remove_(model)
                if not warm:
                    runs[name].append(sum(secs) / len(secs))
                    experts[name].append(clock.seconds / len(secs))
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        clock.remove()
    return {"runs": runs, "experts": experts, "distinct": distinct}


def _summarise(B, res, step_bytes, context, bw) -> list[dict]:
    runs, out, totals = res["runs"], [], []
    native = runs["native"]
    for name, secs in runs.items():
        ms = [1000 * s for s in secs]
        speedups = [n / s for n, s in zip(native, secs)]
        distinct = res["distinct"][name]
        expert_b = step_bytes.experts_read(distinct)
        total_b = expert_b + step_bytes.other_read(B, context)
        totals.append(total_b)
        row = {"batch": B, "policy": name, "ms_per_step": round(statistics.median(ms), 2),
               "ms_min": round(min(ms), 2), "ms_max": round(max(ms), 2),
               "experts_ms_per_step": round(1000 * statistics.median(res["experts"][name]), 2),
               "tokens_per_s": round(B * 1000 / statistics.median(ms), 1),
               "speedup": round(statistics.median(speedups), 3),
               "distinct_mean": round(sum(distinct) / len(distinct), 2),
               "distinct_per_layer": [round(d, 2) for d in distinct],
               "expert_mb_per_step": round(expert_b / 1e6, 1), "total_mb_per_step": round(total_b / 1e6, 1)}
        if bw is not None:
            row["bound_ms"] = round(total_b / bw.gbps / 1e6, 4)
        out.append(row)
    # The speedup a purely memory-bound step would get: native bytes / policy bytes.
    for row, total_b in zip(out, totals):
        row["bound_speedup"] = round(totals[0] / total_b, 3)
    return out


def decode_speed(model, tokens: torch.Tensor, prompt_len: int, policies: list[Policy], batch_sizes: list[int],
                 repeats: int = 3, *, replay: LogitReplay | None = None, bandwidth_mib: int = 1024,
                 on_batch: Callable[[list[dict]], None] | None = None,
                 progress: Callable[[int, int], None] | None = None, gate=None) -> dict:
    """Time native and ``policies`` on ``tokens [rows >= max(batch_sizes), P + S]`` (see the
    module docstring). ``on_batch(rows)`` gets each batch size's result rows as they are
    measured; ``progress(done, total)`` each finished run; ``gate`` (a ``CostModel``) gates every
    policy run. Returns the summary: conditions,
    bandwidth before and after, bytes, and one result row per batch size and policy."""
    if prompt_len < 1 or tokens.shape[1] <= prompt_len:
        raise ValueError(f"need 1 <= prompt_len < tokens per row ({tokens.shape[1]}), got {prompt_len}")
    if repeats < 1 or bandwidth_mib < 0:
        raise ValueError("need repeats >= 1 and bandwidth_mib >= 0")
    if max(batch_sizes) > tokens.shape[0]:
        raise ValueError(f"batch size {max(batch_sizes)} needs that many token rows, got {tokens.shape[0]}")
    E, K = hf.moe_shape(model)
    preset_name, _ = for_shape(E, K)
    policies = [p for p in policies if p.kind != "native"]
    for p in policies:
        p.check_top_k(K)
    before = conditions()
    step_bytes = StepBytes.of(model)
    bw = copy_bandwidth(bandwidth_mib << 20) if bandwidth_mib else None
    results = []
    new_tokens = tokens.shape[1] - prompt_len
    for B in batch_sizes:
        res = _bench_batch(model, tokens[:B], prompt_len, replay, policies, repeats, progress, gate)
        context = prompt_len + (new_tokens + 1) / 2   # mean tokens attended per timed step
        rows = _summarise(B, res, step_bytes, context, bw)
        results += rows
        if on_batch is not None:
            on_batch(rows)
    # Measured again after timing: a large drift means the machine got busier or quieter.
    bw_after = copy_bandwidth(bandwidth_mib << 20) if bandwidth_mib else None
    return {
        "experts": E, "top_k": K, "dtype": str(next(model.parameters()).dtype), "preset": preset_name,
        "new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats,
        "conditions": {"before": before, "after": conditions()},
        "bandwidth_gbps": None if bw is None else round(bw.gbps, 2),
        "bandwidth": None if bw is None else bw.to_dict(),
        "bandwidth_after_gbps": None if bw_after is None else round(bw_after.gbps, 2),
        "dense_mb_per_step": round(step_bytes.dense / 1e6, 1),
        "expert_mb": round(step_bytes.expert[0] / 1e6, 2), "results": results,
    }


def speed_on_text(model, tokenizer, texts: dict[str, list[str]], policies: list[Policy], batch: int,
                  repeats: int = 3, progress: Callable[[int, int], None] | None = None, gate=None) -> dict:
    """``decode_speed`` at one batch size on held-out text, as ``lynx eval --speed`` and ``lynx
    demo`` report it: 16 teacher-forced steps after a 16-token prompt, a 256 MiB bandwidth probe."""
    tokens = token_batch(texts, tokenizer, batch, 32, model.config.vocab_size)
    return decode_speed(model, tokens, 16, policies, [batch], repeats, bandwidth_mib=256, progress=progress,
                        gate=gate)
