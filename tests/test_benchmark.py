"""scripts/benchmark.py end to end on the embedded digits: every family, both paths, a consistent ratio."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_json_has_every_family_with_both_paths_and_their_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--data", "digits",
                           "--steps", "4", "--warmup", "2", "--block", "2", "--out", str(out),
                           "--override", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import FAMILIES

    assert set(result["families"]) == set(FAMILIES)
    assert result["env"]["batch_size"] == 128 and result["env"]["steps"] == 4
    for family, row in result["families"].items():
        assert row["steps"] == 4 and row["peak_rss_mb"] > 0, family
        for path in ("autoenc", "plain"):
            assert row[path]["samples_per_s"] > 0 and row[path]["startup_s"] > 0, (family, path)
        assert row["ratio"] == row["autoenc"]["samples_per_s"] / row["plain"]["samples_per_s"]
        assert family in proc.stdout  # one printed line per family
    assert 0 < result["process_to_first_step_s"] < 600
