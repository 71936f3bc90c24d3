"""`dphrl eval` end to end on a tiny model: SQL scoring modes named in results, refusals before work."""

from __future__ import annotations

import json

import pytest
from _shared import require_shared

from dphrl.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dphrl.data.tokenizer import build_char_tokenizer
    from dphrl.sft import save_model
    from dphrl.testing import tiny_causal_lm

    tok = build_char_tokenizer()
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=0, max_positions=4096), tok, d)
    return d


@pytest.mark.parametrize("mode,fn", [("sandbox", "dphrl.rewards.sql:spider_reward"),
                                     ("official", "dphrl.rewards.sql_official:spider_official_reward")])
def test_sql_mode_is_used_and_named(tmp_path, model_dir, mode, fn):
    dev = require_shared("spider", "dev.json")
    spec = json.dumps({"type": "spider", "path": str(dev.parent), "limit": 2})
    out = tmp_path / mode
    rc = main(["eval", "--model", str(model_dir), "--data", f"spider={spec}", "--n", "2",
               "--max-new-tokens", "4",
               "--sql-mode", mode, "--reward-workers", "0", "--out", str(out), "--engine", "hf"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["rewards"] == {"spider": fn}
    assert res["datasets"]["spider"]["num_problems"] == 2


def test_eval_refuses_before_loading_anything(tmp_path, model_dir, capsys):
    data = "add={type: styles, op: add, split: test, limit: 2}"
    model = ["eval", "--model", str(model_dir)]
    assert main([*model, "--data", data, "--data", data, "--out", str(tmp_path / "a")]) == 2
    assert "dphrl: eval: --data names must be unique" in capsys.readouterr().err
    assert main([*model, "--data", data, "--limit", "0", "--out", str(tmp_path / "b")]) == 2
    assert "dphrl: eval: --limit 0" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text("{}")
    assert main(["eval", "--model", str(model_dir), "--data", data, "--out", str(tmp_path / "c")]) == 2
    assert (tmp_path / "c" / "results.json").read_text() == "{}"  # nothing replaced without --overwrite
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_reports_forgetting_on_a_forgetting_set(tmp_path, model_dir, capsys):
    """`--forgetting-set`: the base scored on its own samples forgets exactly 0; another model forgets > 0;
    `dphrl report` shows both; a damaged set is refused before any model is loaded."""
    import torch

    from dphrl.evaluation.forgetting import sample_forgetting_set
    from dphrl.models import load_model, load_tokenizer
    from dphrl.sft import save_model
    from dphrl.tasks import styles

    fset = tmp_path / "fset"
    sample_forgetting_set(load_model(str(model_dir)), load_tokenizer(str(model_dir)),
                          styles.make_examples("sub", "test", limit=3), fset, n=2, max_new_tokens=4)
    other, sharp = tmp_path / "other_model", load_model(str(model_dir))
    with torch.no_grad():
        sharp.get_output_embeddings().weight.mul_(20)  # a sharper next-token distribution than the base's
    save_model(sharp, load_tokenizer(str(model_dir)), other)
    data = "add={type: styles, op: add, split: test, limit: 2}"
    kl = {}
    for name, model in (("base", model_dir), ("other", other)):
        assert main(["eval", "--model", str(model), "--data", data, "--n", "2", "--max-new-tokens", "4",
                     "--engine", "hf", "--reward-workers", "0", "--forgetting-set", str(fset),
                     "--out", str(tmp_path / name)]) == 0
        res = json.loads((tmp_path / name / "results.json").read_text())
        kl[name] = res["forgetting"]["forgetting/kl_per_token"]
        assert res["forgetting"]["forgetting/sequences"] == 6
        assert (tmp_path / name / "samples.jsonl").is_file()
    assert kl["base"] == 0.0 and kl["other"] > 0.1
    assert main(["report", str(tmp_path / "base"), str(tmp_path / "other"),
                 "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Forgetting" in md and f"| other | 1 | {kl['other']:.4f} |" in md
    (fset / "samples.parquet").write_bytes(b"damaged")
    assert main(["eval", "--model", str(model_dir), "--data", data, "--forgetting-set", str(fset),
                 "--out", str(tmp_path / "c")]) == 2
    assert "checksum" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
