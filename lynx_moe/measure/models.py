"""Every model the measurements run: a model folder, or a tiny random one per architecture.

    model, tokenizer = load_model(path)              # None: the embedded reference model
    model = tiny_model("olmoe")                      # OlmoeForCausalLM, 64 experts top-8, ~1 M params

Tiny models keep each architecture's real routing shape (experts x top-k, groups, shared
experts, dense first layers) at hidden size 64, so tests, examples and benchmarks can exercise
every router without a download. Their outputs are meaningless; only routing statistics and
exact equivalence checks make sense on them. (Realistic-shape stacks: ``measure.shapes``.)
The MoE shape of any loaded model is ``lynx_moe.integrations.hf.moe_shape(model)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_model", "TINY_ARCHS", "tiny_config", "tiny_model"]


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("this needs transformers: pip install 'lynx-moe[hf]'") from e
    return transformers


def load_model(path: Path | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer or None)`` from a local model folder (default: the reference model),
    in eval mode. FileNotFoundError if it is not a model folder, ValueError if it cannot load."""
    if path is None:
        from .. import reference_model_path
        path = reference_model_path()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json there)")
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot load the model: {e}") from None
    tokenizer = None  # token_batch falls back to bytes
    # transformers 5 builds an empty tokenizer for a folder without one: look for files first.
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"cannot load the tokenizer in {path} ({e}); using bytes as tokens", stacklevel=2)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# Tiny random-weight models

_COMMON: dict[str, Any] = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

# architecture -> (config class name, routing shape and architecture-specific fields)
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=128)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=32,
                                         head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(num_experts=64, num_experts_per_tok=8, intermediate_size=32)),
    # DeepSeek-V3 shape: 256 experts top-8 in 8 groups (4 chosen), 1 shared expert, layer 0 dense.
    # Its attention needs num_key_value_heads == num_attention_heads.
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                                             moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                                             num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                                             qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                                             routed_scaling_factor=2.5)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=128, num_experts_per_tok=4, intermediate_size=32,
                                     head_dim=16, sliding_window=64,
                                     rope_parameters={"rope_type": "default", "rope_theta": 150000.0})),
}
TINY_ARCHS = tuple(_ARCHS)


def tiny_config(arch: str, **overrides: Any):
    """The transformers config of ``tiny_model(arch)``; keywords override fields."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    cls_name, fields = _ARCHS[arch]
    return getattr(_transformers(), cls_name)(**{**_COMMON, **fields, **overrides})


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random-weight ``...ForCausalLM`` in eval mode; the same ``seed`` gives the same weights."""
    config = tiny_config(arch, **overrides)
    transformers = _transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
