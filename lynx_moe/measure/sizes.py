"""Output-size fits for the ``SizePrice`` policy, computed once per model (``lynx sizes``).

    fits, meta = size_fits(model, tokenizer, texts)          # [L, 3E+2, E], with per-layer R^2
    save_sizes(model_dir / "sizes/sizes.safetensors", fits, meta)

``fits[l]`` maps ``policies.size_features(logits)`` of a row (its router logits, their softmax,
squares, logsumexp and 1) to ``log |f_e(x)|`` for every expert e of MoE layer l: the norm of
expert e's output on that row, alone, with weight 1, through the model's own experts module.
One ridge regression per expert, over the calibration half of the held-out text (even segments,
``measure.tune.split_texts``: never the test rows of ``lynx frontier``), rows where the expert is
among the row's top 2k weighing 20 times the others (those are the slots a cut frees or fills).
Softmax and sigmoid routers (DeepSeek-V3: the near slots are ranked by the biased scores, groups
aside); not GPT-OSS (softmax over the top k). The fit reads the router's raw logits, which
``route`` hands a policy as ``Step.raw``. Legend: N tokens, F = 3E+2 features, E experts, L layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..integrations.hf import native_routing
from ..policies import SIZES_KEY, size_features
from .data import token_batch
from .similarity import router_inputs, runnable_layers, save_tensor
from .tune import split_texts

__all__ = ["default_path", "fit_sizes", "expert_norms", "size_fits", "save_sizes"]

_CHUNK = 256   # tokens per pass over the experts: bounds memory at E x chunk x D floats


def default_path(model_dir: str | Path) -> Path:
    """``MODEL/sizes/sizes.safetensors``: in a subfolder, because vLLM loads every
    ``*.safetensors`` at a model folder's top level as model weights."""
    return Path(model_dir) / "sizes/sizes.safetensors"


@torch.no_grad()
def expert_norms(experts: torch.nn.Module, num_experts: int, x: torch.Tensor) -> torch.Tensor:
    """``[N, E]`` float64: the norm of each expert's output on each row of ``x [N, D]``."""
    out = []
    for chunk in x.split(_CHUNK):
        n, E = chunk.shape[0], num_experts
        ids = torch.arange(E, device=chunk.device).repeat(n)[:, None]
        y = experts(chunk.repeat_interleave(E, 0), ids, torch.ones(n * E, 1, dtype=chunk.dtype, device=chunk.device))
        out.append(y.view(n, E, -1).double().norm(dim=-1).cpu())
    return torch.cat(out)


def fit_sizes(X: torch.Tensor, Y: torch.Tensor, near: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``[F, E]``: per expert e, the ridge regression of ``Y[:, e]`` on ``X [N, F]``, rows where
    ``near[:, e]`` weighing 20 times the others; ``ridge`` is per row."""
    X, Y = X.double(), Y.double()
    W = (near.double() + 0.05).T[:, :, None]                                   # [E, N, 1]
    XtWX = X.T[None] @ (W * X[None])                                           # [E, F, F]
    XtWY = X.T[None] @ (W * Y.T[:, :, None])                                   # [E, F, 1]
    eye = ridge * X.shape[0] * torch.eye(X.shape[1], dtype=X.dtype)
    return torch.linalg.solve(XtWX + eye, XtWY)[..., 0].T


@torch.no_grad()
def size_fits(model, tokenizer, texts: dict[str, list[str]], *, rows: int = 16, length: int = 128,
              ridge: float = 1e-3) -> tuple[torch.Tensor, dict[str, str], list[float]]:
    """``([L, 3E+2, E] float32, metadata, R^2 per layer)`` for every MoE layer of ``model`` (see
    the module docstring). R^2 is over the slots that matter (each row's top 2k) on the last
    quarter of the calibration tokens, fitted on the rest; the returned fit uses them all."""
    if rows < 1 or length < 1:
        raise ValueError(f"rows and length must be >= 1, got {rows}, {length}")
    layers = runnable_layers(model)
    native = native_routing(layers[0].router)
    if native["scoring"] not in ("softmax", "sigmoid"):
        raise ValueError(f"size_price fits routers that score with a softmax over all experts (OLMoE, Qwen-MoE, "
                         f"Mixtral) or a sigmoid (DeepSeek-V3); {type(model).__name__} scores with "
                         f"{native['scoring']}: not supported")
    calib, _ = split_texts(texts)
    if not calib:
        raise ValueError("size fits need held-out text (--data FILE.jsonl)")
    device = next(model.parameters()).device
    tokens = token_batch(calib, tokenizer, rows, length, model.get_input_embeddings().num_embeddings)
    fits, r2 = [], []
    for layer, x in zip(layers, router_inputs(model, tokens.to(device))):
        logits = layer.router(x)[0].float().cpu()
        X = size_features(logits).double()
        Y = expert_norms(layer.experts, layer.num_experts, x).clamp_min(1e-12).log()
        best = _choice(logits, native_routing(layer.router)).topk(min(2 * layer.top_k, logits.shape[1]), -1).indices
        near = torch.zeros_like(Y, dtype=torch.bool).scatter(1, best, True)
        n = 3 * X.shape[0] // 4
        res = (Y[n:] - X[n:] @ fit_sizes(X[:n], Y[:n], near[:n], ridge))[near[n:]]
        held = Y[n:][near[n:]]
        r2.append(float(1 - res.pow(2).sum() / (held - held.mean()).pow(2).sum().clamp_min(1e-30)))
        fits.append(fit_sizes(X, Y, near, ridge).float())
    meta = {"inputs": f"{rows} rows x {length} tokens of the calibration half (even held-out segments)",
            "tokens": str(tokens.numel()), "layers": ",".join(layer.name for layer in layers),
            "r2": ",".join(f"{v:.4f}" for v in r2)}
    return torch.stack(fits), meta, r2


def _choice(logits: torch.Tensor, native: dict) -> torch.Tensor:
    """The scores a router ranks its experts by (groups aside), from its ``native_routing``
    keywords: the logits, or on sigmoid routers the sigmoid plus the correction bias."""
    if native["scoring"] == "softmax":
        return logits
    bias = native.get("e_score_correction_bias")
    return torch.sigmoid(logits) + (0.0 if bias is None else bias.detach().float().cpu())


def save_sizes(path: str | Path, fits: torch.Tensor, meta: dict[str, str]) -> Path:
    """Write ``fits [L, 3E+2, E]`` and string metadata as a safetensors sizes file."""
    return save_tensor(path, SIZES_KEY, fits, meta)
