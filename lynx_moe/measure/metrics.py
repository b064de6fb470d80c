"""Quality metrics of a routing policy against native routing on the same inputs.

Pure functions on tensors (no model, no transformers), used by ``lynx eval`` and ``lynx demo``:

- ``kl_per_token``: KL(native || policy) of next-token distributions, per scored position;
- ``greedy_agreement``: how long greedy decoding with the policy stays on native's tokens;
- ``paired_bootstrap`` / ``bootstrap``: percentile confidence intervals over items, resampled
  in pairs (the same items for native and policy), with a fixed seed so reports repeat;
- ``perplexity_delta``: relative perplexity change with its interval (resampling sequences);
- ``exact_match``: the short-answer comparison (first words, case and punctuation ignored).

Why paired: the native and policy scores of one item are strongly correlated (most items get
the same answer), so the interval of the *difference* is far narrower than the difference of
two independent intervals; resampling items jointly keeps that pairing.

Legend: N items (or sequences), S scored positions, V vocabulary, R bootstrap resamples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["Interval", "kl_per_token", "greedy_agreement", "bootstrap", "paired_bootstrap",
           "perplexity", "perplexity_delta", "exact_match", "first_word"]

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 1234


class Interval(NamedTuple):
    """A statistic with its bootstrap percentile interval (``lo <= value <= hi`` usually)."""

    value: float
    lo: float
    hi: float

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def to_dict(self, scale: float = 1.0, digits: int = 4) -> dict[str, float]:
        return {"value": round(self.value * scale, digits), "lo": round(self.lo * scale, digits),
                "hi": round(self.hi * scale, digits)}


def kl_per_token(logp_native: torch.Tensor, logp_policy: torch.Tensor) -> torch.Tensor:
    """KL(native || policy) in nats for each position: ``[..., V]`` log-probabilities -> ``[...]``.

    Exactly 0 where the two distributions are identical. Clamped at 0 against rounding.
    """
    p = logp_native.exp()
    kl = (p * (logp_native - logp_policy)).sum(-1)
    return kl.clamp_min(0.0)


def greedy_agreement(native: torch.Tensor, policy: torch.Tensor) -> tuple[float, float]:
    """``(share of identical tokens, mean steps until the first divergence)`` of two greedy
    generations ``[N, S]`` from the same prompts; a row that never diverges counts ``S`` steps."""
    if native.shape != policy.shape or native.dim() != 2:
        raise ValueError(f"need two [N, S] token tensors of one shape, got {tuple(native.shape)} "
                         f"and {tuple(policy.shape)}")
    same = native == policy                                            # [N, S]
    S = same.shape[1]
    # first False per row; argmin of a bool row gives 0 for an all-True row, so patch those
    first = torch.where(same.all(dim=1), torch.full_like(same[:, 0], S, dtype=torch.long),
                        (~same).long().argmax(dim=1))
    return same.double().mean().item(), first.double().mean().item()


def bootstrap(statistic: Callable[[torch.Tensor], torch.Tensor], n: int, *, resamples: int = DEFAULT_RESAMPLES,
              seed: int = DEFAULT_SEED, level: float = 0.95) -> Interval:
    """Percentile bootstrap of ``statistic`` over ``n`` items.

    ``statistic(idx)`` takes an index tensor ``[R, N]`` (rows of items drawn with replacement;
    ``idx = arange(n)[None]`` is the sample itself) and returns ``[R]`` values.
    """
    if n < 1:
        raise ValueError("bootstrap needs at least one item")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    value = float(statistic(torch.arange(n)[None])[0])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    stats = statistic(idx).double()
    tail = (1 - level) / 2
    lo, hi = torch.quantile(stats, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(value, lo, hi)


def paired_bootstrap(native: torch.Tensor, policy: torch.Tensor, **kwargs) -> Interval:
    """Mean of ``policy - native`` over paired items ``[N]`` (e.g. 0/1 correctness), with its
    interval. Identical inputs give exactly ``Interval(0, 0, 0)``."""
    if native.shape != policy.shape or native.dim() != 1:
        raise ValueError(f"need two [N] tensors of one shape, got {tuple(native.shape)} and {tuple(policy.shape)}")
    diff = policy.double() - native.double()
    return bootstrap(lambda idx: diff[idx].mean(dim=1), diff.numel(), **kwargs)


def perplexity(nll: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp(total negative log-likelihood / total tokens) of per-sequence sums ``[N]``."""
    return math.exp(nll.double().sum().item() / max(tokens.double().sum().item(), 1.0))


def perplexity_delta(nll_native: torch.Tensor, nll_policy: torch.Tensor, tokens: torch.Tensor,
                     **kwargs) -> Interval:
    """Relative perplexity change ``ppl_policy / ppl_native - 1`` (0.01 = 1 % worse), with an
    interval from resampling sequences; arguments are per-sequence NLL sums and token counts."""
    diff, t = nll_policy.double() - nll_native.double(), tokens.double()
    return bootstrap(lambda idx: torch.expm1(diff[idx].sum(1) / t[idx].sum(1).clamp_min(1.0)), t.numel(), **kwargs)


_WORD = re.compile(r"[A-Za-z']+")


def first_word(text: str) -> str:
    """The first word of a generated answer (letters and apostrophes), lower-cased; '' if none."""
    m = _WORD.search(text)
    return m.group(0).lower().strip("'") if m else ""


def _words(text: str) -> list[str]:
    return [w.strip("'") for w in _WORD.findall(text.lower())]


def exact_match(generated: str, answer: str) -> bool:
    """Short-answer exact match as the reference tasks score it: the generation's first words,
    as many as the answer has (one for ``next_word``, two for ``next_words_gen``), against the
    answer, ignoring case and punctuation."""
    want = _words(answer)
    return bool(want) and _words(generated)[:len(want)] == want
