"""Every test run gets its own calibration cache (``lynx_moe.measure.gates``), so a calibration
written by one test (or by a user of this machine) never gates another."""

from __future__ import annotations

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
