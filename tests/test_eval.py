"""``lynx eval``, decode-mode scoring, metrics and the lm-eval model, on a tiny random OLMoE.

Metrics are checked on cases with known answers; a policy equal to native (``TopK``) must give
KL 0, 100 % agreement and identical accuracy. The model has 16 experts top-4, hidden 64 and the
reference model's tokenizer; data and tasks are a few generated lines. Nothing is downloaded.
Run: ``OMP_WAIT_POLICY=PASSIVE pytest tests/test_eval.py -q`` (about a minute).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import lynx_moe as lynx
from lynx_moe.cli import main
from lynx_moe.measure import metrics

from .cli_helpers import run_cli as _cli

pytest.importorskip("transformers")

from lynx_moe.measure.data import load_tasks  # noqa: E402
from lynx_moe.measure.decode import greedy, prefill, teacher_forced  # noqa: E402
from lynx_moe.measure.quality import (  # noqa: E402
    EvalConfig,
    evaluate,
    expand_sweep,  # noqa: E402
)

REF = Path(__file__).resolve().parent.parent / "models" / "lynx-ref-moe"
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "amber rivers under pale winter light").split()


# ---------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def tokenizer():
    if not (REF / "tokenizer.json").is_file():
        pytest.skip("the reference tokenizer (models/lynx-ref-moe/tokenizer.json) is not in this checkout")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(REF)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    from lynx_moe.measure.models import tiny_model
    path = tmp_path_factory.mktemp("tiny_olmoe")
    model = tiny_model("olmoe", num_experts=16, num_experts_per_tok=4, vocab_size=len(tokenizer),
                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF / f, path / f)
    _write_eval(path / "eval")
    return path


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(n))


def _write_eval(d: Path) -> None:
    """Held-out text in two domains, a 4-way multiple-choice task and a short-answer task."""
    (d / "heldout").mkdir(parents=True)
    for dom in ("prose", "verse"):
        (d / "heldout" / f"{dom}.jsonl").write_text(
            "".join(json.dumps({"domain": dom, "text": _text(i + len(dom), 40)}) + "\n" for i in range(6)))
    mc = [{"query": _text(i, 6), "choices": [" " + _text(i + c, 3) for c in range(4)], "label": i % 4}
          for i in range(8)]
    gen = [{"context": _text(i, 8), "answer": WORDS[i % len(WORDS)]} for i in range(6)]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + head.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + head.format(d / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from lynx_moe.measure.models import load_model
    return load_model(tiny_dir)


# ---------------------------------------------------------------------------------------
# Metrics on known answers

def test_kl_zero_for_identical_and_known_value():
    logp = torch.randn(5, 7, 11).log_softmax(-1)
    assert torch.equal(metrics.kl_per_token(logp, logp.clone()), torch.zeros(5, 7))
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert metrics.kl_per_token(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)


def test_greedy_agreement():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert metrics.greedy_agreement(a, a.clone()) == (1.0, 4.0)
    b = torch.tensor([[1, 2, 9, 4], [0, 6, 7, 8]])    # diverge at step 2 and step 0
    share, first = metrics.greedy_agreement(a, b)
    assert share == pytest.approx(6 / 8) and first == pytest.approx(1.0)


def test_paired_bootstrap_identical_is_exactly_zero():
    x = (torch.arange(50) % 3 == 0).float()
    ci = metrics.paired_bootstrap(x, x.clone())
    assert ci == metrics.Interval(0.0, 0.0, 0.0) and ci.contains(0.0)


def test_paired_bootstrap_known_synthetic_case():
    n = 1000
    native = torch.zeros(n)
    policy = (torch.arange(n) % 10 == 0).float()       # policy gains on exactly 10 % of the items
    ci = metrics.paired_bootstrap(native, policy, seed=7)
    assert ci.value == pytest.approx(0.1)
    assert ci.lo < 0.1 < ci.hi and ci.lo > 0.07 and ci.hi < 0.13   # binomial sd ~0.0095
    assert metrics.paired_bootstrap(native, policy, seed=7) == ci  # fixed seed: repeatable


def test_perplexity_delta_known_ratio():
    tokens = torch.tensor([10.0, 20.0, 30.0])
    nll = torch.tensor([25.0, 40.0, 70.0])
    ci = metrics.perplexity_delta(nll, nll + tokens * math.log(1.1), tokens)
    assert ci.value == pytest.approx(0.1) and ci.lo == pytest.approx(0.1) and ci.hi == pytest.approx(0.1)
    assert metrics.perplexity(nll, tokens) == pytest.approx(math.exp(135 / 60))


def test_exact_match():
    assert metrics.exact_match(" Fox, jumps", "fox")
    assert not metrics.exact_match(" foxes", "fox") and not metrics.exact_match("", "")
    assert metrics.exact_match(" the Priest said", "the priest")      # a two-word answer: both words
    assert not metrics.exact_match(" the", "the priest") and not metrics.exact_match(" the king", "the priest")


def test_expand_sweep():
    grid = expand_sweep("affinity_binning:alpha=0.5..4,beta=1..4")
    assert len(grid) == 16 and {p.alpha for p in grid} == {0.5, 1, 2, 4} and {p.beta for p in grid} == {1, 2, 3, 4}
    assert [str(p) for p in expand_sweep("oea:k0=1|2")] == ["oea:k0=1", "oea:k0=2"]
    for bad in ("affinity_binning:alpha=4..1", "affinity_binning:alpha=x..2", "nope:a=1"):
        with pytest.raises(ValueError):
            expand_sweep(bad)


# ---------------------------------------------------------------------------------------
# Decode-mode scoring

def test_teacher_forced_matches_full_forward_and_routes_decode_rows(loaded):
    model, _ = loaded
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 8000, (n,), generator=g).tolist() for n in (20, 13, 27, 9)]
    lens = [8, 4, 11, 3]                         # ragged: left-padded prefill, right-padded decode
    pre = prefill(model, rows, lens, pad_id=1)
    with lynx.applied(model, lynx.TopK(), stats=True):
        sc = teacher_forced(model, pre, rows, lens)
        stats = lynx.routing_stats(model)
    scored = sum(len(r) - p - 1 for r, p in zip(rows, lens))
    assert all(s.decode_rows == scored and s.steps == max(len(r) - p - 1 for r, p in zip(rows, lens))
               for s in stats)
    with torch.no_grad():
        for i, (r, p) in enumerate(zip(rows, lens)):
            full = model(input_ids=torch.tensor([r])).logits[0, p:-1].float().log_softmax(-1)
            ref = full.gather(1, torch.tensor(r[p + 1:])[:, None])[:, 0]
            torch.testing.assert_close(sc.row_logprobs(i), ref, atol=1e-4, rtol=0)
    again = teacher_forced(model, pre, rows, lens)     # the cache was rolled back to the prompt
    assert torch.equal(again.logprobs, sc.logprobs)
    gen = greedy(model, prefill(model, rows, [len(r) - 1 for r in rows], 1), rows, 3)
    with torch.no_grad():
        ref = model.generate(torch.tensor([rows[0]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen[0].tolist() == ref[0, len(rows[0]):].tolist()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_decode_scoring_other_architectures(arch):
    """Left-padded prefill + ragged decode equals a plain forward under native routing, and a
    policy changes the scores, on the other supported router types."""
    from lynx_moe.measure.models import tiny_model
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (14, 9, 18)]
    lens = [5, 3, 9]
    pre = prefill(model, rows, lens, pad_id=0)
    native = teacher_forced(model, pre, rows, lens)
    with lynx.applied(model, lynx.AffinityBinning(alpha=1.0, beta=1)):
        policy = teacher_forced(model, pre, rows, lens)
    with torch.no_grad():
        for i, (r, p) in enumerate(zip(rows, lens)):
            full = model(input_ids=torch.tensor([r])).logits[0, p:-1].float().log_softmax(-1)
            ref = full.gather(1, torch.tensor(r[p + 1:])[:, None])[:, 0]
            torch.testing.assert_close(native.row_logprobs(i), ref, atol=1e-4, rtol=0)
    assert not torch.equal(policy.logprobs, native.logprobs)


def test_native_equal_policy_gives_zero_loss(loaded, tiny_dir):
    model, tok = loaded
    from lynx_moe.measure.data import load_texts
    texts = load_texts([tiny_dir / "eval" / "heldout"])
    tasks = list(load_tasks(tiny_dir / "eval").values())
    assert sorted(t.name for t in tasks) == ["tiny_gen", "tiny_mc"]
    cfg = EvalConfig(batch_size=4, prefix=4, ppl_tokens=8, ppl_per_domain=4, gen_prompts=4, gen_tokens=4,
                     resamples=200)
    res = evaluate(model, tok, [lynx.TopK(), lynx.AffinityBinning(alpha=1.0, beta=1)], texts, tasks, cfg)
    native, same, ab = res
    assert [r["policy"] for r in res] == ["native", "topk", "affinity_binning:alpha=1.0,beta=1"]
    assert same["perplexity"]["kl"] == 0 and same["perplexity"]["top1_agreement"] == 1
    assert same["perplexity"]["ppl"] == native["perplexity"]["ppl"]
    assert same["perplexity"]["delta_pct"] == {"value": 0, "lo": 0, "hi": 0}
    assert same["greedy"]["agreement"] == 1 and same["greedy"]["first_divergence"] == 4
    for name, t in same["tasks"].items():
        assert t["acc"] == t["acc_native"] and t["delta_points"] == {"value": 0, "lo": 0, "hi": 0}
    assert same["tasks_pooled"]["delta_points"] == {"value": 0, "lo": 0, "hi": 0}
    assert same["tasks_pooled"]["n"] == 8 + 6
    assert native["tasks"]["tiny_mc"]["chance"] == 0.25
    # decode rows were counted: B rows per step in the perplexity run (8 rows, 2 whole batches)
    assert native["routing"]["steps"] == 2 * 8 and native["routing"]["rows_per_step"] == 4
    assert ab["routing"]["distinct"] <= ab["routing"]["distinct_native"]
    assert ab["perplexity"]["kl"] >= 0


# ---------------------------------------------------------------------------------------
# Command line

@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "not a model folder"),
    (["--policy", "no_such_policy"], "--policy"),
    (["--policy", "affinity_binning:alpha=-1"], "--policy"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--sweep", "affinity_binning:alpha=4..1"], "--sweep"),
])
def test_eval_cli_errors(argv, message, capsys):
    code, _, err = _cli(["eval", *argv], capsys)
    assert code == 2 and message in err


def test_eval_cli_unknown_task_and_top_k(tiny_dir, capsys):
    code, _, err = _cli(["eval", "--model", str(tiny_dir), "--tasks", "no_such_task"], capsys)
    assert code == 2 and "unknown task 'no_such_task'" in err and "tiny_mc" in err
    code, _, err = _cli(["eval", "--model", str(tiny_dir), "--policy", "static_k:k=8"], capsys)
    assert code == 2 and "static_k" in err


def test_eval_cli_takes_preset_as_a_policy(tiny_dir, capsys):
    from lynx_moe.integrations.hf import moe_shape
    from lynx_moe.measure.models import load_model
    from lynx_moe.presets import for_shape
    _, preset = for_shape(*moe_shape(load_model(tiny_dir)[0]))
    code, stdout, err = _cli(["eval", "--model", str(tiny_dir), "--policy", "preset", "--policy", "oea:k0=1",
                              "--tasks", "none", "--batch-size", "4", "--ppl-rows", "2", "--ppl-tokens", "4",
                              "--prefix", "4", "--gen-prompts", "0", "--json-only"], capsys)
    assert code == 0, err
    assert [r["policy"] for r in json.loads(stdout)["results"]] == ["native", str(preset), "oea:k0=1"]


def test_eval_cli_sweep_writes_json_and_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = _cli(["eval", "--model", str(tiny_dir), "--sweep", "oea:k0=1|2", "--tasks", "tiny_mc",
                              "--batch-size", "4", "--ppl-rows", "2", "--ppl-tokens", "6", "--prefix", "4",
                              "--gen-prompts", "4", "--gen-tokens", "3", "--speed", "1", "--out", str(out)], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert [r["policy"] for r in summary["results"]] == ["native", "oea:k0=1", "oea:k0=2"]
    assert all(r["speed"]["speedup"] > 0 for r in summary["results"]) and "speedup" in stdout
    assert "ppl change" in stdout and "task tiny_mc" in stdout
    assert (out / "eval.json").is_file() and (out / "sweep.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------
# lm-eval model

def test_policy_arg_separators():
    from lynx_moe.measure.lm_eval import parse_policy_arg
    ab = lynx.AffinityBinning(alpha=3.0, beta=4)
    assert parse_policy_arg("affinity_binning:alpha=3;beta=4") == ab
    assert parse_policy_arg("affinity_binning:alpha=3+beta=4") == ab
    assert parse_policy_arg(None) == lynx.TopK() and parse_policy_arg(ab.to_dict()) == ab
    with pytest.raises(ValueError):
        parse_policy_arg("affinity_binning:alpha=3;gamma=1")


def test_policy_spec_with_commas_survives_lm_evals_model_args(tiny_dir):
    """lm-eval splits ``policy=affinity_binning:alpha=3,beta=4`` into ``policy=...alpha=3`` and
    ``beta=4``; the model folds the policy's fields back into the spec."""
    pytest.importorskip("lm_eval")
    from lm_eval.utils import simple_parse_args_string

    from lynx_moe.measure.lm_eval import LynxHFLM
    args = simple_parse_args_string(f"pretrained={tiny_dir},policy=affinity_binning:alpha=3,beta=4,dtype=float32")
    lm = LynxHFLM(**args, device="cpu", batch_size=2)
    assert lm.policy == lynx.AffinityBinning(alpha=3.0, beta=4)
    args = simple_parse_args_string(f"pretrained={tiny_dir},policy=oea,k0=2")
    assert LynxHFLM(**args, device="cpu").policy == lynx.OEA(k0=2)


def test_lm_eval_model_runs_offline(tiny_dir, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from lynx_moe.measure.lm_eval import LynxHFLM, register
    assert register() is LynxHFLM and register() is LynxHFLM     # idempotent
    out = lm_eval.simple_evaluate(
        model="lynx-hf", model_args=f"pretrained={tiny_dir},policy=oea:k0=1,dtype=float32",
        tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tiny_dir / "eval")),
        device="cpu", batch_size=4, limit=4)
    assert set(out["results"]) == {"tiny_mc", "tiny_gen"}
    assert 0 <= out["results"]["tiny_mc"]["acc,none"] <= 1


def test_lm_eval_cli_forwards_arguments(monkeypatch):
    pytest.importorskip("lm_eval")
    import sys

    import lm_eval.__main__ as lm_main
    seen = {}
    monkeypatch.setattr(lm_main, "cli_evaluate", lambda: seen.setdefault("argv", list(sys.argv)))
    assert main(["lm-eval", "--model", "lynx-hf", "--model_args", "pretrained=x,policy=oea:k0=1", "-h"]) == 0
    assert seen["argv"][:6] == ["lm_eval", "--model", "lynx-hf", "--model_args", "pretrained=x,policy=oea:k0=1", "-h"]


# ---------------------------------------------------------------------------------------
# lynx demo

def test_demo_without_reference_model_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LYNX_REFERENCE_MODEL", str(tmp_path / "nowhere"))
    code, _, err = _cli(["demo", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "reference model not found" in err and "training" in err
    assert not (tmp_path / "r").exists()


def test_demo_quick_on_tiny_model(tiny_dir, tmp_path, capsys, monkeypatch):
    import lynx_moe.cli.demo as demo
    monkeypatch.setitem(demo.SIZES, "default", dict(ppl_per_domain=4, ppl_tokens=6, limit=8, gen_prompts=4,
                                                  gen_tokens=3, bench_repeats=1))
    out = tmp_path / "report"
    code, stdout, err = _cli(["demo", "--model", str(tiny_dir), "--batch-size", "4", "--out", str(out)],
                             capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in summary["table"]][0] == "native" and len(summary["table"]) >= 3
    assert all(r["speedup"] is not None for r in summary["table"])
    assert (out / "distinct_per_layer.png").is_file() and (out / "quality_vs_saved.png").is_file()
    assert f"report: {out}" in stdout


def test_lm_eval_decode_scoring_matches_prefill_under_native_routing(tiny_dir, tokenizer):
    """With native routing, decode-mode loglikelihoods equal lm-eval's own prefill ones
    (one-token contexts and one-token continuations included); with a policy they differ."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from lynx_moe.measure.lm_eval import LynxHFLM
    lm = LynxHFLM(pretrained=str(tiny_dir), decode_scoring="true", device="cpu", dtype="float32", batch_size=3)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    reqs = [((c, x), enc(c) or [tokenizer.eos_token_id], enc(x))
            for c, x in [("the quick brown fox", " jumps over"), ("a", " lazy dog while seven"),
                         ("winter light under pale", " rivers"), ("", " amber rivers under"),
                         ("seven wizards quietly", " hex the quick brown fox")]]
    ours = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    theirs = HFLM._loglikelihood_tokens(lm, reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    assert lynx.routing_stats(lm.model)[0].decode_rows > 0
    lynx.apply_(lm.model, lynx.AffinityBinning(alpha=1.0, beta=1))
    changed = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert any(abs(a - b) > 1e-4 for (a, _), (b, _) in zip(changed, ours))


def test_lm_eval_model_checks_the_policy_against_the_config_before_loading(tmp_path):
    pytest.importorskip("lm_eval")
    from lynx_moe.measure.lm_eval import LynxHFLM
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 64, "num_experts_per_tok": 8}))
    with pytest.raises(ValueError, match=r"StaticK\(k=9\) needs k <= the model's top_k=8"):
        LynxHFLM(pretrained=str(tmp_path), policy="static_k:k=9")   # no weights there: nothing was loaded


def test_a_calibration_is_cached_and_gates_bench_and_eval_by_default(tiny_dir, tmp_path, capsys, monkeypatch):
    """``lynx bench --calibrate`` writes the cache of this engine, model and machine; ``lynx
    bench`` and ``lynx eval`` then gate with it unless told ``--no-gate`` or ``--gate FILE``."""
    from lynx_moe.measure.gates import cache_path

    from .cli_helpers import run_cli as _cli
    monkeypatch.setenv("LYNX_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--model", str(tiny_dir), "--threads", "1", "--json-only"]
    bench = ["bench", *common, "--batch-sizes", "1,4", "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1",
             "--bandwidth-mib", "0"]
    code, stdout, _ = _cli(bench, capsys)
    assert code == 0 and json.loads(stdout)["gate"] is None                    # no calibration yet: ungated
    code, stdout, _ = _cli([*bench, "--calibrate", "--out", str(tmp_path / "cal")], capsys)
    cached = cache_path("hf", str(tiny_dir), 1)
    summary = json.loads(stdout)
    assert code == 0 and summary["calibration_files"] == [str(cached)] and cached.is_file()
    assert len(summary["fit"]) == 2 * 3 and (tmp_path / "cal" / "fit.png").stat().st_size > 0   # B 1, 4 x native, n=4, 8
    code, stdout, _ = _cli([*bench, "--policy", "oea:k0=1"], capsys)
    assert code == 0 and json.loads(stdout)["gate"] == str(cached)             # the cache gates by default
    code, stdout, _ = _cli([*bench, "--policy", "oea:k0=1", "--no-gate"], capsys)
    assert code == 0 and json.loads(stdout)["gate"] is None
    code, _, stderr = _cli([*bench, "--gate", str(cached), "--no-gate"], capsys)
    assert code == 2 and "not allowed with argument" in stderr
    evaluate = ["eval", *common, "--tasks", "none", "--ppl-rows", "1", "--ppl-tokens", "2", "--gen-prompts", "0",
                "--batch-size", "4"]
    code, stdout, _ = _cli(evaluate, capsys)
    assert code == 0 and json.loads(stdout)["config"]["gate"]["source"].startswith("hf ")
    code, stdout, _ = _cli([*evaluate, "--no-gate"], capsys)
    assert code == 0 and json.loads(stdout)["config"]["gate"] is None
    cached.write_text("{}")
    code, _, stderr = _cli(evaluate, capsys)
    assert code == 2 and f"{cached}: not a lynx cost-model file" in stderr


def test_frontier_sweeps_each_family_at_each_batch_size(tiny_dir, tmp_path, capsys):
    from .cli_helpers import run_cli as _cli
    out = tmp_path / "fr"
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"default": "per_layer(oea:k0=1;topk)"}))
    same = tmp_path / "same.json"                 # a tuned file equal to a peer's setting: listed under both
    same.write_text(json.dumps({"default": "oea:k0=2"}))
    code, stdout, _ = _cli(["frontier", "--model", str(tiny_dir), "--batch-sizes", "2,4", "--families", "oea,static_k",
                            "--policy-file", str(tuned), "--policy-file", str(same), "--ppl-per-domain", "1",
                            "--out", str(out), "--json-only"], capsys)
    assert code == 0
    rows = json.loads(stdout)["rows"]
    assert [r["policy"] for r in rows if r["family"] == "tuned"] == ["per_layer(oea:k0=1;topk)", "oea:k0=2"] * 2
    twice = [r for r in rows if r["batch"] == 4 and r["policy"] == "oea:k0=2"]
    assert [r["family"] for r in twice] == ["oea", "tuned"] and twice[0]["kl"] == twice[1]["kl"]
    K = 4   # the tiny model's top-k
    assert [(r["batch"], r["policy"]) for r in rows if r["family"] == "native"] == [(2, "native"), (4, "native")]
    assert [r["policy"] for r in rows if r["batch"] == 4 and r["family"] == "oea"] == [f"oea:k0={k}" for k in (3, 2, 1)]
    assert len([r for r in rows if r["family"] == "static_k"]) == 2 * (K - 1)
    oea = {r["policy"]: r for r in rows if r["batch"] == 4 and r["family"] == "oea"}
    assert oea["oea:k0=1"]["distinct"] <= oea["oea:k0=3"]["distinct"] <= rows[0]["distinct_native"] + 1e-9
    assert (out / "frontier.png").stat().st_size > 0 and (out / "frontier.json").is_file()
    code, _, stderr = _cli(["frontier", "--model", str(tiny_dir), "--families", "nope", "--out", str(out)], capsys)
    assert code == 2 and "--families: unknown ['nope']" in stderr
    tuned.write_text(json.dumps({"default": "per_layer(oea:k0=1;topk;topk)"}))
    code, _, stderr = _cli(["frontier", "--model", str(tiny_dir), "--policy-file", str(tuned), "--out", str(out)], capsys)
    assert code == 2 and f"--policy-file {tuned}" in stderr and "MoE layers" in stderr
