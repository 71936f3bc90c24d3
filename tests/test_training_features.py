"""Gradient checkpointing (same gradients), evaluation during training, completion logs, the model card
and push_to_hub (exactly the final/ folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import base_cfg, toy_examples

from dphrl.trainer import Seq, Trainer


def _toy_jsonl(path: Path, n: int = 6) -> dict:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i}+{i}", "answer": "7", "id": f"e{i}"}) + "\n")
    return {"type": "jsonl", "path": str(path), "task": "toy_first_char", "id_field": "id"}


def _batch(tok):
    prompts = [tok(f"<|user|>{i}+{i}<|assistant|>", add_special_tokens=False)["input_ids"] for i in range(4)]
    g = torch.Generator().manual_seed(0)
    rolls = [
        Seq(
            p,
            torch.randint(6, len(tok), (3,), generator=g).tolist() + [tok.eos_token_id],
            old_logp=[-2.0] * 4,
            advantage=float(torch.randn(1, generator=g)),
        )
        for p in prompts
        for _ in range(2)
    ]
    return rolls


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tok, make_model):
    grads = {}
    for gc in (False, True):
        cfg = base_cfg(
            tmp_path / str(gc), "grpo", gradient_checkpointing=gc, micro_batch_size=3, max_grad_norm=0.0
        )
        t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(4))
        m = t._unwrapped()
        assert (
            getattr(m, "is_activation_checkpointing", None) in (gc, None)
            and m.model.gradient_checkpointing == gc
        )
        t.optimizer_step(_batch(tok), [])
        grads[gc] = {n: p.grad.clone() for n, p in t._unwrapped().named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 5
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-7, rtol=1e-6)


def test_evaluation_during_training_logs_pass_at_k_over_steps(tmp_path, tok, make_model):
    spec = _toy_jsonl(tmp_path / "eval.jsonl")
    cfg = base_cfg(tmp_path, "grpo", max_steps=3, eval_every=2, eval_data={"toy set": spec}, eval_n=4)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8))
    t.train()
    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/toy set/pass@1" in x]
    assert [x["step"] for x in evals] == [0, 2, 3]  # the start, every 2 steps, the end
    for x in evals:
        for k in (1, 2, 4):
            assert 0.0 <= x[f"eval/toy set/pass@{k}"] <= 1.0
        assert x["eval/toy set/pass@1"] <= x["eval/toy set/pass@4"]
        assert 0.0 <= x["eval/toy set/greedy_acc"] <= 1.0
    # the evaluation is the runner's: same numbers as dphrl.evaluation.evaluate on the final model
    from dphrl.evaluation.runner import evaluate
    from dphrl.rewards import get_reward
    from dphrl.trainer import load_examples

    res = evaluate(
        t.engine,
        tok,
        {"toy set": load_examples(spec)},
        get_reward("toy_first_char"),
        n=4,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed * 7_919 + 3 * 104_729 + 17,
        progress=False,
        show_table=False,
        prompts_per_call=max(1, cfg.generation_batch_size // 4),
    )
    assert res["datasets"]["toy set"]["pass@k"]["4"] == pytest.approx(evals[-1]["eval/toy set/pass@4"])
    # the report draws the curves
    from dphrl.evaluation.report import eval_curves

    curves = eval_curves((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines())
    assert [s for s, _ in curves["toy set"]["pass@1"]] == [0, 2, 3]


def test_completion_logs(tmp_path, tok, make_model):
    cfg = base_cfg(tmp_path, "grpo", max_steps=2, completions_every=1, completions_per_log=3)
    Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8)).train()
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    for r in rows:
        assert r["prompt"].startswith("<|user|>") and r["reward"] in (0.0, 1.0)
        assert r["reward"] == float(r["response"][:1] == "7")  # the toy reward of the logged response


def test_model_card_and_push_are_exactly_the_final_folder(tmp_path, tok, make_model, monkeypatch):
    import huggingface_hub

    pushed = {}

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            pushed["repo"] = repo_id

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            pushed["files"] = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                               for p in Path(folder_path).rglob("*") if p.is_file()}

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    spec = _toy_jsonl(tmp_path / "eval.jsonl")
    cfg = base_cfg(tmp_path, "grpo", max_steps=1, eval_every=1, eval_data={"toy": spec}, eval_n=2,
                   push_to_hub="me/dph-toy")
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8))
    t.train()
    final = Path(cfg.output_dir) / "final"
    on_disk = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert pushed["repo"] == "me/dph-toy" and pushed["files"] == on_disk
    # save_pretrained's and the tokenizer's files, the resolved config and run info, and the card
    from transformers import AutoModelForCausalLM

    ref = tmp_path / "ref"
    AutoModelForCausalLM.from_pretrained(final).save_pretrained(ref)
    tok.save_pretrained(ref)
    expected = {p.name for p in ref.iterdir()} | {
        "dphrl_config.yaml",
        "dphrl_run_info.json",
        "dphrl_totals.json",
        "README.md",
    }
    assert set(on_disk) == expected
    card = on_disk["README.md"].decode()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- grpo" in card
    assert "eval/toy/pass@1" in card and "`algorithm` | `\"grpo\"`" in card
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.library_name == "transformers"  # parses as a model card
