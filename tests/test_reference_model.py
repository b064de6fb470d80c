"""The committed reference model (models/lynx-ref-moe) loads offline, matches its model card, and generates."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _model_path() -> Path:
    import lynx_moe

    try:
        return Path(lynx_moe.reference_model_path())
    except (AttributeError, FileNotFoundError):
        pass
    return Path(__file__).resolve().parent.parent / "models" / "lynx-ref-moe"


PATH = _model_path()
pytestmark = pytest.mark.skipif(not (PATH / "model.safetensors").exists(), reason="reference checkpoint missing")


@pytest.fixture(scope="module")
def model_and_tok():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PATH)
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32)
    model.eval()
    return model, tok


def test_config_is_olmoe_64x8(model_and_tok):
    model, _ = model_and_tok
    cfg = model.config
    assert cfg.model_type == "olmoe"
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (64, 8)
    assert sum(p.numel() for p in model.parameters()) < 24e6


@torch.no_grad()
def _quick_perplexity(model, tok, path: Path) -> tuple[float, float]:
    """(recomputed, card) perplexity over the first segments of each held-out domain."""
    quick = json.loads((path / "metrics.json").read_text())["test_perplexity_quick"]
    n = quick["segments_per_domain"]
    texts = []
    for f in sorted((path / "eval" / "heldout").glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh][:n]
    assert len(texts) >= 8 * n
    seqs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    nll, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), 16):
        batch = [seqs[i] for i in order[s:s + 16]]
        L = max(map(len, batch))
        x = torch.full((len(batch), L), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros_like(x)
        for r, q in enumerate(batch):
            x[r, :len(q)] = torch.tensor(q)
            m[r, :len(q)] = 1
        lp = torch.log_softmax(model(input_ids=x, attention_mask=m).logits.float()[:, :-1], -1)
        tok_lp = lp.gather(-1, x[:, 1:, None])[..., 0] * m[:, 1:]
        nll -= float(tok_lp.sum())
        count += int(m[:, 1:].sum())
    return math.exp(nll / count), quick["value"]


def test_quick_test_split_perplexity_matches_card(model_and_tok):
    ppl, card = _quick_perplexity(*model_and_tok, PATH)
    assert ppl == pytest.approx(card, rel=0.02), (ppl, card)
    assert str(card) in (PATH / "README.md").read_text()   # and the card shows the same number


QWEN = PATH.parent / "lynx-ref-qwen3moe"


@pytest.mark.skipif(not (QWEN / "model.safetensors").exists(), reason="Qwen3-MoE reference checkpoint missing")
def test_qwen3_moe_reference_model_matches_its_card():
    """The second reference model: Qwen3-MoE-style, 128 experts top-8 with normalised top-k,
    under 48 MB, same tokenizer and held-out text; a batch of 32 decode rows touches most experts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lynx_moe as lynx
    assert (QWEN / "model.safetensors").stat().st_size < 48e6
    assert (QWEN / "tokenizer.json").read_bytes() == (PATH / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(QWEN)
    model = AutoModelForCausalLM.from_pretrained(QWEN, dtype=torch.float32).eval()
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and (cfg.num_experts, cfg.num_experts_per_tok) == (128, 8)
    assert cfg.norm_topk_prob
    ppl, card = _quick_perplexity(model, tok, QWEN)
    assert ppl == pytest.approx(card, rel=0.02), (ppl, card)
    assert str(card) in (QWEN / "README.md").read_text()
    distinct = json.loads((QWEN / "metrics.json").read_text())["distinct_experts_per_decode_step"]
    assert distinct["32"]["mean"] > 64 and distinct["1"]["mean"] == 8
    lynx.apply_(model, lynx.AffinityBinning(alpha=3.0, beta=2))    # a supported architecture for the HF patch
    lynx.remove_(model)


@torch.no_grad()
def test_greedy_generation_is_nontrivial(model_and_tok):
    model, tok = model_and_tok
    for prompt in ["In the beginning", "The function"]:
        x = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
        words = re.findall(r"[A-Za-z]+", text)
        assert len(words) >= 5, text
        assert len(set(w.lower() for w in words)) >= 4, text


def test_lm_eval_loads_every_shipped_task_from_any_folder(tmp_path, monkeypatch):
    """The task YAMLs read their data beside themselves: stock lm-eval finds every item from a
    working directory that is not the repository root (and from a copy of the folder)."""
    pytest.importorskip("lm_eval")
    import shutil

    from lm_eval.tasks import TaskManager, get_task_dict
    copy = tmp_path / "copied-eval"
    shutil.copytree(PATH / "eval", copy)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for folder in (PATH / "eval", copy):
        names = sorted(p.stem for p in folder.glob("lynx_ref_*.yaml") if p.stem != "lynx_ref_ppl")
        tasks = get_task_dict(names, TaskManager(include_path=str(folder)))
        for name in names:
            want = sum(1 for line in (folder / _task_file(folder / f"{name}.yaml")).open() if line.strip())
            assert len(list(tasks[name].test_docs())) == want > 0, name


def _task_file(yaml_path: Path) -> str:
    return re.search(r"^  file: (\S+)$", yaml_path.read_text(), re.M).group(1)


def test_chat_template_renders_a_conversation():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PATH)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."},
            {"role": "assistant", "content": "Reynard."}, {"role": "user", "content": "Another?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "Be brief.\n\nQ: Name a fox.\nA: Reynard.\nQ: Another?\nA:"


@pytest.mark.parametrize("task, metric, limit", [
    ("lynx_ref_ppl_bible", "word_perplexity,none", 8),    # loglikelihood_rolling: held-out text
    ("lynx_ref_next_words", "perplexity,none", 32),       # loglikelihood: a two-word answer after a context
])
def test_lm_eval_sees_a_policy_only_in_decode_mode(monkeypatch, task, metric, limit):
    """Stock lm-eval scores loglikelihood requests in one prefill, which is routed natively, so
    every policy gets native's score; with ``decode_scoring=true`` the continuation is fed as
    decode steps with the batch voting, and an aggressive policy scores differently."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lynx_moe.measure.lm_eval import register
    register()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = TaskManager(include_path=str(PATH / "eval"))

    def score(policy: str, decode: bool) -> float:
        out = lm_eval.simple_evaluate(
            model="lynx-hf", model_args=f"pretrained={PATH},policy={policy},decode_scoring={decode},dtype=float32",
            tasks=[task], task_manager=tasks, device="cpu", batch_size=limit, limit=limit)
        return out["results"][task][metric]

    native = score("topk", False)
    assert score("xshare:budget=8", False) == native                 # prefill: the policy is invisible
    assert score("topk", True) == pytest.approx(native, rel=1e-3)    # decode mode, native: the same score
    assert score("xshare:budget=8", True) > native * 1.01            # decode mode: the cut shows


DSV3 = PATH.parent / "lynx-ref-dsv3"
_needs_dsv3 = pytest.mark.skipif(not (DSV3 / "model.safetensors").exists(),
                                 reason="DeepSeek-V3 reference checkpoint missing")


@pytest.fixture(scope="module")
def dsv3():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DSV3)
    model = AutoModelForCausalLM.from_pretrained(DSV3, dtype=torch.float32).eval()
    return model, tok


def _decode_prompts(tok, path: Path, n: int, length: int = 16) -> dict[str, torch.Tensor]:
    """``n`` equal-length prompts: BOS + the first tokens of held-out test segments (one per domain in turn)."""
    rows = [[json.loads(line)["text"] for line in f.open(encoding="utf-8")]
            for f in sorted((path / "eval" / "heldout").glob("*.jsonl"))]
    ids = []
    for i in range(10 * n):
        seq = [tok.bos_token_id] + tok(rows[i % len(rows)][i // len(rows)], add_special_tokens=False)["input_ids"]
        if len(seq) >= length:
            ids.append(seq[:length])
        if len(ids) == n:
            break
    x = torch.tensor(ids)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


@_needs_dsv3
def test_deepseek_v3_reference_model_matches_its_card(dsv3):
    """The third reference model: DeepSeek-V3-style (MLA, sigmoid scores + e_score_correction_bias, grouped
    top-k, routed scaling, one shared expert), 64 experts top-8, under 48 MB, the same tokenizer and held-out
    text; the bias was trained by aux-loss-free balancing, and a batch of 32 decode rows touches most experts."""
    model, tok = dsv3
    assert (DSV3 / "model.safetensors").stat().st_size < 48e6
    for f in ("tokenizer.json", "chat_template.jinja"):
        assert (DSV3 / f).read_bytes() == (PATH / f).read_bytes()
    cfg = model.config
    assert cfg.model_type == "deepseek_v3" and (cfg.n_routed_experts, cfg.num_experts_per_tok) == (64, 8)
    assert (cfg.n_group, cfg.topk_group, cfg.n_shared_experts, cfg.routed_scaling_factor) == (8, 4, 1, 2.5)
    assert cfg.norm_topk_prob and cfg.first_k_dense_replace == 0
    assert (cfg.topk_method, cfg.scoring_func) == ("noaux_tc", "sigmoid")     # what vLLM reads
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576                      # vllm-cpu's MLA head size
    for layer in model.model.layers:
        bias = layer.mlp.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and float(bias.abs().max()) > 0.01  # stored fp32, moved in training
    ppl, card = _quick_perplexity(model, tok, DSV3)
    assert ppl == pytest.approx(card, rel=0.02), (ppl, card)
    assert str(card) in (DSV3 / "README.md").read_text()
    distinct = json.loads((DSV3 / "metrics.json").read_text())["distinct_experts_per_decode_step"]
    assert distinct["32"]["mean"] > 40 and distinct["1"]["mean"] == 8


@_needs_dsv3
def test_deepseek_v3_reference_topk_exact_and_policy_uses_fewer_experts(dsv3):
    """lynx's HF patch on DeepSeek-V3 routing with a trained bias: TopK reproduces the unpatched model
    bit for bit (prefill, decode and greedy generation); a preset policy cuts the distinct experts per step."""
    import copy

    import lynx_moe as lynx
    ref, tok = dsv3
    model = copy.deepcopy(ref)
    lynx.apply_(model, lynx.TopK())
    assert len(lynx.routing_stats(model)) == ref.config.num_hidden_layers
    inputs = _decode_prompts(tok, DSV3, 8)
    with torch.no_grad():
        for m in (model, ref):
            m._out = m.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    assert torch.equal(model._out.sequences, ref._out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(model._out.logits, ref._out.logits))
    stats = lynx.routing_stats(model)
    assert all(s.steps == 3 and s.distinct_policy == s.distinct_native and s.changed_share == 0 for s in stats)
    del model._out, ref._out

    lynx.apply_(model, lynx.presets.for_shape(64, 8)[1])
    inputs = _decode_prompts(tok, DSV3, 32)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    for s in lynx.routing_stats(model):
        assert s.steps == 3 and s.distinct_policy < s.distinct_native and 0 < s.changed_share <= 1
    lynx.remove_(model)


_VLLM_SNIPPET = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=256)
    sp = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1)
    prompts = [{"prompt_token_ids": json.loads(p)} for p in sys.argv[2:]]
    res = lambda o: {"ids": list(o.outputs[0].token_ids),
                     "lp": [max(d.values(), key=lambda v: v.logprob).logprob for d in o.outputs[0].logprobs]}
    single = [res(llm.generate([p], sp, use_tqdm=False)[0]) for p in prompts]   # one sequence per engine step
    print("VLLM_RESULT " + json.dumps({"single": single,
                                       "batch": [res(o) for o in llm.generate(prompts, sp, use_tqdm=False)]}))
"""


@pytest.fixture(scope="module")
def dsv3_vllm(dsv3):
    """vLLM's greedy tokens and log-probabilities on 4 held-out prompts, each alone and all in one batch,
    and transformers' fp32 next-token log-probabilities on the same prompts."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    model, tok = dsv3
    prompts = _decode_prompts(tok, DSV3, 4, length=24)["input_ids"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, "-c", _VLLM_SNIPPET, str(DSV3)] + [json.dumps(r.tolist()) for r in prompts],
                       env=env, capture_output=True, text=True, timeout=900)
    line = [l for l in p.stdout.splitlines() if l.startswith("VLLM_RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-2000:]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=prompts).logits[:, -1].float(), -1)
    return json.loads(line[0][len("VLLM_RESULT "):]), lp


@pytest.mark.vllm
@pytest.mark.slow
@_needs_dsv3
def test_deepseek_v3_reference_loads_and_generates_in_vllm(dsv3_vllm):
    """vllm-cpu 0.32 loads the DeepSeek-V3 reference (MLA head size 576, noaux_tc grouped sigmoid routing with
    the trained fp32 bias) and generates greedy tokens, alone and batched."""
    got, lp = dsv3_vllm
    for mode in ("single", "batch"):
        assert len(got[mode]) == 4
        for g in got[mode]:
            assert len(g["ids"]) == 4 and all(0 <= t < lp.shape[-1] for t in g["ids"])
            assert all(-20 < v <= 0 for v in g["lp"])


@pytest.mark.vllm
@pytest.mark.slow
@_needs_dsv3
@pytest.mark.xfail(strict=False, reason="vllm-cpu 0.32 disagrees with transformers on this model: first-token "
                   "log-probabilities differ by up to ~0.8 nats and argmaxes differ on some held-out prompts, and "
                   "vLLM's own results change when the 4 prompts share a batch (measured 2026-12-02; see the card)")
def test_deepseek_v3_reference_vllm_matches_transformers(dsv3_vllm):
    got, lp = dsv3_vllm
    for mode in ("single", "batch"):
        for r, g in enumerate(got[mode]):
            assert g["ids"][0] == int(lp[r].argmax()), (mode, r, g)
            assert g["lp"][0] == pytest.approx(float(lp[r].max()), abs=0.1), (mode, r, g)
