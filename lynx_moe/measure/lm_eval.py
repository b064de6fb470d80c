"""lm-evaluation-harness model ``lynx-hf``: Hugging Face ``HFLM`` with a routing policy applied.

    lynx lm-eval --model lynx-hf \\
        --model_args "pretrained=PATH,policy=affinity_binning:alpha=3;beta=4,dtype=bfloat16" \\
        --tasks gsm8k --device cpu --batch_size 32

    import lm_eval, lynx_moe.measure.lm_eval as lem
    lem.register()
    lm_eval.simple_evaluate(model="lynx-hf", model_args="pretrained=PATH,policy=oea:k0=2", tasks=[...])

``policy`` is a ``lynx_moe.parse_policy`` spec, written as everywhere else:
``policy=affinity_binning:alpha=3,beta=4``. lm-eval splits ``model_args`` on commas and hands
``beta=4`` over as an argument of its own; every such argument that names a field of the
policy goes back into the spec (``;`` or ``+`` between fields works too).
No ``policy`` (or ``topk``) is native routing, for the baseline run. Every other argument is
``HFLM``'s.

What it exercises. The policy acts on decode steps only. Generation tasks
(``generate_until``: GSM8K, HumanEval, the reference model's ``lynx_ref_next_word``) decode
batches of ``batch_size`` sequences through ``model.generate`` and so measure the policy
(except the first new token, which comes from the prefill). Loglikelihood tasks (multiple
choice, perplexity) run as one prefill forward per request in lm-eval and are therefore
routed natively: their scores do not change with the policy. With ``decode_scoring=true``
they are scored in decode mode instead (``lynx_moe.measure.decode``, as ``lynx eval`` does): each
batch of ``batch_size`` requests prefills its contexts but the last token, then feeds that
token and the continuation one decode step at a time, so every continuation token is
predicted by a decode step with the whole batch voting (slower: one forward per token). After
each pass the distinct experts per decode step are logged. The reference models'
``lynx_ref_next_words`` (two-word answers; acc = the whole answer is greedy, and its perplexity)
is the task built for this; ``lynx lm-eval-compare`` gives paired intervals between two runs.

lm-eval 0.4.13 has no plugin discovery for models: ``register()`` (or ``lynx lm-eval``, which
calls it and then lm-eval's own command line) adds the name to its registry.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

try:
    from lm_eval.api.registry import get_model, register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("the lm-eval integration needs lm-eval: pip install 'lynx-moe[eval]'") from e

from ..integrations import hf
from ..policies import POLICIES, Policy, TopK, parse_policy, policy_from_dict
from .decode import prefill, teacher_forced

__all__ = ["MODEL_NAME", "LynxHFLM", "register", "parse_policy_arg"]

MODEL_NAME = "lynx-hf"
# A child of lm-eval's logger, so its command line shows these lines at its verbosity.
log = logging.getLogger("lm_eval.lynx_hf")


def parse_policy_arg(spec: Any) -> Policy:
    """A policy from a ``model_args`` value: a ``Policy``, a dict (``to_dict`` form), or a spec
    whose fields are separated by ``;`` or ``+`` (or ``,`` when given through the Python API)."""
    if spec is None or spec == "":
        return TopK()
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, dict):
        return policy_from_dict(spec)
    return parse_policy(str(spec).replace(";", ",").replace("+", ","))


def _fold_policy_fields(policy: Any, kwargs: dict[str, Any]) -> Any:
    """``policy="affinity_binning:alpha=3"`` plus ``beta="4"`` (what lm-eval makes of
    ``policy=affinity_binning:alpha=3,beta=4``) -> ``"affinity_binning:alpha=3,beta=4"``; the
    folded keys leave ``kwargs``."""
    if not isinstance(policy, str) or not policy.strip():
        return policy
    cls = POLICIES.get(policy.strip().partition(":")[0])
    names = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
    extra = [f"{k}={kwargs.pop(k)}" for k in list(kwargs) if k in names]
    if not extra:
        return policy
    return policy + ("," if ":" in policy else ":") + ",".join(extra)


class LynxHFLM(HFLM):
    """``HFLM`` whose model routes its decode steps with ``policy`` (see the module docstring)."""

    def __init__(self, pretrained: Any, policy: Any = None, decode_scoring: Any = False, **kwargs: Any) -> None:
        # fail on a bad spec, or one the model's top-k cannot run, before loading anything
        self.policy = parse_policy_arg(_fold_policy_fields(policy, kwargs))
        shape = hf.config_moe_shape(pretrained) if isinstance(pretrained, str) else None
        if shape is not None:
            self.policy.check_top_k(shape[1])
            layers = hf.config_moe_layers(pretrained)
            if layers is not None:
                self.policy.check_layers(layers)
        self.decode_scoring = str(decode_scoring).strip().lower() in ("1", "true", "yes")
        super().__init__(pretrained=pretrained, **kwargs)
        hf.apply_(self.model, self.policy, stats=True)
        log.info("lynx-hf: routing decode steps with %s; loglikelihood requests %s", self.policy,
                 "scored in decode mode" if self.decode_scoring else "run as prefill and are routed natively")

    def _log_stats(self, what: str) -> None:
        stats = hf.routing_stats(self.model)
        if stats and stats[0].steps:
            nat = sum(s.distinct_native for s in stats) / len(stats)
            pol = sum(s.distinct_policy for s in stats) / len(stats)
            log.info("lynx-hf %s, %s: %d decode steps, %.1f rows/step; distinct experts per layer and step "
                     "%.2f (native %.2f)", self.policy, what, stats[0].steps,
                     stats[0].decode_rows / stats[0].steps, pol, nat)

    def generate_until(self, requests, disable_tqdm: bool = False):
        hf.reset_stats(self.model)
        out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._log_stats("generation")
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self.decode_scoring:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm import tqdm
        hf.reset_stats(self.model)
        bs = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 32)
        # Longest first, like lm-eval: similar lengths share a batch and padding stays small.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood in decode mode")
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            for i, answer in zip(chunk, self._decode_scores([requests[i] for i in chunk])):
                out[i] = answer
                if requests[i][0] is not None:   # rolling windows are cached per document by lm-eval
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        self._log_stats("loglikelihood")
        return out

    def _decode_scores(self, requests) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation), continuation is greedy)`` per request, in decode mode."""
        rows, lens, from_prefill = [], [], []
        for _, ctx, cont in requests:
            row = (list(ctx) + list(cont))[-(self.max_length + 1):]
            n_ctx = max(1, len(row) - len(cont))
            rows.append(row)
            # The last context token is fed by the first decode step; a one-token context is
            # prefilled whole and its prediction of the first continuation token comes from the prefill.
            lens.append(n_ctx - 1 if n_ctx >= 2 else 1)
            from_prefill.append(n_ctx == 1)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        pre = prefill(self.model, rows, lens, pad)
        sc = teacher_forced(self.model, pre, rows, lens)
        answers = []
        for r, (row, p) in enumerate(zip(rows, lens)):
            targets = torch.tensor(row[p + 1:], dtype=torch.long)
            total = sc.row_logprobs(r).double().sum().item()
            greedy = bool((sc.argmax[r][sc.live[r]] == targets).all())
            if from_prefill[r]:   # the first continuation token is scored by the prefill
                first = row[p]
                total += pre.last_logp[r, first].item()
                greedy = greedy and int(pre.last_logp[r].argmax()) == first
            answers.append((total, greedy))
        return answers


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
