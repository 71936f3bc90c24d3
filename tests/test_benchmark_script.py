"""Smoke test of benchmarks/step_time.py: a tiny config, one measured step, grpo and dph, no TRL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


def test_step_time_script_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(SCRIPT), "--steps", "1", "--algorithms", "grpo,dph", "--no-trl",
        "--prompts", "2", "--rollouts", "4", "--max-new-tokens", "6", "--examples", "8",
        "--hidden", "32", "--layers", "1", "--intermediate", "64", "--micro-batch", "4",
        "--threads", "1", "--out", str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    text = p.stdout
    # the table and the dph reference-token line are printed
    assert "| algorithm | step s (median)" in text
    assert "| grpo |" in text and "| dph-js |" in text
    assert "reference tokens per step" in text
    assert "trl" not in text.split("| algorithm |")[1].split("time breakdown")[0]

    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["summary"]}
    assert set(rows) == {"grpo", "dph-js"}
    for r in rows.values():
        assert r["measured_steps"] == 1
        m = r["median"]
        assert m["step_s"] > 0 and m["rollout_s"] > 0 and m["update_s"] > 0
        assert abs(m["rollout_s"] + m["update_s"] - m["step_s"]) < 1e-6
        assert m["rollout_seqs"] == 2 * 4
        assert r["tokens_per_s"] > 0
        assert r["peak_rss_mb"] > 0
    assert rows["grpo"]["median"]["ref_tokens"] == 0
    assert rows["dph-js"]["median"]["ref_tokens"] > 0  # dph trains on stored reference samples too
    assert data["store"]["d_pef"] >= 1
    # one warm-up step (excluded) + one measured step per run
    for runs in data["runs"].values():
        assert [s["warmup"] for s in runs[0]["steps"]] == [True, False]
