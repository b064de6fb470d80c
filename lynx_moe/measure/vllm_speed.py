"""Decode speed in vLLM: native routing vs lynx policies in one engine (``lynx bench --engine vllm``).

One ``vllm.LLM`` (eager, bf16) runs with the lynx plugin enabled (``LYNX_POLICY=topk``); the
policy is switched at run time (``integrations.vllm.set_policy``) and runs alternate native /
policies in each round (order flipped every round), so a drifting, shared machine hits all of
them alike. A decode step's time is ``(t(1 + S tokens) - t(1 token)) / S`` over the same greedy
prompts, which removes the prefill. Per batch size and policy: the median over rounds,
tokens/s, the speedup over native (median of per-round ratios, and the ratio of the fastest
runs, which other load on a shared machine hurts least), and mean distinct experts per layer
per decode step from the plugin's statistics.

Models: a model folder on its held-out text (routing is its own), or ``shape`` (see
``measure.shapes``): a causal LM at that shape with random bf16 weights is saved under
``workdir`` and served, its routers replaying logits recorded from ``replay_from`` (default:
the reference model; same experts and top-k) on held-out text: recorded row r, step s of
layer l % L_ref feeds batch row r at decode step s, so every step needs a realistic set of
experts. The replay is a forward hook on each MoE gate (vLLM's ``GateLinear``) installed in
the worker through ``collective_rpc`` with a function, which needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (set here); the plugin then sees the replayed logits
like any router output. ``router="random"`` keeps the random routers (nearly uniform routing:
NOT realistic).

    model_dir, prompts, bank, desc = vllm_inputs(shape="olmoe-1b-7b", layers=4, rows=32, prompt_len=16, steps=16)
    summary = vllm_decode_speed(model_dir, prompts, ["preset"], [8, 32], steps=16, repeats=3, bank=bank)
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .data import default_data, load_texts, token_batch
from .decode import record_routing
from .machine import conditions
from .models import load_model
from .shapes import get_shape, shape_config

__all__ = ["build_shape_model", "patch_gates_for_replay", "record_bank", "vllm_decode_speed", "vllm_inputs"]


def _model_and_tokens(path: Path | None, rows: int, length: int, data: list[Path] | None):
    from .. import reference_model_path
    path = Path(path) if path is not None else reference_model_path()
    model, tokenizer = load_model(path)
    tokens = token_batch(load_texts(data or [default_data(path)]), tokenizer, rows, length, model.config.vocab_size)
    return path, model, tokens


def build_shape_model(name: str, layers: int, out: Path, tokenizer_from: Path | None = None) -> Path:
    """A ``...ForCausalLM`` at ``measure.shapes`` dimensions, random bf16 weights, saved once;
    with ``tokenizer_from``, that model's tokenizer is saved beside it (and sets the vocabulary)
    so a server can take text."""
    import transformers
    if (out / "config.json").is_file():
        return out
    cfg = shape_config(get_shape(name), layers)
    tokenizer = None
    if tokenizer_from is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_from)
        cfg.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _shape_of(cfg: dict) -> dict:
    ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return {"experts": cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts"),
            "top_k": cfg["num_experts_per_tok"], "hidden": cfg["hidden_size"], "expert_ffn": ffn,
            "num_layers": cfg["num_hidden_layers"], "expert_bytes": 3 * cfg["hidden_size"] * ffn * 2}


def record_bank(src: Path | None, rows: int, prompt_len: int, steps: int, out: Path,
                data: list[Path] | None = None) -> tuple[Path, list[int]]:
    """Router logits of ``src`` (default: the reference model) decoding held-out text after
    ``prompt_len`` tokens: ``[L, steps, rows, E]`` float32 saved to ``out``; (src, shape)."""
    path, model, tokens = _model_and_tokens(src, rows, prompt_len + steps, data)
    logits, _ = record_routing(model, tokens, prompt_len)
    torch.save(logits.float().contiguous(), out)
    return path, list(logits.shape)


def vllm_inputs(model: Path | None = None, *, shape: str | None = None, layers: int = 4, router: str = "replay",
                replay_from: Path | None = None, rows: int, prompt_len: int, steps: int,
                workdir: Path = Path("/tmp/lynx-vllm-bench"), data: list[Path] | None = None):
    """``(model dir, token prompts [rows][prompt_len], replay bank path or None, description)``."""
    if shape is None:
        path, _, tokens = _model_and_tokens(model, rows, prompt_len, data)
        cfg = json.loads((path / "config.json").read_text())
        return str(path), tokens.tolist(), None, {"model": str(path), "routing": "own", **_shape_of(cfg)}
    get_shape(shape)   # ValueError listing the known shapes
    workdir.mkdir(parents=True, exist_ok=True)
    bank = None
    desc = {"shape": shape, "layers": layers, "routing": "random weights (NOT realistic)"}
    if router == "replay":
        bank = workdir / "replay.pt"
        src, bank_shape = record_bank(replay_from, max(32, rows), prompt_len, 2 * steps, bank, data)
        desc.update(routing=f"replayed from {src}", replay_shape=bank_shape)
    elif router != "random":
        raise ValueError(f"router must be 'replay' or 'random', got {router!r}")
    path = build_shape_model(shape, layers, workdir / f"{shape}-L{layers}")
    cfg = json.loads((path / "config.json").read_text())
    if bank is not None and desc["replay_shape"][-1] != _shape_of(cfg)["experts"]:
        raise ValueError(f"the replay model has {desc['replay_shape'][-1]} experts but {shape} has "
                         f"{_shape_of(cfg)['experts']}; use router='random'")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg["vocab_size"], (rows, prompt_len), generator=gen).tolist()
    return str(path), tokens, bank, {**desc, **_shape_of(cfg)}


def _replay_hook(bank: torch.Tensor, layer: int, step: list[int]):
    """A forward hook for MoE gate ``layer``: its output becomes recorded logits ``bank[L, S, R, E]``
    (layer ``layer % L``, the step counter ``step[0] % S`` that layer 0 advances, row ``r % R``)."""
    L, S, R, _ = bank.shape

    def replay(module, args, out):
        logits = out[0] if isinstance(out, tuple) else out
        step[0] += layer == 0                                          # layer 0 opens a forward step
        rows = torch.arange(logits.shape[0]) % R
        new = bank[layer % L, step[0] % S][rows].to(logits.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return replay


def _install_replay(worker, bank_path: str) -> str:
    """Runs in the vLLM worker (``collective_rpc``): each MoE gate replays recorded logits."""
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    model = worker.get_model()
    if getattr(model, "_lynx_bench_replay", False):
        return "already installed"
    bank, step = torch.load(bank_path), [-1]
    gates = [m for m in model.modules() if isinstance(m, GateLinear)]
    for i, gate in enumerate(gates):
        gate.register_forward_hook(_replay_hook(bank, i, step))
    model._lynx_bench_replay = True
    return f"replaying recorded router logits {tuple(bank.shape)} into {len(gates)} MoE gates"


def patch_gates_for_replay(bank_path: str) -> None:
    """Every vLLM MoE gate built from now on in this process replays ``bank_path``: for a
    server, whose worker no RPC reaches (``benchmarks/serve_bench.py`` calls this from a
    ``sitecustomize`` in the server's processes)."""
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    init, bank, step, built = GateLinear.__init__, torch.load(bank_path), [-1], [0]

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_forward_hook(_replay_hook(bank, built[0], step))
        built[0] += 1
    GateLinear.__init__ = __init__


def _generate(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t


def _bench_batch(llm, prompts, policies: list[str], steps: int, repeats: int, tick: Callable[[], None]) -> dict:
    from ..integrations.vllm import set_policy, stats
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
            tick()
    return res


def vllm_decode_speed(model_dir: str, prompts: list[list[int]], policies: list[str], batch_sizes: list[int], *,
                      steps: int = 16, repeats: int = 3, bank: Path | None = None, desc: dict | None = None,
                      kv_cache_gib: str = "2", on_batch: Callable[[list[dict]], None] | None = None,
                      progress: Callable[[int, int], None] | None = None, gate_file: Path | None = None) -> dict:
    """Time native and ``policies`` (spec strings, e.g. ``"preset"``) at each batch size in one
    engine (see the module docstring). Returns the summary with one result row per batch size
    and policy; ``on_batch(rows)`` gets each batch size's rows as they are measured;
    ``gate_file`` (``lynx bench --calibrate``) gates every policy in the engine."""
    if max(batch_sizes) > len(prompts):
        raise ValueError(f"batch size {max(batch_sizes)} needs that many prompts, got {len(prompts)}")
    os.environ.update({"LYNX_POLICY": "topk", "LYNX_STATS_EVERY": "0", "VLLM_CPU_KVCACHE_SPACE": kv_cache_gib})
    os.environ.pop("LYNX_POLICY_FILE", None)
    os.environ.pop("LYNX_DEFAULT", None)
    os.environ.pop("LYNX_GATE_FILE", None)
    if gate_file is not None:
        os.environ["LYNX_GATE_FILE"] = str(Path(gate_file).resolve())
    if bank is not None:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM

    from ..integrations.vllm import set_policy
    desc = desc or {}
    before = {**conditions(), "eager": True, "dtype": "bfloat16"}
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0,
              max_num_seqs=max(batch_sizes), skip_tokenizer_init=True)
    try:
        if bank is not None:
            llm.collective_rpc(_install_replay, args=(str(bank),))
        names = {"topk": "native"}
        for spec in policies:
            [names[spec]] = set_policy(llm, spec)   # canonical form, e.g. preset -> the AffinityBinning it means
        specs = ["topk", *[p for p in policies if names[p] != "topk"]]
        done, total = [0], len(batch_sizes) * repeats * len(specs)

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)
        results = []
        for B in batch_sizes:
            res = _bench_batch(llm, prompts[:B], specs, steps, repeats, tick)
            nat_ms = res["topk"]["ms"]
            rows = []
            for p in specs:
                ms, d = res[p]["ms"], statistics.mean(res[p]["policy_d"])
                row = {"batch": B, "policy": names[p], "ms_per_step": round(statistics.median(ms), 2),
                       "ms_min": round(min(ms), 2), "ms_max": round(max(ms), 2),
                       "tokens_per_s": round(B * 1000 / statistics.median(ms), 1),
                       "speedup": round(statistics.median(n / m for n, m in zip(nat_ms, ms)), 3),
                       # A shared machine only ever adds time: the ratio of the fastest runs is
                       # the estimate least hurt by other load.
                       "speedup_of_min": round(min(nat_ms) / min(ms), 3),
                       "distinct_mean": round(d, 2),
                       "native_distinct_mean": round(statistics.mean(res[p]["native_d"]), 2)}
                if "expert_bytes" in desc:
                    row["expert_mb_per_step"] = round(d * desc["expert_bytes"] * desc["num_layers"] / 1e6, 1)
                rows.append(row)
            results += rows
            if on_batch is not None:
                on_batch(rows)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"engine": "vllm", **desc, "new_tokens": steps, "prompt_len": len(prompts[0]), "repeats": repeats,
            "conditions": {"before": before, "after": conditions()}, "results": results}
