"""Compute the lynx-ref-moe model card numbers from the exported model; write metrics.json and README.md.

Usage: python -m training.card [--model models/lynx-ref-moe] [--vllm]

Everything is measured on the committed evaluation data (TEST split only, models/lynx-ref-moe/eval):
* perplexity per domain on eval/heldout/<domain>.jsonl (BOS + segment, token level, fp32)
* the quick-check perplexity (first QUICK_SEGMENTS = 8 segments per domain) that tests/test_reference_model.py recomputes
* expert load per layer (share of top-8 slots per expert) on the held-out text, per domain specialisation
* mean distinct experts per layer per decode step for decode batches of 1/8/32/64 test sequences
  (32-token prompt, then 32 teacher-forced decode steps with KV cache; ids from forward hooks on mlp.gate)
* task accuracies of the tasks shipped in eval/ (multiple choice and next_word greedy generation)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
QUICK_SEGMENTS = 8
SEED = 1234


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.output_router_logits = False
    model.eval()
    return model, tok


def n_experts(cfg) -> int:
    """Routed experts per MoE layer: ``num_experts`` (OLMoE, Qwen3-MoE) or ``n_routed_experts`` (DeepSeek-V3)."""
    n = getattr(cfg, "num_experts", None)
    return int(n if n is not None else cfg.n_routed_experts)


def read_jsonl(p):
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class RouterTap:
    """Forward hooks on every layer's mlp.gate; collects top-k expert ids when enabled."""

    def __init__(self, model):
        self.ids = [[] for _ in model.model.layers]
        self.on = False
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(model.model.layers)]

    def _hook(self, i):
        def fn(mod, args, out):
            if self.on:
                self.ids[i].append(out[2].detach())
        return fn

    def take(self):
        ids, self.ids = self.ids, [[] for _ in self.ids]
        return ids

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def segment_nll(model, tok, texts, batch=16, tap: RouterTap | None = None):
    """Per text: (sum of NLL, number of predicted tokens); BOS(=eos) + text, right padded.
    If tap is given, also returns the top-k ids of the non-pad positions per layer."""
    seqs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    res, routed = [None] * len(seqs), None
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        L = max(len(seqs[i]) for i in idx)
        x = torch.full((len(idx), L), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(seqs[i])] = torch.tensor(seqs[i])
            m[r, :len(seqs[i])] = 1
        if tap is not None:
            tap.on = True
        logits = model(input_ids=x, attention_mask=m).logits.float()
        if tap is not None:
            tap.on = False
            ids = tap.take()
            keep = m.reshape(-1).bool()
            cur = [torch.cat(l)[keep] for l in ids]
            routed = cur if routed is None else [torch.cat([a, b]) for a, b in zip(routed, cur)]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
        mm = m[:, 1:].float()
        for r, i in enumerate(idx):
            res[i] = (float(-(lp[r] * mm[r]).sum()), int(mm[r].sum()))
    return (res, routed) if tap is not None else res


def ppl(pairs):
    return math.exp(sum(a for a, _ in pairs) / sum(b for _, b in pairs))


@torch.no_grad()
def distinct_experts(model, tok, seqs, batch_sizes=(1, 8, 32, 64), prompt=32, steps=32):
    from transformers import DynamicCache

    tap = RouterTap(model)
    out = {}
    E, k = n_experts(model.config), model.config.num_experts_per_tok
    for B in batch_sizes:
        use = seqs[:16] if B == 1 else seqs[: (len(seqs) // B) * B]
        per_layer = [[] for _ in model.model.layers]
        for s in range(0, len(use), B):
            x = torch.tensor([q[:prompt + steps] for q in use[s:s + B]])
            cache = DynamicCache(config=model.config)
            o = model(input_ids=x[:, :prompt], past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            for t in range(prompt, prompt + steps):
                tap.on = True
                o = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
                tap.on = False
                cache = o.past_key_values
                for li, ids in enumerate(tap.take()):
                    per_layer[li].append(int(torch.unique(ids[0]).numel()))
        out[B] = {"per_layer": [round(float(np.mean(v)), 2) for v in per_layer],
                  "mean": round(float(np.mean([np.mean(v) for v in per_layer])), 2),
                  "uniform_random_routing": round(E * (1 - (1 - k / E) ** B), 2),
                  "sequences": len(use), "decode_steps": steps}
    tap.close()
    return out


@torch.no_grad()
def mc_accuracy(model, tok, items, ctx_key, batch=32, mutual_info=False):
    """lm-eval style: loglikelihood of each choice given BOS + context; acc and acc_norm (by char length);
    with mutual_info also acc_mutual_info (loglik given context minus loglik given BOS only)."""
    reqs = []
    if mutual_info:
        for qi, it in enumerate(items):
            for ci, ch in enumerate(it["choices"]):
                reqs.append((-1 - qi, ci, [tok.bos_token_id] + tok(ch, add_special_tokens=False)["input_ids"], 1))
    for qi, it in enumerate(items):
        ctx = [tok.bos_token_id] + tok(it[ctx_key], add_special_tokens=False)["input_ids"]
        for ci, ch in enumerate(it["choices"]):
            whole = [tok.bos_token_id] + tok(it[ctx_key] + ch, add_special_tokens=False)["input_ids"]
            n_ctx = len(ctx)
            if whole[:n_ctx] != ctx:  # merge across the boundary: fall back to separate encoding
                whole = ctx + tok(ch, add_special_tokens=False)["input_ids"]
            reqs.append((qi, ci, whole, n_ctx))
    scores = {}
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i][2]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        L = max(len(reqs[i][2]) for i in idx)
        x = torch.full((len(idx), L), tok.pad_token_id, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(reqs[i][2])] = torch.tensor(reqs[i][2])
        lp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
        for r, i in enumerate(idx):
            qi, ci, whole, n_ctx = reqs[i]
            tgt = torch.tensor(whole[n_ctx:])
            scores[(qi, ci)] = float(lp[r, n_ctx - 1:len(whole) - 1].gather(-1, tgt[:, None]).sum())
    acc = acc_norm = acc_mi = 0
    by_dom = {}
    for qi, it in enumerate(items):
        ll = np.array([scores[(qi, ci)] for ci in range(len(it["choices"]))])
        lens = np.array([len(c) for c in it["choices"]], dtype=float)
        hit = int(np.argmax(ll) == it["label"])
        acc += hit
        if mutual_info:
            unc = np.array([scores[(-1 - qi, ci)] for ci in range(len(it["choices"]))])
            hit = int(np.argmax(ll - unc) == it["label"])  # per-domain breakdown uses acc_mutual_info
            acc_mi += hit
        acc_norm += int(np.argmax(ll / lens) == it["label"])
        d = it.get("domain")
        if d:
            by_dom.setdefault(d, []).append(hit)
    n = len(items)
    labels = [it["label"] for it in items]
    res = {"n": n, "acc": round(acc / n, 4), "acc_norm": round(acc_norm / n, 4),
           "chance": round(float(np.mean([1 / len(it["choices"]) for it in items])), 4),
           "majority_label_share": round(max(labels.count(c) for c in set(labels)) / n, 4)}
    if mutual_info:
        res["acc_mutual_info"] = round(acc_mi / n, 4)
    if by_dom:
        res["acc_by_domain"] = {d: round(float(np.mean(v)), 3) for d, v in sorted(by_dom.items())}
    return res


@torch.no_grad()
def gen_accuracy(model, tok, items, batch=32, max_new=8):
    tok.padding_side = "left"
    hits, by_dom, samples = 0, {}, []
    norm = lambda s: s.lower().strip().strip(string.punctuation)
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        enc = [[tok.bos_token_id] + tok(it["context"], add_special_tokens=False)["input_ids"] for it in chunk]
        L = max(len(e) for e in enc)
        x = torch.full((len(enc), L), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros_like(x)
        for r, e in enumerate(enc):
            x[r, L - len(e):] = torch.tensor(e)
            m[r, L - len(e):] = 1
        out = model.generate(input_ids=x, attention_mask=m, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        for r, it in enumerate(chunk):
            txt = tok.decode(out[r, L:], skip_special_tokens=True)
            for stop in ("\n", ".", ",", ";"):
                txt = txt.split(stop)[0]
            mt = re.findall(r"[A-Za-z']+", txt)
            pred = mt[0] if mt else ""
            hit = int(norm(pred) == norm(it["answer"]))
            hits += hit
            by_dom.setdefault(it["domain"], []).append(hit)
            if len(samples) < 6 and s == 0:
                samples.append({"context_tail": it["context"][-80:], "answer": it["answer"], "pred": pred})
    tok.padding_side = "right"
    answers = [it["answer"].lower() for it in items]
    top = max(set(answers), key=answers.count)
    return {"n": len(items), "exact_match": round(hits / len(items), 4),
            "chance_most_frequent_answer": round(answers.count(top) / len(answers), 4),
            "most_frequent_answer": top,
            "exact_match_by_domain": {d: round(float(np.mean(v)), 3) for d, v in sorted(by_dom.items())},
            "samples": samples}


@torch.no_grad()
def samples(model, tok, prompts, max_new=40):
    res = []
    for p in prompts:
        x = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])
        o = model.generate(input_ids=x, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                           repetition_penalty=1.1)
        res.append({"prompt": p, "greedy": tok.decode(o[0, x.shape[1]:], skip_special_tokens=True)})
    return res


VLLM_SNIPPET = r'''
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=512)
    outs = llm.generate(["In the beginning God", "The function returns"],
                        SamplingParams(temperature=0.0, max_tokens=24))
    print("VLLM_RESULT " + json.dumps([o.outputs[0].text for o in outs]))
'''


def vllm_check(path):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    t = time.time()
    p = subprocess.run([sys.executable, "-c", VLLM_SNIPPET, str(path)], env=env, capture_output=True, text=True,
                       timeout=900)
    line = [l for l in p.stdout.splitlines() if l.startswith("VLLM_RESULT ")]
    return {"ok": bool(line) and p.returncode == 0, "returncode": p.returncode, "seconds": round(time.time() - t),
            "outputs": json.loads(line[0][12:]) if line else None,
            "stderr_tail": None if line else p.stderr[-1500:]}


def train_summary(run_dir: Path):
    recs = read_jsonl(run_dir / "log.jsonl")
    steps = [r for r in recs if "loss" in r and "step" in r]
    held = [r for r in recs if "heldout_loss" in r]
    done = [r for r in recs if r.get("event") == "done"]
    resumes = [r for r in recs if r.get("event") == "resume"]
    last = steps[-1]
    return {"steps": last["step"], "tokens_seen": last["tokens"],
            "train_time_s": done[-1]["train_time_s"] if done else last["elapsed_s"],
            "final_train_loss_last50_steps": round(float(np.mean([r["loss"] for r in steps[-5:]])), 4),
            "final_aux_loss": steps[-1]["aux_loss"],
            "final_heldout_loss_validation": held[-1]["heldout_loss"] if held else None,
            "heldout_curve": [(r["step"], r["heldout_loss"]["mean"]) for r in held],
            "mean_tok_per_s": round(last["tokens"] / max(1, (done[-1]["train_time_s"] if done else last["elapsed_s"]))),
            "resumes": [{"at_step": r["step"], "steps": r["args"]["steps"]} for r in resumes],
            "stopped_early": bool(done and done[-1].get("stopped_early"))}


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(m, cfg, repo: Path) -> str:
    man = json.loads((repo / "training/corpus_manifest.json").read_text())
    tr = m.get("training") or {}
    tokidx = repo / "runs/tokens/index.json"
    weights = {}
    if tokidx.exists():
        from training.tokenizer import domain_weights
        idx = json.loads(tokidx.read_text())
        weights = domain_weights({d: v["train"]["bytes"] for d, v in idx["domains"].items()})
    elif tr.get("domain_weights"):
        weights = tr["domain_weights"]
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    data_rows, tot = [], 0
    for d, v in man["domains"].items():
        sp = v["splits"]
        tot += v["total_bytes"]
        data_rows.append([d, v["package"], v["licence"], f"{v['total_bytes'] / 1e6:.2f}",
                          f"{sp['train']['docs']}/{sp['validation']['docs']}/{sp['test']['docs']}",
                          f"{weights.get(d, float('nan')):.3f}"])
    tp = m["test_perplexity"]
    ppl_rows = [[d, v["ppl"], v["segments"], v["tokens"]] for d, v in tp["per_domain"].items()]
    load_rows = [[r["layer"], r["cv"], r["max_share_x_E"], r["min_share_x_E"], r["experts_below_quarter_of_uniform"]]
                 for r in m["expert_load_test"]["per_layer"]]
    spec_rows = [[d] + v for d, v in m["expert_load_test"]["top8_expert_share_per_domain_per_layer"].items()]
    de = m["distinct_experts_per_decode_step"]
    de_rows = [[B, v["mean"], " / ".join(str(x) for x in v["per_layer"]), v["uniform_random_routing"],
                v["sequences"]] for B, v in de.items()]
    t = m["tasks"]
    task_rows, task_notes = [], []
    for name, r in t.items():
        short = name.removeprefix("lynx_ref_")
        if "acc" in r:
            res = f"acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f}" + (
                f", **acc_mutual_info {r['acc_mutual_info']:.3f}**" if "acc_mutual_info" in r else "")
            ch = f"{r['chance']:.2f}" + (f" (majority label {r['majority_label_share']:.2f})"
                                         if r["majority_label_share"] > r["chance"] + 0.03 else "")
            task_rows.append([f"{name} (multiple choice)", r["n"], res, ch])
            by = r.get("acc_by_domain")
        else:
            task_rows.append([f"{name} (generation, exact match)", r["n"], f"exact_match {r['exact_match']:.3f}",
                              f"~0; always answering the most frequent answer ('{r['most_frequent_answer']}') "
                              f"scores {r['chance_most_frequent_answer']:.3f}"])
            by = r.get("exact_match_by_domain")
        task_notes.append(f"- `{short}`: {TASK_DESC.get(short, '')}." + (f" By domain: {by}." if by else ""))
    for name, r in (m.get("dropped_tasks") or {}).items():
        short = name.removeprefix("lynx_ref_")
        main_metric = max((r.get(k, 0) for k in ("acc", "acc_norm", "acc_mutual_info")), default=0)
        task_notes.append(f"- Dropped, not shipped: `{short}` ({TASK_DESC.get(short, '')}): best of "
                          f"acc/acc_norm/acc_mutual_info {main_metric:.3f} on {r['n']} items vs chance {r['chance']:.2f}"
                          f" (majority label {r['majority_label_share']:.2f}); "
                          f"{r.get('dropped_because', 'below 1.5× chance')}. "
                          f"`python -m training.evaldata --all-tasks` rebuilds it.")
    task_notes = "\n".join(task_notes)
    task_list = ",".join(t) + ",lynx_ref_ppl"
    xc = m.get("lm_eval_crosscheck")
    if xc:
        task_notes += ("\n\nCross-check with lm-eval itself (`" + xc["command"] + "`): " + ", ".join(
            f"{k} {v}" for k, v in xc["results"].items()) + ". " + xc.get("note", ""))
    samples_txt = "\n".join(f"- `{s['prompt']!r}` → `{s['greedy'][:160]!r}`" for s in m.get("samples", []))
    hv = tr.get("final_heldout_loss_validation") or {}
    curve = ", ".join(f"{s}: {l:.3f}" for s, l in tr.get("heldout_curve", []))
    vl = m.get("vllm") or {}
    vllm_txt = (f"Measured: loads and generates (bf16, enforce_eager, {vl.get('seconds')} s including start-up); "
                f"greedy outputs: {vl.get('outputs')!r}" if vl.get("ok") else
                f"Not verified by training/card.py in this build ({'failed: ' + str(vl.get('stderr_tail'))[-300:] if vl else 'not run'}).")
    resumes = tr.get("resumes") or []
    resume_txt = ""
    if resumes:
        resume_txt = ("The run was stopped and resumed from its checkpoint " + "; ".join(
            f"at step {r['at_step']} with the total step count set to {r['steps']}" for r in resumes)
            + " (the first launch asked for 1,800 steps; other jobs on the shared 2-core machine cut the "
              "throughput to ~500 tok/s for a while, so the cosine schedule was shortened to end in time; "
              "data order is a function of the step number, so the resumed run saw the same batches it would have).")
    return f"""# lynx-ref-moe

A small, genuinely trained **OLMoE** mixture-of-experts language model (64 routed experts, top-8) that ships
inside the lynx-moe repository as the offline reference model for tests, benchmarks and demos
(`lynx_moe.reference_model_path()`). It was trained from scratch on a 2-core CPU on ~{tot / 1e6:.0f} MB of
English text from Debian packages, with OLMoE's load-balancing auxiliary loss (coefficient 0.01).
It is a research fixture, not a useful general-purpose LM: expect fluent-looking but often wrong text.

## Load it

```python
import lynx_moe
from transformers import AutoModelForCausalLM, AutoTokenizer
path = lynx_moe.reference_model_path()          # <repo>/models/lynx-ref-moe
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)   # OlmoeForCausalLM, bf16 weights
ids = tok("In the beginning", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=30, do_sample=False)[0]))
```

vLLM (vllm-cpu 0.32), run from the repo root:

```bash
VLLM_CPU_KVCACHE_SPACE=1 OMP_WAIT_POLICY=PASSIVE python -c '
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model="models/lynx-ref-moe", dtype="bfloat16", enforce_eager=True, max_model_len=512)
    print(llm.generate(["In the beginning God"], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text)'
```

{vllm_txt}

The router's top-k ids are visible from a forward hook on each layer's `mlp.gate`
(returns `(router_logits, topk_weights, topk_ids)`).

## Architecture

{_table(["field", "value"], [
        ["architecture", "OlmoeForCausalLM (transformers `olmoe`, loads natively in transformers and vLLM)"],
        ["layers / hidden / heads", f"{cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.num_attention_heads} (head dim {cfg.hidden_size // cfg.num_attention_heads}, no GQA)"],
        ["experts", f"{E} routed, top-{k}, expert FFN width {cfg.intermediate_size} (SwiGLU), norm_topk_prob={cfg.norm_topk_prob}, no shared expert"],
        ["vocab", f"{cfg.vocab_size} (byte-level BPE), tie_word_embeddings={cfg.tie_word_embeddings}"],
        ["context", f"trained at 256 tokens; RoPE theta {cfg.rope_parameters.get('rope_theta') if isinstance(getattr(cfg, 'rope_parameters', None), dict) else 10000}; max_position_embeddings {cfg.max_position_embeddings}"],
        ["parameters", f"{m['params']['total'] / 1e6:.2f}M total, {m['params']['experts'] / 1e6:.2f}M in experts; "
                       f"{m['params']['active_per_token_excl_embeddings'] / 1e6:.2f}M active per token excluding embeddings"],
        ["router aux loss", f"load-balancing loss (Switch/OLMoE form), coefficient {cfg.router_aux_loss_coef}"],
        ["file", "model.safetensors, bfloat16"],
    ])}

## Training

- Objective: next-token cross-entropy + 0.01 × load-balancing loss, sequences of 256 tokens, batch 16
  (4,096 tokens/step), AdamW (β 0.9/0.95, weight decay 0.1 on matrices), peak lr 2e-3, 100 warmup steps,
  cosine decay to 10 %, gradient clipping 1.0, fp32, seed 1234, `experts_implementation=grouped_mm`.
- Steps: **{tr.get('steps')}**, tokens seen: **{tr.get('tokens_seen', 0) / 1e6:.2f}M**, training time:
  **{tr.get('train_time_s', 0) / 60:.1f} min** on 2 shared CPU cores (mean {tr.get('mean_tok_per_s')} tok/s).
  {resume_txt}
- Final training loss (last 50 steps): {tr.get('final_train_loss_last50_steps')}; final aux loss
  {tr.get('final_aux_loss')} (8.0 = perfectly balanced for top-8).
- Validation-split loss per domain at the end: {', '.join(f'{d} {v:.3f}' for d, v in hv.items())}.
- Validation loss curve (step: mean over domains): {curve}.
- Domain mixture: each training window is drawn from a domain with probability ∝ (train bytes)^0.5
  (column "weight" below), so the big dictionary does not drown the small domains.
- Tokenizer: byte-level BPE (`tokenizers`), vocab 8,192, trained on a 30 MB sample of the train split with the
  same domain weights; special tokens `<|endoftext|>` (bos = eos, also the document separator) and `<|pad|>`.

## Data

Debian 12 (bookworm) packages fetched with `apt-get download`, unpacked with `dpkg-deb -x`, text extracted
per domain by `training/corpus.py`, exact-duplicate documents removed, split **by document** (sha256 of
seed|domain|id; 5 % test, 3 % validation). Bytes are UTF-8 bytes of the extracted text.
The corpus itself is not committed (rebuild it with the commands below); `training/corpus_manifest.json`
has the full counts.

{_table(["domain", "Debian package", "licence", "MB", "docs train/val/test", "weight"], data_rows)}

Total: {tot / 1e6:.1f} MB. A "document" is a Bible chapter, a dictionary/WordNet/FOLDOC/Jargon entry, a
documentation file, a man page or a single fortune.

## Held-out perplexity (test split)

Token-level perplexity, fp32, each segment (≤256 tokens of a test document) prefixed with the BOS token;
data: `eval/heldout/<domain>.jsonl` (200 segments per domain).

{_table(["domain", "perplexity", "segments", "tokens"], ppl_rows)}

All domains (token-weighted): **{tp['all_domains_token_weighted']}**.
Quick check used by `tests/test_reference_model.py`: first {m['test_perplexity_quick']['segments_per_domain']}
segments of each domain → **{m['test_perplexity_quick']['value']}** (stored in `metrics.json`).

## Expert load balance (test split, all held-out segments)

Share of the top-{k} slots each expert receives, per layer (uniform = 1/{E}; "max/min × E" is the largest /
smallest share relative to uniform; CV = coefficient of variation across experts).

{_table(["layer", "CV", "max share × E", "min share × E", "experts < 1/4 of uniform"], load_rows)}

Domain specialisation: fraction of a domain's top-{k} slots that go to that domain's 8 most-used experts
(per layer; uniform routing would give 0.125):

{_table(["domain"] + [f"layer {i}" for i in range(cfg.num_hidden_layers)], spec_rows)}

## Distinct experts per decode step

Test-split sequences (held-out segments of all domains, shuffled, seed 1234), 32-token prompt, then 32
teacher-forced decode steps with the KV cache; at every step and layer we count the unique expert ids in the
router's top-{k} over the batch rows. Batch 1 uses 16 sequences, the others 64 sequences split into batches.
"Uniform" is the expectation if every row picked {k} of {E} experts uniformly at random: {E}·(1−(1−{k}/{E})^B).

{_table(["batch", "mean distinct experts / layer / step", "per layer (0..{})".format(cfg.num_hidden_layers - 1), "uniform-random expectation", "sequences"], de_rows)}

## Tasks (test split, `eval/`)

lm-evaluation-harness 0.4.13 task definitions are in `eval/*.yaml`; the numbers below come from
`training/card.py`, which scores the same files the same way (BOS + context, sum of log-likelihoods per choice;
acc_norm divides by the choice's character length; generation is greedy, ≤8 tokens, cut at newline or
`.,;`, first word compared case-insensitively). `last_word` and `next_sentence` end with a second draw
(items 1121-1600 and 1020-2247, added 3 Dec 2026 so that a policy's accuracy change has a 95 % interval
within ±0.5 point; `EXTRA` in `training/evaldata.py`); their first items are unchanged, and their rows below
were re-scored with `python -m training.refcard --model models/lynx-ref-moe --update-tasks last_word,next_sentence`.

{_table(["task", "items", "result", "chance"], task_rows)}

{task_notes}
- `lynx_ref_ppl` (group of `lynx_ref_ppl_<domain>`, loglikelihood_rolling): word/byte perplexity and bits per
  byte of the held-out segments (tokenisation and BOS handling follow lm-eval, so they can differ slightly
  from the table above).

Run with lm-eval, from any folder (each task's YAML reads its JSONL beside itself through
`eval/lynx_data.py`, an lm-eval `custom_dataset` loader, so the folder also works where it is copied):

```bash
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
  --model_args pretrained=PATH/lynx-ref-moe,dtype=float32,add_bos_token=True \\
  --tasks {task_list} \\
  --include_path PATH/lynx-ref-moe/eval --device cpu --batch_size 16
```

Which of these tasks can show a routing policy: a policy acts on decode steps only. Through a server
(stock `local-completions`) and with stock lm-eval in process, the multiple-choice, perplexity and
`loglikelihood` tasks are scored from a prompt pass, which is routed natively, so every policy gets native's
score; `lynx lm-eval --model lynx-hf --model_args "pretrained=...,policy=SPEC,decode_scoring=true"` scores
them in decode mode, where the batch votes. The task built for this is `lynx_ref_next_words` (1020 items:
the next two words, each the majority continuation of its two preceding words in the TRAIN split;
`loglikelihood`: acc = the whole answer is the greedy continuation, and the answer's perplexity): in
decode mode every answer token is predicted by a decode step. Generation (`generate_until`) runs in
decode steps except its first token, which comes from the prompt pass: `lynx_ref_next_word`'s answers are
mostly one token, and on `lynx_ref_next_words_gen` (the same items, whole-answer exact match) even
aggressive policies change 0-3 of 1020 answers on this model. The lynx-moe README has the measured table
with paired intervals (`lynx lm-eval-compare`).

Chat: this is a base model, not instruction-tuned. `chat_template.jinja` turns a conversation into
plain text (the system text, then `Q: ...` / `A: ...` lines, ending with `A:`), so chat clients of
`lynx serve` get a continuation instead of an error; do not expect an assistant.

## Greedy samples (repetition_penalty 1.1)

{samples_txt}

## Reproduce

```bash
export OMP_WAIT_POLICY=PASSIVE
python -m training.corpus          # apt-get download + extract -> runs/corpus/, training/corpus_manifest.json
python -m training.tokenizer       # BPE -> models/lynx-ref-moe/tokenizer*, ids -> runs/tokens/
python -m training.train --steps 1000 --lr 2e-3 --warmup 100 --eval-every 200 --ckpt-every 50
                                   # -> runs/train/{{log.jsonl,ckpt.pt}}, final bf16 export to models/lynx-ref-moe/
python -m training.evaldata        # test-split eval data -> models/lynx-ref-moe/eval/
python -m training.card --vllm     # metrics.json + this README
pytest tests/test_reference_model.py
```

Training resumes automatically from `runs/train/ckpt.pt`. Throughput on this machine varies with other load
(1,000–2,100 tok/s without, ~500 tok/s with heavy contention), so wall-clock time is not reproducible;
the sequence of batches and the initialisation are.

## Limitations

- ~{tr.get('tokens_seen', 0) / 1e6:.1f}M training tokens for {m['params']['total'] / 1e6:.0f}M parameters: heavily
  under-trained by LM standards; the text is locally fluent in each domain's style but not factual.
- Reference/technical English only (dictionaries, Bible, Unix/Python/Perl docs, jokes): routing statistics
  reflect this mix, not chat or web traffic.
- The held-out segments start mid-document for long documents; perplexities are comparable across checkpoints
  of this model, not across tokenizers.
"""


MC_TASKS = [("wn_gloss", "query"), ("wn_pos", "query"), ("last_word", "context"), ("next_sentence", "context"),
            ("continuation", "context")]
MUTUAL_INFO_TASKS = {"next_sentence", "continuation"}
TASK_DESC = {
    "wn_gloss": 'prompt `"<word> (<pos>):"` → the WordNet definition of that synset vs. 3 definitions of other test '
                'synsets with the same part of speech',
    "wn_pos": 'prompt `"<word> ("` → `noun)`, `verb)`, `adjective)` or `adverb)` for single-word WordNet test synsets '
              'whose word has exactly one part of speech in WordNet',
    "last_word": "≤320 characters of a held-out document ending just before the last word of a sentence → that word "
                 "vs. 3 words of similar corpus frequency (same capitalisation)",
    "next_sentence": "≤240 characters of a held-out document ending at a sentence end → the true next sentence vs. 3 "
                     "sentences from other test documents of the same domain",
    "continuation": "as next_sentence, but the 3 distractor sentences come from other domains",
    "next_word": "≤320 characters of a held-out document → generate the next word (greedy, exact match), at positions "
                 "where that word is the clear majority continuation (≥50 % of ≥5 occurrences) of the two preceding "
                 "words in the TRAIN split, excluding the 150 most frequent words",
}


def heldout_metrics(model, tok, ev: Path, E: int, limit: int = 0) -> dict:
    """Test perplexity per domain (and the quick subset) and the router load of every layer on
    ``ev/heldout/*.jsonl``: the ``test_perplexity``, ``test_perplexity_quick`` and
    ``expert_load_test`` entries of metrics.json (also used by ``training.refcard``)."""
    domains = sorted(p.stem for p in (ev / "heldout").glob("*.jsonl"))
    tap = RouterTap(model)
    per_dom, quick, loads, dom_counts = {}, [], None, {}
    for d in domains:
        texts = [r["text"] for r in read_jsonl(ev / "heldout" / f"{d}.jsonl")]
        if limit:
            texts = texts[:limit]
        pairs, routed = segment_nll(model, tok, texts, tap=tap)
        per_dom[d] = {"ppl": round(ppl(pairs), 3), "segments": len(pairs), "tokens": sum(b for _, b in pairs)}
        quick += pairs[:QUICK_SEGMENTS]
        counts = [torch.bincount(r.reshape(-1), minlength=E).double() for r in routed]
        dom_counts[d] = counts
        loads = counts if loads is None else [a + b for a, b in zip(loads, counts)]
        print(f"ppl {d}: {per_dom[d]['ppl']}", flush=True)
    tap.close()
    all_ppl = math.exp(sum(math.log(v["ppl"]) * v["tokens"] for v in per_dom.values())
                       / sum(v["tokens"] for v in per_dom.values()))
    layer_load = []
    for li, c in enumerate(loads):
        share = c / c.sum()
        layer_load.append({"layer": li, "cv": round(float(share.std() / share.mean()), 3),
                           "max_share_x_E": round(float(share.max() * E), 2),
                           "min_share_x_E": round(float(share.min() * E), 2),
                           "experts_below_quarter_of_uniform": int((share * E < 0.25).sum()),
                           "experts_never_used": int((c == 0).sum())})
    # specialisation: share of a domain's slots that go to its 8 most used experts (uniform = 8/E)
    spec = {d: [round(float(torch.topk(c / c.sum(), 8).values.sum()), 3) for c in dom_counts[d]] for d in domains}
    return {"test_perplexity": {"per_domain": per_dom, "all_domains_token_weighted": round(all_ppl, 3)},
            "test_perplexity_quick": {"value": round(ppl(quick), 4), "segments_per_domain": QUICK_SEGMENTS,
                                      "definition": f"exp(total NLL / tokens) over the first {QUICK_SEGMENTS} "
                                                    "segments of each eval/heldout/<domain>.jsonl, BOS + segment, fp32"},
            "expert_load_test": {"per_layer": layer_load, "top8_expert_share_per_domain_per_layer": spec,
                                 "top8_share_if_uniform": round(8 / E, 4)}}


def decode_pool(tok, ev: Path, n: int = 64) -> list[list[int]]:
    """``n`` held-out segments of >= 64 tokens (BOS first), shuffled with the card's seed: the rows
    ``distinct_experts`` decodes."""
    rng = random.Random(SEED)
    pool = []
    for p in sorted((ev / "heldout").glob("*.jsonl")):
        for r in read_jsonl(p):
            ids = [tok.bos_token_id] + tok(r["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= 64:
                pool.append(ids)
    rng.shuffle(pool)
    return pool[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models/lynx-ref-moe"))
    ap.add_argument("--run-dir", default=str(REPO / "runs/train"))
    ap.add_argument("--vllm", action="store_true", help="also load and generate with vLLM (subprocess)")
    ap.add_argument("--limit", type=int, default=0, help="debug: limit items per task / segments per domain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="re-render README.md from metrics.json")
    args = ap.parse_args()
    if args.render_only:
        from transformers import AutoConfig

        m = json.loads((Path(args.model) / "metrics.json").read_text())
        (Path(args.model) / "README.md").write_text(render(m, AutoConfig.from_pretrained(args.model), REPO))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    mdir = Path(args.model)
    model, tok = load(mdir)
    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    ev = mdir / "eval"
    metrics = {"model": "lynx-ref-moe", "dtype_for_eval": "float32 (weights stored in bf16)"}
    t0 = time.time()

    # ---- perplexity + router load on held-out test text
    metrics.update(heldout_metrics(model, tok, ev, E, args.limit))
    print("load done", round(time.time() - t0), flush=True)

    # ---- distinct experts per decode step
    pool = decode_pool(tok, ev)
    metrics["distinct_experts_per_decode_step"] = distinct_experts(model, tok, pool)
    print("distinct done", metrics["distinct_experts_per_decode_step"], round(time.time() - t0), flush=True)

    # ---- tasks
    lim = (lambda xs: xs[:args.limit]) if args.limit else (lambda xs: xs)
    metrics["tasks"] = {}
    for name, key in MC_TASKS:
        if (ev / f"{name}.jsonl").exists():
            metrics["tasks"][f"lynx_ref_{name}"] = mc_accuracy(model, tok, lim(read_jsonl(ev / f"{name}.jsonl")), key,
                                                                mutual_info=name in MUTUAL_INFO_TASKS)
            print(name, metrics["tasks"][f"lynx_ref_{name}"], flush=True)
    if (ev / "next_word.jsonl").exists():
        metrics["tasks"]["lynx_ref_next_word"] = gen_accuracy(model, tok, lim(read_jsonl(ev / "next_word.jsonl")))
    print("tasks", json.dumps(metrics["tasks"])[:1500], round(time.time() - t0), flush=True)
    metrics["samples"] = samples(model, tok, ["In the beginning", "And Jesus said to them,",
                                              "The function", "NAME\n\nls - ", "dog (noun):",
                                              "hacker n.", "Perl"])
    n_params = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    metrics["params"] = {"total": n_params, "experts": n_exp,
                         "active_per_token_excl_embeddings": n_params - n_exp - n_emb + n_exp * k // E}
    if Path(args.run_dir, "log.jsonl").exists():
        metrics["training"] = train_summary(Path(args.run_dir))
    elif (mdir / "metrics.json").exists():
        metrics["training"] = json.loads((mdir / "metrics.json").read_text()).get("training")
    if args.vllm:
        metrics["vllm"] = vllm_check(mdir)
        print("vllm", metrics["vllm"], flush=True)
    elif (mdir / "metrics.json").exists():
        metrics["vllm"] = json.loads((mdir / "metrics.json").read_text()).get("vllm")
    metrics["card_seconds"] = round(time.time() - t0)
    (mdir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    if not args.no_readme:
        (mdir / "README.md").write_text(render(metrics, cfg, REPO))
    print("wrote", mdir / "metrics.json")


if __name__ == "__main__":
    main()
