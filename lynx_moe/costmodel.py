"""When a cut pays: a measured cost model of a decode step, and the gate that uses it.

A policy removes expert bytes, never FLOPs (every row still runs top-k experts), so it saves
time only while a step is memory-bound. The model, per decode step of the engine and machine
it was calibrated on:

    ms(rows R, distinct experts D) = fixed + max(per_expert * D, per_row * R)

``per_expert * D`` is streaming D experts' weights, ``per_row * R`` the rows' expert FLOPs,
``fixed`` everything a policy cannot change. D is distinct experts per MoE layer (the mean over
layers), R the step's rows. ``fit`` finds the three numbers from measured (R, D, ms) points:
``lynx bench --calibrate FILE`` times BatchTopN(n) policies, which fix D, at a few batch sizes.

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
    """``ms = fixed_ms + max(per_expert_ms * D, per_row_ms * R)`` per decode step (see the module)."""

    per_expert_ms: float
    per_row_ms: float
    fixed_ms: float = 0.0
    min_gain: float = 0.03
    source: str = ""   # what it was calibrated on (engine, model, machine)

    def __post_init__(self) -> None:
        for name in ("per_expert_ms", "per_row_ms", "fixed_ms", "min_gain"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
                raise ValueError(f"cost model {name} must be a finite number >= 0, got {v!r}")

    def predict(self, rows, distinct):
        """Predicted ms per step; floats or tensors (broadcast)."""
        if isinstance(rows, torch.Tensor) or isinstance(distinct, torch.Tensor):
            return self.fixed_ms + torch.maximum(torch.as_tensor(distinct * self.per_expert_ms, dtype=torch.float64),
                                                 torch.as_tensor(rows * self.per_row_ms, dtype=torch.float64))
        return self.fixed_ms + max(self.per_expert_ms * distinct, self.per_row_ms * rows)

    def compute_floor(self, rows: float) -> float:
        """The distinct experts below which a step of ``rows`` rows gets no faster."""
        return self.per_row_ms * rows / self.per_expert_ms if self.per_expert_ms else float("inf")

    def at_floor(self, policy: Policy, rows: int) -> Policy:
        """``policy`` with its budget raised to the compute floor of a step of ``rows`` rows
        (a Python int: decided on the host from the step's shape); other policies unchanged."""
        field = _BUDGETS.get(type(policy))
        if field is None or not self.per_expert_ms:
            return policy
        floor = min(math.ceil(self.compute_floor(rows)), 1 << 20)
        return dataclasses.replace(policy, **{field: max(getattr(policy, field), floor)})

    def pays(self, rows: torch.Tensor, native_distinct: torch.Tensor, policy_distinct: torch.Tensor) -> torch.Tensor:
        """Bool tensor: the predicted native time exceeds the policy's by more than ``min_gain``."""
        return self.predict(rows, native_distinct) > (1 + self.min_gain) * self.predict(rows, policy_distinct)

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
    """Least squares fit of ``(rows, distinct, ms)`` points to the model: for each candidate
    ``per_row_ms`` on a grid, alternate between assigning each point to the term that
    dominates and solving for ``per_expert_ms`` and ``fixed_ms``; keep the best fit."""
    import numpy as np
    if len(points) < 3:
        raise ValueError(f"need at least 3 (rows, distinct, ms) points to fit a cost model, got {len(points)}")
    R, D, ms = (np.array(c, dtype=float) for c in zip(*points))
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
    return CostModel(a, b, c, min_gain, source)
