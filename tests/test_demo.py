"""`dphrl demo --quick --sweep` end to end: every artifact is written and every number is a probability.

This checks the pipeline, not the scientific claim (the committed report in docs/ carries that).
"""

import json
import math
import subprocess
import sys
from pathlib import Path


def test_demo_quick_end_to_end(tmp_path: Path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dphrl.cli", "demo", "--quick", "--sweep", "--ablation", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = out / "report"
    for name in ("report.md", "report.html", "passk.png", "training.png", "styles.png", "summary.json",
                 "summary.md", "frontier.png", "passk_steps.png"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    summary = json.loads((rep / "summary.json").read_text())
    methods = set(summary["table"])
    assert methods == {"base", "grpo", "dapo", "rkl", "rkl-k3", "dph-f", "dph-js", "dph-f-topk"}
    # the quick sweep: one more weight per family, and the policy-loss ablation
    assert set(summary["sweep"]) == {"dph-f@eta=1.0", "dph-js@eta=3.0", "rkl@kl_coef=0.2",
                                     "rkl-k3@kl_coef=0.2", "dph-f-topk@eta=1.0", "dph-f+dapo-loss"}
    # the families compared at matched Pass@1 (when their ranges overlap)
    assert summary["matched"]["families"] == ["rkl", "rkl-k3", "dph-f", "dph-js", "dph-f-topk"]
    # Pass@k over training steps for the main methods
    lines = [json.loads(x)
             for x in (out / "seed0" / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval/add (in-domain)/pass@8" in x] == [0, 6, 12]
    run_cfg = (out / "seed0" / "runs" / "rkl" / "config.yaml").read_text()
    assert "kl_estimator: k2" in run_cfg and "kl_estimator: k3" in (
        out / "seed0" / "runs" / "rkl-k3" / "config.yaml").read_text()
    for method, row in {**summary["table"], **summary["sweep"]}.items():
        assert set(row) == {"pass@1", "pass@16", "styles", "ood pass@1", "ood pass@16", "ood answer acc"}
        for key, (mean, std) in row.items():
            assert math.isfinite(mean) and math.isfinite(std), (method, key)
            if key != "styles":
                assert 0.0 <= mean <= 1.0, (method, key, mean)
            else:
                assert 1.0 <= mean <= 3.0 + 1e-9, (method, key, mean)  # effective number of 3 styles
    assert all(isinstance(v, bool) for v in summary["checks"].values())
    # every run has its eval results with pass@k probabilities for both domains
    for method in methods:
        res = json.loads((out / "seed0" / "runs" / method / "eval" / "results.json").read_text())
        assert set(res["datasets"]) == {"add (in-domain)", "sub (out-of-domain)"}
        for ds in res["datasets"].values():
            passk = ds["pass@k"]
            assert [int(k) for k in passk] == [1, 2, 4, 8, 16]
            vals = list(passk.values())
            assert all(0.0 <= v <= 1.0 for v in vals) and vals == sorted(vals)  # pass@k grows with k
        if method != "base":
            assert (out / "seed0" / "runs" / method / "final" / "config.json").is_file()
            assert (out / "seed0" / "runs" / method / "metrics.jsonl").is_file()
    html = (rep / "report.html").read_text()
    assert "data:image/png;base64," in html and "dph-js" in html
    # the D_pef / D_exp split was made and stored
    manifest = json.loads((out / "seed0" / "store" / "manifest.json").read_text())
    assert manifest["counts"]["d_pef"] + manifest["counts"]["d_exp"] == manifest["counts"]["prompts"]


def test_answer_accuracy_counts_right_results_whatever_the_style():
    from dphrl.compare.work import answer_accuracy

    rows = [
        # right, style refused
        {"dataset": "sub", "id": "sub-9-4", "index": 0, "answer": "5", "correct": False},
        {"dataset": "sub", "id": "sub-9-4", "index": 1, "answer": "6", "correct": False},  # wrong result
        # greedy: not counted
        {"dataset": "sub", "id": "sub-9-4", "index": -1, "answer": "5", "correct": True},
        {"dataset": "sub", "id": "sub-30-1", "index": 0, "answer": None, "correct": False},  # no number
        {"dataset": "add", "id": "add-2-2", "index": 0, "answer": "4", "correct": True},  # other dataset
        {"dataset": "sub", "id": "sub-30-1", "index": 1, "answer": "29", "correct": True},
    ]
    gold = {"sub-9-4": "5", "sub-30-1": "29", "add-2-2": "4"}
    assert answer_accuracy([r for r in rows if r["dataset"] == "sub"], gold) == 2 / 4
    assert answer_accuracy([r for r in rows if r["dataset"] == "add"], gold) == 1.0


def test_demo_options_and_budget_guard(tmp_path: Path):
    from dphrl.demo import FULL, DemoBudgetError, _check_budget, demo_size

    size = demo_size(rl_steps=300, lr=7e-5, methods=["grpo", "dph-f"])
    assert (size.rl_steps, size.lr, list(size.methods)) == (300, 7e-5, ["grpo", "dph-f"])
    assert list(size.sweep) == ["dph-f"] and size.methods["dph-f"] == FULL.methods["dph-f"]
    try:
        demo_size(methods=["grpo", "ppo"])
        raise AssertionError("unknown method accepted")
    except DemoBudgetError as e:
        assert "ppo" in str(e) and "dph-js" in str(e)
    assert demo_size(train_prompts=1400).train_prompts == 1400
    try:
        demo_size(train_prompts=1401)
        raise AssertionError("more training prompts than problems accepted")
    except DemoBudgetError as e:
        assert "1400" in str(e)
    _check_budget(tmp_path, size)
    _check_budget(tmp_path, demo_size(rl_steps=300, lr=7e-5, methods=["grpo", "rkl"]))  # more methods: fine
    try:  # same dir, another budget: finished jobs would be reused silently
        _check_budget(tmp_path, demo_size(methods=["grpo"]))
        raise AssertionError("another budget accepted")
    except DemoBudgetError as e:
        assert "rl_steps" in str(e) and "lr" in str(e) and "--out" in str(e)
