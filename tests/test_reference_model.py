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


def test_lm_eval_sees_a_policy_only_in_decode_mode(monkeypatch):
    """Stock lm-eval scores loglikelihood requests in one prefill, which is routed natively, so
    every policy gets native's score; with ``decode_scoring=true`` the continuation is fed as
    decode steps with the batch voting, and an aggressive policy scores differently."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lynx_moe.measure.lm_eval import register
    register()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = TaskManager(include_path=str(PATH / "eval"))

    def word_ppl(policy: str, decode: bool) -> float:
        out = lm_eval.simple_evaluate(
            model="lynx-hf", model_args=f"pretrained={PATH},policy={policy},decode_scoring={decode},dtype=float32",
            tasks=["lynx_ref_ppl_bible"], task_manager=tasks, device="cpu", batch_size=8, limit=8)
        return out["results"]["lynx_ref_ppl_bible"]["word_perplexity,none"]

    native = word_ppl("topk", False)
    assert word_ppl("xshare:budget=8", False) == native                 # prefill: the policy is invisible
    assert word_ppl("topk", True) == pytest.approx(native, rel=1e-3)    # decode mode, native: the same score
    assert word_ppl("xshare:budget=8", True) > native * 1.01            # decode mode: the cut shows
