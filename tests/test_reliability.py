"""Nothing lost, nothing accepted silently: real ``dphrl train`` processes killed at the worst moments
resume to bit-identical weights; SIGTERM checkpoints and exits cleanly; runs are never clobbered;
resume with changed values applies or refuses them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_cfg, toy_examples
from safetensors.torch import load_file

from dphrl.config import ConfigError
from dphrl.rundir import RunDirError, StopSignals, claim_dir
from dphrl.trainer import CHECKPOINT_MARKER, Trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_kill_worker.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny styles-task model on disk, a config for it, and an uninterrupted reference run."""
    from dphrl.data.tokenizer import build_char_tokenizer
    from dphrl.sft import save_model
    from dphrl.tasks import styles
    from dphrl.testing import tiny_causal_lm

    d = tmp_path_factory.mktemp("rel")
    tok = build_char_tokenizer(styles.CHARS)
    save_model(tiny_causal_lm(tok, hidden=32, layers=2, heads=4, max_positions=64, seed=3), tok, d / "model")
    cfg = {
        "model": str(d / "model"),
        "algorithm": "grpo",
        "reward": "styles",
        "engine": "hf",
        "reward_workers": 0,
        "dataset": {"type": "styles", "op": "add", "split": "train", "limit": 16},
        "prompts_per_step": 4,
        "rollout_n": 4,
        "max_new_tokens": 8,
        "max_steps": 8,
        "save_every": 2,
        "keep_last": 1,
        "lr": 3e-3,
        "micro_batch_size": 8,
        "progress": False,
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    ref = run(d, "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    return d


def run(d: Path, out: str, point: str = "none", n: int = 0, *extra: str, wait: bool = True):
    cmd = [sys.executable, str(WORKER), point, str(n), "--", "--config", str(d / "cfg.yaml"),
           f"output_dir={d / out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def assert_all_complete(run_dir: Path) -> None:
    """Every normally named checkpoint is complete (a half-written one is never selectable as latest)."""
    for name in checkpoints(run_dir):
        assert (run_dir / "checkpoints" / name / CHECKPOINT_MARKER).is_file(), name


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_kills_at_the_worst_moments_resume_to_identical_weights(setup):
    d, chain = setup, setup / "chain"
    killed = run(d, "chain", "prune", 1)  # step 4: step_000002 renamed away, not yet deleted
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoints(chain) == ["step_000004"] and assert_all_complete(chain) is None
    assert metrics_steps(chain) == [1, 2, 3, 4]

    killed = run(d, "chain", "metrics", 1, "--resume", "latest")  # resume's rewrite of metrics.jsonl
    assert killed.returncode == -signal.SIGKILL
    assert metrics_steps(chain) == [1, 2, 3, 4]  # the old file is intact, never half-written

    killed = run(d, "chain", "ckpt_write", 1, "--resume", "latest")  # while step 6's checkpoint is written
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(chain) == ["step_000004"]  # the half-written step 6 has no normal name
    assert_all_complete(chain)

    killed = run(d, "chain", "final", 1, "--resume", "latest")  # final/ written to a temp dir, not swapped
    assert killed.returncode == -signal.SIGKILL
    assert not (chain / "final").exists() and checkpoints(chain) == ["step_000006"]

    done = run(d, "chain", "none", 0, "--resume", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = final_weights(d / "ref"), final_weights(chain)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert metrics_steps(chain) == list(range(1, 9))
    assert not [p for p in chain.rglob("*") if ".tmp" in p.name or p.name.startswith(".deleting")]


def test_sigterm_checkpoints_and_a_second_run_is_refused(setup):
    d, out = setup, setup / "term"
    proc = run(d, "term", "none", 25, wait=False)  # 2.5 s per step: still running when the 2nd run starts
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics_steps(out)) >= 2):
        time.sleep(0.1)
    other = run(d, "term")  # a concurrent run into the same directory
    assert other.returncode == 2 and "in use by pid" in other.stderr, other.stderr[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: stopped after step" in err and "--resume latest" in err and "Traceback" not in err
    (ck,) = checkpoints(out)
    assert (out / "checkpoints" / ck / CHECKPOINT_MARKER).is_file()
    assert metrics_steps(out)[-1] == int(ck.removeprefix("step_")) and not (out / "final").exists()
    done = run(d, "term", "none", 0, "--resume", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = final_weights(d / "ref"), final_weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_finished_run_is_never_clobbered(setup, capsys):
    from dphrl.cli import main

    d = setup
    ref = d / "ref"
    def state():  # every file of the run (our lock file is bookkeeping, rewritten by each claim)
        return {p.name: p.stat().st_mtime_ns for p in ref.rglob("*") if p.name != ".dphrl.lock"}

    before = state()
    assert main(["train", "--config", str(d / "cfg.yaml"), f"output_dir={ref}"]) == 2
    err = capsys.readouterr().err
    assert str(ref) in err and "--resume" in err and "--overwrite" in err and "Nothing was changed" in err
    assert state() == before
    # --overwrite replaces it, but only once the new run has validated its inputs
    bad = [
        "train",
        "--config",
        str(d / "cfg.yaml"),
        f"output_dir={ref}",
        "--overwrite",
        "model=/no/such/model",
    ]
    assert main(bad) == 2  # fails at start-up, never sent to the hub
    assert "dphrl: model path /no/such/model does not exist" in capsys.readouterr().err
    assert state() == before


def test_claim_dir_refuses_overwrites_and_locks(tmp_path):
    out = tmp_path / "r"
    lock = claim_dir(out, what="t")
    with pytest.raises(RunDirError, match="in use"):
        claim_dir(out, what="t")
    lock.release()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="already holds a run"):
        claim_dir(out, what="t")
    claim_dir(out, what="t", resume=True).release()
    claim_dir(out, what="t", overwrite=True).release()
    assert [p.name for p in out.iterdir()] == [".dphrl.lock"]


def test_stop_signals_become_a_flag_and_a_second_sigint_interrupts():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_applies_or_refuses_changed_values(tmp_path, tok, make_model):
    exs = toy_examples(8)
    kw = dict(max_steps=2, save_every=1, keep_last=2, lr=1e-2)
    t = Trainer(base_cfg(tmp_path, "grpo", **kw), model=make_model(), tokenizer=tok, examples=exs)
    t.train()
    out = Path(t.cfg.output_dir)
    t2 = Trainer(base_cfg(tmp_path, "grpo", **{**kw, "max_steps": 4, "lr": 5e-3}), model=make_model(),
                 tokenizer=tok, examples=exs)
    t2.resume(out / "checkpoints" / "step_000001")
    assert [g["lr"] for g in t2.optimizer.param_groups] == [5e-3]  # the new value is the one trained with
    log = [json.loads(x) for x in (out / "resume_log.jsonl").read_text().splitlines()]
    assert log[-1]["changed"] == {"max_steps": [2, 4], "lr": [1e-2, 5e-3]}
    t2.train()
    assert [m["lr"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-1] == 5e-3
    t3 = Trainer(
        base_cfg(tmp_path, "grpo", **{**kw, "seed": 5}), model=make_model(), tokenizer=tok, examples=exs
    )
    with pytest.raises(ConfigError, match=r"keys that define the run: seed \(0 -> 5\)"):
        t3.resume("latest")
