"""Distinct experts per decode step, native vs AffinityBinning vs OEA, on tiny transformers models,
and what the router hook and its counting cost per layer call.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/hf_distinct.py [--batch 32] [--new-tokens 16]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/hf_distinct.py --model models/lynx-ref-moe \
        --prompts models/lynx-ref-moe/eval/heldout/fortunes.jsonl --prompt-len 32

For each architecture of ``lynx_moe.measure.models.tiny_model`` (random weights, hidden 64, real routing
shapes) a left-padded batch is generated greedily (EOS suppressed, so every row decodes) with
``TopK`` (native), the authors' AffinityBinning preset for the shape (``lynx.presets.for_shape``)
and OEA (``k0 = max(1, K // 4)``), reading ``lynx.routing_stats``. Means are over decode steps
and MoE layers. Random router weights give near-uniform logits, so the reductions here show the
mechanics, not what a trained model gets.

Hook cost: wall time of each decode-step router call (router forward + hooks after it), median
over calls, best of ``--rounds`` interleaved rounds, for the unpatched model and for each policy
with ``stats`` off and on; the costs are differences of medians (noisy on a shared CPU: compare
the orders of magnitude).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch  # noqa: E402

import lynx_moe as lynx  # noqa: E402
from lynx_moe.integrations import hf  # noqa: E402
from lynx_moe.measure import models  # noqa: E402


def random_prompts(B: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, length), generator=g)
    mask = torch.ones_like(ids)
    pad = torch.randint(0, length // 2, (B,), generator=g)
    for b in range(B):  # left padding of 0..length/2 tokens
        ids[b, : pad[b]], mask[b, : pad[b]] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def timed_generate(model, inputs, new_tokens: int) -> list[float]:
    """Generate; return the µs of every decode-step router call (forward + the hooks before ours)."""
    B = inputs["input_ids"].shape[0]
    routers = [layer.router for layer in hf.moe_layers(model)]
    starts: dict[int, float] = {}
    times: list[float] = []

    def pre(m, args):
        starts[id(m)] = time.perf_counter()

    def post(m, args, out):
        if args[0].reshape(-1, args[0].shape[-1]).shape[0] == B:  # decode calls only
            times.append((time.perf_counter() - starts[id(m)]) * 1e6)

    handles = [h for r in routers for h in (r.register_forward_pre_hook(pre), r.register_forward_hook(post))]
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return times


def mean_stats(model) -> dict[str, float]:
    s = lynx.routing_stats(model)
    return {"native": statistics.fmean(x.distinct_native for x in s),
            "policy": statistics.fmean(x.distinct_policy for x in s),
            "changed": statistics.fmean(x.changed_share for x in s)}


def text_prompts(path: str, tokenizer_dir: str, B: int, length: int) -> dict[str, torch.Tensor]:
    """The first B texts of a JSONL file (field "text") or text file (one per line), left-padded,
    cut to at most ``length`` tokens."""
    from transformers import AutoTokenizer
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] if path.endswith(".jsonl") else line for line in f if line.strip()]
    if len(texts) < B:
        raise SystemExit(f"{path}: {len(texts)} prompts, need --batch {B}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left", truncation_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(texts[:B], return_tensors="pt", padding=True, truncation=True, max_length=length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run_model(label: str, model, inputs: dict[str, torch.Tensor], new_tokens: int, rounds: int) -> dict:
    E, K = hf.moe_shape(model)
    preset, ab = lynx.presets.for_shape(E, K)
    policies = {"native": lynx.TopK(), "affinity_binning": ab, "oea": lynx.OEA(k0=max(1, K // 4))}
    timed_generate(model, inputs, 2)  # warm-up
    row = {"arch": label, "experts": E, "top_k": K, "preset": preset,
           "policies": {n: str(p) for n, p in policies.items()}, "distinct": {}, "native_same_logits": {},
           "changed": {}, "us": {}}
    us: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved rounds; the best median resists a busy machine
        us.setdefault("unpatched", []).append(statistics.median(timed_generate(model, inputs, new_tokens)))
        for name, policy in policies.items():
            for stats in (False, True):
                lynx.apply_(model, policy, stats=stats)
                key = f"{name}/stats={'on' if stats else 'off'}"
                us.setdefault(key, []).append(statistics.median(timed_generate(model, inputs, new_tokens)))
                if stats:
                    s = mean_stats(model)
                    row["distinct"][name], row["changed"][name] = s["policy"], s["changed"]
                    row["native_same_logits"][name] = s["native"]
            lynx.remove_(model)
    row["us"] = {k: min(v) for k, v in us.items()}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--archs", default=",".join(models.TINY_ARCHS))
    p.add_argument("--model", help="a local model folder instead of the tiny models (e.g. models/lynx-ref-moe)")
    p.add_argument("--prompts", help="with --model: JSONL (field 'text') or text file of prompts")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds; the best median is kept")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        inputs = (text_prompts(args.prompts, args.model, args.batch, args.prompt_len) if args.prompts
                  else random_prompts(args.batch, args.prompt_len, model.config.vocab_size))
        rows = [run_model(os.path.basename(args.model.rstrip("/")), model, inputs, args.new_tokens, args.rounds)]
    else:
        rows = []
        for arch in args.archs.split(","):
            model = models.tiny_model(arch)
            inputs = random_prompts(args.batch, args.prompt_len, model.config.vocab_size)
            rows.append(run_model(arch, model, inputs, args.new_tokens, args.rounds))

    print(f"batch {args.batch}, {args.new_tokens} new tokens (EOS suppressed), prompts <= {args.prompt_len} "
          f"tokens left-padded ({args.prompts or 'random ids'}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, {platform.machine()}")
    print("\ndistinct experts per decode step (mean over steps and MoE layers)")
    print(f"{'arch':<12} {'E x K':>8} {'native':>7} {'AffBin':>7} {'(chg%)':>7} {'OEA':>7} {'(chg%)':>7}  "
          "AffBin preset / OEA")
    for r in rows:
        d, c = r["distinct"], r["changed"]
        print(f"{r['arch']:<12} {r['experts']:>4} x {r['top_k']:<1} {d['native']:>7.1f} {d['affinity_binning']:>7.1f} "
              f"{100 * c['affinity_binning']:>6.1f}% {d['oea']:>7.1f} {100 * c['oea']:>6.1f}%  "
              f"{r['preset']} {r['policies']['affinity_binning']} / {r['policies']['oea']}")
    print(f"\nrouter call incl. hooks, µs per decode-step layer call (best of {args.rounds} medians); "
          "unpatched = router alone")
    keys = list(rows[0]["us"])
    print(f"{'arch':<12} " + " ".join(f"{k.replace('affinity_binning', 'affbin'):>18}" for k in keys))
    for r in rows:
        print(f"{r['arch']:<12} " + " ".join(f"{r['us'][k]:>18.0f}" for k in keys))
    summary = {k: statistics.fmean(r["us"][k] - r["us"]["unpatched"] for r in rows) for k in keys[1:]}
    print("\nmean added µs per layer call: " + ", ".join(f"{k} {v:.0f}" for k, v in summary.items()))
    print(json.dumps({"benchmark": "hf_distinct", "batch": args.batch, "new_tokens": args.new_tokens,
                      "threads": torch.get_num_threads(), "rows": rows, "added_us_mean": summary}))


if __name__ == "__main__":
    main()
