"""Expert-selection policies: frozen, validated configs, one per strategy.

A policy is only configuration. Each one answers a single question about one MoE layer in
one forward pass, given the rows that vote (valid decode rows):

- set policies (``AffinityBinning``, ``Confidence``, ``BatchTopN``, ``OEA``, ``MassFloor``, ``XShare``,
  ``SizePrice``)
  return ``keep[E]``, the experts this step may use; ``routing.route`` then sends every
  voting row to its best experts inside that set;
- row policies (``StaticK``, ``SER``) return how many of its native top-k experts each row
  keeps; the remaining slots get weight 0 (see ``routing`` for which ids fill them);
- substitute policies (``SERE``) return each (row, slot)'s expert: its native one or a
  stand-in; the slot's native weight moves with it (see ``routing``).

``PerLayer`` holds one policy per MoE layer (``lynx tune``'s per-layer result); the
integrations ask every policy for its layer's policy with ``for_layer(i)`` (i: the MoE layer's
position in the model), so a step only ever sees a plain policy.

``SERE`` also needs model data: one ``[E, E]`` expert similarity matrix per layer, read from a
file (``lynx similarity MODEL`` writes it) by ``for_layer(i)``, which returns a copy bound to
layer i's matrix; ``route`` only ever sees that copy. ``SizePrice`` likewise reads one output-size
fit per layer from a ``lynx sizes`` file.

The maths is specified in ``docs/algorithms.md``. Policies round-trip through
``to_dict`` / ``policy_from_dict`` and through one-line specs for CLIs and environment
variables: ``parse_policy("affinity_binning:alpha=3,beta=2")`` and ``str(policy)``.

Legend: T router rows, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch

__all__ = [
    "Policy", "TopK", "AffinityBinning", "Confidence", "StaticK", "SER", "BatchTopN",
    "OEA", "MassFloor", "XShare", "SERE", "PerLayer", "POLICIES", "policy_from_dict", "parse_policy", "load_policy",
    "read_similarity", "SIMILARITY_KEY", "SizePrice", "size_features", "read_sizes", "SIZES_KEY",
]


class Step(NamedTuple):
    """What a policy may look at in one step (built by ``routing.route``)."""

    logits: torch.Tensor      # [T, E] fp32 selection logits; -inf outside a row's groups
    native_ids: torch.Tensor  # [T, K] native choice, best first
    native_w: torch.Tensor    # [T, K] native weights (fp32)
    vote: torch.Tensor | None  # [T] bool: valid decode rows; None when every row votes
    n_votes: torch.Tensor | float  # number of voting rows (>= 1); a float when every row votes
    top_k: int
    raw: torch.Tensor | None = None  # [T, E] fp32 router logits before bias and groups (None: = logits)
    scoring: str = "softmax"  # the model's scoring (routing.SCORINGS)


def _expand(step: Step, mask_rows: torch.Tensor) -> torch.Tensor:
    """Union over voting rows of a per-row [T, E] bool mask -> keep [E]."""
    if step.vote is not None:
        mask_rows = mask_rows & step.vote[:, None]
    return mask_rows.any(dim=0)


def _full(step: Step, value: int) -> torch.Tensor:
    """[T] int64 filled with value."""
    return torch.full(step.logits.shape[:1], value, dtype=torch.long, device=step.logits.device)


def _rows_first(step: Step, counts: torch.Tensor) -> torch.Tensor:
    """[T, E] bool: each row's first counts[t] native experts."""
    slots = torch.arange(step.top_k, device=counts.device)
    take = slots[None, :] < counts[:, None]                           # [T, K]
    out = torch.zeros_like(step.logits, dtype=torch.bool)
    return out.scatter(1, step.native_ids, take)


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class. Subclasses set ``name`` and ``kind`` and implement one decision method."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "native", "set", "row" or "substitute"
    text_fields: ClassVar[tuple[str, ...]] = ()  # fields a spec gives as text (paths), not numbers

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        # Flags that are off are left out; None is written so that it round-trips.
        args = ",".join(f"{k}={'none' if v is None else v}"
                        for k, v in dataclasses.asdict(self).items() if v is not False)
        return f"{self.name}:{args}" if args else self.name

    def check_top_k(self, top_k: int) -> None:
        """Raise ValueError if this policy cannot run on a layer with this top_k."""

    def check_layers(self, num_layers: int) -> None:
        """Raise ValueError if this policy cannot run on a model with this many MoE layers."""

    def for_layer(self, index: int) -> Policy:
        """The policy of the model's ``index``-th MoE layer (most policies: the same for all)."""
        return self

    def keep(self, step: Step) -> torch.Tensor:  # set policies: keep[E] bool
        raise NotImplementedError

    def counts(self, step: Step) -> torch.Tensor:  # row policies: [T] int64 in [1, K]
        raise NotImplementedError

    def substitute(self, step: Step) -> torch.Tensor:  # substitute policies: [T, K] int64 ids
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class TopK(Policy):
    """Native routing, bit-identical to the model's own (the no-op policy)."""

    name: ClassVar[str] = "topk"
    kind: ClassVar[str] = "native"


@dataclasses.dataclass(frozen=True)
class AffinityBinning(Policy):
    """Lynx v3 (the paper's method). Bins are ``1/alpha`` logits wide; ``beta`` clamps the
    lowest bin (``None``: no clamp). Faithful by default; ``protect_top1`` (ours, off by
    default) adds every voting row's own top-1 to the kept set."""

    name: ClassVar[str] = "affinity_binning"
    kind: ClassVar[str] = "set"
    alpha: float = 3.0
    beta: int | None = 2
    protect_top1: bool = False

    def __post_init__(self) -> None:
        _check(_is_num(self.alpha) and self.alpha > 0, "alpha", f"must be a finite number > 0, got {self.alpha!r}")
        _check(self.beta is None or (_is_int(self.beta) and self.beta >= 1), "beta",
               f"must be an integer >= 1 or None (no clamp), got {self.beta!r}")
        _check(isinstance(self.protect_top1, bool), "protect_top1", f"must be a bool, got {self.protect_top1!r}")

    def keep(self, step: Step) -> torch.Tensor:
        L, vote, k, B = step.logits, step.vote, step.top_k, step.n_votes
        T, E = L.shape
        q = torch.ceil(self.alpha * (L - L.amax(dim=-1, keepdim=True)))     # [T, E] bins <= 0
        if self.beta is not None and (self.beta + 1) * float(T) ** (self.beta + 1) * E < 2**52:
            # Exact integer arithmetic in float64: H * B**beta = B**level with
            # level = q + beta in [0, beta], so popularity ties are exact ties, broken by
            # expert index like the authors' kernels; one exact key replaces a stable sort.
            level = q.clamp(min=-self.beta) + self.beta
            j = torch.arange(self.beta + 1, dtype=torch.float64, device=L.device)
            powers = (B ** j).expand(T, -1)                                    # [T, beta + 1]
            h = powers.gather(1, level.long())                                 # [T, E]
            if vote is not None:
                h = h * vote[:, None]
            others = h.sum(dim=0, keepdim=True) - h                            # < B**(beta + 1)
            rev = torch.arange(E - 1, -1, -1, dtype=torch.float64, device=L.device)
            # (M + beta) * B**(beta + 1), then the index: all integers below 2**53.
            key = (level.double() * B ** (self.beta + 1) + others) * E + rev
            picks = torch.topk(key, k, dim=-1).indices
        else:
            # No clamp (or a batch too large for exact integers): float64, stable sort. Each
            # column is summed in sorted order, so that reordering the rows cannot change a
            # rounding (nor break an exact popularity tie another way).
            if self.beta is not None:
                q = q.clamp(min=-self.beta)
            h = torch.pow(B, q.double())
            if vote is not None:
                h = h * vote[:, None]
            m = q.double() + (h.sort(dim=0).values.sum(dim=0, keepdim=True) - h) / B
            picks = torch.sort(m, dim=-1, descending=True, stable=True).indices[:, :k]
        chosen = torch.zeros_like(L, dtype=torch.bool).scatter(1, picks, True)
        if self.protect_top1:
            chosen = chosen.scatter(1, step.native_ids[:, :1], True)
        return _expand(step, chosen)


@dataclasses.dataclass(frozen=True)
class Confidence(Policy):
    """Lynx v2 confidence reduction: each row keeps ``clamp(floor(c*K*beta) + alpha, 1, K)``
    of its experts, ``c`` its top-half vs bottom-half weight contrast."""

    name: ClassVar[str] = "confidence"
    kind: ClassVar[str] = "set"
    alpha: int = 1
    beta: float = 0.5

    def __post_init__(self) -> None:
        _check(_is_int(self.alpha) and self.alpha >= 0, "alpha", f"must be an integer >= 0, got {self.alpha!r}")
        _check(_is_num(self.beta) and self.beta >= 0, "beta", f"must be a finite number >= 0, got {self.beta!r}")

    def keep(self, step: Step) -> torch.Tensor:
        k, w = step.top_k, step.native_w
        half = k // 2
        head = w[:, :half].sum(dim=-1)
        tail = w[:, half:].sum(dim=-1)
        c = torch.where(head > 0, (head - tail) / head.clamp_min(1e-30), 1.0)
        counts = (torch.floor(c * k * self.beta) + self.alpha).clamp(1, k).long()
        return _expand(step, _rows_first(step, counts))


@dataclasses.dataclass(frozen=True)
class StaticK(Policy):
    """Every voting row uses only its top ``k`` experts (llama.cpp's expert_used_count)."""

    name: ClassVar[str] = "static_k"
    kind: ClassVar[str] = "row"
    k: int = 4

    def __post_init__(self) -> None:
        _check(_is_int(self.k) and self.k >= 1, "k", f"must be an integer >= 1, got {self.k!r}")

    def check_top_k(self, top_k: int) -> None:
        _check(self.k <= top_k, "k", f"StaticK(k={self.k}) needs k <= the model's top_k={top_k}")

    def counts(self, step: Step) -> torch.Tensor:
        return _full(step, self.k)


@dataclasses.dataclass(frozen=True)
class SER(Policy):
    """ik_llama.cpp's smart expert reduction: keep the top ``k_min``; keep expert i beyond
    that only if its probability exceeds ``threshold`` times the top-1's."""

    name: ClassVar[str] = "ser"
    kind: ClassVar[str] = "row"
    k_min: int = 2
    threshold: float = 0.5

    def __post_init__(self) -> None:
        _check(_is_int(self.k_min) and self.k_min >= 1, "k_min", f"must be an integer >= 1, got {self.k_min!r}")
        _check(_is_num(self.threshold) and 0 <= self.threshold <= 1, "threshold",
               f"must be a number in [0, 1], got {self.threshold!r}")

    def check_top_k(self, top_k: int) -> None:
        _check(self.k_min <= top_k, "k_min", f"SER(k_min={self.k_min}) needs k_min <= top_k={top_k}")

    def counts(self, step: Step) -> torch.Tensor:
        w = step.native_w
        strong = w > self.threshold * w[:, :1]
        strong[:, : self.k_min] = True
        # Weights are sorted, so the strong slots form a prefix.
        return strong.sum(dim=-1)


@dataclasses.dataclass(frozen=True)
class BatchTopN(Policy):
    """Keep the ``n`` experts with the largest summed native top-k weight over the batch."""

    name: ClassVar[str] = "batch_top_n"
    kind: ClassVar[str] = "set"
    n: int = 16

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")

    def check_top_k(self, top_k: int) -> None:
        _check(self.n >= top_k, "n", f"BatchTopN(n={self.n}) needs n >= top_k={top_k} so every row can fill its slots")

    def keep(self, step: Step) -> torch.Tensor:
        return _top_mass(step, self.n, forced=None)


@dataclasses.dataclass(frozen=True)
class OEA(Policy):
    """Opportunistic expert activation (arXiv 2511.02237): each voting row keeps its top
    ``k0``; the other slots are filled with experts the batch already uses."""

    name: ClassVar[str] = "oea"
    kind: ClassVar[str] = "set"
    k0: int = 2

    def __post_init__(self) -> None:
        _check(_is_int(self.k0) and self.k0 >= 1, "k0", f"must be an integer >= 1, got {self.k0!r}")

    def check_top_k(self, top_k: int) -> None:
        _check(self.k0 <= top_k, "k0", f"OEA(k0={self.k0}) needs k0 <= top_k={top_k}")

    def keep(self, step: Step) -> torch.Tensor:
        counts = _full(step, self.k0)
        return _expand(step, _rows_first(step, counts))


@dataclasses.dataclass(frozen=True)
class MassFloor(Policy):
    """Ours: each voting row keeps the fewest of its native experts whose weights add up to at
    least ``mass`` of its native top-k weight (at least one); the other slots are filled with
    experts the batch already uses (as in OEA). A confident row keeps one or two experts, a
    flat one most of its top-k: the weight a row can lose is bounded, not its expert count."""

    name: ClassVar[str] = "mass_floor"
    kind: ClassVar[str] = "set"
    mass: float = 0.6

    def __post_init__(self) -> None:
        _check(_is_num(self.mass) and 0 < self.mass <= 1, "mass", f"must be a number in (0, 1], got {self.mass!r}")

    def keep(self, step: Step) -> torch.Tensor:
        w = step.native_w
        before = (w.cumsum(dim=-1) - w) / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)   # [T, K] mass of earlier slots
        counts = (before < self.mass).sum(dim=-1).clamp_min(1)
        return _expand(step, _rows_first(step, counts))


@dataclasses.dataclass(frozen=True)
class XShare(Policy):
    """XShare (arXiv 2602.07265): a shared set of at most ``budget`` experts maximising the
    batch's native gate mass, always containing each voting row's top ``k0``. If those alone
    exceed the budget they are kept anyway (quality first), so the set has
    ``max(budget, |union of top-k0|)`` experts at most."""

    name: ClassVar[str] = "xshare"
    kind: ClassVar[str] = "set"
    budget: int = 16
    k0: int = 1

    def __post_init__(self) -> None:
        _check(_is_int(self.budget) and self.budget >= 1, "budget", f"must be an integer >= 1, got {self.budget!r}")
        _check(_is_int(self.k0) and self.k0 >= 1, "k0", f"must be an integer >= 1, got {self.k0!r}")

    def check_top_k(self, top_k: int) -> None:
        _check(self.k0 <= top_k, "k0", f"XShare(k0={self.k0}) needs k0 <= top_k={top_k}")
        _check(self.budget >= top_k, "budget", f"XShare(budget={self.budget}) needs budget >= top_k={top_k}")

    def keep(self, step: Step) -> torch.Tensor:
        counts = _full(step, self.k0)
        return _top_mass(step, self.budget, forced=_expand(step, _rows_first(step, counts)))


def _top_mass(step: Step, n: int, forced: torch.Tensor | None) -> torch.Tensor:
    """The ``n`` experts with the largest summed native weight over voting rows (forced ones
    first, zero-mass experts never). Counting each row's mass over its native top-k makes
    the objective modular, so greedy selection is exactly one sort."""
    w = step.native_w if step.vote is None else step.native_w * step.vote[:, None]
    mass = torch.zeros(step.logits.shape[1], dtype=torch.float64, device=w.device)
    mass = mass.scatter_add(0, step.native_ids.flatten(), w.double().flatten())   # [E]
    used = mass > 0
    if forced is not None:
        mass = torch.where(forced, mass + mass.sum() + 1.0, mass)
    order = torch.sort(mass, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    keep = (rank < n) & used
    return keep if forced is None else keep | forced


SIMILARITY_KEY = "similarity"   # the [L, E, E] tensor of a ``lynx similarity`` file (safetensors)


def _open_tensor(path: str | Path, key: str, what: str, how: str, layout: str, fits, read):
    """``read(slice, shape)`` on tensor ``key`` of a safetensors file, after ``fits(shape)``
    (ValueError naming the file and the expected ``layout`` otherwise)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:
        raise ImportError(f"reading a {what} needs safetensors: pip install 'lynx-moe[hf]'") from e
    if not Path(path).is_file():
        raise ValueError(f"{what} {str(path)!r} not found: {how}")
    try:
        with safe_open(str(path), framework="pt") as f:
            if key not in f.keys():
                raise ValueError(f"{path}: no {key!r} tensor in it ({how})")
            part = f.get_slice(key)
            shape = tuple(part.get_shape())
            if not fits(shape) or 0 in shape:
                raise ValueError(f"{path}: {key!r} must be {layout}, got {list(shape)}")
            return read(part, shape)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _with_data(policy: Policy, attr: str, tensor: torch.Tensor) -> Policy:
    """A copy of ``policy`` carrying ``tensor`` (float32) as ``attr``: model data, not config
    (``to_dict`` and ``==`` ignore it)."""
    out = dataclasses.replace(policy)
    object.__setattr__(out, attr, tensor.detach().float())
    return out


def _read_layers(path: str | Path, index: int | None):
    """A ``read`` for ``_open_tensor``: the whole ``[L, ...]`` tensor, or layer ``index``'s slice."""
    def read(part, shape):
        if index is not None and not 0 <= index < shape[0]:
            raise ValueError(f"{path}: has {shape[0]} layers, no MoE layer {index}")
        return (part[:] if index is None else part[index]).float()
    return read


def _open_similarity(path: str | Path, read):
    """``read(slice, shape)`` on the checked ``[L, E, E]`` tensor of a similarity file."""
    return _open_tensor(path, SIMILARITY_KEY, "SERE similarity file", "compute one with `lynx similarity MODEL` "
                        "(or --out FILE)", "[layers, experts, experts]",
                        lambda shape: len(shape) == 3 and shape[1] == shape[2], read)


def read_similarity(path: str | Path, index: int | None = None) -> torch.Tensor:
    """Expert similarities from a ``lynx similarity`` file: ``[L, E, E]`` float32, or layer
    ``index``'s ``[E, E]`` (only that slice is read). ValueError names the file."""
    return _open_similarity(path, _read_layers(path, index))


@dataclasses.dataclass(frozen=True)
class SERE(Policy):
    """SERE (arXiv 2602.07616): the union of every voting row's top ``top_s`` experts are the
    primaries; each other expert a voting row chose is replaced by its most similar primary
    (inside the row's groups) when their similarity is at least ``rho``, else kept. The slot
    keeps its native weight; slots that land on one expert merge (their weights add up).
    ``rho`` is a cosine (``lynx similarity``'s metric); the default 0.2 gives a moderate cut on
    the reference models (docs/algorithms.md, section 4b).

    ``similarity``: a ``lynx similarity`` file (``[L, E, E]``, one matrix per MoE layer);
    ``for_layer(i)`` returns a copy bound to layer i's matrix, ``bound(matrix)`` one bound to
    a given ``[E, E]`` tensor. Routing with an unbound SERE raises ValueError."""

    name: ClassVar[str] = "sere"
    kind: ClassVar[str] = "substitute"
    text_fields: ClassVar[tuple[str, ...]] = ("similarity",)
    top_s: int = 2
    rho: float = 0.2
    similarity: str | None = None

    def __post_init__(self) -> None:
        _check(_is_int(self.top_s) and self.top_s >= 1, "top_s", f"must be an integer >= 1, got {self.top_s!r}")
        _check(_is_num(self.rho) and -1 <= self.rho <= 1, "rho",
               f"must be a number in [-1, 1] (a cosine similarity), got {self.rho!r}")
        _check(self.similarity is None or (isinstance(self.similarity, str) and self.similarity.strip() != ""),
               "similarity", f"must be a file path or None, got {self.similarity!r}")

    def check_top_k(self, top_k: int) -> None:
        _check(self.top_s <= top_k, "top_s", f"SERE(top_s={self.top_s}) needs top_s <= top_k={top_k}")

    def check_layers(self, num_layers: int) -> None:
        if self.similarity is not None:
            layers = _open_similarity(self.similarity, lambda part, shape: shape[0])
            _check(layers == num_layers, "similarity",
                   f"{self.similarity} has {layers} layers but the model has {num_layers} MoE layers")

    def for_layer(self, index: int) -> Policy:
        if self.similarity is None:
            return self
        return self.bound(read_similarity(self.similarity, index))

    def bound(self, matrix: torch.Tensor) -> SERE:
        """A copy that routes with ``matrix`` (``[E, E]``, ``matrix[e, p]``: how well primary p
        stands in for expert e, finite, in [-1, 1]). Not part of the config (``to_dict``, ``==``)."""
        ok = (isinstance(matrix, torch.Tensor) and matrix.is_floating_point() and matrix.dim() == 2
              and matrix.shape[0] == matrix.shape[1])
        _check(ok, "similarity", "a bound matrix must be a float tensor [E, E]")
        _check(bool(((matrix >= -1) & (matrix <= 1)).all()), "similarity",
               "matrix values must be finite and in [-1, 1]")
        return _with_data(self, "_matrix", matrix)

    def substitute(self, step: Step) -> torch.Tensor:
        matrix = getattr(self, "_matrix", None)
        if matrix is None:
            raise ValueError(f"{self} has no similarity matrix: give similarity=FILE (`lynx similarity MODEL` "
                             "writes MODEL/sere/similarity.safetensors) and route policy.for_layer(i), "
                             "or use policy.bound(matrix)")
        T, E = step.logits.shape
        _check(matrix.shape == (E, E), "similarity", f"the matrix is {list(matrix.shape)} but the layer has E={E} experts")
        ids = step.native_ids                                                  # [T, K]
        primary = _expand(step, _rows_first(step, _full(step, self.top_s)))    # [E]
        allowed = primary[None, :] & torch.isfinite(step.logits)               # [T, E]: inside the row's groups
        sim = matrix.to(ids.device)[ids]                                       # [T, K, E]: sim[e, p]
        best, best_p = sim.masked_fill(~allowed[:, None, :], -torch.inf).max(dim=-1)   # ties: lower index
        swap = ~primary[ids] & (best >= self.rho)
        return torch.where(swap, best_p, ids)


SIZES_KEY = "sizes"   # the [L, 3E+2, E] tensor of a ``lynx sizes`` file (safetensors)


def size_features(logits: torch.Tensor) -> torch.Tensor:
    """``[T, 3E+2]`` float32: what ``SizePrice`` predicts a row's expert output sizes from: its
    raw router logits clamped to [-30, 30], their softmax, their squares, their logsumexp and 1."""
    z = logits.float().clamp(-30.0, 30.0)
    return torch.cat([z, torch.softmax(z, -1), z * z, z.logsumexp(-1, keepdim=True), torch.ones_like(z[:, :1])], 1)


def read_sizes(path: str | Path, index: int | None = None) -> torch.Tensor:
    """Output-size fits from a ``lynx sizes`` file: ``[L, 3E+2, E]`` float32, or layer ``index``'s
    ``[3E+2, E]``. ValueError names the file."""
    return _open_tensor(path, SIZES_KEY, "size_price sizes file", "compute one with `lynx sizes --model MODEL` "
                        "(or --out FILE)", "[layers, 3 * experts + 2, experts]",
                        lambda shape: len(shape) == 3 and shape[1] == 3 * shape[2] + 2, _read_layers(path, index))


@dataclasses.dataclass(frozen=True)
class SizePrice(Policy):
    """Ours (docs/algorithms.md, section 4d): prune the batch's native union of experts while
    removing one costs at most ``lam``. A (row, slot)'s size is its score (softmax probability,
    or sigmoid score on sigmoid routers; before any renormalisation) times ``|f_e(x)|``, expert
    e's output norm on the row, predicted from the raw logits alone by a per-layer linear fit on
    ``size_features`` (``lynx sizes`` computes it once per model from held-out text). Removing
    an expert frees its slots in the rows that have it in their top k (by selection logit)
    inside the kept set, each filled by the row's next kept expert, and adds ``sqrt(size**2 +
    filler's size**2)`` (the two outputs as orthogonal vectors), over the step's mean native
    size, to the row's loss; an expert's cost is the change of ``mean over voting rows of
    loss**p`` (per row, so one ``lam`` fits every batch size). Each of ``rounds`` rounds removes
    every expert whose cost is at most ``lam`` and lower (ties: lower index) than that of every
    other such expert sharing a voting row's top k+1 with it: such removals touch different
    rows, so their costs add up exactly. At least ``top_k`` experts stay. Sigmoid routers use
    their sigmoid scores, every other one the softmax over all experts (``lynx sizes`` fits
    softmax and sigmoid routers, not GPT-OSS's softmax over the top k).

    ``sizes``: a ``lynx sizes`` file; ``for_layer(i)`` returns a copy bound to layer i's fit,
    ``bound(fit)`` one bound to a given ``[3E+2, E]`` tensor. Routing an unbound one raises."""

    name: ClassVar[str] = "size_price"
    kind: ClassVar[str] = "set"
    text_fields: ClassVar[tuple[str, ...]] = ("sizes",)
    lam: float = 0.001
    p: float = 2.0
    rounds: int = 16
    sizes: str | None = None

    def __post_init__(self) -> None:
        _check(_is_num(self.lam) and self.lam >= 0, "lam", f"must be a number >= 0, got {self.lam!r}")
        _check(_is_num(self.p) and self.p >= 1, "p", f"must be a number >= 1, got {self.p!r}")
        _check(_is_int(self.rounds) and self.rounds >= 1, "rounds", f"must be an integer >= 1, got {self.rounds!r}")
        _check(self.sizes is None or (isinstance(self.sizes, str) and self.sizes.strip() != ""),
               "sizes", f"must be a file path or None, got {self.sizes!r}")

    def check_layers(self, num_layers: int) -> None:
        if self.sizes is not None:
            layers = read_sizes(self.sizes).shape[0]
            _check(layers == num_layers, "sizes", f"{self.sizes} has {layers} layers but the model has {num_layers} MoE layers")

    def for_layer(self, index: int) -> Policy:
        return self if self.sizes is None else self.bound(read_sizes(self.sizes, index))

    def bound(self, fit: torch.Tensor) -> SizePrice:
        """A copy that predicts sizes with ``fit`` (``[3E+2, E]``, finite). Not part of the config."""
        ok = (isinstance(fit, torch.Tensor) and fit.is_floating_point() and fit.dim() == 2
              and fit.shape[0] == 3 * fit.shape[1] + 2)
        _check(ok, "sizes", "a bound fit must be a float tensor [3E+2, E]")
        _check(bool(torch.isfinite(fit).all()), "sizes", "fit values must be finite")
        return _with_data(self, "_fit", fit)

    def keep(self, step: Step) -> torch.Tensor:
        fit = getattr(self, "_fit", None)
        if fit is None:
            raise ValueError(f"{self} has no size fit: give sizes=FILE (`lynx sizes --model MODEL` writes "
                             "MODEL/sizes/sizes.safetensors) and route policy.for_layer(i), or use policy.bound(fit)")
        T, E = step.logits.shape
        K = step.top_k
        _check(fit.shape[1] == E, "sizes", f"the fit is {list(fit.shape)} but the layer has E={E} experts")
        keep = _expand(step, _rows_first(step, _full(step, K)))           # the voting rows' native union
        if E <= K:
            return keep
        dev = keep.device
        vote = torch.ones(T, device=dev) if step.vote is None else step.vote.float()
        raw = (step.logits if step.raw is None else step.raw).float()
        weight = torch.sigmoid(raw) if step.scoring == "sigmoid" else torch.softmax(raw, -1)
        size = weight * (size_features(raw) @ fit.to(dev)).exp()
        voters = vote.sum().clamp_min(1)
        size = size / size.gather(1, step.native_ids).sum(-1).mul(vote).sum().div(voters).clamp_min(1e-30)
        loss = torch.zeros(T, device=dev)
        idx = torch.arange(E, device=dev)
        for _ in range(self.rounds):   # a fixed count: no host sync
            # Each row's best k+1 kept experts by selection logit (-inf: outside its groups, or cut).
            top = step.logits.masked_fill(~keep[None, :], -torch.inf).topk(K + 1, dim=-1)
            real = top.values > -torch.inf
            spare = torch.where(real[:, K:], size.gather(1, top.indices[:, K:]), 0.0)
            # A freed slot loses its output and gains the filler's, counted as orthogonal vectors.
            delta = torch.zeros_like(size).scatter(1, top.indices[:, :K], real[:, :K].float()) * (size**2 + spare**2).sqrt()
            cost = (((loss[:, None] + delta) ** self.p - loss[:, None] ** self.p) * vote[:, None]).sum(0) / voters
            cost = cost.masked_fill(~keep, torch.inf)
            cand = cost <= self.lam
            near = torch.zeros_like(size).scatter(1, top.indices, real.float()) * vote[:, None]
            shared = (near.T @ near) > 0                                                      # [E, E]
            better = (cost[:, None] < cost[None, :]) | ((cost[:, None] == cost[None, :]) & (idx[:, None] < idx[None, :]))
            chosen = cand & ~(shared & cand[None, :] & better.T).any(1)      # no cheaper candidate beside it
            chosen = chosen & ((better & chosen[:, None]).sum(0) < keep.sum() - K)   # at least K stay
            loss = loss + (delta * chosen[None, :]).sum(1)
            keep = keep & ~chosen
        return keep


@dataclasses.dataclass(frozen=True)
class PerLayer(Policy):
    """One policy per MoE layer, in layer order. Spec: ``per_layer(SPEC;SPEC;...)``; dict:
    ``{"policy": "per_layer", "layers": [SPEC or dict, ...]}``."""

    name: ClassVar[str] = "per_layer"
    kind: ClassVar[str] = "per_layer"
    layers: tuple[Policy, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        _check(len(self.layers) >= 1 and all(isinstance(p, Policy) and not isinstance(p, PerLayer)
                                             for p in self.layers),
               "layers", f"must be one or more (non per-layer) policies, got {self.layers!r}")

    def check_top_k(self, top_k: int) -> None:
        for i, p in enumerate(self.layers):
            try:
                p.check_top_k(top_k)
            except ValueError as e:
                raise ValueError(f"layers[{i}]: {e}") from None

    def check_layers(self, num_layers: int) -> None:
        _check(num_layers == len(self.layers), "layers",
               f"this per-layer policy has {len(self.layers)} layers but the model has {num_layers} MoE layers")

    def for_layer(self, index: int) -> Policy:
        self.check_layers(max(index + 1, len(self.layers)))
        return self.layers[index].for_layer(index)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "layers": [p.to_dict() for p in self.layers]}

    def __str__(self) -> str:
        return f"{self.name}({';'.join(str(p) for p in self.layers)})"


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (TopK, AffinityBinning, Confidence, StaticK, SER, BatchTopN, OEA, MassFloor, XShare, SERE,
                              SizePrice, PerLayer)
}


def policy_from_dict(d: dict[str, Any]) -> Policy:
    """Inverse of ``Policy.to_dict``: ``{"policy": "oea", "k0": 2}`` -> ``OEA(k0=2)``."""
    if not isinstance(d, dict) or "policy" not in d:
        raise ValueError(f"a policy dict needs a 'policy' key naming one of {sorted(POLICIES)}, got {d!r}")
    d = dict(d)
    name = d.pop("policy")
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {unknown}; fields are {sorted(fields) or 'none'}")
    if cls is PerLayer:
        layers = d.get("layers")
        if not isinstance(layers, (list, tuple)):
            raise ValueError(f"per_layer: 'layers' must be a list of policies (specs or dicts), got {layers!r}")
        d["layers"] = tuple(policy_from_dict(p) if isinstance(p, dict) else parse_policy(p) for p in layers)
    return cls(**d)


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        raise ValueError(f"cannot read value {text!r}: expected a number, true/false or none") from None


def parse_policy(spec: str) -> Policy:
    """Read a one-line spec: ``"name"`` or ``"name:field=value,field=value"``. Values are
    numbers, true/false or none, except text fields such as SERE's ``similarity`` (a path).

    ``parse_policy("affinity_binning:alpha=3,beta=2")``; ``parse_policy(str(p)) == p``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty policy spec; expected e.g. 'affinity_binning:alpha=3,beta=2', got {spec!r}")
    head, paren, inner = spec.strip().partition("(")
    if paren:   # per_layer(SPEC;SPEC;...)
        if head.strip() != PerLayer.name or not inner.endswith(")"):
            raise ValueError(f"bad policy spec {spec!r}: only per_layer(SPEC;SPEC;...) takes parentheses")
        return PerLayer(tuple(parse_policy(s) for s in inner[:-1].split(";")))
    name, _, rest = spec.strip().partition(":")
    fields: dict[str, Any] = {"policy": name.strip()}
    text = getattr(POLICIES.get(name.strip()), "text_fields", ())
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad policy spec {spec!r}: expected field=value, got {item!r}")
        key = key.strip()
        # Text fields (file paths) are taken as written: no ',' in them, 'none' for None.
        is_text = key in text and value.strip().lower() not in ("none", "null")
        fields[key] = value.strip() if is_text else _parse_value(value)
    policy = policy_from_dict(fields)
    # Floats given as integers ("alpha=3") are fine; the dataclass keeps them as typed.
    return policy


def load_policy(path: str | Path) -> Policy:
    """The ``default`` policy of a policy file (``lynx tune --out FILE``, the format
    ``LYNX_POLICY_FILE`` reads): a spec string or a policy dict. ValueError names the file."""
    import json
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as a JSON policy file: {e}") from None
    spec = data.get("default") if isinstance(data, dict) else None
    if spec is None:
        raise ValueError(f"{path}: no 'default' policy (expected {{\"default\": \"affinity_binning:alpha=3,beta=4\"}} "
                         "or a policy dict)")
    try:
        return policy_from_dict(spec) if isinstance(spec, dict) else parse_policy(spec)
    except ValueError as e:
        raise ValueError(f"{path}: default: {e}") from None
