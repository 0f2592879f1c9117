"""scripts/benchmark.py end to end on the embedded digits: every family and path, and a cost it must find."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from benchmark import FAMILIES  # noqa: E402


def test_benchmark_measures_every_family_and_finds_a_known_per_step_cost(tmp_path):
    """50 ms of sleep after each autoenc step must show as autoenc overhead, and not in the Lightning floor,
    which runs without it (a margin of 10 ms per step for a busy machine's preemptions over 6 steps)."""
    out = tmp_path / "bench.json"
    delay = ["+callbacks.delay._target_=helpers.Delay", "+callbacks.delay.seconds=0.05"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--data", "digits",
                           "--steps", "6", "--warmup", "2", "--block", "3", "--out", str(out), "--override",
                           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *delay],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["families"]) == set(FAMILIES)
    assert result["env"]["batch_size"] == 128 and result["env"]["steps"] == 6 and result["env"]["threads"] == 1
    for family, row in result["families"].items():
        assert row["steps"] == 6 and row["peak_rss_mb"] > 0, family
        assert row["autoenc"]["overhead_us"] >= 40_000 > row["floor"]["overhead_us"] + 10_000, family
        assert row["autoenc"]["ratio"] < row["floor"]["ratio"], family
        assert row["autoenc"]["startup_s"] > 0 and row["plain"]["startup_s"] > 0
        assert f"{family} " in proc.stdout  # one printed line per family
    assert 0 < result["process_to_first_step_s"] < 600
