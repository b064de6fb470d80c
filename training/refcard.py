"""Card numbers for any exported reference model folder (OLMoE, Qwen3-MoE, ...), reusing training.card.

Usage:
  python -m training.refcard --model models/lynx-ref-qwen3moe --run-dir runs/train-qwen3moe [--tasks] [--vllm]
  python -m training.refcard --model M --update-tasks last_word,next_sentence   # re-score tasks whose items changed

Unlike ``training.card`` (which is specific to models/lynx-ref-moe and renders its README), this reads the
evaluation data from ``--eval-dir`` (default: the reference model's committed eval/, TEST split only) and
writes only ``<model>/metrics.json``:
* perplexity per domain on eval/heldout/<domain>.jsonl (BOS + segment, token level, fp32) and the quick check
  (first 8 segments per domain), exactly as training.card computes them
* expert load per layer (share of top-k slots per expert) and per-domain specialisation (share of a domain's
  slots that go to its 8 most used experts; uniform routing gives 8/E)
* mean distinct experts per layer per decode step at batch 1/8/32/64 (training.card.distinct_experts)
* with --tasks: the eval/ task accuracies (training.card.mc_accuracy / gen_accuracy); with --vllm: a vLLM load check
* parameter counts, file size, and the training summary from <run-dir>/log.jsonl
Metrics are written after every stage, so a partial run still leaves the finished numbers behind.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from training.card import (MC_TASKS, MUTUAL_INFO_TASKS, SEED, decode_pool, distinct_experts, gen_accuracy,
                           heldout_metrics, load, mc_accuracy, n_experts, read_jsonl, samples, train_summary,
                           vllm_check)

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "models/lynx-ref-qwen3moe"))
    ap.add_argument("--eval-dir", default=str(REPO / "models/lynx-ref-moe/eval"))
    ap.add_argument("--run-dir", default=str(REPO / "runs/train-qwen3moe"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="debug: segments per domain / items per task")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--tasks", action="store_true", help="also score the eval/ tasks")
    ap.add_argument("--vllm", action="store_true", help="also load and generate with vLLM (subprocess)")
    ap.add_argument("--update-tasks", default=None, metavar="NAMES",
                    help="only re-score these multiple-choice tasks (comma-separated, e.g. last_word) and update "
                         "them in the model's existing metrics.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    mdir, ev = Path(args.model), Path(args.eval_dir)
    out_path = mdir / "metrics.json"
    lim = (lambda xs: xs[:args.limit]) if args.limit else (lambda xs: xs)
    if args.update_tasks:
        names = args.update_tasks.split(",")
        unknown = [n for n in names if n not in dict(MC_TASKS) or not (ev / f"{n}.jsonl").exists()]
        if unknown:
            raise SystemExit(f"--update-tasks: {unknown} are not multiple-choice tasks in {ev} "
                             f"(known: {[n for n, _ in MC_TASKS if (ev / f'{n}.jsonl').exists()]})")
        if not out_path.exists():
            raise SystemExit(f"--update-tasks: {out_path} does not exist yet; run without it first")
    model, tok = load(mdir)
    cfg = model.config
    E, k = n_experts(cfg), cfg.num_experts_per_tok

    def score(name):
        return mc_accuracy(model, tok, lim(read_jsonl(ev / f"{name}.jsonl")), dict(MC_TASKS)[name],
                           mutual_info=name in MUTUAL_INFO_TASKS)

    if args.update_tasks:
        metrics = json.loads(out_path.read_text())
        for name in names:
            metrics.setdefault("tasks", {})[f"lynx_ref_{name}"] = score(name)
            print(name, metrics["tasks"][f"lynx_ref_{name}"], flush=True)
            out_path.write_text(json.dumps(metrics, indent=1) + "\n")
        return
    metrics = {"model": mdir.name, "architecture": cfg.architectures[0] if cfg.architectures else type(model).__name__,
               "dtype_for_eval": "float32 (weights stored in bf16)",
               "eval_data": str(ev.relative_to(REPO)) if ev.is_relative_to(REPO) else str(ev)}
    n_params = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    metrics["params"] = {"total": n_params, "experts": n_exp,
                         "active_per_token_excl_embeddings": n_params - n_exp - n_emb + n_exp * k // E}
    metrics["file_bytes"] = {p.name: p.stat().st_size for p in sorted(mdir.glob("*.safetensors"))}
    if Path(args.run_dir, "log.jsonl").exists():
        metrics["training"] = train_summary(Path(args.run_dir))

    def save():
        out_path.write_text(json.dumps(metrics, indent=1) + "\n")

    save()
    t0 = time.time()

    # ---- perplexity + router load on held-out test text (the computation of training.card)
    metrics.update(heldout_metrics(model, tok, ev, E, args.limit))
    print("load", json.dumps(metrics["expert_load_test"]["per_layer"]), flush=True)
    metrics["eval_seconds"] = {"perplexity_and_load": round(time.time() - t0)}
    save()

    # ---- distinct experts per decode step (same pool and procedure as training.card)
    t1 = time.time()
    pool = decode_pool(tok, ev)
    bs = tuple(int(b) for b in args.batch_sizes.split(","))
    metrics["distinct_experts_per_decode_step"] = distinct_experts(model, tok, pool, batch_sizes=bs)
    metrics["eval_seconds"]["distinct_experts"] = round(time.time() - t1)
    save()
    print("distinct", json.dumps(metrics["distinct_experts_per_decode_step"]), flush=True)

    metrics["samples"] = samples(model, tok, ["In the beginning", "And Jesus said to them,", "The function",
                                              "NAME\n\nls - ", "dog (noun):", "hacker n.", "Perl"])
    save()

    if args.tasks:
        t2 = time.time()
        metrics["tasks"] = {}
        for name, _ in MC_TASKS:
            if (ev / f"{name}.jsonl").exists():
                metrics["tasks"][f"lynx_ref_{name}"] = score(name)
                print(name, metrics["tasks"][f"lynx_ref_{name}"], flush=True)
                save()
        if (ev / "next_word.jsonl").exists():
            metrics["tasks"]["lynx_ref_next_word"] = gen_accuracy(model, tok, lim(read_jsonl(ev / "next_word.jsonl")))
            print("next_word", metrics["tasks"]["lynx_ref_next_word"]["exact_match"], flush=True)
        metrics["eval_seconds"]["tasks"] = round(time.time() - t2)
        save()
    if args.vllm:
        metrics["vllm"] = vllm_check(mdir)
        print("vllm", metrics["vllm"], flush=True)
        save()
    metrics["eval_seconds"]["total"] = round(time.time() - t0)
    save()
    print("wrote", out_path, flush=True)


if __name__ == "__main__":
    main()
