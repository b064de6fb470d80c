"""Memory bandwidth and the bytes a decode step must read: the memory-bound floor of a step.

A batched MoE decode step on a CPU (or a GPU at small batch) is bounded below by the bytes
it has to stream from memory: the weights of every expert some row uses, every dense weight
(attention, router, norms, LM head), and the KV cache. ``copy_bandwidth`` measures what this
machine streams right now; ``StepBytes`` counts a model's bytes; their ratio is the fastest a
step can be, which tells a benchmark reader how far a measurement is from the floor and how
much of it a policy can remove (only the expert part)::

    bw = copy_bandwidth()                                  # GB/s, STREAM "copy" convention
    sb = StepBytes.of(model)
    floor_ms = sb.total(distinct=[40.5] * 16, batch=32, context=64) / bw.gbps / 1e6
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

__all__ = ["Bandwidth", "copy_bandwidth", "StepBytes", "experts_modules"]


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Copy bandwidth in GB/s (1e9 bytes/s): read + written bytes per second."""

    gbps: float            # median over repeats
    min_gbps: float
    max_gbps: float
    nbytes: int            # size of the buffer that was copied
    repeats: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> Bandwidth:
    """Measure ``dst.copy_(src)`` on two ``nbytes`` buffers, counting read + write (STREAM
    copy). The buffers are far larger than any cache, so this is DRAM bandwidth as torch's
    current thread pool sees it. Needs ``2 * nbytes`` of free memory."""
    if nbytes < 1 << 20 or repeats < 1:
        raise ValueError("need nbytes >= 1 MiB and repeats >= 1")
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once so first-use page faults are not timed
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * src.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return Bandwidth(statistics.median(rates), min(rates), max(rates), src.numel() * 4, repeats)


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routed-experts module of every MoE layer (``mlp.experts``), in layer order."""
    return [m for m in model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj")]


@dataclasses.dataclass(frozen=True)
class StepBytes:
    """Bytes a decode step reads, by kind (from a transformers MoE model)."""

    expert: list[int]      # bytes of one expert, per MoE layer
    dense: int             # every non-expert weight read each step (incl. the LM head, if any)
    embed_row: int         # bytes of one embedding row (each sequence reads one per step)
    kv_per_token: int      # K and V bytes of one cached token, summed over layers

    @classmethod
    def of(cls, model: torch.nn.Module) -> "StepBytes":
        experts = experts_modules(model)
        if not experts:
            raise ValueError(f"no MoE experts modules found in {type(model).__name__}")
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
