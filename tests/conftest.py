"""Every test run gets its own calibration cache (``lynx_moe.measure.gates``), so a calibration
written by one test (or by a user of this machine) never gates another. ``olmoe_dir``: a tiny
model folder with held-out text, for the once-per-model calibration commands."""

from __future__ import annotations

import json
import os
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_calibration_cache():
    with tempfile.TemporaryDirectory(prefix="lynx-cache-") as d:
        before = os.environ.get("LYNX_CACHE_DIR")
        os.environ["LYNX_CACHE_DIR"] = d   # also seen by the CLI's child processes
        yield d
        if before is None:
            os.environ.pop("LYNX_CACHE_DIR", None)
        else:
            os.environ["LYNX_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory):
    """A tiny OLMoE (64 experts, top-8, 2 MoE layers) saved as a model folder, with held-out text."""
    from lynx_moe.measure import models
    d = tmp_path_factory.mktemp("tiny-olmoe")
    models.tiny_model("olmoe").save_pretrained(d)
    text = "The fox ran over the hill and the dog slept under the old oak tree by the river. " * 6
    with open(d / "heldout.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"{i} {text}", "domain": "a" if i % 2 else "b"}) + "\n")
    return d
