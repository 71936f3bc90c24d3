"""Bad experiment files are refused before any work, naming the key, the file and the line; every
(method, seed, coefficient) is resolved into a full training config up front."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dphrl.compare import load_experiment
from dphrl.compare.jobs import plan
from dphrl.config import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "experiments" / "tiny.yaml"


def _write(tmp_path: Path, edit) -> tuple[Path, list[str]]:
    data = yaml.safe_load(EXAMPLE.read_text())
    edit(data)
    path = tmp_path / "exp.yaml"
    text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return path, text.splitlines()


def _line(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines, 1) if needle in line)


CASES = {
    # edit, the key named, a text on the line named, a phrase of the message
    "unknown top key": (lambda d: d.update(seed=[0, 1]), "seed", "seed:", "put it under 'base:'"),
    "misspelt top key": (lambda d: d.update(method={}), "method", "method:", "Did you mean 'methods'"),
    "training key alias": (lambda d: d["methods"]["grpo"].update(learning_rate=1e-4),
                           "methods.grpo.learning_rate", "learning_rate", "Did you mean 'lr'"),
    "bad value in a method": (lambda d: d["methods"]["dph-f"].update(eta=-1), "methods.dph-f.eta", "eta: -1",
                              ">= 0"),
    "bad value in base": (lambda d: d["base"].update(prompts_per_step=0), "base.prompts_per_step",
                          "prompts_per_step: 0", ">= 1"),
    "runner key": (lambda d: d["methods"]["grpo"].update(output_dir="x"), "methods.grpo.output_dir",
                   "output_dir", "set by dphrl compare"),
    "bad sweep value": (lambda d: d["sweeps"]["dph-f"].update(eta=[-1.0]), "sweeps.dph-f.eta.0", "- -1.0",
                        ">= 0"),
    "sweep of no method": (lambda d: d["sweeps"].update(rkl={"kl_coef": [0.1]}), "sweeps.rkl", "rkl:",
                           "not a method"),
    "evaluation key": (lambda d: d["evaluation"].update(samples=3), "evaluation.samples", "samples: 3",
                       "unknown key"),
    "dataset option": (lambda d: d["evaluation"]["in_domain"]["add"].update(opp="add"),
                       "evaluation.in_domain.add.opp", "opp: add", "Did you mean 'op'"),
    "claim metric": (lambda d: d["claims"][0].update(metric="pass@32"), "claims.0.metric", "metric: pass@32",
                     "K <= evaluation.n"),
    "claim run": (lambda d: d["claims"][1].update(right="grp"), "claims.1.right", "right: grp",
                  "Did you mean 'grpo'"),
    "claim set": (lambda d: d["claims"][0].update(set="test"), "claims.0.set", "set: test",
                  "not an evaluation set"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_names_key_file_and_line(tmp_path: Path, case: str):
    edit, key, needle, phrase = CASES[case]
    path, lines = _write(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        plan(load_experiment(path), tmp_path / "out")
    msg = str(err.value)
    assert f"'{key}'" in msg and f"{path}:{_line(lines, needle)}" in msg and phrase in msg, msg
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_file_before_any_work(tmp_path: Path):
    path, lines = _write(tmp_path, lambda d: d["methods"]["dph-f"].update(divergence="forwrd_kl"))
    proc = subprocess.run([sys.executable, "-m", "dphrl.cli", "compare", "--config", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"methods.dph-f.divergence' ({path}:{_line(lines, 'forwrd_kl')})" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_plan_resolves_every_run_and_shares_one_store_per_seed(tmp_path: Path):
    exp = load_experiment(EXAMPLE)
    jobs = plan(exp, tmp_path)
    assert [j.id for j in jobs if j.seed == 0] == [
        "seed0/prepare", "seed0/eval/base", "seed0/train/grpo", "seed0/eval/grpo", "seed0/train/dph-f",
        "seed0/eval/dph-f", "seed0/train/dph-f@eta=1.0", "seed0/eval/dph-f@eta=1.0"]
    cfgs = {j.run: j.spec["config"] for j in jobs if j.kind == "train" and j.seed == 1}
    assert "seed1/eval/base" in [j.id for j in jobs]  # a base model built per seed: evaluated per seed
    assert cfgs["grpo"]["reference_store"] == "" and cfgs["grpo"]["clip_high"] == 0.2  # grpo's preset filled
    assert (cfgs["dph-f"]["reference_store"] == cfgs["dph-f@eta=1.0"]["reference_store"]
            == str(tmp_path / "seed1/store"))
    # sweep points: no curves
    assert cfgs["dph-f@eta=1.0"]["eval_every"] == 0 and cfgs["dph-f"]["eval_every"] == 4
    prep = next(j for j in jobs if j.id == "seed1/prepare").spec
    assert (prep["presample"]["seed"] == 1 and prep["presample"]["threshold"] == 0.5
            and prep["forgetting"]["n"] == 2)
    assert next(j for j in jobs if j.id == "seed1/eval/dph-f").deps == ["seed1/train/dph-f"]


def test_rehearsing_methods_must_agree_on_the_shared_store(tmp_path: Path):
    path, lines = _write(tmp_path, lambda d: d["methods"].update(
        {"dph-js": {"algorithm": "dph", "divergence": "js", "presample_n": 4}}))
    with pytest.raises(ConfigError) as err:
        plan(load_experiment(path), tmp_path / "out")
    assert "methods.dph-js.presample_n" in str(err.value) and "share one presample store" in str(err.value)


def test_docs_list_every_experiment_key():
    from dphrl.compare import experiment_help

    doc = (EXAMPLE.parents[2] / "docs" / "config.md").read_text()
    assert experiment_help() in doc, ("docs/config.md is stale: regenerate its 'Experiment keys' with "
                                      "experiment_help()")


def test_a_fixed_base_model_is_evaluated_once(tmp_path: Path):
    """Without ``base_model`` (the same model for every seed) the base is evaluated once, under the first
    seed, and every seed's summary reads that evaluation; a built base model is evaluated per seed."""
    import yaml as _yaml

    from dphrl.compare.experiment import Experiment
    from dphrl.compare.jobs import base_dir

    raw = _yaml.safe_load(EXAMPLE.read_text())
    raw.pop("base_model")
    raw["base"]["model"] = "some/model"
    raw["seeds"] = 3
    f = tmp_path / "fixed.yaml"
    f.write_text(_yaml.safe_dump(raw))
    exp = load_experiment(f)
    assert isinstance(exp, Experiment) and not exp.base_model
    ids = [j.id for j in plan(exp, tmp_path / "out")]
    assert [i for i in ids if i.endswith("/eval/base")] == ["seed0/eval/base"]
    assert {base_dir(exp, tmp_path, s) for s in (0, 1, 2)} == {tmp_path / "seed0" / "runs" / "base"}
    built = load_experiment(EXAMPLE)
    assert base_dir(built, tmp_path, 1) == tmp_path / "seed1" / "runs" / "base"
