"""``lynx profile`` and ``lynx bench``: argument errors and tiny end-to-end runs (seconds).

Models are tiny random OLMoE models (64 experts top-8) saved to a temporary folder; the
held-out text is a few generated JSONL lines. Nothing is downloaded and nothing is timed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .cli_helpers import run_cli as _cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from lynx_moe.measure.models import tiny_model
    path = tmp_path_factory.mktemp("tiny_olmoe")
    tiny_model("olmoe", dtype=torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    lines = [{"domain": d, "text": " ".join(words[(i * 7 + j) % len(words)] for j in range(120))}
             for i, d in enumerate(["prose", "code", "verse"] * 2)]
    path.write_text("\n".join(json.dumps(rec) for rec in lines) + "\n")
    return path


@pytest.mark.parametrize("command", ["profile", "bench"])
def test_bad_model_path(command, tmp_path, capsys):
    code, _, err = _cli([command, "--model", str(tmp_path / "missing")], capsys)
    assert code == 2
    assert "not a model folder" in err and "missing" in err


@pytest.mark.parametrize("command", ["profile", "bench"])
@pytest.mark.parametrize("spec", ["no_such_policy", "affinity_binning:alpha=-1", "oea:k0"])
def test_bad_policy_spec(command, spec, capsys):
    code, _, err = _cli([command, "--policy", spec], capsys)
    assert code == 2
    assert "--policy" in err


@pytest.mark.parametrize("command", ["profile", "bench"])
@pytest.mark.parametrize("sizes", ["0", "1,0,8", "-4", "x"])
def test_bad_batch_sizes(command, sizes, capsys):
    code, _, err = _cli([command, "--batch-sizes", sizes], capsys)
    assert code == 2
    assert "--batch-sizes" in err


def test_bench_bad_shape_and_counts(capsys):
    code, _, err = _cli(["bench", "--shape", "gpt-9"], capsys)
    assert code == 2 and "unknown shape" in err
    code, _, err = _cli(["bench", "--shape", "olmoe-tiny", "--new-tokens", "0"], capsys)
    assert code == 2 and "--new-tokens" in err


def test_profile_end_to_end(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "prof"
    code, stdout, _ = _cli(["profile", "--model", str(tiny_dir), "--data", str(data_file), "--steps", "3",
                            "--prompt-len", "4", "--batch-sizes", "1,2,6", "--out", str(out)], capsys)
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["num_experts"] == 64 and summary["top_k"] == 8 and summary["rows"] == 6
    assert summary["distinct_mean"]["1"] == 8.0        # one row: exactly its top-8
    assert 8 <= summary["distinct_mean"]["6"] <= 48
    stats = json.loads((out / "profile.json").read_text())
    layer = stats["layers"][0]
    assert layer["batch"]["2"]["groups"] == 3
    assert len(layer["same_bin_by_rank"]) == 8 and layer["same_bin_by_rank"][0] == 1.0
    assert abs(sum(layer["expert_share"]) - 1) < 1e-3
    assert "affinity_binning:alpha=3.0,beta=4" in layer["batch"]["6"]["policy_distinct"]
    assert (out / "distinct_experts.png").stat().st_size > 0 and (out / "expert_load.png").stat().st_size > 0


def _bench_rows(stdout: str) -> tuple[dict, list[dict]]:
    summary = json.loads(stdout.strip().splitlines()[-1])
    return summary, summary["results"]


def test_bench_model_end_to_end(tiny_dir, data_file, capsys):
    code, stdout, _ = _cli(["bench", "--model", str(tiny_dir), "--data", str(data_file), "--batch-sizes", "1,4",
                            "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1", "--policy", "oea:k0=1",
                            "--bandwidth-mib", "8", "--json-only"], capsys)
    assert code == 0
    assert len(stdout.strip().splitlines()) == 1       # --json-only: the JSON line alone
    summary, rows = _bench_rows(stdout)
    assert [(r["batch"], r["policy"]) for r in rows] == [(1, "native"), (1, "oea:k0=1"), (4, "native"), (4, "oea:k0=1")]
    native4, oea4 = rows[2], rows[3]
    assert native4["speedup"] == 1.0 and oea4["distinct_mean"] <= native4["distinct_mean"]
    assert oea4["expert_mb_per_step"] <= native4["expert_mb_per_step"]
    assert native4["bound_speedup"] == 1.0 and oea4["bound_speedup"] >= 1.0
    assert all(r["ms_min"] <= r["ms_per_step"] <= r["ms_max"] and r["bound_ms"] > 0 for r in rows)
    assert all(0 < r["experts_ms_per_step"] <= r["ms_max"] for r in rows)
    assert summary["bandwidth_gbps"] > 0


def test_bench_shape_replays_recorded_logits(tiny_dir, data_file, capsys):
    code, stdout, _ = _cli(["bench", "--shape", "olmoe-tiny", "--layers", "3", "--replay-from", str(tiny_dir),
                            "--data", str(data_file), "--batch-sizes", "4", "--new-tokens", "2", "--prompt-len", "4",
                            "--repeats", "1", "--bandwidth-mib", "0"], capsys)
    assert code == 0
    summary, rows = _bench_rows(stdout)
    assert summary["shape"] == "olmoe-tiny" and summary["router"] == "replay" and summary["bandwidth_gbps"] is None
    native = rows[0]["distinct_per_layer"]
    assert len(native) == 3 and native[2] == native[0]  # 2 recorded layers, cycled over a 3-layer stack
    assert rows[1]["policy"].startswith("affinity_binning")  # default: the authors' preset for 64 x 8


def test_logit_replay_feeds_recorded_logits():
    from lynx_moe.integrations.hf import moe_layers
    from lynx_moe.measure.shapes import SHAPES, LogitReplay, build_stack
    stack = build_stack(SHAPES["olmoe-tiny"], layers=2)
    rec = torch.randn(1, 3, 5, 64).to(torch.bfloat16).float()     # [L_ref, steps, rows, E]
    replay = LogitReplay(stack, rec)
    seen = []
    handle = moe_layers(stack)[1].router.register_forward_hook(lambda m, a, o: seen.append(o[0].float()))
    replay.step = 4                                                  # cycles to recorded step 1
    with torch.inference_mode():
        stack(input_ids=torch.randint(1, 100, (5, 1)))
    handle.remove()
    assert torch.equal(seen[0], rec[0, 1])


def test_step_bytes_match_shape():
    from lynx_moe.measure.shapes import SHAPES, build_stack
    from lynx_moe.measure.speed import StepBytes
    shape = SHAPES["olmoe-tiny"]
    sb = StepBytes.of(build_stack(shape, layers=2))
    assert sb.expert == [shape.expert_bytes()] * 2
    assert sb.experts_read([10, 20]) == 30 * shape.expert_bytes()
    assert sb.kv_per_token == 2 * 2 * shape.kv_heads * shape.head_dim * 2


def test_bench_replay_needs_same_routing_shape(data_file, tmp_path, capsys):
    from lynx_moe.measure.models import tiny_model
    tiny_model("mixtral", dtype=torch.bfloat16).save_pretrained(tmp_path)     # 8 experts top-2
    code, _, err = _cli(["bench", "--shape", "olmoe-tiny", "--replay-from", str(tmp_path), "--data", str(data_file)],
                        capsys)
    assert code == 2 and "--router random" in err
