"""Paired intervals between two lm-eval runs, read from their --log_samples files."""
from __future__ import annotations

import json
import math

import pytest

from lynx_moe.cli import main
from lynx_moe.measure.lm_eval_compare import compare, load_samples


def _write_run(folder, shift: float, acc: list[int], n_docs: int = 6):
    """An lm-eval --output_path folder: a loglikelihood task (acc + perplexity), a rolling
    perplexity task (word_perplexity [ll, words] pairs) and an older file that must be ignored."""
    sub = folder / "models__m"
    sub.mkdir(parents=True)
    ll = [{"doc_id": i, "filter": "none", "metrics": ["perplexity", "acc"], "acc": acc[i],
           "perplexity": -2.0 - i / 10 - shift} for i in range(n_docs)]
    rolling = [{"doc_id": i, "filter": "none", "metrics": ["word_perplexity", "bits_per_byte"],
                "word_perplexity": [-(10.0 + i) - 5 * shift, 5], "bits_per_byte": [-(10.0 + i), 40]}
               for i in range(n_docs)]
    for name, rows in (("words", ll), ("ppl", rolling)):
        (sub / f"samples_{name}_2026-12-02T10-00-00.000001.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    (sub / "samples_words_2026-01-01T00-00-00.000001.jsonl").write_text(json.dumps(ll[0] | {"doc_id": 99}) + "\n")
    return folder


def test_compare_pairs_items_and_scales_each_metric(tmp_path):
    native = load_samples(_write_run(tmp_path / "native", 0.0, [1, 1, 0, 1, 0, 0]))
    policy = load_samples(_write_run(tmp_path / "policy", math.log(1.1), [1, 0, 0, 1, 0, 0]))
    out = compare(native, policy, resamples=200)
    acc, ppl, word = out["words"]["acc,none"], out["words"]["perplexity,none"], out["ppl"]["word_perplexity,none"]
    assert (acc["kind"], acc["items"], acc["native"], acc["policy"]) == ("mean", 6, 0.5, pytest.approx(1 / 3))
    assert acc["change"].value == pytest.approx(-1 / 6) and acc["change"].lo < 0 <= acc["change"].hi
    # every item's log-likelihood drops by log(1.1) nats per answer / per word: +10 % exactly, a zero-width interval
    for row in (ppl, word):
        assert row["kind"] == "perplexity"
        assert row["policy"] == pytest.approx(row["native"] * 1.1)
        assert row["change"].lo == pytest.approx(0.1) and row["change"].hi == pytest.approx(0.1)
    assert "bits_per_byte,none" not in out["ppl"]          # the same information as byte_perplexity
    assert compare(native, native)["words"]["acc,none"]["change"] == (0.0, 0.0, 0.0)


def test_compare_refuses_runs_on_different_items(tmp_path):
    native = load_samples(_write_run(tmp_path / "a", 0.0, [1] * 6))
    policy = load_samples(_write_run(tmp_path / "b", 0.0, [1] * 5, n_docs=5))
    with pytest.raises(ValueError, match="same --limit"):
        compare(native, policy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--log_samples"):
        load_samples(tmp_path / "empty")


def test_cli_prints_table_and_one_json_line(tmp_path, capsys):
    a = _write_run(tmp_path / "native", 0.0, [1, 1, 0, 1, 0, 0])
    b = _write_run(tmp_path / "policy", math.log(1.1), [1, 0, 0, 1, 0, 0])
    assert main(["lm-eval-compare", str(a), str(b), "--resamples", "100"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("word_perplexity" in line and "+10.00 %" in line for line in lines)
    summary = json.loads(lines[-1])
    assert summary["runs"][str(b)]["words"]["acc,none"]["change"]["value"] == pytest.approx(-1 / 6, abs=1e-4)
    assert main(["lm-eval-compare", str(a)]) == 2
