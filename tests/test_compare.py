"""`dphrl compare`: the example experiment end to end on a tiny model (report, forgetting, Pass@k over
steps), a failing job that loses nothing else, resume, and the job list's plain data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "experiments" / "tiny.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dphrl.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _status(out: Path) -> dict:
    return json.loads((out / "jobs_status.json").read_text())


def test_example_end_to_end_with_a_failing_job_then_resumed(tmp_path: Path):
    exp = yaml.safe_load(EXAMPLE.read_text())
    # every prompt dropped: fails at start
    exp["methods"]["broken"] = {"algorithm": "grpo", "max_prompt_tokens": 1}
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(exp, sort_keys=False))
    out = tmp_path / "out"
    proc = _cli("compare", "--config", str(cfg), "--out", str(out), "--workers", "2")
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1, log  # a job failed: reported, non-zero exit, every other job done

    status = _status(out)
    for seed in (0, 1):
        assert status[f"seed{seed}/train/broken"]["state"] == "failed", log
        assert "max_prompt_tokens" in status[f"seed{seed}/train/broken"]["error"]
        assert status[f"seed{seed}/eval/broken"] == {
            "state": "skipped", "error": f"needs seed{seed}/train/broken, which did not finish"}
    others = {i: s for i, s in status.items() if "broken" not in i}
    assert len(others) == 2 * (1 + 1 + 2 * 3) and all(s["state"] == "done" and s["seconds"] > 0
                                                      for s in others.values())

    rep = out / "report"
    for name in ("report.md", "report.html", "passk.png", "passk_steps.png", "frontier.png", "summary.md",
                 "summary.json"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["seeds"] == 2 and set(summary["table"]) == {"base", "grpo", "dph-f"}
    assert set(summary["sweep"]) == {"dph-f@eta=1.0"}
    assert set(summary["failed"]) == {f"seed{s}/{k}/broken" for s in (0, 1) for k in ("train", "eval")}
    for row in {**summary["table"], **summary["sweep"]}.values():
        assert set(row) == {"pass@1", "pass@8", "styles", "ood pass@1", "ood pass@8", "ood answer acc"}
        assert all(0 <= m <= 1 and math.isfinite(s) for k, (m, s) in row.items() if k != "styles")
    raises, forgets = summary["claims"]
    assert raises["ok"] is None and "broken" in raises["detail"]  # a run it names has no results: not checked
    assert isinstance(forgets["ok"], bool) and len(forgets["per_seed"]) == 2
    assert summary["forgetting"]["base"] == [0.0, 0.0]  # the base scored on its own samples: exactly 0
    assert all(m > 0 for n, (m, _) in summary["forgetting"].items() if n != "base")
    assert set(summary["timing"]["runs"]["grpo"]) == {"train", "eval"}
    md = (rep / "summary.md").read_text()
    assert "Jobs that did not finish" in md and "Wall time per job" in md and "Forgetting" in md
    assert "| RL raises in-domain Pass@1 | NOT CHECKED | NOT CHECKED | 0 of 2 |" in md

    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    for j in jobs:  # plain data: each job is one dphrl command
        assert j["cmd"] == ["dphrl", "compare", "--out", str(out), "--job", j["id"]]
    train = next(j for j in jobs if j["id"] == "seed1/train/dph-f@eta=1.0")
    assert (train["spec"]["config"]["eta"], train["spec"]["config"]["seed"]) == (1.0, 1)
    assert train["spec"]["config"]["reference_store"] == str(out / "seed1" / "store")
    steps = [json.loads(x)
             for x in (out / "seed0" / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in steps if "eval/add/pass@8" in x] == [0, 4, 8]  # Pass@k over training steps
    res = json.loads((out / "seed0" / "runs" / "dph-f" / "eval" / "results.json").read_text())
    assert set(res["datasets"]) == {"add", "sub"} and 0 <= res["datasets"]["sub"]["answer_accuracy"] <= 1
    assert res["forgetting"]["forgetting/sequences"] == 16 * 2

    # resume: only what is missing runs again (and the broken job fails again)
    shutil.rmtree(out / "seed1" / "runs" / "grpo" / "eval")
    # neither --resume nor --overwrite
    assert _cli("compare", "--config", str(cfg), "--out", str(out)).returncode == 2
    proc = _cli("compare", "--config", str(cfg), "--out", str(out), "--resume")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = _status(out)
    assert status["seed1/eval/grpo"]["state"] == "done" and "earlier" not in status["seed1/eval/grpo"]
    assert status["seed0/train/grpo"]["earlier"] and status["seed1/train/broken"]["state"] == "failed"
    assert (out / "seed1" / "runs" / "grpo" / "eval" / "results.json").is_file()

    # a finished job whose spec changed is refused before anything runs
    exp["methods"]["grpo"]["lr"] = 1e-5
    cfg.write_text(yaml.safe_dump(exp, sort_keys=False))
    proc = _cli("compare", "--config", str(cfg), "--out", str(out), "--resume")
    assert proc.returncode == 2 and "seed0/train/grpo" in proc.stderr and "lr" in proc.stderr, proc.stderr
