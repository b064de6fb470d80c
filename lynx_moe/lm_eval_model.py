"""lm-evaluation-harness model ``lynx-hf``: Hugging Face ``HFLM`` with a routing policy applied.

    lynx lm-eval --model lynx-hf \\
        --model_args "pretrained=PATH,policy=affinity_binning:alpha=3;beta=4,dtype=bfloat16" \\
        --tasks gsm8k --device cpu --batch_size 32

    import lm_eval, lynx_moe.lm_eval_model as lem
    lem.register()
    lm_eval.simple_evaluate(model="lynx-hf", model_args="pretrained=PATH,policy=oea:k0=2", tasks=[...])

``policy`` is a ``lynx_moe.parse_policy`` spec. lm-eval splits ``model_args`` on commas, so
inside the spec separate fields with ``;`` (or ``+``): ``affinity_binning:alpha=3;beta=4``.
No ``policy`` (or ``topk``) is native routing, for the baseline run. Every other argument is
``HFLM``'s.

What it exercises. The policy acts on decode steps only. Generation tasks
(``generate_until``: GSM8K, HumanEval, the reference model's ``lynx_ref_next_word``) decode
batches of ``batch_size`` sequences through ``model.generate`` and so measure the policy
(except the first new token, which comes from the prefill). Loglikelihood tasks (multiple
choice, perplexity) run as one prefill forward per request in lm-eval and are therefore
routed natively: their scores do not change with the policy. ``lynx eval`` scores those in
decode mode instead. After each generation pass the distinct experts per decode step are
logged.

lm-eval 0.4.13 has no plugin discovery for models: ``register()`` (or ``lynx lm-eval``, which
calls it and then lm-eval's own command line) adds the name to its registry.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from lm_eval.api.registry import get_model, register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("the lm-eval integration needs lm-eval: pip install 'lynx-moe[eval]'") from e

import lynx_moe as lynx

__all__ = ["MODEL_NAME", "LynxHFLM", "register", "parse_policy_arg"]

MODEL_NAME = "lynx-hf"
# A child of lm-eval's logger, so its command line shows these lines at its verbosity.
log = logging.getLogger("lm_eval.lynx_hf")


def parse_policy_arg(spec: Any) -> lynx.Policy:
    """A policy from a ``model_args`` value: a ``Policy``, a dict (``to_dict`` form), or a spec
    whose fields are separated by ``;`` or ``+`` (or ``,`` when given through the Python API)."""
    if spec is None or spec == "":
        return lynx.TopK()
    if isinstance(spec, lynx.Policy):
        return spec
    if isinstance(spec, dict):
        return lynx.policy_from_dict(spec)
    return lynx.parse_policy(str(spec).replace(";", ",").replace("+", ","))


class LynxHFLM(HFLM):
    """``HFLM`` whose model routes its decode steps with ``policy`` (see the module docstring)."""

    def __init__(self, pretrained: Any, policy: Any = None, **kwargs: Any) -> None:
        self.policy = parse_policy_arg(policy)   # fail on a bad spec before loading anything
        super().__init__(pretrained=pretrained, **kwargs)
        lynx.apply_(self.model, self.policy, stats=True)
        log.info("lynx-hf: routing decode steps with %s; loglikelihood requests run as prefill "
                 "and are routed natively", self.policy)

    def generate_until(self, requests, disable_tqdm: bool = False):
        lynx.reset_stats(self.model)
        out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        stats = lynx.routing_stats(self.model)
        if stats and stats[0].steps:
            nat = sum(s.distinct_native for s in stats) / len(stats)
            pol = sum(s.distinct_policy for s in stats) / len(stats)
            log.info("lynx-hf %s: %d decode steps, %.1f rows/step; distinct experts per layer and step "
                     "%.2f (native %.2f)", self.policy, stats[0].steps,
                     stats[0].decode_rows / stats[0].steps, pol, nat)
        return out


def register() -> type:
    """Add ``lynx-hf`` to lm-eval's model registry (idempotent); returns the class."""
    import lm_eval.models  # noqa: F401  # the built-in models first: lm-eval loads them only into an empty registry
    try:
        if get_model(MODEL_NAME) is LynxHFLM:
            return LynxHFLM
    except ValueError:
        pass
    register_model(MODEL_NAME)(LynxHFLM)
    return LynxHFLM
