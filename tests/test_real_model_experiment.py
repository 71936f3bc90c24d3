"""The real-model experiment file (examples/experiments/smollm2_arith.yaml) in a tiny mode: the same
methods, data files, evaluation sets, forgetting set and claims, with a random tiny model and a few
prompts, so that the file cannot rot (its keys, data paths and claims stay valid)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dphrl.compare.experiment import load_experiment
from dphrl.compare.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "examples" / "experiments" / "smollm2_arith.yaml"


def _tiny_model(out: Path, texts: list[str]) -> Path:
    from dphrl.data.tokenizer import build_char_tokenizer
    from dphrl.sft import save_model
    from dphrl.testing import tiny_causal_lm

    tok = build_char_tokenizer("".join(sorted(set("".join(texts)))))
    save_model(tiny_causal_lm(tok, hidden=32, layers=2, heads=4, max_positions=256, seed=0), tok, out)
    return out


def _absolute(spec: dict) -> dict:
    return {**spec, "path": str(ROOT / spec["path"])} if "path" in spec else spec


def test_the_real_model_experiment_runs_in_tiny_mode(tmp_path):
    exp = yaml.safe_load(EXPERIMENT.read_text())
    files = [ROOT / s["path"] for s in [exp["base"]["dataset"], exp["forgetting"]["data"],
                                        *exp["evaluation"]["in_domain"].values(),
                                        *exp["evaluation"]["out_of_domain"].values()]]
    texts = [json.loads(x)["prompt"] + str(json.loads(x).get("answer", "")) for f in files
             for x in f.read_text().splitlines() if x.strip()]
    exp["base"].update(model=str(_tiny_model(tmp_path / "model", texts)), max_steps=1, prompts_per_step=2,
                       rollout_n=2, max_new_tokens=4, max_prompt_tokens=256, micro_batch_size=8,
                       dataset={**_absolute(exp["base"]["dataset"]), "limit": 6}, split_threshold=0.5)
    ev = exp["evaluation"]
    for group in ("in_domain", "out_of_domain"):
        ev[group] = {name: {**_absolute(spec), "limit": 2} for name, spec in ev[group].items()}
    ev.update(max_new_tokens=4)  # n stays: the claims read pass@n
    exp["forgetting"].update(data={**_absolute(exp["forgetting"]["data"]), "limit": 2}, n=1, max_new_tokens=4)
    exp["seeds"] = 1
    assert list(exp["sweeps"]) == ["grpo"]  # the matched-Pass@1 control: GRPO with fewer steps
    exp["sweeps"] = {"grpo": {"max_steps": [2]}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))

    run_experiment(load_experiment(path), tmp_path / "out", workers=1, backend="sequential")
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    methods = {"grpo", "rkl", "rkl-k3", "dph-f", "dph-js"}
    assert set(summary["table"]) == {"base"} | methods
    assert not summary.get("failed")
    assert set(summary["sweep"]) == {"grpo@max_steps=2"}
    assert set(summary["forgetting"]) == {"base", "grpo@max_steps=2"} | methods
    assert len(summary["claims"]) == len(exp["claims"])
    for claim in summary["claims"]:  # every claim names runs and sets that exist: each one is checked
        assert isinstance(claim["ok"], bool), claim
