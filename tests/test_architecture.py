"""One place per decision: the registry idiom, the algorithm table, the engine factory, launch checks."""

from __future__ import annotations

import functools
import json
import sys
import textwrap

import pytest
import torch
from conftest import base_cfg, toy_examples

from dphrl import advantages, divergences, losses
from dphrl.algorithms import ALGORITHMS, COMMON_DEFAULTS, AlgorithmSpec, get_algorithm
from dphrl.batching import pad_token_id
from dphrl.config import ConfigError, TrainConfig, load_config
from dphrl.engines import ENGINES, build_engine, resolve_engine
from dphrl.launch import Launch, check_launch
from dphrl.registry import Registry
from dphrl.rewards.registry import CORRECT_THRESHOLD, REWARDS
from dphrl.trainer import Trainer

REGISTRIES = [
    (divergences.DIVERGENCES, "divergence"),
    (losses.POLICY_LOSSES, "policy_loss"),
    (losses.AGGREGATIONS, "loss_agg"),
    (losses.KL_ESTIMATORS, "kl_estimator"),
    (advantages.ADVANTAGES, "advantage"),
    (REWARDS, "reward"),
    (ENGINES, "engine"),
    (ALGORITHMS, "algorithm"),
]


@pytest.mark.parametrize("reg,key", REGISTRIES, ids=[k for _, k in REGISTRIES])
def test_every_registry_names_its_key_and_lists_the_valid_names(reg, key):
    assert isinstance(reg, Registry) and reg.config_key == key and len(reg) > 0
    with pytest.raises(ValueError) as e:
        reg.get("no_such_name")
    msg = str(e.value)
    assert f"config key '{key}'" in msg and "package.module:attr" in msg
    assert all(repr(n) in msg for n in reg.names())
    with pytest.raises(ValueError, match="cannot import"):
        reg.get("dphrl.no_such_module:x")


def test_close_matches_are_suggested():
    with pytest.raises(ValueError, match="Did you mean 'forward_kl'"):
        divergences.DIVERGENCES.get("forward_kll")


def test_registering_by_decorator_and_refusing_silent_replacement():
    reg: Registry = Registry("thing", config_key="thing")

    @reg.register("a")
    def a() -> int:
        return 1

    assert reg.get("a") is a and "a" in reg and reg.names() == ["a"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", lambda: 2)
    reg.register("a", len, overwrite=True)
    assert reg["a"] is len
    assert reg.get("missing", None) is None  # dict-style get with a default


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user package on sys.path with a divergence generator and an advantage function."""
    (tmp_path / "my_user_code.py").write_text(textwrap.dedent('''
        import torch

        def squared_log(u):
            return 0.5 * torch.log(u) ** 2

        def zero_advantages(rewards, group_size):
            return torch.zeros_like(rewards), {"adv/mean": 0.0}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_user_code"
    sys.modules.pop("my_user_code", None)


def test_a_user_divergence_is_usable_from_a_recipe(tmp_path, user_module, tok, make_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny\nalgorithm: dph\nreference_store: {tmp_path / 's'}\n"
                      f"divergence: {user_module}:squared_log\nadvantage: {user_module}:zero_advantages\n")
    cfg = load_config(recipe)
    assert cfg.divergence == f"{user_module}:squared_log" and cfg.eta == 0.1  # the generic default eta
    d = torch.tensor([[-2.0, 0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    per_tok = divergences.per_token_loss(cfg.divergence, d, torch.zeros_like(d))
    torch.testing.assert_close(per_tok, 0.5 * d.detach() ** 2)  # g(d) = f(exp(d)) = d^2 / 2
    per_tok.sum().backward()
    torch.testing.assert_close(d.grad, d.detach())
    adv, _ = advantages.compute_advantages(cfg.advantage, torch.tensor([1.0, 0.0]), 2)
    assert adv.tolist() == [0.0, 0.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: tiny\nalgorithm: dph\nreference_store: x\ndivergence: {user_module}:nope\n")
    with pytest.raises(ConfigError, match="config key 'divergence'.*cannot import 'nope'"):
        load_config(bad)


def test_the_algorithm_table_fills_presets_and_common_defaults():
    for name in ("grpo", "dapo", "rkl", "dph"):
        spec = get_algorithm(name)
        cfg = TrainConfig(model="m", algorithm=name, reference_store="s")
        for key, value in {**COMMON_DEFAULTS, **spec.defaults}.items():  # the algorithm's preset wins
            assert getattr(cfg, key) == (value(cfg) if callable(value) else value), (name, key)
    assert TrainConfig(model="m", algorithm="dph", reference_store="s", divergence="forward_kl").eta == 0.01
    assert TrainConfig(model="m", algorithm="dapo", max_new_tokens=40).overlong_buffer == 10
    # user wins
    assert TrainConfig(model="m", algorithm="dph", reference_store="s", clip_high=0.1).clip_high == 0.1
    flags = {n: (s.rollout_prompts, s.live_reference, s.rehearsal) for n, s in ALGORITHMS.items()}
    assert flags == {"grpo": ("all", False, False), "dapo": ("all", False, False),
                     "rkl": ("all", True, False), "dph": ("d_exp", False, True)}
    with pytest.raises(ConfigError, match="config key 'algorithm'.*'grpo'"):
        TrainConfig(model="m", algorithm="ppo")


def test_a_new_algorithm_is_one_entry(tmp_path, tok, make_model):
    """An algorithm registered in the table trains with no other change (here: grpo with a live-reference KL
    term by default, i.e. 'rkl with k2')."""
    spec = AlgorithmSpec("test_rkl_k2", "rkl with k2", defaults={"kl_coef": 0.05},
                         live_reference=True)
    ALGORITHMS.register(spec.name, spec)
    try:
        cfg = base_cfg(tmp_path, spec.name, kl_estimator="k2", max_steps=1)
        assert cfg.kl_coef == 0.05 and cfg.clip_high == COMMON_DEFAULTS["clip_high"]
        t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8))
        assert t.live_reference and t.ref_model is not None
        last = t.train()
        assert "kl/value" in last
    finally:
        ALGORITHMS.pop(spec.name)


def test_engine_factory_resolves_auto_at_run_time_and_records_it(tmp_path, tok, make_model):
    cfg = base_cfg(tmp_path, "grpo", max_steps=1)
    assert cfg.engine == "auto"
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(4))
    t.train()
    info = json.loads((tmp_path / "run_grpo" / "run_info.json").read_text())
    assert (info["engine_requested"], info["engine"], info["old_logprob"]) == ("auto", "hf", "rollout")
    saved = (tmp_path / "run_grpo" / "config.yaml").read_text()
    assert "engine: auto" in saved  # the config is the user's choice, not this machine's
    assert json.loads((tmp_path / "run_grpo" / "final" / "dphrl_run_info.json").read_text())["engine"] == "hf"
    with pytest.raises(ValueError, match="config key 'engine'.*'hf'"):
        build_engine("hff", None, tok)
    assert resolve_engine("hf") == "hf"
    eng = build_engine("hf", make_model(), tok, batch_size=3, model_name="ignored")
    assert type(eng).__name__ == "HFEngine" and eng.batch_size == 3


def test_launch_checks_are_one_function():
    cfg = TrainConfig(model="m", algorithm="grpo", prompts_per_step=6, lora=True, old_logprob="rollout")
    ok = check_launch(cfg, Launch(world_size=2, sharding="ddp", engine="hf"))
    assert ok.errors == [] and ok.warnings == []
    bad = check_launch(cfg, Launch(world_size=4, sharding="fsdp", engine="vllm", engine_was_auto=True))
    text = "\n".join(bad.errors)
    assert "'prompts_per_step' (6) must be divisible" in text and "lora=true under FSDP" in text
    assert "'old_logprob': rollout cannot be used with the vllm engine" in text
    z3 = check_launch(cfg, Launch(world_size=2, sharding="zero3"))
    assert any("refuses DeepSpeed" in e for e in z3.errors)
    auto_hf = check_launch(
        TrainConfig(model="m", algorithm="grpo"), Launch(engine="hf", engine_was_auto=True)
    )
    assert auto_hf.errors == [] and "engine auto resolved to hf" in auto_hf.warnings[0]


def test_the_trainer_raises_the_launch_refusals(tmp_path, tok, make_model, monkeypatch):
    from dphrl.engines import vllm as vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)  # auto -> vllm here
    cfg = base_cfg(tmp_path, "grpo", old_logprob="rollout")
    with pytest.raises(ConfigError, match="'old_logprob': rollout cannot be used with the vllm engine"):
        Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(4))


def test_one_pad_helper_and_one_correctness_threshold(tok):
    assert pad_token_id(tok) == tok.pad_token_id == 0

    class NoPad:
        pad_token_id, eos_token_id = None, 7

    assert pad_token_id(NoPad()) == 7
    NoPad.eos_token_id = None
    with pytest.raises(ValueError, match="pad token"):
        pad_token_id(NoPad())
    from dphrl.evaluation.metrics import DEFAULT_THRESHOLD

    assert DEFAULT_THRESHOLD == CORRECT_THRESHOLD == 1.0


def test_the_demo_reports_progress_through_a_callback(tmp_path, tok, make_model):
    seen = []
    cfg = base_cfg(tmp_path, "grpo", max_steps=2)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(4),
                callbacks=[lambda tr, m: seen.append((tr.step, m["step"], "reward/mean" in m))])
    t.train()
    assert seen == [(1, 1, True), (2, 2, True)]


_ENGINE_MODULE = '''
from dphrl.engines import with_capabilities
from dphrl.engines.hf import HFEngine

CALLS = {"generate": 0, "sync": 0}


class CopyEngine(HFEngine):
    """Generates from its own copy of the weights, like an inference server would."""

    def __init__(self, model, tokenizer, **kw):
        import copy

        super().__init__(copy.deepcopy(model), tokenizer, **kw)

    def generate(self, *a, **kw):
        CALLS["generate"] += 1
        return super().generate(*a, **kw)

    def sync_weights(self, model):
        CALLS["sync"] += 1
        self.model.load_state_dict(model.state_dict())


@with_capabilities(uses_policy_module=False, exact_logprobs=False, needs_model=True)
def factory(model, tokenizer, *, batch_size=64, **_):
    return CopyEngine(model, tokenizer, batch_size=batch_size)


def no_sync(model, tokenizer, **_):  # declares nothing: the defaults say it keeps its own weights
    return HFEngine(model, tokenizer)
'''


def test_an_engine_from_outside_the_package_is_one_entry(tmp_path, tok, make_model, monkeypatch):
    """``engine: my_mod:factory`` from YAML: its declared capabilities decide pi_old (recomputed: its
    log-probs are not declared exact) and the weight pushes (one before the first rollout, one after
    every update), with no engine name compared anywhere."""
    (tmp_path / "my_engine_mod.py").write_text(_ENGINE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "cfg.yaml").write_text("algorithm: grpo\nmodel: toy\nengine: my_engine_mod:factory\n")
    cfg = load_config(tmp_path / "cfg.yaml", [f"output_dir={tmp_path / 'run'}", "reward=toy_first_char",
                                              "prompts_per_step=4", "rollout_n=4", "max_new_tokens=4",
                                              "max_steps=3", "progress=false", "reward_workers=0"])
    assert cfg.old_logprob == "recompute"
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8))
    mod = sys.modules["my_engine_mod"]
    assert t.engine_caps.uses_policy_module is False and type(t.engine).__name__ == "CopyEngine"
    t.train()
    assert mod.CALLS == {"generate": 3, "sync": 3}  # pushed before each of the 3 rollouts
    for a, b in zip(t.engine.model.parameters(), t._unwrapped().parameters()):
        assert not torch.equal(a, b)  # the last update came after the last push
    with pytest.raises(
        ConfigError, match="'old_logprob'.*rollout cannot be used with the my_engine_mod:factory engine"
    ):
        load_config(tmp_path / "cfg.yaml", ["old_logprob=rollout"])
    bad = base_cfg(tmp_path / "b", "grpo", engine="my_engine_mod:no_sync", max_steps=1)
    with pytest.raises(TypeError, match="has no sync_weights"):
        Trainer(bad, model=make_model(), tokenizer=tok, examples=toy_examples(8)).train()


@pytest.mark.parametrize("overrides", [
    {"advantage": "passk", "passk_k": 2}, {"advantage": "pkpo", "passk_k": 3, "passk_anneal_step": 1},
    {"advantage": "w_reinforce", "w_reinforce_lambda": 0.5},
    {"policy_loss": "kl_cov", "kl_cov_ratio": 0.1}, {"policy_loss": "clip_cov", "clip_cov_ratio": 0.5},
], ids=["passk", "pkpo-annealed", "w_reinforce", "kl_cov", "clip_cov"])
def test_diversity_entries_train_from_their_config_keys(tmp_path, tok, make_model, overrides, monkeypatch):
    """Each entry receives exactly its declared config parameters (dphrl.registry.config_params)."""
    seen: list[dict] = []
    name = overrides.get("advantage") or overrides["policy_loss"]
    reg = advantages.ADVANTAGES if "advantage" in overrides else losses.POLICY_LOSSES
    real = reg[name]

    @functools.wraps(real)  # same signature and config_params
    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setitem(reg, name, spy)
    cfg = base_cfg(tmp_path, "grpo", max_steps=2, **overrides)
    Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8)).train()
    assert seen
    for param, key in real.config_params.items():
        want = getattr(cfg, key)
        if key == "passk_k" and cfg.passk_anneal_step:  # step 0 uses k, from step 1 on k_final
            assert [kw[param] for kw in seen] == [cfg.passk_k, cfg.passk_k_final]
        else:
            assert all(kw[param] == want for kw in seen), (param, key)
    if name == "clip_cov":
        assert all(isinstance(kw["generator"], torch.Generator) for kw in seen)


def test_diversity_entries_refuse_impossible_settings(tmp_path):
    with pytest.raises(ConfigError, match="'passk_k'.*<= rollout_n"):
        base_cfg(tmp_path, "grpo", advantage="passk", passk_k=9, rollout_n=4)
    # k = rollout_n: every group's pass@k is 0 or 1, every advantage 0 (pkpo still learns there)
    with pytest.raises(ConfigError, match="'passk_k'.*every advantage is 0"):
        base_cfg(tmp_path, "grpo", advantage="passk", passk_k=4, rollout_n=4)
    with pytest.raises(ConfigError, match="'passk_k_final'.*every advantage is 0"):
        base_cfg(tmp_path, "grpo", advantage="passk", passk_k=2, passk_k_final=4, passk_anneal_step=3,
                 rollout_n=4)
    assert base_cfg(tmp_path, "grpo", advantage="pkpo", passk_k=4, rollout_n=4).passk_k == 4
    assert base_cfg(tmp_path, "grpo", advantage="passk", passk_k=3, passk_k_final=4, rollout_n=4).passk_k == 3
    with pytest.raises(ConfigError, match="'dual_clip'.*kl_cov"):
        TrainConfig(model="m", algorithm="dph", reference_store="s", policy_loss="kl_cov")
    assert (
        TrainConfig(
            model="m", algorithm="dph", reference_store="s", policy_loss="kl_cov", dual_clip=0
        ).dual_clip
        == 0
    )
    with pytest.raises(ConfigError, match="'clip_cov_ub'"):
        base_cfg(tmp_path, "grpo", policy_loss="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0)
