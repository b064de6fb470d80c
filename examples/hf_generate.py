"""Generate with a Hugging Face MoE model under a lynx policy, then read how many experts each
decode step touched.

    python examples/hf_generate.py                                    # tiny random OLMoE, offline
    python examples/hf_generate.py --arch deepseek_v3 --policy oea:k0=2
    python examples/hf_generate.py --model models/lynx-ref-moe --policy affinity_binning:alpha=3,beta=4

Usage (README section)
----------------------
``pip install 'lynx-moe[hf]'``, then, on a model you already load::

    import lynx_moe as lynx
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    lynx.apply_(model, lynx.AffinityBinning(alpha=3.0, beta=2))   # in place; again = replace
    out = model.generate(**batch, max_new_tokens=64)
    for layer in lynx.routing_stats(model):                       # one line per MoE layer
        print(layer.layer, layer.distinct_native, layer.distinct_policy, layer.changed_share)
    lynx.reset_stats(model)
    lynx.remove_(model)                                           # exactly the original model
    with lynx.applied(model, lynx.OEA(k0=2)):                     # the same, for one block
        model.generate(**batch)

- Supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS (transformers 5.16-5.19);
  anything else raises ``ValueError`` and is left untouched. Only the router's choice changes;
  expert execution, shared experts and dense layers stay transformers' own.
- Prompt (prefill) tokens are always routed natively; the policy acts on decode steps (one new
  token per sequence), where rows of padding and of finished sequences (input token EOS or pad,
  from ``model.generation_config``; override with ``apply_(..., stop_token_ids=[...])``) do not
  vote. Call the model you patched (``model.generate`` / ``model(...)``): inner modules called
  alone get native routing.
- With ``lynx.TopK()`` the model is bit-identical to the unpatched one; ``stats=False`` skips
  the counting (0.05-0.2 ms per layer call on a busy 2-core CPU).
- ``lynx.presets.for_shape(num_experts, top_k)`` gives the authors' AffinityBinning preset
  for a routing shape, a starting point for tuning.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch  # noqa: E402

import lynx_moe as lynx  # noqa: E402
from lynx_moe.integrations.hf import moe_shape  # noqa: E402
from lynx_moe.measure.models import TINY_ARCHS, load_model, tiny_model  # noqa: E402

PROMPTS = ["In the beginning", "The meaning of the word", "A list of the planets:", "Once upon a time there",
           "The function returns", "To install the package,", "Water boils at", "The capital of France is"]


def load(args) -> tuple[torch.nn.Module, dict[str, torch.Tensor], object | None]:
    """The model, a left-padded batch of prompts, and the tokenizer (None for tiny models)."""
    if args.model is None:
        model = tiny_model(args.arch)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.batch, 8), generator=g)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None
    try:
        model, tok = load_model(args.model)
    except FileNotFoundError as e:   # not a model folder: say so, not a model-hub error
        raise SystemExit(f"error: {e}") from None
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer in that folder")
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    return model, dict(tok(prompts, return_tensors="pt", padding=True)), tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local model folder (default: a tiny random model)")
    p.add_argument("--arch", default="olmoe", choices=TINY_ARCHS, help="tiny model architecture")
    p.add_argument("--policy", type=lynx.parse_policy, default=None,
                   help="policy spec, e.g. affinity_binning:alpha=3,beta=2 (default: preset for the shape)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args()

    model, batch, tok = load(args)
    policy = args.policy or lynx.presets.for_shape(*moe_shape(model))[1]
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        for p_ in (lynx.TopK(), policy):
            with lynx.applied(model, p_):
                out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False)
                stats = lynx.routing_stats(model)
            native, chosen, changed = (sum(getattr(s, f) for s in stats) / len(stats)
                                       for f in ("distinct_native", "distinct_policy", "changed_share"))
            print(f"{str(p_):<40} distinct experts per decode step: native {native:.1f} -> {chosen:.1f}, "
                  f"slots changed {100 * changed:.0f}%")
            if tok is not None:
                print("   ", repr(tok.decode(out[0, n:], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
