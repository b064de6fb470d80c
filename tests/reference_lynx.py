"""An independent, plain-Python AffinityBinning written from the specification
(docs/algorithms.md, section 2), not from lynx_moe.routing.

Slow on purpose: loops over rows and experts, exact rational popularity (``Fraction``), bins
computed in float32 like the router's logits. Used by the tests to check the fast
implementation decision for decision.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def affinity_binning(logits: np.ndarray, k: int, alpha: float, beta: int | None,
                     vote: list[bool], native: list[list[int]]) -> tuple[set[int], list[list[int]]]:
    """Returns (keep set, final expert ids per voting row, best first by logit).

    ``native`` (each row's native top-k) only breaks exact ties at step 6, which the spec
    leaves open: lynx prefers the row's native experts, then the lower index."""
    L = np.asarray(logits, dtype=np.float32)
    T, E = L.shape
    rows = [t for t in range(T) if vote[t]]
    B = len(rows)
    a = np.float32(alpha)

    # Step 2: bins. Integers 0, -1, ..., clamped at -beta.
    Q = {}
    for t in rows:
        top = L[t].max()
        for e in range(E):
            q = math.ceil(float(a * (L[t, e] - top)))
            if beta is not None and q <= -beta:
                q = -beta
            Q[t, e] = q

    # Step 3: bin weight B**Q and batch popularity.
    H = {(t, e): Fraction(B) ** Q[t, e] for t in rows for e in range(E)}
    S = [sum(H[t, e] for t in rows) for e in range(E)]

    # Steps 4-5: score, each row picks its top-k, ties to the lower expert index.
    keep: set[int] = set()
    for t in rows:
        M = [Q[t, e] + (S[e] - H[t, e]) / B for e in range(E)]
        picks = sorted(range(E), key=lambda e: (-M[e], e))[:k]
        keep.update(picks)

    # Step 6: each row takes its top-k logits among the kept experts.
    final = []
    for t in rows:
        kept = sorted(keep, key=lambda e: (-float(L[t, e]), e not in native[t], e))
        final.append(kept[:k])
    return keep, final


def weights(logits_row: np.ndarray, ids: list[int], renormalize: bool, native_mass: float) -> np.ndarray:
    """Step 6 weights: softmax over the row's kept picks, renormalised to 1 or rescaled to
    the row's original top-k probability mass."""
    x = np.asarray(logits_row, dtype=np.float64)[ids]
    p = np.exp(x - x.max())
    p = p / p.sum()
    return p if renormalize else p * native_mass
