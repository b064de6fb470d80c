"""The decode loop every measurement uses: batched decode steps through the KV cache.

A routing policy acts only on decode steps (one new token per sequence, with a KV cache):
that is where a serving batch puts ``B`` rows through each MoE layer and where the policy
can shrink the union of experts. A prefill forward is routed natively (``lynx.apply_`` leaves
calls with more than one query token alone), so scoring text the usual way (one forward over
the whole sequence, as lm-eval's loglikelihood does) would compare native with native and
measure nothing. Here each batch of ``B`` sequences is prefilled up to a short prefix, then the
rest is fed one token per step (teacher forcing) or generated greedily, and every scored
token is predicted by a decode step in which all ``B`` rows vote.

    pre = prefill(model, rows, prefill_lens, pad_id)     # native; shared by all policies
    out = teacher_forced(model, pre, rows, prefill_lens, keep_logprobs=True)
    gen = greedy(model, pre, rows, steps=32)             # rows[i] = prompt; prefill = len - 1
    for logits in decode_steps(model, pre, feed, live):  # the loop itself (timing, recording)
        ...

The prefill's KV cache is identical under every policy, so one ``Prefilled`` serves native and
each policy in turn: every decode run crops the cache back to the prompt when it ends.

Rows are left-padded for the prefill (attention mask 0, positions counted from each row's
first real token) and right-padded in the decode phase: a row with nothing left to feed gets
the pad token with attention mask 0, which ``lynx.apply_`` counts as a non-voting row. Models
without an LM head (the realistic-shape stacks of ``measure.shapes``) decode the same way and
yield ``None`` logits.

Legend: B rows, P prefill length (padded), S decode steps, V vocabulary, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Prefilled", "Scored", "prefill", "decode_steps", "teacher_forced", "greedy", "record_routing"]


@dataclass
class Prefilled:
    """The KV cache of a batch's prompts and what the decode phase needs to continue them."""

    cache: object              # transformers Cache holding P positions per row
    mask: torch.Tensor         # [B, P] int64 attention mask (left padding = 0)
    next_pos: torch.Tensor     # [B] int64 position of each row's next token
    pad_id: int
    last_logp: torch.Tensor | None  # [B, V] float32 log-probabilities after each row's last prefill token

    @property
    def length(self) -> int:
        return self.mask.shape[1]


@dataclass
class Scored:
    """Teacher-forced decode of a batch."""

    logprobs: torch.Tensor         # [B, S] log p(target) at each decode step (0 where not live)
    live: torch.Tensor             # [B, S] bool: the step scored a real token of the row
    argmax: torch.Tensor           # [B, S] the model's most likely token at each step
    full: torch.Tensor | None      # [B, S, V] float32 log-probabilities (keep_logprobs=True)

    def row_logprobs(self, i: int) -> torch.Tensor:
        return self.logprobs[i][self.live[i]]


def _forward(model, **kwargs) -> tuple[torch.Tensor | None, object]:
    """One forward with the cache: ``(last position's logits [B, V] or None without an LM head,
    the cache)``."""
    if hasattr(model, "lm_head"):
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        out = model(use_cache=True, **kwargs)
    logits = getattr(out, "logits", None)
    return (None if logits is None else logits[:, -1]), out.past_key_values


def prefill(model, rows: list[list[int]], prefill_lens: list[int], pad_id: int) -> Prefilled:
    """Run ``rows[i][:prefill_lens[i]]`` (left-padded to one length) through ``model``."""
    if len(rows) != len(prefill_lens) or not rows:
        raise ValueError("need one prefill length per row and at least one row")
    if any(not 1 <= p <= len(r) for r, p in zip(rows, prefill_lens)):
        raise ValueError("every prefill length must be between 1 and the row's length")
    B, P, dev = len(rows), max(prefill_lens), next(model.parameters()).device
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, prefill_lens)):
        ids[i, P - p:] = torch.as_tensor(r[:p], dtype=torch.long)
        mask[i, P - p:] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    logits, cache = _forward(model, input_ids=ids, attention_mask=mask, position_ids=pos)
    last = None if logits is None else logits.float().log_softmax(-1)
    return Prefilled(cache, mask, mask.sum(1), pad_id, last)


def _rollback(pre: Prefilled) -> None:
    extra = pre.cache.get_seq_length() - pre.length
    if extra > 0:
        pre.cache.crop(-extra)


def decode_steps(model, pre: Prefilled, feed: torch.Tensor, live: torch.Tensor | None = None,
                 before_step: Callable[[int], None] | None = None) -> Iterator[torch.Tensor | None]:
    """Feed ``feed[:, j]`` ``[B, S]`` one decode step at a time; yields each step's logits
    ``[B, V]`` (None without an LM head). Rows with ``live[:, j]`` False get the pad token with
    attention mask 0 (they do not vote). ``before_step(j)`` runs before step ``j`` (e.g. to set
    a logit replay's step). The cache is cropped back to the prompt when the loop ends."""
    dev = pre.mask.device
    feed = feed.to(dev)
    live = torch.ones_like(feed, dtype=torch.bool) if live is None else live.to(dev)
    mask, pos = pre.mask, pre.next_pos
    try:
        for j in range(feed.shape[1]):
            if before_step is not None:
                before_step(j)
            tok = torch.where(live[:, j], feed[:, j], torch.full_like(feed[:, j], pre.pad_id))
            mask = torch.cat([mask, live[:, j].long()[:, None]], dim=1)
            logits, _ = _forward(model, input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                                 past_key_values=pre.cache)
            pos = pos + live[:, j].long()
            yield logits
    finally:
        _rollback(pre)


def teacher_forced(model, pre: Prefilled, rows: list[list[int]], prefill_lens: list[int], *,
                   keep_logprobs: bool = False) -> Scored:
    """Score ``rows[i][prefill_lens[i] + 1:]``: step ``j`` feeds token ``prefill_lens[i] + j`` and
    is scored on the one after it. Rows with fewer tokens stop early (they then stop voting).
    (Token ``prefill_lens[i]`` itself is predicted by the prefill: ``pre.last_logp``.)"""
    spans = [r[p:] for r, p in zip(rows, prefill_lens)]
    if any(len(s) < 1 for s in spans):
        raise ValueError("every row needs at least 1 token after its prefill")
    S = max(len(s) for s in spans) - 1
    feed = torch.full((len(rows), S + 1), pre.pad_id, dtype=torch.long)
    live = torch.zeros((len(rows), S), dtype=torch.bool)
    for i, s in enumerate(spans):
        feed[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        live[i, :len(s) - 1] = True
    B, V = len(rows), pre.last_logp.shape[-1]
    if S == 0:   # nothing to decode: every row ends right after its prefill
        return Scored(torch.zeros(B, 0), live, torch.zeros(B, 0, dtype=torch.long),
                      torch.zeros(B, 0, V) if keep_logprobs else None)
    target = feed[:, 1:].to(pre.mask.device)
    lps, args, fulls = [], [], []
    for j, logits in enumerate(decode_steps(model, pre, feed[:, :S], live)):
        logp = logits.float().log_softmax(-1)
        lps.append(logp.gather(1, target[:, j:j + 1])[:, 0])
        args.append(logp.argmax(-1))
        if keep_logprobs:
            fulls.append(logp)
    logprobs = torch.stack(lps, 1).cpu().masked_fill(~live, 0.0)
    return Scored(logprobs, live, torch.stack(args, 1).cpu(),
                  torch.stack(fulls, 1).cpu() if keep_logprobs else None)


def greedy(model, pre: Prefilled, rows: list[list[int]], steps: int) -> torch.Tensor:
    """Greedy continuation ``[B, steps]`` of prompts ``rows`` prefilled up to their last token
    (``prefill_lens = len(row) - 1``), which the first decode step feeds. Unlike
    ``model.generate``, whose first new token comes from the (native) prefill, every generated
    token here comes from a decode step. Rows keep going after an EOS (they stop voting)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    # Column j + 1 of ``feed`` is filled with step j's argmax before step j + 1 reads it.
    feed = torch.zeros((len(rows), steps), dtype=torch.long, device=pre.mask.device)
    feed[:, 0] = torch.tensor([r[-1] for r in rows], dtype=torch.long)
    out = []
    for j, logits in enumerate(decode_steps(model, pre, feed)):
        tok = logits.argmax(-1)
        out.append(tok)
        if j + 1 < steps:
            feed[:, j + 1] = tok
    return torch.stack(out, 1).cpu()


def record_routing(model, tokens: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``tokens[:, prompt_len:]`` ``[B, P + S]`` one step at a time after prefilling the
    prompt. Returns ``(logits [L, S, B, E] float32, ids [L, S, B, K])`` of every router during
    the decode steps (prefill rows are not recorded)."""
    from ..integrations.hf import moe_layers
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"no MoE router that lynx_moe knows in {type(model).__name__}")
    logits: list[list[torch.Tensor]] = [[] for _ in layers]
    ids: list[list[torch.Tensor]] = [[] for _ in layers]
    recording = [False]

    def hook(i):
        def fn(module, args, out):
            if recording[0]:
                logits[i].append(out[0].detach().float().clone())
                ids[i].append(out[2].detach().long().clone())
        return fn

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        B = tokens.shape[0]
        pre = prefill(model, tokens.tolist(), [prompt_len] * B, pad_id=0)
        recording[0] = True
        for _ in decode_steps(model, pre, tokens[:, prompt_len:]):
            pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack([torch.stack(x) for x in logits]), torch.stack([torch.stack(x) for x in ids])
