"""Quality of routing policies against native routing, measured in decode mode.

``evaluate(model, tokenizer, policies, texts, tasks, EvalConfig())`` runs native routing and
each policy over the same batches (``lynx_moe.measure.decode``: prefix prefilled, every scored token
predicted by a decode step with B rows), batch by batch, so native outputs are only kept for
the batch at hand. Why decode mode: the policies act only on decode steps; a prefill-only
forward routes natively and would measure no loss at all, whatever the policy does.

Per policy it returns routing counts (distinct experts per MoE layer and decode step from
``lynx.routing_stats``; native's own count beside it), perplexity per domain and its change
with a 95 % paired-bootstrap interval, KL(native || policy), top-1 agreement, greedy
agreement, and per task the accuracy and its delta against native with an interval. The
command line is ``lynx eval`` (``lynx_moe.cli.eval``); ``expand_sweep`` turns a grid spec into
policies, ``check_policies`` refuses policies a model cannot run before anything is measured.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..costmodel import CostModel
from ..integrations import hf
from ..policies import Policy, TopK, parse_policy
from . import metrics
from .data import Task, encode, heldout_rows
from .decode import greedy, prefill, teacher_forced

__all__ = ["EvalConfig", "evaluate", "expand_sweep", "check_policies", "DEFAULT_SWEEP"]

DEFAULT_SWEEP = "affinity_binning:alpha=1|3,beta=1|2|4"

# progress(done, total): called after each batch x policy (the CLI draws a bar with it)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalConfig:
    """Sizes of one evaluation (all per policy; native runs the same)."""

    batch_size: int = 32        # decode rows per step
    prefix: int = 16            # prefilled tokens of each held-out row
    ppl_tokens: int = 64        # scored decode steps per held-out row
    ppl_per_domain: int = 16    # held-out rows per domain
    limit: int | None = 200     # items per task (None: all)
    gen_prompts: int = 64       # greedy-agreement prompts
    gen_tokens: int = 32        # greedy-agreement steps
    resamples: int = metrics.DEFAULT_RESAMPLES
    seed: int = metrics.DEFAULT_SEED
    gate: CostModel | None = None   # gate every policy (``lynx_moe.costmodel``): cut only where it pays

    def __post_init__(self) -> None:
        for name in ("batch_size", "prefix", "ppl_tokens", "gen_tokens", "resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ppl_per_domain", "gen_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")


# ---------------------------------------------------------------------------------------
# Running policies batch by batch

class _Stats:
    """Routing counts summed over runs: per layer [steps, rows, distinct native x steps,
    distinct policy x steps, changed share x rows]."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, layer_stats) -> None:
        t = torch.tensor([[s.steps, s.decode_rows, s.distinct_native * s.steps, s.distinct_policy * s.steps,
                           s.changed_share * s.decode_rows] for s in layer_stats], dtype=torch.float64)
        self.sums = t if self.sums is None else self.sums + t

    def to_dict(self) -> dict:
        if self.sums is None or self.sums[:, 0].sum() == 0:
            return {"steps": 0, "rows_per_step": 0.0, "distinct": 0.0, "distinct_native": 0.0, "saved": 0.0,
                    "changed_share": 0.0, "distinct_per_layer": []}
        s = self.sums
        steps = s[:, 0].clamp_min(1)
        per_layer = (s[:, 3] / steps).tolist()
        d, dn = sum(per_layer) / len(per_layer), (s[:, 2] / steps).mean().item()
        return {"steps": int(s[0, 0]), "rows_per_step": round((s[:, 1] / steps).mean().item(), 2),
                "distinct": round(d, 3), "distinct_native": round(dn, 3), "saved": round(1 - d / max(dn, 1e-9), 4),
                "changed_share": round((s[:, 4].sum() / s[:, 1].sum().clamp_min(1)).item(), 4),
                "distinct_per_layer": [round(v, 3) for v in per_layer]}


class _Bar:
    """Counts finished batch x policy runs for ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def update(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def skip(self, runs: int) -> None:
        """``runs`` that were counted in ``total`` will not happen."""
        self.total -= runs


def _each_policy(model, policies: dict, stats: dict[str, _Stats], work, gate: CostModel | None):
    """Yield ``(name, work())`` for every policy, applied (with statistics) around the call."""
    for name, policy in policies.items():
        hf.apply_(model, policy, stats=True, gate=gate)
        try:
            out = work()
            stats[name].add(hf.routing_stats(model))
        finally:
            hf.remove_(model)
        yield name, out


def _batches(n: int, size: int):
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _perplexity(model, policies, rows, domains, cfg, pad_id, bar) -> tuple[dict, dict]:
    """Per policy: per-row NLL sums and token counts, KL and top-1 agreement sums."""
    names = list(policies)
    acc = {n: {"nll": [], "tokens": [], "kl": 0.0, "top1": 0, "scored": 0} for n in names}
    stats = {n: _Stats() for n in names}
    for idx in _batches(len(rows), cfg.batch_size):
        batch = [rows[i] for i in idx]
        lens = [cfg.prefix] * len(batch)
        pre = prefill(model, batch, lens, pad_id)
        native = None
        for name, sc in _each_policy(model, policies, stats,
                                     lambda: teacher_forced(model, pre, batch, lens, keep_logprobs=True), cfg.gate):
            native = sc if native is None else native
            a = acc[name]
            a["nll"] += (-sc.logprobs.double().sum(1)).tolist()
            a["tokens"] += sc.live.sum(1).tolist()
            live = sc.live
            a["kl"] += metrics.kl_per_token(native.full[live], sc.full[live]).double().sum().item()
            a["top1"] += (sc.argmax == native.argmax)[live].sum().item()
            a["scored"] += live.sum().item()
            bar.update()
    return acc, {n: s.to_dict() for n, s in stats.items()}


def _greedy_runs(model, policies, prompts, steps, pad_id, cfg, bar) -> tuple[dict, dict]:
    names = list(policies)
    out = {n: [] for n in names}
    stats = {n: _Stats() for n in names}
    for idx in _batches(len(prompts), cfg.batch_size):
        batch = [prompts[i] for i in idx]
        pre = prefill(model, batch, [len(r) - 1 for r in batch], pad_id)
        for name, gen in _each_policy(model, policies, stats, lambda: greedy(model, pre, batch, steps), cfg.gate):
            out[name].append(gen)
            bar.update()
    return {n: torch.cat(v) for n, v in out.items()}, {n: s.to_dict() for n, s in stats.items()}


def _choice_task(model, policies, task, tokenizer, cfg, pad_id, bar) -> tuple[dict, dict]:
    """Per policy, 0/1 correctness per item. Each batch holds one choice of ``B`` different
    items, so a batch's rows are as unrelated as a server's."""
    items = task.items
    enc = [_context_ids(tokenizer, it["context"], pad_id) for it in items]
    choice_ids = [[encode(tokenizer, ch) or [pad_id] for ch in it["choices"]] for it in items]
    pairs = [(i, c) for g in _batches(len(items), cfg.batch_size)
             for c in range(max(len(items[i]["choices"]) for i in g)) for i in g if c < len(items[i]["choices"])]
    scores = {n: [[float("-inf")] * len(it["choices"]) for it in items] for n in policies}
    stats = {n: _Stats() for n in policies}
    for idx in _batches(len(pairs), cfg.batch_size):
        rows, lens = [], []
        for i, c in (pairs[j] for j in idx):
            rows.append(enc[i] + choice_ids[i][c])
            lens.append(len(enc[i]) - 1)   # the last context token is fed by the first decode step
        pre = prefill(model, rows, lens, pad_id)
        for name, sc in _each_policy(model, policies, stats, lambda: teacher_forced(model, pre, rows, lens),
                                     cfg.gate):
            for r, j in enumerate(idx):
                i, c = pairs[j]
                scores[name][i][c] = sc.row_logprobs(r).double().sum().item()
            bar.update()
    if task.metric == "acc_norm":   # lm-eval's acc_norm: log-likelihood per byte of the choice
        scores = {n: [[v / max(1, len(ch.encode("utf-8"))) for v, ch in zip(s, it["choices"])]
                      for s, it in zip(sc, items)] for n, sc in scores.items()}
    correct = {n: torch.tensor([float(max(range(len(s)), key=s.__getitem__) == it["label"])
                                for s, it in zip(sc, items)]) for n, sc in scores.items()}
    return correct, {n: s.to_dict() for n, s in stats.items()}


def _generate_task(model, policies, task, tokenizer, cfg, pad_id, bar) -> tuple[dict, dict]:
    prompts = [_context_ids(tokenizer, it["context"], pad_id) for it in task.items]
    gens, stats = _greedy_runs(model, policies, prompts, task.max_new_tokens, pad_id, cfg, bar)
    correct = {n: torch.tensor([float(metrics.exact_match(_until(tokenizer.decode(g.tolist()), task.until),
                                                          it["answer"]))
                                for g, it in zip(gen, task.items)]) for n, gen in gens.items()}
    return correct, stats


def _task(model, policies, task, tokenizer, cfg, pad_id, bar, min_over_chance) -> tuple[dict, dict]:
    """Per-item correctness and routing counts of every policy on one task; with
    ``min_over_chance``, native runs first and the policies only if it is above that."""
    run = _choice_task if task.kind == "choice" else _generate_task
    if not min_over_chance:
        return run(model, policies, task, tokenizer, cfg, pad_id, bar)
    native = {"native": policies["native"]}
    correct, stats = run(model, native, task, tokenizer, cfg, pad_id, bar)
    others = {n: p for n, p in policies.items() if n != "native"}
    if correct["native"].mean().item() < min_over_chance * task.chance or not others:
        bar.skip(len(others) * _task_batches(task, cfg))
        return correct, stats
    more_correct, more_stats = run(model, others, task, tokenizer, cfg, pad_id, bar)
    return correct | more_correct, stats | more_stats


def _until(text: str, stops: tuple[str, ...]) -> str:
    """The generation up to its first stop string, as lm-eval cuts it before scoring."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def _context_ids(tokenizer, text: str, pad_id: int, max_len: int = 256) -> list[int]:
    """The context's last ``max_len`` tokens, at least 2 (one prefilled, one fed by the first
    decode step): a shorter one gets the EOS (document separator) in front."""
    ids = encode(tokenizer, text)[-max_len:]
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id
    return [sep] * max(0, 2 - len(ids)) + ids


def _task_batches(task, cfg) -> int:
    if task.kind == "generate":
        return len(_batches(len(task.items), cfg.batch_size))
    return len(_batches(sum(len(it["choices"]) for it in task.items), cfg.batch_size))


# ---------------------------------------------------------------------------------------
# The evaluation

def evaluate(model, tokenizer, policies: list[Policy], texts: dict[str, list[str]] | None, tasks: list[Task],
             cfg: EvalConfig = EvalConfig(), *, progress: Progress | None = None,
             min_over_chance: float = 0.0) -> list[dict]:
    """Quality of each policy against native routing (prepended as ``native``), in decode mode.

    ``texts``: held-out text by domain (perplexity, KL, greedy agreement; None skips them);
    ``tasks``: ``measure.data.Task`` list. Returns one dict per policy, native first
    (see the module docstring for what is in it).

    ``min_over_chance``: a task whose native accuracy is below this multiple of its chance
    level is scored natively only (its result is in native's entry, marked ``at_chance``) and
    left out of the policies' results and of ``tasks_pooled``: a change on a task the model
    cannot do is noise, not a result. Default 0: every task is scored under every policy.
    """
    pad_id = _pad_id(model, tokenizer)
    named = {"native": TopK(), **{str(p): p for p in policies}}
    n = len(named)
    rows, domains = [], []
    if texts:
        rows, domains = _heldout(texts, tokenizer, cfg)
        if len(rows) > cfg.batch_size:   # whole batches only: every step has B rows, as in serving
            keep = len(rows) // cfg.batch_size * cfg.batch_size
            rows, domains = rows[:keep], domains[:keep]
    prompts = [r[:cfg.prefix + 1] for r in rows[:cfg.gen_prompts]]
    tasks = [t if cfg.limit is None else _limited(t, cfg.limit) for t in tasks]
    total = n * (len(_batches(len(rows), cfg.batch_size)) + len(_batches(len(prompts), cfg.batch_size))
                 + sum(_task_batches(t, cfg) for t in tasks))
    bar = _Bar(total, progress)
    results = {name: {"policy": name, "spec": p.to_dict()} for name, p in named.items()}
    t0 = time.perf_counter()
    if rows:
        acc, stats = _perplexity(model, named, rows, domains, cfg, pad_id, bar)
        _add_perplexity(results, acc, stats, domains, cfg)
    if prompts:
        gens, gstats = _greedy_runs(model, named, prompts, cfg.gen_tokens, pad_id, cfg, bar)
        for name, r in results.items():
            share, first = metrics.greedy_agreement(gens["native"], gens[name])
            r["greedy"] = {"agreement": round(share, 4), "first_divergence": round(first, 2),
                           "prompts": len(prompts), "tokens": cfg.gen_tokens, "routing": gstats[name]}
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in named}
    pooled_tasks = []
    for task in tasks:
        correct, tstats = _task(model, named, task, tokenizer, cfg, pad_id, bar, min_over_chance)
        nat = correct["native"]
        for name in correct:
            delta = metrics.paired_bootstrap(nat, correct[name], resamples=cfg.resamples, seed=cfg.seed)
            results[name].setdefault("tasks", {})[task.name] = {
                "kind": task.kind, "metric": task.metric if task.kind == "choice" else "exact_match",
                "n": len(task.items), "chance": round(task.chance, 4),
                "acc": round(correct[name].mean().item(), 4), "acc_native": round(nat.mean().item(), 4),
                "delta_points": delta.to_dict(scale=100, digits=2), "routing": tstats[name]}
        if len(correct) < len(named):
            results["native"]["tasks"][task.name]["at_chance"] = True
            continue
        pooled_tasks.append(task.name)
        for name in named:
            pooled[name].append(correct[name])
    if len(tasks) > 1 and pooled_tasks:   # items of all tasks together: one tighter interval for "points lost"
        nat = torch.cat(pooled["native"])
        for name, r in results.items():
            pol = torch.cat(pooled[name])
            delta = metrics.paired_bootstrap(nat, pol, resamples=cfg.resamples, seed=cfg.seed)
            r["tasks_pooled"] = {"n": len(nat), "tasks": pooled_tasks, "acc": round(pol.mean().item(), 4),
                                 "acc_native": round(nat.mean().item(), 4),
                                 "delta_points": delta.to_dict(scale=100, digits=2)}
    for r in results.values():
        r.setdefault("routing", _first_routing(r))
    out = list(results.values())
    out[0]["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _pad_id(model, tokenizer) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def _heldout(texts, tokenizer, cfg):
    return heldout_rows(texts, tokenizer, cfg.ppl_per_domain, cfg.prefix + cfg.ppl_tokens + 1, cfg.prefix + 2)


def _limited(task, limit: int):
    if len(task.items) <= limit:
        return task
    return Task(task.name, task.kind, task.items[:limit], task.max_new_tokens, task.source, task.until, task.metric)


def _add_perplexity(results, acc, stats, domains, cfg) -> None:
    nat = acc["native"]
    for name, a in acc.items():
        nll, tok = torch.tensor(a["nll"]), torch.tensor(a["tokens"], dtype=torch.float64)
        delta = metrics.perplexity_delta(torch.tensor(nat["nll"]), nll, tok, resamples=cfg.resamples, seed=cfg.seed)
        by_domain = {}
        for d in sorted(set(domains)):
            sel = torch.tensor([x == d for x in domains])
            by_domain[d] = round(metrics.perplexity(nll[sel], tok[sel]), 3)
        results[name]["perplexity"] = {
            "ppl": round(metrics.perplexity(nll, tok), 4), "delta_pct": delta.to_dict(scale=100, digits=3),
            "by_domain": by_domain, "kl": round(a["kl"] / max(a["scored"], 1), 6),
            "top1_agreement": round(a["top1"] / max(a["scored"], 1), 4), "rows": len(nll), "scored": a["scored"]}
        results[name]["routing"] = stats[name]


def _first_routing(r: dict) -> dict:
    """Headline routing numbers when there was no perplexity run (whose B full rows per step
    make the headline otherwise): the greedy run's, else the first task's."""
    if "greedy" in r:
        return r["greedy"]["routing"]
    tasks = list(r.get("tasks", {}).values())
    return tasks[0]["routing"] if tasks else _Stats().to_dict()


# ---------------------------------------------------------------------------------------
# Which policies: sweep grids, and a check before anything runs

def _values(field: str, text: str) -> list[str]:
    if "|" in text:
        return [v.strip() for v in text.split("|") if v.strip()]
    if ".." not in text:
        return [text.strip()]
    lo_s, hi_s = (v.strip() for v in text.split("..", 1))
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise ValueError(f"{field}: bad range {text!r}; expected e.g. 1..4 or 0.5..4") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{field}: range {text!r} must have 0 < lo <= hi")
    if lo.is_integer() and hi.is_integer() and "." not in lo_s + hi_s:
        return [str(v) for v in range(int(lo), int(hi) + 1)]
    vals, v = [], lo
    while v < hi * (1 - 1e-9):
        vals.append(f"{v:g}")
        v *= 2
    return vals + [f"{hi:g}"]


def expand_sweep(spec: str, max_points: int = 64) -> list[Policy]:
    """Policies of a grid spec, e.g. ``affinity_binning:alpha=0.5..4,beta=2|4`` (8 settings):
    ``lo..hi`` is every integer between integer ends, else doublings from ``lo`` up to ``hi``;
    ``a|b|c`` lists values."""
    name, _, rest = spec.strip().partition(":")
    fields = [item.split("=", 1) for item in rest.split(",") if item.strip()] if rest else []
    if any(len(f) != 2 for f in fields):
        raise ValueError(f"bad sweep spec {spec!r}: expected name:field=values,...")
    grids = [[(k.strip(), v) for v in _values(k.strip(), vals)] for k, vals in fields]
    combos = list(itertools.product(*grids))
    if len(combos) > max_points:
        raise ValueError(f"sweep {spec!r} has {len(combos)} settings; at most {max_points}")
    return [parse_policy(name + (":" + ",".join(f"{k}={v}" for k, v in c) if c else "")) for c in combos]


def check_policies(model, policies: list[Policy]) -> None:
    """ValueError naming the policy when one cannot run on ``model`` (unsupported model,
    top_k too small), before a long run starts."""
    for p in policies:
        try:
            hf.apply_(model, p, stats=False)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        finally:
            hf.remove_(model)
