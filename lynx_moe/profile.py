"""``lynx profile``: which experts a model's layers touch when real text decodes in batches.

Lynx can only save time where a batch's rows spread over many experts, so this is the first
thing to look at on a model. Held-out text (the reference model's test split by default) is
fed one token per step through the KV cache (teacher forcing), so each MoE layer sees
``B`` decode rows per step, exactly as in batched serving. Router logits and top-k ids of
every layer and step are recorded once at the largest batch size; smaller batches are the
disjoint row groups of that recording (native routing has no cross-row effects). Reported
per layer and batch size: mean / spread of distinct experts per step, expert load skew, how
often a row's rank-j expert lies in the same AffinityBinning bin as its top-1 (bin width
``1/alpha`` of the authors' preset for the model's shape), and, for each ``--policy``, the
distinct experts that policy would keep on the same logits (offline).

    lynx profile --batch-sizes 1,8,32,64 --out runs/profile
    lynx profile --model PATH --data heldout.jsonl --steps 16 --json-only

Writes ``profile.json``, ``distinct_experts.png`` and ``expert_load.png`` under ``--out``;
prints a table and one JSON line. Legend: L layers, S steps, B batch rows, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

__all__ = ["add_arguments", "run", "load_model", "load_texts", "token_batch", "prefill",
           "decode_step", "record_routing", "default_data", "profile_stats"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import policy_arg, positive_ints
    parser.add_argument("--model", type=Path, default=None, metavar="PATH",
                        help="model folder (default: the reference model)")
    parser.add_argument("--data", type=Path, action="append", default=None, metavar="FILE",
                        help="held-out text: a JSONL file with a 'text' field per line, or a folder of them "
                             "(repeatable; default: MODEL/eval/heldout)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 8, 32, 64], metavar="B,B,...",
                        help="e.g. 1,8,32,64")
    parser.add_argument("--steps", type=int, default=32, metavar="N", help="decode steps per sequence (default 32)")
    parser.add_argument("--prompt-len", type=int, default=16, metavar="N",
                        help="tokens prefilled before decoding (default 16)")
    parser.add_argument("--policy", type=policy_arg, action="append", default=None, metavar="SPEC",
                        help="also count the distinct experts this policy keeps (offline, on the recorded "
                             "logits; repeatable; default: the authors' AffinityBinning preset for the shape)")
    parser.add_argument("--out", type=Path, default=Path("runs/profile"), metavar="DIR",
                        help="output folder (default runs/profile)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--json-only", action="store_true", help="print only the final JSON line")


# ---------------------------------------------------------------------------------------
# Model, text and decode steps (shared with ``lynx bench``)

def load_model(path: Path | None, dtype: torch.dtype | None = None):
    """``(model, tokenizer or None)`` from a local folder; UsageError if it is not a model."""
    from .cli import UsageError
    if path is None:
        from . import reference_model_path
        try:
            path = reference_model_path()
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"--model {path}: not a model folder (no config.json there)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UsageError("this command needs transformers: pip install 'lynx-moe[hf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--model {path}: cannot load: {e}") from None
    tokenizer = None  # token_batch falls back to bytes
    # transformers 5 builds an empty tokenizer for a folder without one: look for files first.
    if any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"lynx: cannot load the tokenizer in {path} ({e}); using bytes as tokens", file=sys.stderr)
    return model, tokenizer


def load_texts(paths: list[Path]) -> dict[str, list[str]]:
    """Texts by domain from JSONL files (``domain`` field, else the file name)."""
    from .cli import UsageError
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.rglob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"--data {p}: no such file or folder")
    texts: dict[str, list[str]] = {}
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line) if line.strip() else None
            if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
                texts.setdefault(str(rec.get("domain") or f.stem), []).append(rec["text"])
    if not texts:
        raise UsageError(f"no JSONL records with a 'text' field in {', '.join(map(str, paths))}")
    return texts


def default_data(model_path: Path) -> Path:
    """The held-out text shipped with a model (``eval/heldout``, else ``eval``), or, for a
    model without any, the reference model's per-domain test segments."""
    from .cli import UsageError
    candidates = [Path(model_path) / "eval"]
    try:
        candidates.append(_ref_path() / "eval")
    except FileNotFoundError:
        pass
    for eval_dir in candidates:
        if (eval_dir / "heldout").is_dir():
            return eval_dir / "heldout"
        if eval_dir.is_dir():
            return eval_dir
    raise UsageError(f"no held-out text found for {model_path} (looked for {candidates[0]}): pass --data FILE.jsonl")


def token_batch(texts: dict[str, list[str]], tokenizer, rows: int, length: int, vocab: int) -> torch.Tensor:
    """``[rows, length]`` token ids: row i reads domain ``i % D``'s text stream (documents
    joined) at its own offset, so a batch mixes domains like a server's would. Without a
    tokenizer, UTF-8 bytes modulo the vocabulary stand in for tokens."""
    from .cli import UsageError
    domains = sorted(texts)
    streams = {}
    for d in domains:
        joined = "\n\n".join(texts[d])
        ids = tokenizer.encode(joined) if tokenizer is not None else list(joined.encode("utf-8"))
        streams[d] = torch.tensor(ids, dtype=torch.long) % vocab
    out = []
    for i in range(rows):
        s = streams[domains[i % len(domains)]]
        if len(s) < length:
            raise UsageError(f"domain {domains[i % len(domains)]!r} has only {len(s)} tokens; need {length} per row")
        start = (i // len(domains)) * length % max(1, len(s) - length + 1)
        out.append(s[start:start + length])
    return torch.stack(out)


def _forward(model, ids: torch.Tensor, cache=None):
    kwargs = {"logits_to_keep": 1} if hasattr(model, "lm_head") else {}
    return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)


def prefill(model, ids: torch.Tensor):
    """Run ``ids [B, P]`` through the model; returns the KV cache."""
    with torch.inference_mode():
        return _forward(model, ids).past_key_values


def decode_step(model, ids: torch.Tensor, cache) -> None:
    """One decode step: ``ids [B, 1]``, appended to ``cache``."""
    with torch.inference_mode():
        _forward(model, ids, cache)


def record_routing(model, tokens: torch.Tensor, prompt_len: int, progress: bool = True):
    """Decode ``tokens[:, prompt_len:]`` one step at a time after prefilling the prompt.

    Returns ``(logits [L, S, B, E] float32, ids [L, S, B, K])`` of every router during the
    decode steps (prefill rows are not recorded).
    """
    from tqdm import tqdm

    from .shapes import routers
    mods = routers(model)
    logits: list[list[torch.Tensor]] = [[] for _ in mods]
    ids: list[list[torch.Tensor]] = [[] for _ in mods]
    recording = [False]

    def hook(i):
        def fn(module, args, out):
            if recording[0]:
                logits[i].append(out[0].detach().float().clone())
                ids[i].append(out[2].detach().long().clone())
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(mods)]
    try:
        cache = prefill(model, tokens[:, :prompt_len])
        recording[0] = True
        for s in tqdm(range(prompt_len, tokens.shape[1]), desc="decode steps", file=sys.stderr,
                      disable=not progress, leave=False):
            decode_step(model, tokens[:, s:s + 1], cache)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([torch.stack(x) for x in logits]), torch.stack([torch.stack(x) for x in ids])


# ---------------------------------------------------------------------------------------
# Statistics

def _spread(x: torch.Tensor) -> dict:
    x = x.double().flatten()
    return {"mean": round(x.mean().item(), 3), "std": round(x.std(unbiased=False).item(), 3),
            "min": round(x.min().item(), 3), "max": round(x.max().item(), 3)}


def profile_stats(logits: torch.Tensor, ids: torch.Tensor, batch_sizes: list[int], alpha: float,
                  policies: list = ()) -> dict:
    """Per-layer statistics of a recording (see the module docstring); batch size ``B`` uses
    the ``rows // B`` disjoint groups of ``B`` recorded rows."""
    from .routing import route
    L, S, R, E = logits.shape
    K = ids.shape[-1]
    top = logits.gather(-1, ids)                                           # [L, S, R, K] native order
    same_bin = torch.ceil(alpha * (top - top[..., :1])) >= 0              # rank j in the top-1's bin
    layers = []
    for layer in range(L):
        by_batch = {}
        for B in batch_sizes:
            groups = ids[layer, :, : R // B * B].reshape(S, R // B, B * K)     # [S, G, B*K]
            counts = torch.zeros(S, R // B, E).scatter_add_(-1, groups, torch.ones_like(groups, dtype=torch.float))
            distinct = (counts > 0).sum(-1)                                    # [S, G]
            mean_load = B * K / E
            entry = {"groups": R // B, "distinct": _spread(distinct),
                     "load_max_over_mean": round((counts.amax(-1) / mean_load).mean().item(), 3),
                     "load_cv": round((counts.std(-1, unbiased=False) / mean_load).mean().item(), 3)}
            for p in policies:
                d = [route(logits[layer, s, g * B:(g + 1) * B], K, p).ids.unique().numel()
                     for s in range(S) for g in range(R // B)]
                entry.setdefault("policy_distinct", {})[str(p)] = _spread(torch.tensor(d))
            by_batch[str(B)] = entry
        share = torch.bincount(ids[layer].flatten(), minlength=E).double() / ids[layer].numel()
        layers.append({
            "layer": layer, "batch": by_batch,
            "same_bin_by_rank": [round(v, 4) for v in same_bin[layer].double().mean((0, 1)).tolist()],
            "same_bin_mean": round(same_bin[layer].double().sum(-1).mean().item(), 3),
            "expert_share": [round(v, 5) for v in share.tolist()],
        })
    return {"layers": layers, "num_experts": E, "top_k": K, "steps": S, "rows": R, "alpha": alpha}


# ---------------------------------------------------------------------------------------
# Output

def _table(stats: dict, batch_sizes: list[int]) -> str:
    pols = sorted({p for ly in stats["layers"] for e in ly["batch"].values() for p in e.get("policy_distinct", {})})
    head = f"{'layer':>5} {'B':>4} {'distinct mean±std':>18} {'min-max':>8} {'load max/mean':>13} {'load cv':>7}"
    widths = [max(len(p), 8) for p in pols]
    head += "".join(f"  {p:>{w}}" for p, w in zip(pols, widths))
    lines = [head]
    for ly in stats["layers"]:
        for B in batch_sizes:
            e = ly["batch"][str(B)]
            d = e["distinct"]
            row = (f"{ly['layer']:>5} {B:>4} {d['mean']:>11.1f} ± {d['std']:<4.1f} {d['min']:>3.0f}-{d['max']:<4.0f}"
                   f" {e['load_max_over_mean']:>13.2f} {e['load_cv']:>7.2f}")
            row += "".join(f"  {e['policy_distinct'][p]['mean']:>{w}.1f}" for p, w in zip(pols, widths))
            lines.append(row)
    if pols:
        lines.insert(0, "distinct experts per step, native and (offline, on the same logits) per policy:")
    lines.append(f"share of rows whose rank-j expert is in the top-1's bin (alpha={stats['alpha']}), j=1..K:")
    for ly in stats["layers"]:
        lines.append(f"  layer {ly['layer']}: " + " ".join(f"{v:.2f}" for v in ly["same_bin_by_rank"])
                     + f"  (mean {ly['same_bin_mean']:.2f} of {stats['top_k']} in bin 0)")
    return "\n".join(lines)


def _plots(stats: dict, batch_sizes: list[int], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'lynx-moe[plot]' (or pass --no-plots)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ly in stats["layers"]:
        m = [ly["batch"][str(B)]["distinct"]["mean"] for B in batch_sizes]
        s = [ly["batch"][str(B)]["distinct"]["std"] for B in batch_sizes]
        line = ax.errorbar(batch_sizes, m, yerr=s, marker="o", capsize=3, label=f"layer {ly['layer']}")
        for p, style in zip(sorted(ly["batch"][str(batch_sizes[0])].get("policy_distinct", {})), ("--", ":", "-.")):
            pm = [ly["batch"][str(B)]["policy_distinct"][p]["mean"] for B in batch_sizes]
            ax.plot(batch_sizes, pm, style, color=line[0].get_color(), alpha=0.7,
                    label=f"{p} (offline; same colour per layer)" if ly["layer"] == 0 else None)
    ax.axhline(stats["num_experts"], color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(B) for B in batch_sizes])
    ax.set_xlabel("batch size (decode rows per step)")
    ax.set_ylabel("distinct experts per step")
    ax.set_title("Distinct experts per layer and step (mean ± std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "distinct_experts.png", dpi=120)
    plt.close(fig)

    n = len(stats["layers"])
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, ly in zip(axes.flat, stats["layers"]):
        share = sorted(ly["expert_share"], reverse=True)
        ax.bar(range(len(share)), share, width=1.0)
        ax.axhline(1 / stats["num_experts"], color="red", lw=0.8)
        ax.set_title(f"layer {ly['layer']}", fontsize=9)
        ax.set_xlabel("experts, by load", fontsize=8)
        ax.set_ylabel("share of assignments", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Expert load over all decode steps (red: uniform)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=120)
    plt.close(fig)
    return [str(out / "distinct_experts.png"), str(out / "expert_load.png")]


def run(args: argparse.Namespace) -> int:
    from .cli import UsageError
    from .presets import for_shape
    if args.steps < 1 or args.prompt_len < 1:
        raise UsageError("--steps and --prompt-len must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    path = Path(args.model) if args.model else None
    data = args.data or [default_data(path or _ref_path())]
    texts = load_texts(data)
    rows = max(args.batch_sizes)
    tokens = token_batch(texts, tokenizer, rows, args.prompt_len + args.steps, model.config.vocab_size)
    logits, ids = record_routing(model, tokens, args.prompt_len, progress=not args.json_only)
    E, K = logits.shape[-1], ids.shape[-1]
    preset_name, preset = for_shape(E, K)
    policies = args.policy if args.policy is not None else [preset]
    policies = [p for p in policies if p.kind != "native"]
    if policies and "deepseek" in str(getattr(model.config, "model_type", "")):
        # The offline count routes with softmax scoring; DeepSeek's grouped, biased sigmoid
        # routing would pick other experts. ``lynx bench`` runs the real patched router.
        print("lynx profile: policy counts are skipped for DeepSeek-style routing", file=sys.stderr)
        policies = []
    stats = profile_stats(logits, ids, args.batch_sizes, preset.alpha, policies)
    stats.update({"model": str(path or _ref_path()), "data": [str(d) for d in data], "preset": preset_name,
                  "prompt_len": args.prompt_len, "threads": torch.get_num_threads()})
    args.out.mkdir(parents=True, exist_ok=True)
    stats["plots"] = [] if args.no_plots else _plots(stats, args.batch_sizes, args.out)
    (args.out / "profile.json").write_text(json.dumps(stats, indent=1))
    if not args.json_only:
        print(f"{stats['model']}: {len(stats['layers'])} MoE layers, {E} experts top-{K}; {args.steps} decode "
              f"steps x {rows} rows of {', '.join(sorted(texts))}; bins of 1/{preset.alpha:g} ({preset_name} preset)")
        print(_table(stats, args.batch_sizes))
        print(f"wrote {args.out / 'profile.json'}" + "".join(f", {p}" for p in stats["plots"]))
    summary = {k: v for k, v in stats.items() if k != "layers"}
    summary["distinct_mean"] = {str(B): round(sum(ly["batch"][str(B)]["distinct"]["mean"] for ly in stats["layers"])
                                              / len(stats["layers"]), 3) for B in args.batch_sizes}
    print(json.dumps(summary))
    return 0


def _ref_path() -> Path:
    from . import reference_model_path
    return reference_model_path()
