"""Expert similarity matrices for SERE, computed once per model (``lynx similarity``).

    sim, meta = expert_similarity(model, tokenizer, texts, method="outputs")   # [L, E, E]
    save_similarity(model_dir / "sere/similarity.safetensors", sim, meta)

``sim[l, e, p]``: the mean, over calibration inputs ``x``, of the cosine between expert e's and
expert p's outputs on the same ``x`` in MoE layer l (each expert run by transformers' own
experts module, alone, with weight 1). SERE hands a token's slot from expert e to primary p,
so what matters is how close ``f_p(x)`` lands to ``f_e(x)`` in the residual basis, token by
token. That is why the metric is the per-token cosine and not the authors' default CKA:
CKA is invariant to rotations of the output space, but a stand-in's output is added in the
same basis. Two sources of inputs:

- ``outputs``: the hidden states that reach each MoE layer (its router's input) in a plain
  forward over held-out text, the last quarter of every domain's segments
  (``calibration_texts``). ``lynx eval`` reads each domain from its first segment on (at its
  defaults, 16 rows of 81 tokens: under a fifth of the smallest domain), ``lynx tune`` both
  halves from the start (8 rows each), so neither reads this slice at its defaults;
- ``weights``: data-free, from the weights alone: the same cosine on seeded Gaussian inputs
  ``N(0, I)`` (the scale of RMS-normalised hidden states, before the norm's gain).

The file is safetensors: one float32 tensor ``similarity`` ``[L, E, E]`` (MoE layers in model
order, as ``integrations.hf.moe_layers`` lists them) and string metadata; the policy core
reads it (``policies.read_similarity``). Legend: N tokens, D hidden size, E experts, L layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..integrations.hf import moe_layers
from ..policies import SIMILARITY_KEY
from .data import token_batch

__all__ = ["METHODS", "default_path", "calibration_texts", "router_inputs", "cosine_similarity",
           "expert_similarity", "runnable_layers", "save_similarity", "save_tensor"]

METHODS = ("outputs", "weights")
_CHUNK = 512   # tokens per pass over the experts: bounds memory at E x chunk x D floats


def default_path(model_dir: str | Path, method: str) -> Path:
    """Where a model's similarity file goes: ``MODEL/sere/similarity.safetensors`` (``outputs``),
    ``MODEL/sere/similarity_weights.safetensors`` (``weights``): in a subfolder, because vLLM
    loads every ``*.safetensors`` at a model folder's top level as model weights."""
    return Path(model_dir) / ("sere/similarity.safetensors" if method == "outputs"
                              else f"sere/similarity_{method}.safetensors")


def calibration_texts(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    """The last quarter (at least one) of each domain's segments, kept in order."""
    return {d: t[len(t) - max(1, len(t) // 4):] for d, t in texts.items() if t}


@torch.no_grad()
def router_inputs(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """``[N, D]`` hidden states reaching each MoE layer (its router's input) in a plain forward
    of ``tokens [B, S]`` (native routing; nothing is patched)."""
    layers = moe_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.router.register_forward_pre_hook(
        lambda m, args, i=i: seen[i].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(layers)]
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


@torch.no_grad()
def cosine_similarity(experts: torch.nn.Module, num_experts: int, x: torch.Tensor) -> torch.Tensor:
    """``[E, E]`` float32: mean over the rows of ``x [N, D]`` of the cosine between two experts'
    outputs on that row; symmetric, 1 on the diagonal, in [-1, 1]."""
    E, N = num_experts, x.shape[0]
    total = torch.zeros(E, E, dtype=torch.float64)
    for chunk in x.split(_CHUNK):
        n = chunk.shape[0]
        ones = torch.ones(n, 1, dtype=chunk.dtype, device=chunk.device)
        # Expert e alone, weight 1, through the model's own experts module.
        outs = torch.stack([experts(chunk, torch.full((n, 1), e, dtype=torch.long, device=chunk.device), ones)
                            for e in range(E)]).float()                          # [E, n, D]
        unit = F.normalize(outs, dim=-1)
        total += torch.einsum("end,fnd->ef", unit, unit).double().cpu()
    sim = (total / N).float().clamp(-1.0, 1.0)
    return sim.fill_diagonal_(1.0)


def expert_similarity(model, tokenizer, texts: dict[str, list[str]] | None, *, method: str = "outputs",
                      tokens: int = 4096, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, dict[str, str]]:
    """``([L, E, E] float32, metadata)`` for every MoE layer of ``model`` (see the module
    docstring). ``texts``: the held-out text (``outputs`` reads ``calibration_texts`` of it,
    ``tokens`` tokens in rows of ``length``; ``weights`` ignores it)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tokens < 1 or length < 1:
        raise ValueError(f"tokens and length must be >= 1, got {tokens}, {length}")
    layers = runnable_layers(model)
    dtype = next(model.parameters()).dtype
    if method == "outputs":
        if not texts:
            raise ValueError("method 'outputs' needs held-out text")
        rows = -(-tokens // length)
        batch = token_batch(calibration_texts(texts), tokenizer, rows, length,
                            model.get_input_embeddings().num_embeddings)
        inputs = router_inputs(model, batch.to(next(model.parameters()).device))
        source = f"{rows} rows x {length} tokens of the last quarter of each domain's held-out segments"
    else:
        g = torch.Generator().manual_seed(seed)
        D = layers[0].router.weight.shape[-1]
        inputs = [torch.randn(tokens, D, generator=g).to(dtype) for _ in layers]
        source = f"{tokens} Gaussian N(0, I) inputs per layer, seed {seed}"
    sims = torch.stack([cosine_similarity(layer.experts, layer.num_experts, x.to(layer.router.weight.device))
                        for layer, x in zip(layers, inputs)])
    meta = {"method": method, "metric": "mean per-token cosine of expert outputs", "inputs": source,
            "tokens": str(inputs[0].shape[0]), "layers": ",".join(layer.name for layer in layers)}
    return sims, meta


def save_tensor(path: str | Path, key: str, tensor: torch.Tensor, meta: dict[str, str]) -> Path:
    """Write ``tensor`` (float32) under ``key`` and string metadata as a safetensors file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.float().contiguous()}, str(path), metadata=dict(meta))
    return path


def save_similarity(path: str | Path, sims: torch.Tensor, meta: dict[str, str]) -> Path:
    """Write ``sims [L, E, E]`` and string metadata as a safetensors similarity file."""
    return save_tensor(path, SIMILARITY_KEY, sims, meta)


def runnable_layers(model) -> list:
    """``moe_layers(model)``, checked to be non-empty with an experts module beside each router
    (calibration runs every expert); ValueError otherwise."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer that lynx_moe knows")
    if any(layer.experts is None for layer in layers):
        raise ValueError("a MoE layer without an experts module beside its router: cannot run its experts")
    return layers
