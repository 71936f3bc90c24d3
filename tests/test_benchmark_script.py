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
        "--threads", "1", "--bound", "--out", str(out),
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
    # generation against the machine's bounds (--bound): measured, positive, fractions of a bound
    b = data["bound"]
    assert b["bandwidth_gbs"] > 0 and b["matmul_gflops"] > 0 and b["rows"] == 2 * 4
    assert 0 < b["decode_steps"] <= 6 and b["tokens"] <= 8 * 6 and b["decode_s"] > 0
    assert b["fraction_of_bandwidth_bound"] > 0 and b["fraction_of_compute_bound"] > 0
    assert "memory-bandwidth bound" in text
    # one warm-up step (excluded) + one measured step per run
    for runs in data["runs"].values():
        assert [s["warmup"] for s in runs[0]["steps"]] == [True, False]


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generation_bounds_by_hand():
    """Two rows of a 10-parameter model: prompt 3 and response 2, prompt 1 and response 4."""
    from types import SimpleNamespace as G

    st = _load("step_time")
    gens = [G(prompt_ids=[1, 2, 3], response_ids=[4, 5]), G(prompt_ids=[1], response_ids=[4, 5, 6, 7])]
    b = st.generation_bounds(gens, seconds=3.0, prefill_s=1.0, n_params=10, weight_bytes=40,
                             kv_bytes_per_position=8, layers=2, attn_width=4, bandwidth_gbs=1e-9, gflops=1e-9)
    # positions read while decoding: row 1: 3 + 4 = 7; row 2: 1 + 2 + 3 + 4 = 10
    assert b["decode_steps"] == 4 and b["tokens"] == 6 and b["decode_s"] == 2.0
    assert b["kv_bytes_read"] == 17 * 8
    assert b["bandwidth_bound_s"] == 4 * 40 + 17 * 8  # bytes at 1 byte/s
    assert b["compute_bound_s"] == 6 * 2 * 10 + 4 * 2 * 4 * 17  # FLOPs at 1 FLOP/s
    assert b["fraction_of_bandwidth_bound"] == (4 * 40 + 17 * 8) / 2.0
    assert b["tokens_per_s"] == 3.0


def test_update_memory_script_tiny():
    """benchmarks/update_memory.py on the tiny model: every mode runs, and the shared-prefix, packed and
    checkpointed updates give the same gradient (the modes differ in memory, not in what they compute)."""
    um = _load("update_memory")
    rows = {r["mode"]: r for r in um.main(["--model", "tiny", "--seqs", "4", "--resp", "12", "--prompt", "6",
                                             "--top", "3"])}
    assert set(rows) == set(um.MODES)
    norms = [r["grad_norm"] for r in rows.values()]
    assert min(norms) > 0 and max(norms) - min(norms) < 1e-5 * max(norms)
    assert rows["default"]["prompt_rows"] == 2 and rows["packed"]["prompt_rows"] == 4
    assert rows["profile"]["top"] and all(t["mb"] > 0 for t in rows["profile"]["top"])


def test_a_dead_worker_is_reported_not_fatal():
    st = _load("step_time")
    line = st.worker_failure("worker trl failed (exit -9):\n", 612.4)
    assert line.startswith("worker trl failed (exit -9)") and "out-of-memory" in line and "612 s" in line
    line = st.worker_failure("worker grpo failed (exit 1):\nTraceback\n  x\nValueError: bad\n", 3)
    assert line.endswith("after 3 s; ValueError: bad") and "memory" not in line
