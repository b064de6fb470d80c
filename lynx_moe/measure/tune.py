"""``lynx tune``'s search: the policy that saves the most experts within a perplexity budget.

    result = tune(model, tokenizer, texts, batch_size=32, max_ppl_increase=0.5)

The held-out text of each domain is split in two, alternately by segment: a calibration half,
on which every candidate (``candidates_for``: AffinityBinning, OEA, XShare and Confidence over
their knobs) is measured in decode mode (``measure.quality.evaluate``: distinct experts per
decode step and the perplexity change against native, with a paired 95 % interval), and a
test half that no choice saw, on which the winner and the authors' preset are measured again.
The winner saves the most distinct experts among the candidates whose calibration perplexity
change is at most ``max_ppl_increase`` percent. One policy for every layer (per-layer budgets
are not searched).
"""

from __future__ import annotations

from ..integrations import hf
from ..policies import OEA, AffinityBinning, Confidence, Policy, XShare
from ..presets import for_shape
from .quality import EvalConfig, evaluate

__all__ = ["candidates_for", "split_texts", "tune"]


def candidates_for(experts: int, top_k: int) -> list[Policy]:
    """The searched settings for a model of ``experts`` x ``top_k``."""
    out: list[Policy] = [AffinityBinning(float(a), b) for a in (1, 2, 3, 4) for b in (1, 2, 3, 4)]
    out += [OEA(k0) for k0 in range(1, top_k)]
    out += [XShare(n, k0) for n in sorted({int(experts * f) for f in (0.25, 0.375, 0.5, 0.625)} - {0})
            for k0 in (1, 2) if top_k <= n < experts and k0 <= top_k]
    out += [Confidence(alpha=a, beta=b) for a in (0, 1) for b in (0.5, 1.0)]
    return out


def split_texts(texts: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(calibration, test): even and odd segments of each domain."""
    return ({d: t[0::2] for d, t in texts.items() if t[0::2]}, {d: t[1::2] for d, t in texts.items() if t[1::2]})


def _row(r: dict) -> dict:
    d = r["perplexity"]["delta_pct"]
    return {"policy": r["policy"], "saved": r["routing"]["saved"], "distinct": r["routing"]["distinct"],
            "distinct_native": r["routing"]["distinct_native"], "ppl_delta_pct": d["value"],
            "ppl_delta_lo": d["lo"], "ppl_delta_hi": d["hi"], "kl": r["perplexity"]["kl"]}


def tune(model, tokenizer, texts: dict[str, list[str]], *, batch_size: int, max_ppl_increase: float,
         cfg: EvalConfig | None = None, candidates: list[Policy] | None = None, progress=None) -> dict:
    """Search (see the module docstring); returns the winner, the calibration frontier and the
    test-split check (native, preset, winner)."""
    if max_ppl_increase < 0:
        raise ValueError(f"max_ppl_increase must be >= 0 (percent), got {max_ppl_increase}")
    E, K = hf.moe_shape(model)
    cfg = cfg or EvalConfig(batch_size=batch_size, ppl_per_domain=8, gen_prompts=0)
    calib, test = split_texts(texts)
    if not calib or not test:
        raise ValueError("tuning needs held-out text with at least two segments per domain")
    candidates = candidates or candidates_for(E, K)
    for p in candidates:
        p.check_top_k(K)
    searched = [_row(r) for r in evaluate(model, tokenizer, candidates, calib, [], cfg, progress=progress)[1:]]
    fits = [r for r in searched if r["ppl_delta_pct"] <= max_ppl_increase]
    preset_name, preset = for_shape(E, K)
    if not fits:
        return {"winner": None, "searched": searched, "reason": f"no candidate within +{max_ppl_increase} % "
                f"perplexity on the calibration split"}
    best = max(fits, key=lambda r: (r["saved"], -r["ppl_delta_pct"]))
    winner = next(p for p in candidates if str(p) == best["policy"])
    check = [winner] + ([preset] if str(preset) != str(winner) else [])
    tested = [_row(r) for r in evaluate(model, tokenizer, check, test, [], cfg)[1:]]
    return {"winner": str(winner), "winner_spec": winner.to_dict(), "preset": f"{preset_name}: {preset}",
            "batch_size": cfg.batch_size, "max_ppl_increase": max_ppl_increase,
            "calibration": best, "test": tested, "searched": searched}
