"""benchmarks/gpu_check.py on the CPU (``--tiny``): the device run's code, every part, one JSON.

One subprocess runs the whole check on a tiny Qwen2 in bf16 (the GPU's dtype) with one part made to
fail on purpose: the JSON must hold every part, the failure recorded with its error, the other parts'
numbers finite and positive. An exhausted budget skips every part with its reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_records_every_part_and_a_deliberate_failure(tmp_path):
    gc = _module()
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--dtype", "bfloat16", "--peak-tflops", "1",
           "--threads", "1", "--fail-part", "step_grpo", "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    data = json.loads(out.read_text())
    assert set(data) == {"schema", "created", "wall_s", "args", "env", "model", "workload", "budget", "parts",
                         "summary", "out"}
    assert data["schema"] == gc.SCHEMA and data["wall_s"] < 60  # the tiny mode's promise (imports excluded)
    assert data["env"]["dtype"] == "bfloat16" and data["env"]["peak_flops"]["tflops"] == 1.0
    assert data["model"]["n_params"] > 0 and data["model"]["shape"]["num_key_value_heads"] == 2
    parts = data["parts"]
    assert list(parts) == list(gc.PARTS)

    # the failing part is recorded with its error; the parts before and after it are all there
    failed = parts["step_grpo"]
    assert failed["status"] == "error" and "deliberate failure" in failed["error"] and failed["traceback"]
    has_trl = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    for name in gc.PARTS:
        if name == "step_grpo":
            continue
        rec = parts[name]
        if name == "step_trl" and not has_trl:
            assert rec["status"] == "skipped" and "TRL not importable" in rec["reason"]
            continue
        assert rec["status"] == "ok", (name, rec.get("error"), rec.get("traceback"))
        assert rec["seconds"] > 0 and rec["limit_s"] > 0

    # every number in the JSON is finite; the headline numbers are positive
    assert gc.all_finite(data)
    s = data["summary"]
    missing = {k for k, v in s.items() if v is None}
    grpo_keys = {"step_s_grpo", "update_s_grpo", "rollout_s_grpo", "grpo_vs_trl_step", "grpo_vs_trl_update",
                 "dph_vs_grpo_step", "peak_mem_mb_step_grpo"}
    trl_keys = {"step_s_trl", "update_s_trl", "rollout_s_trl", "peak_mem_mb_step_trl"}
    assert missing == grpo_keys | (set() if has_trl else trl_keys)
    for k, v in s.items():
        if v is not None and not isinstance(v, bool):
            assert math.isfinite(v) and v > 0, (k, v)
    assert s["store_within_bf16_tolerance"] is True

    gen = parts["generation"]["result"]
    assert set(gen["configs"]) == {"shared", "unshared"} and gen["dtype"] == "bfloat16"
    w = data["workload"]
    for c in gen["configs"].values():  # a random model over its whole vocabulary never samples EOS
        assert c["generated_tokens"] == w["prompts"] * w["rollouts"] * w["max_new_tokens"]
    upd = parts["update"]["result"]
    assert upd["n_params"] == data["model"]["n_params"] and upd["dtype"] == "bfloat16"
    assert upd["mfu"] == upd["achieved_tflops"] / 1.0
    assert upd["tokens_forwarded"] > upd["response_tokens"] > 0
    store = parts["store_check"]["result"]
    assert store["store_dtype"] == store["train_dtype"] == "bfloat16" and store["tokens"] > 0
    # bf16 presample vs bf16 autocast: not bit-equal
    assert store["max_abs_dlogp"] >= store["mean_abs_dlogp"] > 0
    dph = parts["step_dph"]["result"]
    assert dph["built_with"]["dphrl_dtype"] == ["bfloat16"] and dph["store"]["stored_samples"] > 0
    assert dph["summary"]["median"]["ref_tokens"] > 0
    if has_trl:
        assert parts["step_trl"]["result"]["built_with"]["trl_bf16"] == [True]
    assert "part         status" in p.stdout and "wrote" in p.stdout


def test_exhausted_budget_skips_every_part_with_a_reason(tmp_path, monkeypatch):
    gc = _module()
    out = tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT", raising=False)
    assert gc.main(["--tiny", "--budget-s", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["parts"]) == list(gc.PARTS)
    for rec in data["parts"].values():
        assert rec["status"] == "skipped" and rec["reason"].startswith("budget:")
    assert all(v is None for v in data["summary"].values())


def test_a_part_past_its_time_is_stopped_and_the_next_still_runs(tmp_path, monkeypatch):
    gc = _module()
    out = tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setitem(gc.RUNNERS, "generation", lambda ck: time.sleep(60))  # would outlive the budget
    monkeypatch.setitem(gc.RUNNERS, "update", lambda ck: {"ran": True})
    t = time.perf_counter()
    assert gc.main(["--tiny", "--budget-s", "3", "--parts", "generation,update", "--out", str(out)]) == 0
    assert time.perf_counter() - t < 30
    parts = json.loads(out.read_text())["parts"]
    assert parts["generation"]["status"] == "timeout" and "budget" in parts["generation"]["error"]
    assert parts["generation"]["seconds"] < 3  # stopped at its share: the budget less the next part's minimum
    assert parts["update"] == {**parts["update"], "status": "ok", "result": {"ran": True}}


def test_peak_table_and_default_out(monkeypatch):
    gc = _module()
    assert gc.peak_flops("NVIDIA H100 80GB HBM3", None)["row"] == "H100 SXM"
    assert gc.peak_flops("NVIDIA H100 PCIe", None)["tflops"] == 756.0
    assert gc.peak_flops("NVIDIA H200", None)["tflops"] == 989.0
    assert gc.peak_flops("NVIDIA A100-SXM4-80GB", None)["tflops"] == 312.0
    unknown = gc.peak_flops("NVIDIA L4", None)
    assert unknown["tflops"] is None and "--peak-tflops" in unknown["reason"]
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert gc.default_out() == "/tmp/device-out/gpu_check.json"
    assert len(gc.char_vocab(512)) == 512 - 6
