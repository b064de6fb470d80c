"""``lynx tune``'s search: the policy that saves the most experts within a perplexity budget.

    result = tune(model, tokenizer, texts, batch_size=32, max_ppl_increase=0.5)

The held-out text of each domain is split in two, alternately by segment: a calibration half,
on which every candidate (``candidates_for``: AffinityBinning, OEA, XShare and Confidence over
their knobs) is measured in decode mode (``measure.quality.evaluate``: distinct experts per
decode step and the perplexity change against native, with a paired 95 % interval), and a
test half that no choice saw, on which the winner and the authors' preset are measured again.
The winner saves the most distinct experts among the candidates whose calibration perplexity
change is at most ``max_ppl_increase`` percent.

Per layer (``per_layer=True``): the candidates on the calibration frontier are measured again,
each on one MoE layer alone (native elsewhere); perplexity changes of single layers add up
closely (measured on the reference model: OEA k0=2 per layer +0.23/+0.35/+0.56/+0.30 %, all
layers at once +1.49 %), so a knapsack (``pick_per_layer``) picks one setting per layer that
saves the most experts within the budget; the combination is measured, and the budget
tightened until it fits. The per-layer result wins if it saves more than the single winner.

A single layer's perplexity change is a fraction of a percent, about as wide as its own
interval, and a knapsack over noisy costs picks the settings whose noise happened to be low
(the winner then overshoots on the test split). KL(native || policy) per token measures the
same damage with far less noise (it is never negative and averages over every scored
token's distribution), and across the whole-model candidates the perplexity change is close
to proportional to it (reference model, OEA k0=5..2: 130, 120, 110, 100 % per nat). So the
knapsack's cost of a single-layer setting is ``ppl_per_kl x its KL``, ``ppl_per_kl`` fitted on
the whole-model candidates (``ppl_per_kl``); the combination is still judged by its measured
perplexity change.
"""

from __future__ import annotations

import math

from ..integrations import hf
from ..policies import OEA, AffinityBinning, Confidence, PerLayer, Policy, TopK, XShare
from ..presets import for_shape
from .quality import EvalConfig, evaluate

__all__ = ["candidates_for", "split_texts", "pick_per_layer", "ppl_per_kl", "frontier", "tune"]


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


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both saved experts and perplexity change, most saved first."""
    rows = sorted(rows, key=lambda r: (-r["saved"], r["ppl_delta_pct"]))
    out: list[dict] = []
    for r in rows:
        if not out or r["ppl_delta_pct"] < out[-1]["ppl_delta_pct"]:
            out.append(r)
    return out


def ppl_per_kl(rows: list[dict]) -> float:
    """Least-squares slope through the origin of perplexity change (%) on KL (nats per token)
    over ``rows`` (``_row`` dicts), the settings that changed anything; 0 without any."""
    pts = [(r["kl"], r["ppl_delta_pct"]) for r in rows if r["kl"] > 0]
    den = sum(k * k for k, _ in pts)
    return sum(k * d for k, d in pts) / den if den > 0 else 0.0


def pick_per_layer(options: list[list[tuple[float, float]]], budget: float, steps: int = 200) -> list[int | None]:
    """Knapsack: ``options[i]`` lists ``(experts saved, ppl change %)`` of layer i's settings;
    returns per layer the index of the chosen setting (None: native) that maximises the saved
    experts with the summed (non-negative) perplexity changes at most ``budget``."""
    if budget <= 0:
        return [None] * len(options)
    unit = budget / steps
    best = {0: (0.0, [])}                      # cost units used -> (saved, choices)
    for layer in options:
        nxt: dict[int, tuple[float, list]] = {}
        for used, (saved, picks) in best.items():
            for j, (gain, cost) in [(None, (0.0, 0.0)), *enumerate(layer)]:
                c = used + math.ceil(max(cost, 0.0) / unit - 1e-9)
                if c <= steps and gain >= 0 and (c not in nxt or nxt[c][0] < saved + gain):
                    nxt[c] = (saved + gain, picks + [j])
        best = nxt
    return max(best.values(), key=lambda v: v[0])[1]


def _per_layer(model, tokenizer, calib, ladder: list[Policy], budget: float, slope: float, cfg,
               progress) -> tuple[dict | None, list]:
    """Search one setting per layer (see the module docstring; a setting's cost is ``slope`` x
    its KL, its measured perplexity change if ``slope`` is 0); returns the best combination
    that fits (a calibration row with ``spec``) and the single-layer table."""
    L = len(hf.moe_layers(model))
    alone = [PerLayer(tuple(p if j == i else TopK() for j in range(L))) for i in range(L) for p in ladder]
    res = evaluate(model, tokenizer, alone, calib, [], cfg, progress=progress)
    native = res[0]["routing"]["distinct_per_layer"]
    table, options = [], [[] for _ in range(L)]
    for n, r in enumerate(res[1:]):
        i, p = divmod(n, len(ladder))
        gain = native[i] - r["routing"]["distinct_per_layer"][i]
        kl, delta = r["perplexity"]["kl"], r["perplexity"]["delta_pct"]["value"]
        cost = slope * kl if slope > 0 else delta
        options[i].append((gain, cost))
        table.append({"layer": i, "policy": str(ladder[p]), "saved": round(gain / max(native[i], 1e-9), 4),
                      "ppl_delta_pct": delta, "kl": kl, "cost_pct": round(cost, 4)})
    cap, tried = budget, set()
    for _ in range(4):
        picks = pick_per_layer(options, cap)
        policy = PerLayer(tuple(TopK() if j is None else ladder[j] for j in picks))
        if all(j is None for j in picks) or str(policy) in tried:
            break
        tried.add(str(policy))
        row = _row(evaluate(model, tokenizer, [policy], calib, [], cfg)[1])
        if row["ppl_delta_pct"] <= budget:
            return {**row, "spec": policy}, table
        cap *= 0.7
    return None, table


def tune(model, tokenizer, texts: dict[str, list[str]], *, batch_size: int, max_ppl_increase: float,
         cfg: EvalConfig | None = None, candidates: list[Policy] | None = None, progress=None,
         per_layer: bool = True) -> dict:
    """Search (see the module docstring); returns the winner, the calibration frontier, the
    per-layer table and the test-split check (native, preset, winner)."""
    if not max_ppl_increase >= 0:
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
    by_name = {str(p): p for p in candidates}
    best, winner = (max(fits, key=lambda r: (r["saved"], -r["ppl_delta_pct"])), None) if fits else (None, None)
    if best is not None:
        winner = by_name[best["policy"]]
    layers_table: list = []
    slope = None
    if per_layer and len(hf.moe_layers(model)) > 1:
        # The frontier's settings up to four times the budget, at most 12 (the deeper ones matter
        # for the layers that tolerate them).
        ladder = [by_name[r["policy"]] for r in frontier(searched)
                  if r["ppl_delta_pct"] <= 4 * max_ppl_increase + 0.1][:12]
        slope = ppl_per_kl(searched)
        combo, layers_table = _per_layer(model, tokenizer, calib, ladder, max_ppl_increase, slope, cfg, None) \
            if ladder else (None, [])
        if combo is not None and (best is None or combo["saved"] > best["saved"]):
            winner, best = combo.pop("spec"), combo
    if winner is None:
        return {"winner": None, "searched": searched, "per_layer": layers_table,
                "reason": f"no candidate within +{max_ppl_increase} % perplexity on the calibration split"}
    check = [winner] + ([preset] if str(preset) != str(winner) else [])
    tested = [_row(r) for r in evaluate(model, tokenizer, check, test, [], cfg)[1:]]
    return {"winner": str(winner), "winner_spec": winner.to_dict(), "preset": f"{preset_name}: {preset}",
            "batch_size": cfg.batch_size, "max_ppl_increase": max_ppl_increase,
            "calibration": best, "test": tested, "searched": searched, "per_layer": layers_table,
            "ppl_per_kl": slope}
