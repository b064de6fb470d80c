"""Bad input to the ``lynx`` commands is refused up front: exit 2, one line, no traceback, and
no model work first (each case here returns in well under a second of work)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .cli_helpers import run_cli

pytest.importorskip("transformers")


@pytest.fixture
def under_a_file(tmp_path) -> Path:
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "report"


def _refused(argv: list[str], capsys) -> str:
    t = time.monotonic()
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    assert time.monotonic() - t < 30
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lynx {argv[0]}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["demo", "eval", "bench", "profile"])
def test_unwritable_out_is_refused_before_any_work(command, under_a_file, capsys):
    line = _refused([command, "--out", str(under_a_file)], capsys)
    assert f"--out {under_a_file}: cannot write there" in line
    assert not under_a_file.exists()


def test_serve_refuses_a_missing_model_folder(tmp_path, capsys):
    line = _refused(["serve", str(tmp_path / "no-such-model"), "--policy", "topk"], capsys)
    assert "no such model folder" in line
    line = _refused(["serve", str(tmp_path), "--policy", "topk"], capsys)
    assert "not a model folder (no config.json there)" in line


def test_serve_checks_the_policy_against_the_models_top_k(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 64, "num_experts_per_tok": 8}))
    line = _refused(["serve", str(tmp_path), "--policy", "static_k:k=99"], capsys)
    assert "StaticK(k=99) needs k <= the model's top_k=8" in line


def test_serve_checks_policy_variables_from_the_environment(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 64, "num_experts_per_tok": 8}))
    monkeypatch.setenv("LYNX_POLICY_FILE", str(tmp_path / "missing.json"))
    line = _refused(["serve", str(tmp_path), "--policy", "topk"], capsys)
    assert "LYNX_POLICY_FILE" in line and "missing.json" in line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {str(tmp_path): "static_k:k=12"}}))
    monkeypatch.setenv("LYNX_POLICY_FILE", str(bad))
    line = _refused(["serve", str(tmp_path), "--policy-file", str(bad)], capsys)
    assert "StaticK(k=12) needs k <= the model's top_k=8" in line


def test_a_negative_batch_size_is_named_not_taken_for_an_option(capsys):
    code, _, err = run_cli(["bench", "--batch-sizes", "-1,8"], capsys)   # argparse: usage, then the error
    assert code == 2 and err.strip().splitlines()[-1] == (
        "lynx bench: error: argument --batch-sizes: expected positive integers (>= 1), got '-1,8'")


def test_serve_names_a_local_folder_by_its_name():
    import lynx_moe
    from lynx_moe.cli.serve import _model
    ref = lynx_moe.reference_model_path()
    rest = [str(ref), "--port", "8000"]
    assert _model(rest) == str(ref) and rest == ["--port", "8000", "--served-model-name", "lynx-ref-moe"]
    rest = ["--served-model-name", "mine"]
    assert _model(rest) == str(ref) and rest == ["--served-model-name", "mine"]
    rest = ["org/some-model"]
    assert _model(rest) == "org/some-model" and rest == []     # a Hugging Face id goes to vLLM as is
