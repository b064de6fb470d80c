"""Paired comparison of two lm-eval runs (native routing vs a policy) from their per-item samples.

    lynx lm-eval --model lynx-hf --model_args "pretrained=PATH,decode_scoring=true" --tasks T \\
        --output_path runs/native --log_samples
    lynx lm-eval ... --model_args "pretrained=PATH,policy=SPEC,decode_scoring=true" ... --output_path runs/policy --log_samples
    lynx lm-eval-compare runs/native runs/policy

Why: lm-eval's standard errors are per run, so two runs' intervals overlap even where every item
moves the same way; the items are the same in both runs, and resampling them in pairs
(``metrics.paired_bootstrap`` / ``metrics.perplexity_delta``) gives the interval of the difference.

Per task and metric, from each item's value in lm-eval's ``samples_<task>_<time>.jsonl``:
- a number per item (``acc``, ``exact_match``, ...): mean, and the policy's difference in points
  with its 95 % interval;
- ``perplexity`` of a ``loglikelihood`` task (each item its log-likelihood): exp(-mean), and its
  relative change;
- ``[log-likelihood, count]`` per item (``word_perplexity``, ``byte_perplexity`` of
  ``loglikelihood_rolling`` tasks): exp(-sum / sum of counts), and its relative change
  (``bits_per_byte`` says the same as ``byte_perplexity`` and is left out).
Reading files and the statistics are here; ``lynx_moe.cli.lm_eval_compare`` prints.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from . import metrics

__all__ = ["load_samples", "compare"]

_SAMPLES = re.compile(r"^samples_(.+)_(\d{4}-\d\d-\d\dT[\d.-]+)\.jsonl$")
_SKIP = {"bits_per_byte"}

# task -> {(doc_id, filter): {metric: value}}
Samples = dict[str, dict[tuple[int, str], dict[str, Any]]]


def load_samples(path: Path | str) -> Samples:
    """Per-item metric values of every task in an lm-eval ``--output_path`` folder (searched
    recursively; the newest samples file of each task) or in one ``samples_*.jsonl`` file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("samples_*.jsonl"))
    newest: dict[str, Path] = {}
    for f in files:
        m = _SAMPLES.match(f.name)
        if m and (m.group(1) not in newest or m.group(2) > _SAMPLES.match(newest[m.group(1)].name).group(2)):
            newest[m.group(1)] = f
    if not newest:
        raise FileNotFoundError(f"{path}: no lm-eval samples_<task>_<time>.jsonl (run lm-eval with --log_samples)")
    out: Samples = {}
    for task, f in sorted(newest.items()):
        items = {}
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                s = json.loads(line)
                items[(int(s["doc_id"]), str(s.get("filter", "none")))] = {m: s[m] for m in s.get("metrics", [])
                                                                           if m in s and m not in _SKIP}
        out[task] = items
    return out


def _metric(name: str, native: list, policy: list, **kwargs) -> dict[str, Any]:
    if isinstance(native[0], list):   # [log-likelihood, words or bytes] per item
        ll_n, ll_p = (torch.tensor([float(v[0]) for v in vs], dtype=torch.float64) for vs in (native, policy))
        count = torch.tensor([float(v[1]) for v in native], dtype=torch.float64)
        ci = metrics.perplexity_delta(-ll_n, -ll_p, count, **kwargs)
        return {"kind": "perplexity", "native": metrics.perplexity(-ll_n, count),
                "policy": metrics.perplexity(-ll_p, count), "change": ci}
    n, p = (torch.tensor([float(v) for v in vs], dtype=torch.float64) for vs in (native, policy))
    if name == "perplexity":          # a log-likelihood per item; lm-eval reports exp(-mean)
        ones = torch.ones_like(n)
        return {"kind": "perplexity", "native": math.exp(-n.mean().item()), "policy": math.exp(-p.mean().item()),
                "change": metrics.perplexity_delta(-n, -p, ones, **kwargs)}
    return {"kind": "mean", "native": n.mean().item(), "policy": p.mean().item(),
            "change": metrics.paired_bootstrap(n, p, **kwargs)}


def compare(native: Samples, policy: Samples, **kwargs) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {"metric,filter": {"kind", "native", "policy", "change": Interval, "items"}}}`` for
    the tasks both runs have. ``change`` is policy - native for a mean (0.01 = one point) and
    policy / native - 1 for a perplexity, with its paired 95 % interval (``kwargs`` go to the
    bootstrap). ValueError where the runs scored different items of a task (another ``--limit``)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in sorted(set(native) & set(policy)):
        a, b = native[task], policy[task]
        if set(a) != set(b):
            raise ValueError(f"{task}: the runs scored different items ({len(a)} vs {len(b)}); "
                             "run both with the same --limit")
        keys = sorted(a)
        rows = {}
        for filt in sorted({k[1] for k in keys}):
            ks = [k for k in keys if k[1] == filt]
            for name in a[ks[0]]:
                rows[f"{name},{filt}"] = _metric(name, [a[k][name] for k in ks], [b[k][name] for k in ks], **kwargs)
                rows[f"{name},{filt}"]["items"] = len(ks)
        out[task] = rows
    if not out:
        raise ValueError(f"no task in both runs (native: {sorted(native)}, policy: {sorted(policy)})")
    return out
