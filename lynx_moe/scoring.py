"""Decode-mode scoring: run the tokens being evaluated as batched decode steps.

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

The prefill's KV cache is identical under every policy, so one ``Prefilled`` serves native and
each policy in turn: every decode run crops the cache back to the prompt when it ends.

Rows are left-padded for the prefill (attention mask 0, positions counted from each row's
first real token) and right-padded in the decode phase: a row with nothing left to feed gets
the pad token with attention mask 0, which ``lynx.apply_`` counts as a non-voting row.

Legend: B rows, P prefill length (padded), S decode steps, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Prefilled", "Scored", "prefill", "teacher_forced", "greedy"]


@dataclass
class Prefilled:
    """The KV cache of a batch's prompts and what the decode phase needs to continue them."""

    cache: object              # transformers Cache holding P positions per row
    mask: torch.Tensor         # [B, P] int64 attention mask (left padding = 0)
    next_pos: torch.Tensor     # [B] int64 position of each row's next token
    pad_id: int
    last_logp: torch.Tensor    # [B, V] float32 log-probabilities after each row's last prefill token

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


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, **kwargs):
    with torch.inference_mode():
        return model(use_cache=True, **kwargs)


def prefill(model, rows: list[list[int]], prefill_lens: list[int], pad_id: int) -> Prefilled:
    """Run ``rows[i][:prefill_lens[i]]`` (left-padded to one length) through ``model``."""
    if len(rows) != len(prefill_lens) or not rows:
        raise ValueError("need one prefill length per row and at least one row")
    if any(not 1 <= p <= len(r) for r, p in zip(rows, prefill_lens)):
        raise ValueError("every prefill length must be between 1 and the row's length")
    B, P, dev = len(rows), max(prefill_lens), _device(model)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, prefill_lens)):
        ids[i, P - p:] = torch.tensor(r[:p], dtype=torch.long)
        mask[i, P - p:] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    out = _forward(model, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
    return Prefilled(out.past_key_values, mask, mask.sum(1), pad_id, out.logits[:, -1].float().log_softmax(-1))


def _step(model, pre: Prefilled, mask: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor,
          live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step; returns (log-probs [B, V] float32, new mask, new positions)."""
    tok = torch.where(live, tok, torch.full_like(tok, pre.pad_id))
    mask = torch.cat([mask, live.long()[:, None]], dim=1)
    out = _forward(model, input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                   past_key_values=pre.cache)
    return out.logits[:, -1].float().log_softmax(-1), mask, pos + live.long()


def _rollback(pre: Prefilled) -> None:
    extra = pre.cache.get_seq_length() - pre.length
    if extra > 0:
        pre.cache.crop(-extra)


def teacher_forced(model, pre: Prefilled, rows: list[list[int]], prefill_lens: list[int], *,
                   keep_logprobs: bool = False) -> Scored:
    """Score ``rows[i][prefill_lens[i] + 1:]``: step ``j`` feeds token ``prefill_lens[i] + j`` and
    is scored on the one after it. Rows with fewer tokens stop early (they then stop voting).
    (Token ``prefill_lens[i]`` itself is predicted by the prefill: ``pre.last_logp``.)"""
    dev = pre.mask.device
    spans = [r[p:] for r, p in zip(rows, prefill_lens)]
    if any(len(s) < 1 for s in spans):
        raise ValueError("every row needs at least 1 token after its prefill")
    S = max(len(s) for s in spans) - 1
    feed = torch.full((len(rows), S + 1), pre.pad_id, dtype=torch.long)
    live = torch.zeros((len(rows), S), dtype=torch.bool)
    for i, s in enumerate(spans):
        feed[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        live[i, :len(s) - 1] = True
    feed, live = feed.to(dev), live.to(dev)
    mask, pos = pre.mask, pre.next_pos
    lps, args, fulls = [], [], []
    try:
        for j in range(S):
            logp, mask, pos = _step(model, pre, mask, pos, feed[:, j], live[:, j])
            lps.append(logp.gather(1, feed[:, j + 1:j + 2])[:, 0])
            args.append(logp.argmax(-1))
            if keep_logprobs:
                fulls.append(logp)
    finally:
        _rollback(pre)
    B, V = len(rows), pre.last_logp.shape[-1]
    if S == 0:   # nothing to decode: every row ends right after its prefill
        return Scored(torch.zeros(B, 0), live.cpu(), torch.zeros(B, 0, dtype=torch.long),
                      torch.zeros(B, 0, V) if keep_logprobs else None)
    logprobs = torch.stack(lps, 1).masked_fill(~live, 0.0)
    return Scored(logprobs.cpu(), live.cpu(), torch.stack(args, 1).cpu(),
                  torch.stack(fulls, 1).cpu() if keep_logprobs else None)


def greedy(model, pre: Prefilled, rows: list[list[int]], steps: int) -> torch.Tensor:
    """Greedy continuation ``[B, steps]`` of prompts ``rows`` prefilled up to their last token
    (``prefill_lens = len(row) - 1``), which the first decode step feeds. Unlike
    ``model.generate``, whose first new token comes from the (native) prefill, every generated
    token here comes from a decode step. Rows keep going after an EOS (they stop voting)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    dev = pre.mask.device
    tok = torch.tensor([r[-1] for r in rows], dtype=torch.long, device=dev)
    live = torch.ones(len(rows), dtype=torch.bool, device=dev)
    mask, pos, out = pre.mask, pre.next_pos, []
    try:
        for _ in range(steps):
            logp, mask, pos = _step(model, pre, mask, pos, tok, live)
            tok = logp.argmax(-1)
            out.append(tok)
    finally:
        _rollback(pre)
    return torch.stack(out, 1).cpu()
