"""When a cut pays: a measured cost model of a decode step, and the gate that uses it.

A policy removes expert bytes, never FLOPs (every row still runs top-k experts), so it saves
time only while a step is memory-bound. The model, per decode step of the engine and machine
it was calibrated on:

    ms(rows R, distinct experts D) = fixed + max(per_expert * D, per_row * R)    (form "max")
    ms(rows R, distinct experts D) = fixed + per_expert * D + per_row * R       (form "sum")

``per_expert * D`` is streaming D experts' weights, ``per_row * R`` the rows' expert FLOPs,
``fixed`` everything a policy cannot change. D is distinct experts per MoE layer (the mean over
layers), R the step's rows. "max" is the roofline (loads and FLOPs overlap: past the compute
floor fewer experts buy nothing); "sum" is what a kernel that loads and then computes each
expert in turn does (vLLM's CPU kernel on one thread measured so: every expert removed pays).
``fit`` finds the three numbers from measured (R, D, ms) points, in both forms, and keeps the
closer one: ``lynx bench --calibrate`` times BatchTopN(n) policies, which fix D, at a few batch
sizes.

The gate (``CostModel.pays``): a step keeps the policy's routing only when the model predicts
a gain of more than ``min_gain`` over native routing; otherwise every row gets its native
experts back. It is tensor code (no host sync), evaluated per layer and step from the rows and
the distinct experts native and with the policy, so a step the model calls compute-bound is
left exactly native. ``at_floor`` also keeps a budgeted policy (XShare, BatchTopN) from cutting
below the compute floor of the step's rows, where fewer experts buy nothing and cost accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from .policies import BatchTopN, Policy, XShare

__all__ = ["CostModel", "fit", "load_cost_model"]

_BUDGETS = {XShare: "budget", BatchTopN: "n"}   # the field that caps a policy's distinct experts


@dataclasses.dataclass(frozen=True)
class CostModel:
    """``ms = fixed_ms + max(per_expert_ms * D, per_row_ms * R)`` per decode step, or with
    ``form="sum"`` ``fixed_ms + per_expert_ms * D + per_row_ms * R`` (see the module)."""

    per_expert_ms: float
    per_row_ms: float
    fixed_ms: float = 0.0
    min_gain: float = 0.03
    source: str = ""   # what it was calibrated on (engine, model, machine)
    form: str = "max"

    def __post_init__(self) -> None:
        if self.form not in ("max", "sum"):
            raise ValueError(f"cost model form must be 'max' or 'sum', got {self.form!r}")
        for name in ("per_expert_ms", "per_row_ms", "fixed_ms", "min_gain"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
                raise ValueError(f"cost model {name} must be a finite number >= 0, got {v!r}")

    def predict(self, rows, distinct):
        """Predicted ms per step; floats or tensors (broadcast)."""
        if isinstance(rows, torch.Tensor) or isinstance(distinct, torch.Tensor):
            memory = torch.as_tensor(distinct * self.per_expert_ms, dtype=torch.float64)
            compute = torch.as_tensor(rows * self.per_row_ms, dtype=torch.float64)
            return self.fixed_ms + (memory + compute if self.form == "sum" else torch.maximum(memory, compute))
        memory, compute = self.per_expert_ms * distinct, self.per_row_ms * rows
        return self.fixed_ms + (memory + compute if self.form == "sum" else max(memory, compute))

    def compute_floor(self, rows: float) -> float:
        """The distinct experts below which a step of ``rows`` rows gets no faster (form "sum": 0)."""
        if not self.per_expert_ms:
            return float("inf")
        return 0.0 if self.form == "sum" else self.per_row_ms * rows / self.per_expert_ms

    def at_floor(self, policy: Policy, rows: int) -> Policy:
        """``policy`` with its budget raised to the compute floor of a step of ``rows`` rows
        (a Python int: decided on the host from the step's shape); other policies unchanged."""
        field = _BUDGETS.get(type(policy))
        if field is None or not self.per_expert_ms or self.form == "sum":
            return policy
        floor = min(math.ceil(self.compute_floor(rows)), 1 << 20)
        return dataclasses.replace(policy, **{field: max(getattr(policy, field), floor)})

    def pays(self, rows: torch.Tensor, native_distinct: torch.Tensor, policy_distinct: torch.Tensor) -> torch.Tensor:
        """Bool tensor: the predicted native time exceeds the policy's by more than ``min_gain``."""
        return self.predict(rows, native_distinct) > (1 + self.min_gain) * self.predict(rows, policy_distinct)

    def __str__(self) -> str:
        if self.form == "sum":
            return (f"ms/step = {self.fixed_ms:.1f} + {self.per_expert_ms:.2f} x distinct + {self.per_row_ms:.2f} x rows "
                    f"(loads and FLOPs add up: every expert removed saves {self.per_expert_ms:.2f} ms)")
        floor = (f"compute floor at batch B = {self.per_row_ms / self.per_expert_ms:.2f} x B experts"
                 if self.per_expert_ms else "no measurable per-expert cost: the gate never cuts")
        return (f"ms/step = {self.fixed_ms:.1f} + max({self.per_expert_ms:.2f} x distinct, {self.per_row_ms:.2f} x rows); "
                f"{floor}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"cost_model": self.to_dict()}, indent=1) + "\n")


def load_cost_model(path: str | Path) -> CostModel:
    """Read a file written by ``CostModel.save`` (``lynx bench --calibrate``); ValueError names the file."""
    try:
        data = json.loads(Path(path).read_text())["cost_model"]
        return CostModel(**data)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a lynx cost-model file (write one with lynx bench --calibrate FILE): {e}") from None


def fit(points: list[tuple[float, float, float]], *, min_gain: float = 0.03, source: str = "") -> CostModel:
    """Least squares fit of ``(rows, distinct, ms)`` points in both forms; the one with the
    smaller squared error wins (a tie: "max", the roofline)."""
    import numpy as np
    if len(points) < 3:
        raise ValueError(f"need at least 3 (rows, distinct, ms) points to fit a cost model, got {len(points)}")
    R, D, ms = (np.array(c, dtype=float) for c in zip(*points))
    roofline, additive = _fit_max(R, D, ms), _fit_sum(R, D, ms)

    def err(m: CostModel) -> float:
        return sum((m.predict(r, d) - t) ** 2 for r, d, t in points)
    best = additive if err(additive) < err(roofline) else roofline
    return dataclasses.replace(best, min_gain=min_gain, source=source)


def _fit_sum(R, D, ms) -> CostModel:
    """Non-negative least squares of ``ms = fixed + per_expert * D + per_row * R`` (the
    coefficients that come out negative are dropped and the rest refitted)."""
    import numpy as np
    columns = [D, R, np.ones_like(ms)]
    keep = [0, 1, 2]
    while True:
        coef = list(np.linalg.lstsq(np.stack([columns[i] for i in keep], axis=1), ms, rcond=None)[0])
        if min(coef) >= 0 or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    x = [0.0, 0.0, 0.0]
    for i, c in zip(keep, coef):
        x[i] = max(float(c), 0.0)
    return CostModel(x[0], x[1], x[2], form="sum")


def _fit_max(R, D, ms) -> CostModel:
    """The roofline form: for each candidate ``per_row_ms`` on a grid, alternate between
    assigning each point to the term that dominates and solving for ``per_expert_ms`` and
    ``fixed_ms``; keep the best fit, then polish both terms at once."""
    import numpy as np
    best = None
    for b in np.linspace(0.0, float((ms / R).max()), 401):
        memory = np.ones(len(ms), dtype=bool)
        for _ in range(20):
            A = np.stack([D * memory, np.ones_like(ms)], axis=1)
            (a, c), *_ = np.linalg.lstsq(A, ms - b * R * ~memory, rcond=None)
            a, c = max(float(a), 0.0), max(float(c), 0.0)
            new = a * D >= b * R
            if (new == memory).all():
                break
            memory = new
        err = float(((c + np.maximum(a * D, b * R) - ms) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, a, float(b), c)
    _, a, b, c = best
    memory = a * D >= b * R
    if memory.any() and (~memory).any():   # polish: both terms at once, on the best assignment
        A = np.stack([D * memory, R * ~memory, np.ones_like(ms)], axis=1)
        (a2, b2, c2), *_ = np.linalg.lstsq(A, ms, rcond=None)
        err = float(((c2 + np.maximum(a2 * D, b2 * R) - ms) ** 2).sum())
        if min(a2, b2, c2) >= 0 and err <= best[0]:
            a, b, c = float(a2), float(b2), float(c2)
    return CostModel(a, b, c)
