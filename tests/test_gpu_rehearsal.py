"""benchmarks/gpu_rehearsal.py --smoke: the H200 rehearsal's code end to end on CPU with tiny-mistral
(throughput rows from interleaved rounds with the per-document probe, the three-arm miniature with its
bits/char curve), inside its time budget, with a JSON report and markdown rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_runs_the_rehearsal_within_its_budget(tmp_path):
    subprocess.run([sys.executable, "benchmarks/gpu_rehearsal.py", "--smoke", "--output_dir", str(tmp_path)],
                   cwd=REPO_ROOT, check=True, timeout=300, capture_output=True,
                   env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads((tmp_path / "gpu_rehearsal.json").read_text())
    rows = report["throughput"]["rows"]
    assert {(r["loss"], r["gradient_checkpointing"]) for r in rows} == {
        ("plain", False), ("plain", True), ("chunked", False), ("chunked", True)}
    # every option ran its warm-up round; a timed round either ran or the budget cut it, on the record
    assert all(r["per_document_attention"] is True for r in rows)  # read from what sdpa received
    for row in rows:
        assert (row["steps_timed"] >= 1 and row["tokens_per_second"] > 0) or "trimmed" in report["throughput"]["notes"]
    arms = {arm["arm"]: arm for arm in report["ablation"]["arms"]}
    assert set(arms) == {"base", "continued", "extended"}
    for name in ("continued", "extended"):
        arm = arms[name]
        assert len(arm["curve"]) == 1 + (arm["steps_run"] >= 1) + arm["steps_run"] // 10 - (
            arm["steps_run"] >= 1 and arm["steps_run"] % 10 == 0)  # at 0, every 10 steps, at the end
        assert arm["trimmed"] == (arm["steps_run"] < arm["steps_planned"])  # a cut run says so
    assert arms["extended"]["vocabulary"] > arms["continued"]["vocabulary"]
    budget = report["arguments"]["time_budget_seconds"]
    assert report["seconds"] < budget * 1.15  # the last evaluation may finish after the deadline
    assert "| sdpa | chunked | on |" in (tmp_path / "gpu_rehearsal.md").read_text()
