"""Do better set choices or another weight rule move the quality frontier? Research policies
beside OEA (the best peer at batch 32) and MassFloor (ours), on the test split that ``lynx
frontier`` uses (docs/algorithms.md, section 4c, has the measured answer: no, within 2-3 points),
and oracles that know every expert's output, to see how much a set choice could buy at all.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/set_policy_ablation.py \
        [--model DIR] [--batch-size 32] [--ppl-per-domain 16] [--variants price,fill_price,...]

The variants, defined here and not in ``lynx_moe``: they loop over experts in Python with a
host sync per iteration, fine for measuring quality, useless for serving.

- ``price``: Lagrangian pruning. A row's loss is the fraction of its native top-k weight that
  the kept set drops; starting from the native union, remove the expert whose removal adds the
  least ``sum over rows of loss**p`` while that is under ``lam`` (and more than top-k remain). ``p = 1`` is XShare's modular
  objective with a price instead of a budget; a larger ``p`` spreads the loss over rows.
- ``fill_price``: the same, but a row's loss counts the replacement it gets: its native top-k
  mass minus its top-k mass inside the kept set (routing fills a freed slot with the row's
  best kept expert, so dropping a flat row's 8th choice costs little).
- ``norm_scaled``: MassFloor and OEA on importance ``w * s_e`` instead of ``w``, where ``s_e``
  is expert e's mean output norm on the tokens routed to it (calibration half of the held-out
  text).
- ``capped``: MassFloor with a cap: a row keeps the fewest of its native experts that reach
  ``mass`` of its native top-k weight, at least one and at most ``at_most`` (between MassFloor
  and OEA: a flat row's count is bounded as in OEA, a confident row's loss as in MassFloor).
- ``output_oracle``: ``price``'s pruning with a row's true loss: the relative error of its layer
  output after the shared step's fill and rescale, ``|y_keep - y_native| / |y_native|``, from
  every expert's output on the row. It runs every expert on every row, so it is not a policy: it
  measures what knowing the experts' outputs would buy a greedy set choice.
  ``output_oracle_abs``: the same, errors over the step's mean ``|y_native|`` instead of the row's.
  ``rownorm_fill_price`` / ``slotnorm_fill_price``: ``fill_price`` weighted by each row's native
  output norm / by each (row, expert)'s output norm, to see which part of the oracle's knowledge
  pays. All four run every expert and, like ``fill_price``, assume softmax scoring.
- ``predicted_slotnorm``: ``slotnorm_fill_price`` with each expert's output norm on the row
  predicted from the router logits alone, by a per-layer fit on the calibration half
  (``lynx_moe.measure.sizes``): pruned greedily, one expert per host sync; ``lynx_moe.SizePrice``
  is the serving form (tensor rounds, no host sync), measured by ``lynx frontier``.
- ``native_weights``: OEA's and MassFloor's sets, but the kept native experts keep their native
  weights and fillers get weight 0 (the routing contract fills freed slots and rescales to the
  native mass instead).

Prints one table (saved distinct experts, perplexity change with its paired 95 % interval, KL),
each family's curve read at +0.5 % (linear between settings, from native), and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # after OMP_WAIT_POLICY

from lynx_moe import reference_model_path
from lynx_moe.integrations import hf
from lynx_moe.measure.data import default_data, load_texts, token_batch
from lynx_moe.measure.frontier import frontier, saved_at
from lynx_moe.measure.models import load_model
from lynx_moe.measure.quality import EvalConfig
from lynx_moe.measure.similarity import router_inputs
from lynx_moe.measure.sizes import size_fits
from lynx_moe.measure.tune import split_texts
from lynx_moe.policies import OEA, MassFloor, Policy, Step, TopK, _expand, _rows_first, size_features
from lynx_moe.routing import Routing, route


def _row_weights(step: Step) -> torch.Tensor:
    """[T, E] float64: each voting row's native weights as fractions of its top-k weight."""
    w = step.native_w / step.native_w.sum(-1, keepdim=True).clamp_min(1e-30)
    if step.vote is not None:
        w = w * step.vote[:, None]
    return torch.zeros_like(step.logits, dtype=torch.float64).scatter(1, step.native_ids, w.double())


@dataclasses.dataclass(frozen=True)
class _Pruning(Policy):
    """Greedy pruning of the native union: remove the expert whose removal adds the least
    ``sum over voting rows of loss**p`` while that is at most ``lam`` and more than top-k remain.
    Subclasses give a per-step table (``table``, computed once) and what each row's loss
    becomes without each expert (``without``)."""

    kind: ClassVar[str] = "set"
    lam: float = 0.002
    p: float = 3.0

    def table(self, step: Step) -> torch.Tensor:
        raise NotImplementedError   # [T, E] float64

    def without(self, step: Step, table: torch.Tensor, keep: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError   # [T, E]: each row's loss if expert e left keep

    def keep(self, step: Step) -> torch.Tensor:
        vote = torch.ones_like(step.logits[:, 0], dtype=torch.bool) if step.vote is None else step.vote
        keep = _row_weights(step).sum(0) > 0
        loss = torch.zeros_like(step.logits[:, 0], dtype=torch.float64)
        table = self.table(step)
        for _ in range(keep.numel()):
            new = self.without(step, table, keep, loss)
            cost = ((new ** self.p - loss[:, None] ** self.p) * vote[:, None]).sum(0).masked_fill(~keep, torch.inf)
            c, e = cost.min(0)
            if float(c) > self.lam or int(keep.sum()) <= step.top_k:
                break
            keep[e], loss = False, new[:, e]
        return keep


@dataclasses.dataclass(frozen=True)
class Price(_Pruning):
    """Loss: the row's lost share of its native top-k weight."""

    name: ClassVar[str] = "price"

    def table(self, step: Step) -> torch.Tensor:
        return _row_weights(step)

    def without(self, step: Step, table: torch.Tensor, keep: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss[:, None] + table


@dataclasses.dataclass(frozen=True)
class FillPrice(_Pruning):
    """Loss: native top-k mass minus the row's top-k mass inside keep (softmax scoring, as on
    the two softmax reference models)."""

    name: ClassVar[str] = "fill_price"
    lam: float = 0.005
    p: float = 2.0

    def table(self, step: Step) -> torch.Tensor:
        prob = torch.softmax(step.logits.double(), -1)
        return prob / prob.gather(1, step.native_ids).sum(-1, keepdim=True)       # native top-k mass = 1

    def without(self, step: Step, prob: torch.Tensor, keep: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        inside = prob.masked_fill(~keep[None, :], -1.0)
        top = inside.topk(step.top_k + 1, dim=-1)
        spare = top.values[:, step.top_k].clamp_min(0)                             # the best replacement
        in_k = torch.zeros_like(inside, dtype=torch.bool).scatter(1, top.indices[:, :step.top_k], True) & (inside >= 0)
        return loss[:, None] + in_k * (prob - spare[:, None]).clamp_min(0)


def _pick(y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T, E, d] outputs, [T, n] ids -> [T, n, d]."""
    return y.gather(1, ids[..., None].expand(-1, -1, y.shape[-1]))


def _mix(p: torch.Tensor, ys: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The shared step's output: expert outputs ``ys`` weighted by ``p`` rescaled to the native mass."""
    return mass[..., None] * (p[..., None] * ys).sum(-2) / p.sum(-1, keepdim=True)


def expert_outputs(step: Step, layer: int):
    """Every expert's output on every row of this call of MoE layer ``layer`` (from
    ``OutputOracle.inputs``): softmax probabilities [T, E], outputs [T, E, d], the native layer
    output [T, d] and each row's native weight sum [T], float64."""
    x, experts = OutputOracle.inputs[layer]
    T, E = step.logits.shape
    ids = torch.arange(E).repeat(T)[:, None]
    y = experts(x.repeat_interleave(E, 0), ids, torch.ones_like(ids, dtype=x.dtype)).view(T, E, -1).double()
    prob = torch.softmax(step.logits.double(), -1)
    mass = step.native_w.double().sum(-1)
    return prob, y, _mix(prob.gather(1, step.native_ids), _pick(y, step.native_ids), mass), mass


@dataclasses.dataclass(frozen=True)
class OutputOracle(_Pruning):
    """Loss: the row's relative layer-output error, from every expert's output on the row.
    ``inputs[i]`` (layer index -> (router input [T, d], experts module)) is set by a router
    pre-hook (``expert_inputs``) before each call."""

    name: ClassVar[str] = "output_oracle"
    lam: float = 0.05
    p: float = 2.0
    relative: bool = True          # False: errors over the step's mean output norm, not the row's
    inputs: ClassVar[dict] = {}

    def for_layer(self, index: int) -> Policy:
        out = dataclasses.replace(self)
        object.__setattr__(out, "_i", index)
        return out

    def table(self, step: Step):
        return expert_outputs(step, self._i)

    def without(self, step: Step, table, keep: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        prob, y, y0, mass = table
        K = step.top_k
        top = prob.masked_fill(~keep[None, :], -1.0).topk(K + 1, dim=-1)    # keep holds > K experts
        ids = top.indices                                                   # [T, K+1]: selection, then spare
        ys = _pick(y, ids)
        # Removing slot s: the spare takes its place.
        p = top.values[:, None, :].expand(-1, K, -1).clone()               # [T, K(removed), K+1]
        p[:, torch.arange(K), torch.arange(K)] = 0.0
        out = _mix(p, ys[:, None].expand(-1, K, -1, -1), mass[:, None])   # [T, K, d]
        norm = y0.norm(dim=-1, keepdim=True)
        err = (out - y0[:, None]).norm(dim=-1) / (norm if self.relative else norm.mean()).clamp_min(1e-12)
        return loss[:, None].expand_as(prob).clone().scatter(1, ids[:, :K], err)


@dataclasses.dataclass(frozen=True)
class RowNormFillPrice(FillPrice):
    """``fill_price`` with each row's loss times its native layer-output norm over the step's
    mean (taken from every expert's output, as ``output_oracle``): does the oracle's gain come
    from knowing which rows' outputs are large?"""

    name: ClassVar[str] = "rownorm_fill_price"

    for_layer = OutputOracle.for_layer

    def table(self, step: Step) -> torch.Tensor:
        y0 = expert_outputs(step, self._i)[2]
        norm = y0.norm(dim=-1)
        return super().table(step) * (norm / norm.mean().clamp_min(1e-12))[:, None]


@dataclasses.dataclass(frozen=True)
class SlotNormFillPrice(FillPrice):
    """``fill_price`` counting each (row, expert) as its probability times the norm of that
    expert's output on that row (over the step's mean, from every expert's output), a freed slot
    costing ``|size - spare's size|``; rows still choose inside keep by probability. Does the
    oracle's gain come from the outputs' sizes?"""

    name: ClassVar[str] = "slotnorm_fill_price"

    for_layer = OutputOracle.for_layer

    def table(self, step: Step):
        prob, y, _, _ = expert_outputs(step, self._i)
        size = prob * y.norm(dim=-1)
        return prob, size / size.gather(1, step.native_ids).sum(-1, keepdim=True).mean()

    def without(self, step: Step, table, keep: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        prob, size = table
        top = prob.masked_fill(~keep[None, :], -1.0).topk(step.top_k + 1, dim=-1)
        spare = size.gather(1, top.indices[:, step.top_k:])                       # [T, 1]
        in_k = torch.zeros_like(prob, dtype=torch.bool).scatter(1, top.indices[:, :step.top_k], True)
        return loss[:, None] + in_k * (size - spare).abs()       # a larger spare is a change too


@dataclasses.dataclass(frozen=True)
class PredictedSlotNorm(SlotNormFillPrice):
    """``slotnorm_fill_price`` with each expert's output norm on the row predicted from the
    router logits alone (``lynx_moe.measure.sizes``, fitted on the calibration half): the greedy,
    host-synced form of ``lynx_moe.SizePrice``. ``fits`` is set by ``main``."""

    name: ClassVar[str] = "predicted_slotnorm"
    fits: ClassVar[list] = []

    def table(self, step: Step):
        prob = torch.softmax(step.logits.double(), -1)
        size = prob * (size_features(step.logits).double() @ self.fits[self._i].double()).exp()
        return prob, size / size.gather(1, step.native_ids).sum(-1, keepdim=True).mean()


@contextlib.contextmanager
def expert_inputs(model):
    """While active, each router's input and its experts module are left in ``OutputOracle.inputs``."""
    def stash(i, experts):
        def hook(module, args):
            OutputOracle.inputs[i] = (args[0], experts)
        return hook
    handles = [layer.router.register_forward_pre_hook(stash(i, layer.experts))
               for i, layer in enumerate(hf.moe_layers(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        OutputOracle.inputs.clear()


@dataclasses.dataclass(frozen=True)
class NormScaled(Policy):
    """``inner`` deciding on ``w * s_e`` (slots re-sorted by it); ``scales`` [L, E] is set by ``main``."""

    name: ClassVar[str] = "norm_scaled"
    kind: ClassVar[str] = "set"
    inner: Policy = OEA(3)
    scales: ClassVar[torch.Tensor | None] = None

    def for_layer(self, index: int) -> Policy:
        out = dataclasses.replace(self)
        object.__setattr__(out, "_s", self.scales[index])
        return out

    def keep(self, step: Step) -> torch.Tensor:
        imp = step.native_w * self._s[step.native_ids]
        order = imp.argsort(dim=-1, descending=True, stable=True)
        return self.inner.keep(step._replace(native_ids=step.native_ids.gather(1, order),
                                             native_w=imp.gather(1, order)))

    def __str__(self) -> str:
        return f"norm_scaled[{self.inner}]"


@dataclasses.dataclass(frozen=True)
class Capped(MassFloor):
    """MassFloor's per-row count, capped at ``at_most``."""

    name: ClassVar[str] = "capped_mass_floor"
    at_most: int = 4

    def keep(self, step: Step) -> torch.Tensor:
        w = step.native_w
        before = (w.cumsum(dim=-1) - w) / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        counts = (before < self.mass).sum(dim=-1).clamp(1, self.at_most)
        return _expand(step, _rows_first(step, counts))


@dataclasses.dataclass(frozen=True)
class NativeWeights(Policy):
    """``inner``'s set; the weight rule is changed by ``native_weight_rule``."""

    name: ClassVar[str] = "native_weights"
    kind: ClassVar[str] = "set"
    inner: Policy = OEA(3)

    def keep(self, step: Step) -> torch.Tensor:
        return self.inner.keep(step)

    def __str__(self) -> str:
        return f"native_weights[{self.inner}]"


@contextlib.contextmanager
def native_weight_rule():
    """While active, the HF hook's routing gives a NativeWeights policy's kept native experts
    their native weights and its fillers weight 0 (ids unchanged)."""
    def routed(logits, top_k, policy, *args, **kwargs):
        r = route(logits, top_k, policy, *args, **kwargs)
        if not isinstance(policy, NativeWeights):
            return r
        n = route(logits, top_k, TopK(), *args, **kwargs)
        w = ((r.ids[:, :, None] == n.ids[:, None, :]) * n.weights[:, None, :]).sum(-1)
        return Routing(torch.where(r.vote[:, None], w, r.weights), r.ids, r.native_ids, r.vote)
    hf.route = routed
    try:
        yield
    finally:
        hf.route = route


@torch.no_grad()
def output_scales(model, tokenizer, texts: dict[str, list[str]]) -> torch.Tensor:
    """[L, E]: each expert's mean output norm over the tokens routed to it, over the mean
    (calibration half of the held-out text, 32 rows x 128 tokens)."""
    calib, _ = split_texts(texts)
    tokens = token_batch(calib, tokenizer, 32, 128, model.get_input_embeddings().num_embeddings)
    out = []
    for layer, x in zip(hf.moe_layers(model), router_inputs(model, tokens)):
        _, _, ids = layer.router(x)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
        norms = torch.stack([layer.experts(x, ids[:, k:k + 1], ones).float().norm(dim=-1)
                             for k in range(ids.shape[1])], 1)
        count = torch.bincount(ids.flatten(), minlength=layer.num_experts)
        total = torch.zeros(layer.num_experts).scatter_add(0, ids.flatten(), norms.flatten())
        s = torch.where(count > 0, total / count.clamp_min(1), total.sum() / count.sum())
        out.append(s / s.mean())
    return torch.stack(out)


def variants(top_k: int, batch: int = 32) -> dict[str, list[Policy]]:
    mild, deep = OEA(top_k // 2), OEA(top_k // 2 - 1)
    per_row = [lam * batch / 32 for lam in (0.001, 0.002, 0.004, 0.008, 0.016, 0.032)]   # the price is summed over rows
    return {
        "oea": [mild, deep],
        "mass_floor": [MassFloor(0.7), MassFloor(0.6)],
        "price": [Price(0.004, 2.0), Price(0.016, 2.0), Price(0.032, 2.0), Price(0.002, 3.0), Price(0.006, 3.0)],
        "fill_price": [FillPrice(0.002, 2.0), FillPrice(0.005, 2.0), FillPrice(0.01, 2.0), FillPrice(0.0005, 3.0),
                       FillPrice(0.002, 3.0)],
        "output_oracle": [OutputOracle(lam, 2.0) for lam in (0.03, 0.06, 0.1, 0.15)],
        "output_oracle_abs": [OutputOracle(lam, 2.0, False) for lam in (0.02, 0.035, 0.06, 0.1)],
        "rownorm_fill_price": [RowNormFillPrice(lam, 2.0) for lam in (0.002, 0.005, 0.01)],
        "slotnorm_fill_price": [SlotNormFillPrice(lam, 2.0) for lam in (0.002, 0.004, 0.008, 0.016)],
        "predicted_slotnorm": [PredictedSlotNorm(lam, 2.0) for lam in per_row],
        "capped": [Capped(m, c) for c in (top_k // 2, top_k // 2 - 1) for m in (0.8, 0.7, 0.6)],
        "norm_scaled": [NormScaled(mild), NormScaled(deep), NormScaled(MassFloor(0.7)), NormScaled(MassFloor(0.6))],
        "native_weights": [NativeWeights(mild), NativeWeights(deep), NativeWeights(MassFloor(0.7)),
                           NativeWeights(MassFloor(0.6))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded reference model)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ppl-per-domain", type=int, default=16)
    ap.add_argument("--variants", default=None, help="comma-separated families (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(reference_model_path())
    model, tokenizer = load_model(model_dir)
    texts = load_texts([default_data(Path(model_dir))])
    fams = variants(hf.moe_shape(model)[1], args.batch_size)
    if args.variants:
        fams = {f: fams[f] for f in args.variants.split(",")}
    if "norm_scaled" in fams:
        NormScaled.scales = output_scales(model, tokenizer, texts)
    if "predicted_slotnorm" in fams:
        PredictedSlotNorm.fits, _, r2 = size_fits(model, tokenizer, texts)
        print("size predictor R^2 per layer (held-out calibration tokens): " + ", ".join(f"{v:.3f}" for v in r2))
    with native_weight_rule(), expert_inputs(model):
        rows = frontier(model, tokenizer, texts, fams, [args.batch_size],
                        EvalConfig(ppl_per_domain=args.ppl_per_domain, gen_prompts=0))
    print(f"{model_dir}, batch {args.batch_size}, test split, {args.ppl_per_domain} rows per domain")
    print(f"  {'family':<15} {'policy':<40} {'saved':>6} {'ppl change % [95% CI]':>26} {'KL':>7}")
    for r in rows:
        print(f"  {r['family']:<15} {r['policy']:<40} {100 * r['saved']:>5.1f}% {r['ppl_delta_pct']:>+8.3f} "
              f"[{r['lo']:+.3f}, {r['hi']:+.3f}] {r['kl']:>7.4f}")
    at = {f: saved_at([r for r in rows if r["family"] == f], 0.5) for f in fams}
    print("saved at +0.5 %: " + ", ".join(f"{f} {'-' if v is None else f'{100 * v:.1f}'}" for f, v in at.items()))
    print(json.dumps({"model": model_dir, "batch": args.batch_size, "saved_at_0.5pct": at, "rows": rows}))


if __name__ == "__main__":
    main()
