"""A load and fault run against an OpenAI-compatible server (``lynx serve``): nothing lost.

    report = load_run("http://127.0.0.1:8000", "lynx-ref-moe", requests=200, concurrency=32)

``requests`` requests from ``concurrency`` client threads, a fixed mix decided by a seeded
generator: completions and chat, streaming and not (valid, greedy, ``ignore_eos``, 4-16 new
tokens, some opted out of lynx with ``vllm_xargs {"lynx": "off"}``), clients that hang up
after the first streamed chunk, and requests that must be refused with a 400: a prompt over
``max_model_len``, an invalid sampling value, ``vllm_xargs {"lynx": "bogus"}``.

A valid request passes when it gets a complete answer: status 200, exactly ``max_tokens``
tokens (from ``usage``; streams ask for it with ``include_usage``), a finish reason, and for
streams the ``[DONE]`` line. A refused one passes on a 400 whose body names the problem.
Before the load, every distinct valid request that is compared is sent once, alone: under
load its answer must equal that unloaded answer. ``compare="all"`` is for a server that
routes natively (``--policy topk``); ``compare="opted_out"`` checks only the requests that
opted out, which must be batch-invariant under any policy; ``None`` compares nothing. After the load the server must
still answer ``/health`` and a request.

The report: counts per kind, failures (each with its reason), mismatches, and latency
percentiles (ms) of the valid requests.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["Request", "plan", "load_run"]

WORDS = ("the quick brown fox jumps over the lazy dog and then some old man reads a small book "
         "about green hills tall trees red roofs and long rivers").split()


@dataclass(frozen=True)
class Request:
    """One planned request: ``kind`` says what must happen to it."""

    index: int
    kind: str            # valid | hangup | too_long | bad_sampling | bad_xargs
    chat: bool
    stream: bool
    body: dict = field(hash=False)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def key(self) -> str:
        """Same key: same answer expected (the request without its stream settings)."""
        body = {k: v for k, v in self.body.items() if k not in ("stream", "stream_options")}
        return json.dumps([self.chat, body], sort_keys=True)


def plan(model: str, requests: int, max_model_len: int, seed: int = 0, distinct_prompts: int = 24) -> list[Request]:
    """The mix: about 70 % valid, 10 % hang-ups, 20 % that must be refused."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))) for _ in range(distinct_prompts)]
    out = []
    for i in range(requests):
        u = rng.random()
        kind = ("valid" if u < 0.7 else "hangup" if u < 0.8 else "too_long" if u < 0.87
                else "bad_sampling" if u < 0.94 else "bad_xargs")
        chat, stream = rng.random() < 0.4, kind == "hangup" or rng.random() < 0.5
        prompt = prompts[rng.randrange(distinct_prompts)]
        if kind == "too_long":
            prompt = " ".join(rng.choice(WORDS) for _ in range(2 * max_model_len))
        body: dict = {"model": model, "max_tokens": rng.choice((4, 8, 16)), "temperature": 0, "ignore_eos": True}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if kind == "bad_sampling":
            body["temperature"] = -1.0
        if kind == "bad_xargs":
            body["vllm_xargs"] = {"lynx": "bogus"}
        elif kind == "valid" and rng.random() < 0.25:
            body["vllm_xargs"] = {"lynx": "off"}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        out.append(Request(i, kind, chat, stream, body))
    return out


def _send(base: urllib.parse.SplitResult, req: Request, timeout: float) -> dict:
    """Send one request; returns {ok, reason, text, ms}."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=timeout)
    try:
        conn.request("POST", req.path, json.dumps(req.body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if req.kind in ("too_long", "bad_sampling", "bad_xargs"):
            body = resp.read().decode(errors="replace")
            expect = {"too_long": "max", "bad_sampling": "temperature", "bad_xargs": "'on', 'off'"}[req.kind]
            ok = resp.status == 400 and expect in body
            return {"ok": ok, "reason": None if ok else f"HTTP {resp.status}: {body[:300]}"}
        if resp.status != 200:
            return {"ok": False, "reason": f"HTTP {resp.status}: {resp.read()[:300]!r}"}
        if req.kind == "hangup":   # read the first event, then drop the connection
            resp.readline()
            return {"ok": True, "reason": None}
        if req.stream:
            text, usage, finish, done = [], None, None, False
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for c in event.get("choices", []):
                    text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
                    finish = c.get("finish_reason") or finish
            text, tokens = "".join(text), (usage or {}).get("completion_tokens")
        else:
            event = json.loads(resp.read())
            c = event["choices"][0]
            text = c["message"]["content"] if req.chat else c["text"]
            tokens, finish, done = event["usage"]["completion_tokens"], c.get("finish_reason"), True
        complete = done and finish is not None and tokens == req.body["max_tokens"]
        return {"ok": complete, "text": text, "ms": 1000 * (time.perf_counter() - t0),
                "reason": None if complete else f"incomplete: tokens {tokens}/{req.body['max_tokens']}, "
                                                f"finish {finish}, done {done}"}
    except (OSError, http.client.HTTPException, json.JSONDecodeError, KeyError) as e:
        return {"ok": False, "reason": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def _health(base: urllib.parse.SplitResult) -> bool:
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _percentiles(ms: list[float]) -> dict:
    if not ms:
        return {}
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"p50": round(q[49], 1), "p90": round(q[89], 1), "p99": round(q[98], 1), "max": round(max(ms), 1)}


def load_run(url: str, model: str, requests: int = 200, concurrency: int = 32, *, max_model_len: int = 256,
             compare: str | None = "all", seed: int = 0, timeout: float = 300) -> dict:
    """Run the mix (see the module docstring); returns the report."""
    if compare not in ("all", "opted_out", None):
        raise ValueError(f"compare must be 'all', 'opted_out' or None, got {compare!r}")
    base = urllib.parse.urlsplit(url)
    reqs = plan(model, requests, max_model_len, seed)

    def compared(r: Request) -> bool:
        return r.kind == "valid" and (compare == "all" or (compare == "opted_out" and "vllm_xargs" in r.body))
    reference: dict[str, str | None] = {}
    for r in reqs:
        if compared(r) and r.key() not in reference:
            alone = _send(base, Request(r.index, "valid", r.chat, False,
                                        {k: v for k, v in r.body.items() if k not in ("stream", "stream_options")}),
                          timeout)
            reference[r.key()] = alone.get("text") if alone["ok"] else None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: _send(base, r, timeout), reqs))
    wall = time.perf_counter() - t0
    failures, mismatches = [], []
    for r, res in zip(reqs, results):
        if not res["ok"]:
            failures.append({"index": r.index, "kind": r.kind, "chat": r.chat, "stream": r.stream, "reason": res["reason"]})
        elif compared(r) and res["text"] != reference.get(r.key()):
            mismatches.append({"index": r.index, "chat": r.chat, "stream": r.stream,
                               "alone": reference.get(r.key()), "under_load": res["text"]})
    after = _health(base) and _send(base, Request(-1, "valid", False, False, {
        "model": model, "prompt": "the fox", "max_tokens": 4, "temperature": 0, "ignore_eos": True}), timeout)["ok"]
    kinds: dict[str, int] = {}
    for r in reqs:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    valid_ms = [res["ms"] for r, res in zip(reqs, results) if r.kind == "valid" and res["ok"]]
    return {"requests": requests, "concurrency": concurrency, "kinds": kinds, "wall_s": round(wall, 1),
            "streams": sum(r.stream for r in reqs), "chats": sum(r.chat for r in reqs),
            "opted_out": sum("vllm_xargs" in r.body and r.kind == "valid" for r in reqs),
            "compared": compare, "compared_requests": sum(map(compared, reqs)), "distinct_compared": len(reference),
            "failures": failures, "mismatches": mismatches, "server_up_after": after,
            "latency_ms": _percentiles(valid_ms)}
