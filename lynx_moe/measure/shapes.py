"""Realistic-shape MoE decoder stacks with random weights and replayed router logits.

The reference model is small: its expert weights sit in cache and its decode steps are
overhead-bound, which says nothing about a 7B-30B MoE whose steps are memory-bound. A
``Shape`` is a published model's layer dimensions; ``build_stack`` builds its decoder stack
(embedding, N decoder layers, final norm; no LM head) in bf16 with random weights using the
model family's own transformers classes, so attention, KV cache and expert execution are
exactly what a user of that model runs.

Random routers would spread tokens almost uniformly. ``LogitReplay`` instead makes every
router output logits recorded from a real model on real text (same expert count and top-k):
the router weight becomes ``[I_E | 0]`` and a forward pre-hook hands it a tensor whose first
E columns are the recorded logits of the current step, so the router (and any policy patched
into it) sees real logits while the experts still get the real hidden states::

    stack = build_stack(SHAPES["olmoe-1b-7b"], layers=4)
    replay = LogitReplay(stack, logits)     # logits [L_ref, steps, rows, E], cycled over layers
    replay.step = 3                          # before each decode step

Legend: L layers, E experts, K top-k, D hidden.
"""

from __future__ import annotations

import dataclasses

import torch

from ..integrations.hf import moe_layers

__all__ = ["Shape", "SHAPES", "get_shape", "shape_config", "build_stack", "LogitReplay"]


# family -> (config class name, base model class name, config field for the expert width)
_FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeModel", "intermediate_size"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeModel", "moe_intermediate_size"),
    "mixtral": ("MixtralConfig", "MixtralModel", "intermediate_size"),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One MoE decoder layer's dimensions (and the published depth and vocabulary)."""

    family: str          # transformers model type: "olmoe", "qwen3_moe" or "mixtral"
    hidden: int          # D
    layers: int          # the published model's depth (``build_stack`` may build fewer)
    heads: int
    kv_heads: int
    head_dim: int
    experts: int         # E
    top_k: int           # K
    expert_ffn: int      # intermediate size of one expert
    vocab: int           # published vocabulary (only the LM head would read all of it)

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {self.family!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "family" and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
        if not self.top_k <= self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")

    def expert_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one expert's weights (gate, up and down projections)."""
        return 3 * self.hidden * self.expert_ffn * dtype.itemsize

    def layer_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one decoder layer: attention projections, router and all experts."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (2 * q + 2 * kv)
        return attention * dtype.itemsize + self.experts * (self.expert_bytes(dtype) + self.hidden * dtype.itemsize)


SHAPES: dict[str, Shape] = {
    # allenai/OLMoE-1B-7B-0924: 64 experts top-8, the reference model's routing shape.
    "olmoe-1b-7b": Shape("olmoe", 2048, 16, 16, 16, 128, 64, 8, 1024, 50304),
    # Qwen/Qwen3-30B-A3B: 128 experts top-8, GQA 32/4 heads of 128.
    "qwen3-30b-a3b": Shape("qwen3_moe", 2048, 48, 32, 4, 128, 128, 8, 768, 151936),
    # mistralai/Mixtral-8x7B: 8 experts top-2, GQA 32/8.
    "mixtral-8x7b": Shape("mixtral", 4096, 32, 32, 8, 128, 8, 2, 14336, 32000),
    # A tiny stand-in with OLMoE-1B-7B's routing shape, for tests and smoke runs.
    "olmoe-tiny": Shape("olmoe", 64, 2, 4, 4, 16, 64, 8, 32, 50304),
}

# The stack never computes LM logits, so its embedding only needs ids it will be fed.
_STACK_VOCAB = 1024


def get_shape(name: str) -> Shape:
    """``SHAPES[name]`` with an error listing the known names."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None


def shape_config(shape: Shape, layers: int):
    """The transformers config of ``shape`` with ``layers`` layers (vocabulary 1024; id 0 is
    BOS, EOS and pad), for ``build_stack`` and for saving a full causal LM of the shape."""
    import transformers
    cfg_name, _, ffn_field = _FAMILIES[shape.family]
    experts_field = "num_local_experts" if shape.family == "mixtral" else "num_experts"
    cfg = getattr(transformers, cfg_name)(
        vocab_size=_STACK_VOCAB, hidden_size=shape.hidden, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        num_experts_per_tok=shape.top_k, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
        **{experts_field: shape.experts, ffn_field: shape.expert_ffn})
    cfg.head_dim = shape.head_dim
    if shape.family == "qwen3_moe":
        cfg.intermediate_size = shape.expert_ffn  # dense MLP width; unused (every layer is MoE)
    return cfg


def build_stack(shape: Shape, layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0) -> torch.nn.Module:
    """The decoder stack of ``shape`` with ``layers`` layers (default: all), random weights.

    Weights are drawn directly in ``dtype`` (no fp32 copy, so a 4-layer OLMoE-1B-7B stack
    needs about 3.3 GB, not 10). Needs transformers (``pip install lynx-moe[hf]``).
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("realistic shapes need transformers: pip install 'lynx-moe[hf]'") from None
    layers = shape.layers if layers is None else layers
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    cfg = shape_config(shape, layers)
    model_cls = getattr(transformers, _FAMILIES[shape.family][1])
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and initialised) in bf16 directly
    try:
        model = model_cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


class LogitReplay:
    """Make every router of ``model`` output recorded logits (see the module docstring).

    ``logits`` is ``[L_ref, steps, rows, E]``: stack layer ``l`` replays reference layer
    ``l % L_ref``; step ``s`` replays recorded step ``s % steps``; a forward with ``T`` rows
    takes recorded rows ``0..T-1`` (cycled if ``T > rows``). Set ``step`` before each forward;
    ``active = False`` lets the routers see their real input (e.g. during prefill).
    """

    def __init__(self, model: torch.nn.Module, logits: torch.Tensor) -> None:
        self.routers = [layer.router for layer in moe_layers(model)]
        if not self.routers:
            raise ValueError(f"no MoE router that lynx_moe knows in {type(model).__name__}")
        E = self.routers[0].weight.shape[0]
        if logits.dim() != 4 or logits.shape[-1] != E:
            raise ValueError(f"recorded logits must be [layers, steps, rows, E={E}], got {tuple(logits.shape)}")
        D = self.routers[0].weight.shape[1]
        if D < E:
            raise ValueError(f"replay needs hidden size >= experts (got D={D}, E={E})")
        self.logits = logits
        self.step = 0
        self.active = True
        self._handles = []
        for i, router in enumerate(self.routers):
            with torch.no_grad():
                router.weight.zero_()
                router.weight[:, :E].copy_(torch.eye(E))
            self._handles.append(router.register_forward_pre_hook(self._hook(i % logits.shape[0])))

    def _hook(self, ref_layer: int):
        def pre_hook(module, args):
            if not self.active:
                return None
            hidden = args[0]
            T = hidden.numel() // hidden.shape[-1]
            rec = self.logits[ref_layer, self.step % self.logits.shape[1]]           # [rows, E]
            rows = torch.arange(T) % rec.shape[0]
            x = hidden.new_zeros(T, hidden.shape[-1])                                # [T, D]
            x[:, : rec.shape[-1]] = rec[rows].to(hidden.dtype)
            return (x, *args[1:])
        return pre_hook

    def remove(self) -> None:
        """Take the hooks off (the routers keep their identity weights)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
