"""The quality frontier: every policy's sweep of its own knob, at several batch sizes.

    rows = frontier(model, tokenizer, texts, families_for(E, K, similarity), [8, 16, 32, 64], cfg)

Each family (``families_for``) is one policy with its main knob swept from mild to deep; every
setting is measured with ``measure.quality.evaluate`` in decode mode at each batch size (distinct
experts per MoE layer and step, native's beside it; perplexity change with a paired 95 %
interval; KL to native) on the **test** half of the held-out text (``tune.split_texts``: odd
segments), which ``lynx tune``'s search never sees. The command is ``lynx frontier``.
"""

from __future__ import annotations

from pathlib import Path

from ..policies import OEA, SERE, AffinityBinning, Confidence, MassFloor, Policy, SizePrice, StaticK, XShare
from .quality import EvalConfig, evaluate
from .tune import split_texts

__all__ = ["at_target", "families_for", "frontier", "saved_at"]


def families_for(experts: int, top_k: int, similarity: str | Path | None = None,
                 sizes: str | Path | None = None) -> dict[str, list[Policy]]:
    """Per family, its settings from the mildest cut to the deepest. SERE needs the model's
    similarity file (``lynx similarity``), SizePrice its sizes file (``lynx sizes``); without
    one the family is left out."""
    fams: dict[str, list[Policy]] = {
        "affinity_binning": [AffinityBinning(3.0, b) for b in (4, 3, 2, 1)],
        "confidence": [Confidence(1, 1.0), Confidence(1, 0.5), Confidence(0, 1.0), Confidence(0, 0.5)],
        "oea": [OEA(k0) for k0 in range(top_k - 1, 0, -1)],
        "mass_floor": [MassFloor(m) for m in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)],
        "xshare": [XShare(n, 1) for n in sorted({int(experts * f) for f in (0.75, 0.625, 0.5, 0.375, 0.25)},
                                                 reverse=True) if top_k <= n < experts],
        "static_k": [StaticK(k) for k in range(top_k - 1, 0, -1)],
    }
    if similarity is not None:
        fams["sere"] = [SERE(2, rho, str(similarity)) for rho in (0.5, 0.3, 0.2, 0.1, 0.0)]
    if sizes is not None:
        fams["size_price"] = [SizePrice(lam, sizes=str(sizes)) for lam in (1.25e-4, 2.5e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3)]
    return fams


def frontier(model, tokenizer, texts: dict[str, list[str]], families: dict[str, list[Policy]],
             batch_sizes: list[int], cfg: EvalConfig, progress=None) -> list[dict]:
    """One row per batch size and setting (native first at each batch size): ``batch``,
    ``family``, ``policy``, ``saved``, ``distinct``, ``distinct_native``, ``ppl_delta_pct`` with
    ``lo``/``hi``, ``kl``."""
    _, test = split_texts(texts)
    if not test:
        raise ValueError("the frontier needs held-out text with at least two segments per domain")
    policies = [p for ps in families.values() for p in ps]
    # A setting in two families (a tuned file equal to a peer's setting) is measured once and
    # listed under both.
    wanted = [("native", "native")] + [(f, str(p)) for f, ps in families.items() for p in ps]
    rows = []
    for B in batch_sizes:
        run = EvalConfig(**{**cfg.__dict__, "batch_size": B})
        measured = {r["policy"]: r for r in evaluate(model, tokenizer, policies, test, [], run, progress=progress)}
        for fam, spec in wanted:
            r = measured[spec]
            d = r["perplexity"]["delta_pct"]
            rows.append({"batch": B, "family": fam, "policy": r["policy"],
                         "saved": r["routing"]["saved"], "distinct": r["routing"]["distinct"],
                         "distinct_native": r["routing"]["distinct_native"], "ppl_delta_pct": d["value"],
                         "lo": d["lo"], "hi": d["hi"], "kl": r["perplexity"]["kl"]})
    return rows


def saved_at(rows: list[dict], target: float) -> float | None:
    """A family's saved fraction at perplexity change ``target`` (%), linear between its
    settings sorted by perplexity, from native (0, 0); None beyond its deepest setting."""
    pts = [(0.0, 0.0)] + sorted((r["ppl_delta_pct"], r["saved"]) for r in rows)
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if d0 <= target <= d1:
            return s0 + (s1 - s0) * (target - d0) / (d1 - d0) if d1 > d0 else max(s0, s1)
    return None


def at_target(rows: list[dict], target: float = 0.5) -> list[dict]:
    """Per batch size and family of ``frontier`` rows: ``best``, the most saved by a measured
    setting at or under ``target`` % perplexity (0 if none), and ``curve``, ``saved_at`` the
    target (None beyond the family's deepest setting)."""
    out = []
    for B in dict.fromkeys(r["batch"] for r in rows):
        at_b = [r for r in rows if r["batch"] == B and r["family"] != "native"]
        for fam in dict.fromkeys(r["family"] for r in at_b):
            fr = [r for r in at_b if r["family"] == fam]
            out.append({"batch": B, "family": fam, "curve": saved_at(fr, target),
                        "best": max((r["saved"] for r in fr if r["ppl_delta_pct"] <= target), default=0.0)})
    return out
