"""End-to-end Trainer runs on the toy task (tiny models, few steps): dph, grpo, dapo, rkl, resume,
final artifacts, reward failures and non-finite losses."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import base_cfg, make_store, state_copy, toy_examples
from transformers import AutoModelForCausalLM, AutoTokenizer

import dphrl.models
from dphrl import losses
from dphrl.batching import pack, response_logprobs
from dphrl.data.chat import encode_prompt
from dphrl.data.example import Example
from dphrl.models import load_tokenizer
from dphrl.rewards.registry import register_reward
from dphrl.trainer import RewardFailureError, Trainer


def read_metrics(out_dir: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def held_parameters(trainer: Trainer) -> set[int]:
    """ids of every parameter of every nn.Module the trainer (or an object it holds) references."""
    mods = []
    for v in vars(trainer).values():
        if isinstance(v, torch.nn.Module):
            mods.append(v)
        elif hasattr(v, "__dict__"):
            mods += [w for w in vars(v).values() if isinstance(w, torch.nn.Module)]
    return {id(p) for m in mods for p in m.parameters()}


# ------------------------------------------------------------------------------------------------
# dph: learns, holds no reference model, keeps rollouts and reference samples apart
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model_dir(tmp_path, tok, make_model):
    d = tmp_path / "base_model"
    make_model(seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_dph_learns_without_reference_model(tmp_path, saved_model_dir, monkeypatch):
    model_dir = str(saved_model_dir)
    tokenizer = load_tokenizer(model_dir)
    exs = toy_examples(16)
    store = tmp_path / "store"
    manifest = make_store(
        store,
        dphrl.models.load_model(model_dir),
        tokenizer,
        exs,
        n=8,
        max_new_tokens=4,
        threshold=0.125,
        model_name=model_dir,
    )
    assert manifest["counts"]["d_pef"] > 0 and manifest["counts"]["d_exp"] > 0

    loads: list[str] = []
    real_load = dphrl.models.load_model
    monkeypatch.setattr(
        dphrl.models, "load_model", lambda name, **kw: loads.append(str(name)) or real_load(name, **kw)
    )
    deep_copied: list[type] = []
    real_deepcopy = copy.deepcopy

    def spy_deepcopy(x, *a, **kw):
        deep_copied.append(type(x))
        return real_deepcopy(x, *a, **kw)

    monkeypatch.setattr(copy, "deepcopy", spy_deepcopy)
    cfg = base_cfg(
        tmp_path,
        "dph",
        model=model_dir,
        reference_store=str(store),
        prompts_per_step=4,
        rollout_n=8,
        max_new_tokens=4,
        lr=1e-2,  # 3e-2 was chaotic: 1e-7 float differences (e.g. shared-prefix prefill) changed the outcome
        max_steps=20,
        mini_batches=2,
        micro_batch_size=8,
    )
    t = Trainer(cfg, examples=exs)  # loads the policy by name
    monkeypatch.setattr(copy, "deepcopy", real_deepcopy)

    # --- no reference model: one load, no module copies, only the policy's parameters held
    assert loads == [model_dir]
    assert not [c for c in deep_copied if issubclass(c, torch.nn.Module)]
    assert t.ref_model is None
    policy = t._unwrapped()
    assert held_parameters(t) == {id(p) for p in policy.parameters()}

    # --- spies: which sequences reach which loss, and what the rollout rewards were
    exp_prompts = {tuple(encode_prompt(tokenizer, ex.prompt)) for ex in t.rollout_examples}
    pef_prompts = {tuple(encode_prompt(tokenizer, ex.prompt)) for ex in exs if ex.id in set(t.pef_ids)}
    assert exp_prompts and pef_prompts and not exp_prompts & pef_prompts
    calls: list[tuple[str, list]] = []
    step_rollouts: list[set[int]] = []
    step_refs: list[set[int]] = []
    step_rewards: list[torch.Tensor] = []
    real_roll, real_ref, real_collect, real_refbatch, real_gen = (
        t.updater.rollout_loss,
        t.updater.reference_loss,
        t.collect_rollouts,
        t.reference_batch,
        t.rollouts.generate_and_score,
    )

    def roll_loss(batch, chunk, *a):
        calls.append(("roll", list(chunk)))
        return real_roll(batch, chunk, *a)

    def ref_loss(batch, chunk, *a):
        calls.append(("ref", list(chunk)))
        return real_ref(batch, chunk, *a)

    def collect():
        seqs, m = real_collect()
        step_rollouts.append({id(s) for s in seqs})
        return seqs, m

    def refbatch():
        refs = real_refbatch()
        step_refs.append({id(s) for s in refs})
        return refs

    def gen(*a):
        out = real_gen(*a)
        step_rewards.append(out[1].clone())
        return out

    (
        t.updater.rollout_loss,
        t.updater.reference_loss,
        t.collect_rollouts,
        t.reference_batch,
        t.rollouts.generate_and_score,
    ) = (
        roll_loss,
        ref_loss,
        collect,
        refbatch,
        gen,
    )

    t.train()
    metrics = read_metrics(cfg.output_dir)
    assert [m["step"] for m in metrics] == list(range(1, 21))

    # --- reward rises on the exploration prompts
    first = sum(m["reward/mean"] for m in metrics[:3]) / 3
    last = sum(m["reward/mean"] for m in metrics[-3:]) / 3
    assert last > first + 0.3, (first, last)

    # --- never mixed: every micro-batch is purely rollouts (of this step) or purely reference samples
    all_roll = set().union(*step_rollouts)
    all_ref = set().union(*step_refs)
    assert all_ref and not all_roll & all_ref
    kinds = {k for k, _ in calls}
    assert kinds == {"roll", "ref"}
    for kind, chunk in calls:
        ids = {id(s) for s in chunk}
        if kind == "roll":
            assert ids <= all_roll and all(s.old_logp is not None and s.ref_logp is None for s in chunk)
            assert all(tuple(s.prompt_ids) in exp_prompts for s in chunk)
        else:
            assert ids <= all_ref and all(s.ref_logp is not None and s.old_logp is None for s in chunk)
            assert all(tuple(s.prompt_ids) in pef_prompts for s in chunk)
    # every micro-batch size respects micro_batch_size
    assert max(len(c) for _, c in calls) <= 8

    # --- reward statistics are those of the rollouts only (the always-correct ref samples excluded)
    assert len(step_rewards) == 20
    for m, r in zip(metrics, step_rewards):
        assert r.numel() == cfg.prompts_per_step * cfg.rollout_n == m["rollout/sequences"]
        assert m["reward/mean"] == pytest.approx(r.mean().item(), abs=1e-7)
        assert m["reward/pass_rate"] == pytest.approx((r >= 1).float().mean().item(), abs=1e-7)
    assert all("div/value" in m and math.isfinite(m["div/value"]) for m in metrics)


# ------------------------------------------------------------------------------------------------
# baselines: grpo, dapo, rkl (+ LoRA)
# ------------------------------------------------------------------------------------------------


def test_grpo_two_steps(tmp_path, tok, make_model):
    model = make_model()
    before = state_copy(model)
    cfg = base_cfg(tmp_path, "grpo")
    t = Trainer(cfg, model=model, tokenizer=tok, examples=toy_examples(8))
    assert t.ref_model is None and t.store is None
    t.train()
    m = read_metrics(cfg.output_dir)
    assert [x["step"] for x in m] == [1, 2]
    assert all("kl/value" not in x and "div/value" not in x for x in m)
    after = t._unwrapped().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


@register_reward("toy_low_digit")
def toy_low_digit(response: str, ex: Example) -> float:
    """always-prompts: 1; others: 1 when the first character is one of 0-4 (mixed groups)."""
    return 1.0 if ex.answer == "always" else float(response[:1] in set("01234") and response[:1] != "")


def test_dapo_dynamic_sampling_drops_all_equal_groups(tmp_path, tok, make_model):
    exs = toy_examples(8, always=4)  # p0..p3 always right: their groups have all-equal rewards
    cfg = base_cfg(tmp_path, "dapo", reward="toy_low_digit", rollout_n=8, max_new_tokens=4)
    assert cfg.dynamic_sampling and cfg.overlong_buffer == 1
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=exs)
    always = {tuple(encode_prompt(tok, ex.prompt)) for ex in exs[:4]}
    seqs, m = t.collect_rollouts()
    n = cfg.rollout_n
    assert len(seqs) % n == 0 and m["rollout/groups_kept"] == len(seqs) // n == cfg.prompts_per_step
    by_prompt = {ex_ids: ex for ex in exs for ex_ids in [tuple(encode_prompt(tok, ex.prompt))]}
    for g in range(len(seqs) // n):
        group = seqs[g * n : (g + 1) * n]
        assert len({tuple(s.prompt_ids) for s in group}) == 1
        assert tuple(group[0].prompt_ids) not in always
        ex = by_prompt[tuple(group[0].prompt_ids)]
        eos = tok.eos_token_id
        texts = [tok.decode([i for i in s.response_ids if i != eos], skip_special_tokens=True) for s in group]
        rewards = [toy_low_digit(x, ex) for x in texts]
        assert len(set(rewards)) > 1, rewards  # informative group
        assert any(s.advantage != 0 for s in group)
    # the always-right prompts were sampled (so they really were dropped, not just never drawn)
    assert m["rollout/sequences"] == len(seqs)
    assert m["reward/mean"] > 0  # stats cover every generated group, dropped ones included
    t.train()
    assert [x["step"] for x in read_metrics(cfg.output_dir)] == [1, 2]


def _kl_per_step(tmp_path, tok, model, **kw):
    cfg = base_cfg(tmp_path, "rkl", kl_coef=0.1, lr=3e-2, **kw)
    t = Trainer(cfg, model=model, tokenizer=tok, examples=toy_examples(8))
    return t, cfg


def test_rkl_frozen_reference(tmp_path, tok, make_model):
    model = make_model()
    before = state_copy(model)
    t, cfg = _kl_per_step(tmp_path, tok, model)
    ref = t.ref_model
    assert ref is not None
    assert all(not p.requires_grad for p in ref.parameters())
    policy_ptrs = {p.data_ptr() for p in t._unwrapped().parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref.parameters()}
    t.train()
    m = read_metrics(cfg.output_dir)
    # step 1: policy == reference; step 2: the policy moved away from the frozen initial model
    assert abs(m[0]["kl/value"]) < 1e-5
    assert m[1]["kl/value"] > 1e-5
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


def test_rkl_lora_uses_adapter_disabled_base(tmp_path, tok, make_model):
    t, cfg = _kl_per_step(tmp_path, tok, make_model(), lora=True, lora_r=4, lora_alpha=8)
    assert t.ref_model is None
    assert held_parameters(t) == {id(p) for p in t._unwrapped().parameters()}
    t.train()
    m = read_metrics(cfg.output_dir)
    assert abs(m[0]["kl/value"]) < 1e-5
    assert m[1]["kl/value"] > 1e-5  # the reference is the base (adapter off), not the live policy
    # the stored ref log-probs are those of the adapter-disabled model
    peft_model = t._unwrapped()
    seqs, _ = t.collect_rollouts()
    batch = pack([s.prompt_ids for s in seqs], [s.response_ids for s in seqs], t.pad_id)
    with torch.no_grad(), peft_model.disable_adapter():
        base_lp, _ = response_logprobs(peft_model, batch, cfg.temperature)
    with torch.no_grad():
        live_lp, _ = response_logprobs(peft_model, batch, cfg.temperature)
    for i, s in enumerate(seqs):
        n = len(s.response_ids)
        torch.testing.assert_close(torch.tensor(s.ref_logp), base_lp[i, :n], atol=1e-5, rtol=0)
    assert (live_lp - base_lp).mul(batch.resp_mask).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# checkpoints: exact resume, atomic dirs, keep_last, final/ loadable by plain transformers
# ------------------------------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def _optimizer_states_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(w)), (k, name)


def test_resume_is_exact(tmp_path, tok, make_model):
    exs = toy_examples(16)
    store = tmp_path / "store"
    make_store(store, make_model(seed=0), tok, exs, n=8, threshold=0.125)
    common = dict(
        reference_store=str(store),
        max_steps=5,
        save_every=2,
        keep_last=1,
        mini_batches=2,
        lr_schedule="linear",
        lr=2e-2,
        rollout_n=4,
        micro_batch_size=4,
    )

    cfg_a = base_cfg(tmp_path / "a", "dph", **common)
    a = Trainer(cfg_a, model=make_model(seed=0), tokenizer=tok, examples=exs)
    a.train()

    cfg_b = base_cfg(tmp_path / "b", "dph", **common)
    b1 = Trainer(cfg_b, model=make_model(seed=0), tokenizer=tok, examples=exs)
    real_collect = b1.collect_rollouts

    def crashing_collect():
        if b1.step == 3:  # dies in step 4, after step 3 was logged but not checkpointed
            raise Crash
        return real_collect()

    b1.collect_rollouts = crashing_collect
    with pytest.raises(Crash):
        b1.train()
    ck = Path(cfg_b.output_dir) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000002"]
    assert [m["step"] for m in read_metrics(cfg_b.output_dir)] == [1, 2, 3]

    b2 = Trainer(cfg_b, model=make_model(seed=0), tokenizer=tok, examples=exs)  # the store's base model ...
    with torch.no_grad():  # ... then other weights: the checkpoint must restore them
        for p in b2._unwrapped().parameters():
            p.add_(torch.randn_like(p))
    b2.resume("latest")
    assert b2.step == 2
    assert [m["step"] for m in read_metrics(cfg_b.output_dir)] == [1, 2]  # step 3's line dropped
    b2.train()

    wa, wb = a._unwrapped().state_dict(), b2._unwrapped().state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    _optimizer_states_equal(a.optimizer.state_dict(), b2.optimizer.state_dict())
    assert a.scheduler.state_dict() == b2.scheduler.state_dict()
    assert a.totals == b2.totals

    ma, mb = read_metrics(cfg_a.output_dir), read_metrics(cfg_b.output_dir)
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5]
    for x, y in zip(ma, mb):
        for k in x:
            if not k.startswith(("time/", "throughput/", "memory/")):
                assert x[k] == y[k], (x["step"], k)

    # atomic dirs, keep_last=1: only the newest checkpoint survives, nothing temporary left
    for run in (cfg_a.output_dir, cfg_b.output_dir):
        ck = Path(run) / "checkpoints"
        assert sorted(p.name for p in ck.iterdir()) == ["step_000004"]
        assert not list(Path(run).rglob("*.tmp"))
        assert sorted(p.name for p in (ck / "step_000004").iterdir()) == [
            "COMPLETE",  # written last: only complete checkpoints are resumable
            "config.yaml",
            "model.safetensors",
            "optimizer.pt",
            "rng_0.json",
            "trainer_state.json",
        ]

    # final/ is a plain transformers model + tokenizer
    final = Path(cfg_b.output_dir) / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, wb[k]), k
    tok2 = AutoTokenizer.from_pretrained(final)
    assert tok2("12+3")["input_ids"] == tok("12+3")["input_ids"]
    assert json.loads((final / "dphrl_totals.json").read_text())["step"] == 5


def test_save_after_train_then_resume_with_more_steps(tmp_path, tok, make_model):
    """2 steps + save_checkpoint + new Trainer + resume("latest") + 2 steps == 4 steps."""
    exs = toy_examples(8)
    kw = dict(mini_batches=2, lr=2e-2, micro_batch_size=4, keep_last=1)
    a = Trainer(
        base_cfg(tmp_path / "a", "grpo", max_steps=4, **kw), model=make_model(), tokenizer=tok, examples=exs
    )
    a.train()
    cfg2 = base_cfg(tmp_path / "b", "grpo", max_steps=2, **kw)
    b = Trainer(cfg2, model=make_model(), tokenizer=tok, examples=exs)
    b.train()
    first = b.save_checkpoint()
    assert first.name == "step_000002" and (first / "model.safetensors").exists()
    cfg4 = base_cfg(tmp_path / "b", "grpo", max_steps=4, **kw)
    b2 = Trainer(cfg4, model=make_model(seed=7), tokenizer=tok, examples=exs)
    b2.resume("latest")
    b2.train()
    wa, wb = a._unwrapped().state_dict(), b2._unwrapped().state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    _optimizer_states_equal(a.optimizer.state_dict(), b2.optimizer.state_dict())
    assert [m["step"] for m in read_metrics(cfg4.output_dir)] == [1, 2, 3, 4]
    b2.save_checkpoint()
    ck = Path(cfg4.output_dir) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000004"]  # keep_last=1


def test_lora_final_is_merged_and_loadable(tmp_path, tok, make_model):
    cfg = base_cfg(tmp_path, "grpo", lora=True, lora_r=4, lora_alpha=8, lr=5e-2, max_steps=1)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8))
    t.train()
    final = Path(cfg.output_dir) / "final"
    assert not (final / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in k for k in loaded.state_dict())
    peft_model = t._unwrapped().eval()
    ids = torch.tensor([encode_prompt(tok, toy_examples(1)[0].prompt) + [7, 8, 9]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - base).abs().max() > 1e-4  # the adapter did change the model, and was merged
    tok2 = AutoTokenizer.from_pretrained(final)
    assert tok2("7+7")["input_ids"] == tok("7+7")["input_ids"]


# ------------------------------------------------------------------------------------------------
# robustness: failing rewards, non-finite losses
# ------------------------------------------------------------------------------------------------


@register_reward("toy_flaky")
def toy_flaky(response: str, ex: Example) -> float:
    """Raises on example p0; 1.0 elsewhere."""
    if ex.id == "p0":
        raise ValueError("flaky reward exploded on p0")
    return 1.0


def test_reward_failures_score_zero_and_are_counted(tmp_path, tok, make_model):
    # 4 prompts per step out of 4: p0 is in every step, 4 of 16 rewards fail (25%)
    cfg = base_cfg(tmp_path, "grpo", reward="toy_flaky", max_reward_failure_frac=0.3, max_steps=1)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(4))
    t.train()
    (m,) = read_metrics(cfg.output_dir)
    assert m["reward/failures"] == 4.0
    assert m["reward/mean"] == pytest.approx(12 / 16)  # failed items score 0, the rest 1
    assert t.totals["reward_failures"] == 4


def test_too_many_reward_failures_stop_the_run(tmp_path, tok, make_model):
    cfg = base_cfg(tmp_path, "grpo", reward="toy_flaky", max_reward_failure_frac=0.2, max_steps=2)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(4))
    with pytest.raises(RewardFailureError) as e:
        t.train()
    msg = str(e.value)
    assert "4 of 16" in msg and "max_reward_failure_frac=0.2" in msg and "toy_flaky" in msg
    assert "flaky reward exploded on p0" in msg  # the underlying error is shown


def test_nonfinite_loss_skips_the_update(tmp_path, tok, make_model, monkeypatch):
    real = losses.POLICY_LOSSES["ppo_clip"]
    calls = {"n": 0}

    def nan_once(*a, **kw):
        loss, m = real(*a, **kw)
        calls["n"] += 1
        return (loss * float("nan"), m) if calls["n"] == 1 else (loss, m)

    monkeypatch.setitem(losses.POLICY_LOSSES, "ppo_clip", nan_once)
    model = make_model()
    initial = state_copy(model)
    cfg = base_cfg(tmp_path, "grpo", max_steps=2, micro_batch_size=16)
    t = Trainer(cfg, model=model, tokenizer=tok, examples=toy_examples(8))
    snapshots = []
    real_step = t.updater.optimizer_step

    def step_and_snapshot(*a):
        out = real_step(*a)
        snapshots.append((state_copy(t._unwrapped()), len(t.optimizer.state)))
        return out

    t.updater.optimizer_step = step_and_snapshot
    t.train()
    m = read_metrics(cfg.output_dir)
    assert [x["update/nonfinite_skipped"] for x in m] == [1.0, 0.0]
    assert t.totals["nonfinite_skipped"] == 1
    (w1, n_state1), (w2, _) = snapshots
    assert n_state1 == 0  # the optimizer never saw the NaN step
    for k in initial:
        assert torch.equal(w1[k], initial[k]), k
        assert torch.isfinite(w2[k]).all(), k
    assert any(not torch.equal(w2[k], initial[k]) for k in initial)  # the next step did update


def test_prompts_longer_than_max_prompt_tokens_are_dropped_with_a_count(tmp_path, tok, make_model):
    exs = toy_examples(12)  # prompts "<|user|>i+i<|assistant|>": 5 tokens for i < 10, 7 tokens for i >= 10
    cfg = base_cfg(tmp_path, "grpo", max_prompt_tokens=5)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=exs)
    assert t.dropped_long_prompts == 2
    assert [ex.id for ex in t.rollout_examples] == [f"p{i}" for i in range(10)]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        Trainer(
            base_cfg(tmp_path, "grpo", max_prompt_tokens=2), model=make_model(), tokenizer=tok, examples=exs
        )


def test_recomputed_old_logprobs_equal_the_engine_logprobs(tmp_path, tok, make_model):
    cfg = base_cfg(tmp_path, "grpo", old_logprob="recompute", ppo_epochs=2, mini_batches=2)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8))
    rollouts, _ = t.collect_rollouts()
    engine_lp = [list(s.old_logp) for s in rollouts]
    t.updater.recompute_old_logprobs(rollouts)
    for s, e in zip(rollouts, engine_lp):
        assert torch.allclose(torch.tensor(s.old_logp), torch.tensor(e), atol=1e-5)
    m = t.update(rollouts, [])
    assert m["pg/ratio_mean"] != 1.0  # later mini-batches/epochs see a moved policy against a fixed pi_old


def test_top_p_below_one_defaults_to_recompute(tmp_path):
    assert base_cfg(tmp_path, "grpo", top_p=0.9).old_logprob == "recompute"
    cfg = base_cfg(tmp_path, "grpo")  # engine auto: pi_old's source is resolved with the engine at run time
    assert cfg.old_logprob is None and cfg.engine == "auto"
    assert (cfg.old_logprob_for("hf"), cfg.old_logprob_for("vllm")) == ("rollout", "recompute")
    assert base_cfg(tmp_path, "grpo", engine="hf").old_logprob == "rollout"
