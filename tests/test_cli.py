"""The command line, in process (``dphrl.cli.main``): the config reference, config errors with the key
and file:line (exit 2), and ``train --dry-run`` on a paper recipe."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dphrl.cli import main
from dphrl.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_config_prints_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in out, f.name


def test_unknown_key_exits_2_with_key_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m-instruct\nalgorithm: grpo\nlearning_rate: 1e-5\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and f"{bad}:3" in err
    assert "config error" in err


def test_bad_value_and_bad_override_exit_2(tmp_path, capsys):
    ok = tmp_path / "ok.yaml"
    ok.write_text("model: smollm2-135m-instruct\nalgorithm: grpo\nrollout_n: 1\n")
    assert main(["train", "--dry-run", "--config", str(ok)]) == 2
    assert "rollout_n" in capsys.readouterr().err
    recipe = "recipes/bird_llama31_8b_grpo.yaml"
    assert main(["train", "--dry-run", "--config", recipe, "lr=abc"]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--config", recipe, "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_train_dry_run_prints_the_plan(capsys):
    rc = main(["train", "--dry-run", "--config", "recipes/bird_llama31_8b_dph_js.yaml"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "dphrl dry run: algorithm dph, model meta-llama/Llama-3.1-8B-Instruct" in out
    assert "divergence: js" in out and "eta: 0.2" in out  # the resolved config
    assert "rollouts/step: 128 x 16 = 2048 sequences" in out
    assert (
        "micro-batch(es)" in out and "max sequence length: 4096 prompt + 1024 response = 5120 tokens" in out
    )
    assert "optimizer updates: 150 steps x 4 = 600" in out
    assert "memory per device (ESTIMATE)" in out and "FSDP/ZeRO-3 x 8" in out
    assert "reference_store: runs/bird_llama31_8b/ref_store" in out
    assert out.rstrip().endswith(("dry run OK", "dry run OK (with warnings)"))


def test_train_dry_run_with_overrides(capsys):
    rc = main(["train", "--dry-run", "--config", "recipes/cpu_smollm2_arith_grpo.yaml", "lr=1e-5",
               "dataset.limit=4", "max_steps=3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "lr: 1.0e-05" in out and "max_steps: 3" in out
    assert "built 4 example(s)" in out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "dphrl.cli", "config"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "| `reference_store` |" in proc.stdout
