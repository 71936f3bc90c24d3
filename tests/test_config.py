"""TrainConfig: YAML + overrides, error messages, algorithm presets, config_help."""

from __future__ import annotations

import dataclasses

import pytest

from dphrl.config import ConfigError, TrainConfig, config_help, load_config


def _yaml(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_line_and_suggestion(tmp_path):
    p = _yaml(tmp_path, "model: tiny\nalgorithm: grpo\nmax_new_token: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'max_new_token'" in msg
    assert "cfg.yaml:3" in msg
    assert "did you mean" in msg.lower() and "'max_new_tokens'" in msg
    # the closest real key is suggested
    p = _yaml(tmp_path, "model: tiny\nalgorithm: grpo\n\nrollout: 4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:4.*rollout_n"):
        load_config(p)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"'temprature'.*command line.*temperature"):
        load_config(overrides=["model=tiny", "algorithm=grpo", "temprature=0.5"])


@pytest.mark.parametrize(
    "text,key",
    [
        ("lr: fast\n", "lr"),
        ("rollout_n: 2.5\n", "rollout_n"),
        ("lora: 'yes please'\n", "lora"),
        ("dataset: [1, 2]\n", "dataset"),
        ("prompts_per_step: null\n", "prompts_per_step"),
    ],
)
def test_bad_value_type_names_the_key(tmp_path, text, key):
    p = _yaml(tmp_path, "model: tiny\nalgorithm: grpo\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"'{key}'" in str(e.value)
    assert "cfg.yaml:3" in str(e.value)


def test_bad_value_range_names_the_key():
    with pytest.raises(ConfigError, match="'temperature'"):
        TrainConfig(model="tiny", algorithm="grpo", temperature=0.0)
    with pytest.raises(ConfigError, match="'algorithm'"):
        TrainConfig(model="tiny", algorithm="ppo")
    with pytest.raises(ConfigError, match="'keep_last'"):
        TrainConfig(model="tiny", algorithm="grpo", keep_last=0)
    with pytest.raises(ConfigError, match="'kl_coef'"):
        load_config(overrides=["model=tiny", "algorithm=rkl", "kl_coef=-1"])


def test_overrides_win_and_dotted_keys(tmp_path):
    # PyYAML reads 1e-5 (no dot) as a string: it must still become the float 1e-5
    assert load_config(_yaml(tmp_path, "model: tiny\nalgorithm: grpo\nlr: 1e-5\n")).lr == 1e-5
    p = _yaml(tmp_path, "model: tiny\nalgorithm: grpo\nlr: 0.001\ndataset:\n  type: gsm8k\n  path: x.jsonl\n")
    cfg = load_config(p, ["lr=3e-5", "rollout_n=4", "dataset.limit=5", "lora=true", "clip_high=null"])
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float)
    assert cfg.rollout_n == 4 and isinstance(cfg.rollout_n, int)
    assert cfg.lora is True
    assert cfg.dataset == {"type": "gsm8k", "path": "x.jsonl", "limit": 5}
    assert cfg.clip_high == 0.2  # null -> filled by the grpo preset
    cfg = load_config(overrides=["model=tiny", "algorithm=grpo", "dataset.limit=5"])
    assert cfg.dataset == {"limit": 5}
    with pytest.raises(ConfigError, match="dotted"):
        load_config(overrides=["model=tiny", "algorithm=grpo", "lr.x=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["model=tiny", "lr"])


def test_algorithm_presets():
    grpo = TrainConfig(model="m", algorithm="grpo")
    assert (grpo.clip_high, grpo.dual_clip, grpo.loss_agg, grpo.kl_coef) == (
        0.2,
        None,
        "seq-mean-token-mean",
        0.0,
    )
    assert grpo.dynamic_sampling is False and grpo.overlong_buffer == 0
    rkl = TrainConfig(model="m", algorithm="rkl")
    assert (rkl.clip_high, rkl.kl_coef) == (0.2, 0.01)
    dapo = TrainConfig(model="m", algorithm="dapo", max_new_tokens=64)
    assert (dapo.clip_high, dapo.loss_agg, dapo.dynamic_sampling, dapo.overlong_buffer) == (
        0.28,
        "token-mean",
        True,
        16,
    )
    js = TrainConfig(model="m", algorithm="dph", reference_store="s")
    assert (js.clip_high, js.dual_clip, js.loss_agg, js.divergence, js.eta) == (
        0.28,
        3.0,
        "token-mean",
        "js",
        0.2,
    )
    assert js.kl_coef == 0.0
    fkl = TrainConfig(model="m", algorithm="dph", reference_store="s", divergence="forward_kl")
    assert fkl.eta == 0.01


def test_explicit_values_are_not_overridden_by_presets():
    c = TrainConfig(
        model="m",
        algorithm="dph",
        reference_store="s",
        divergence="forward_kl",
        eta=0.5,
        clip_high=0.25,
        dual_clip=2.0,
        loss_agg="seq-mean-token-mean",
    )
    assert (c.eta, c.clip_high, c.dual_clip, c.loss_agg) == (0.5, 0.25, 2.0, "seq-mean-token-mean")
    c = TrainConfig(model="m", algorithm="dapo", dynamic_sampling=False, overlong_buffer=0, clip_high=0.2)
    assert (c.dynamic_sampling, c.overlong_buffer, c.clip_high) == (False, 0, 0.2)
    c = TrainConfig(model="m", algorithm="rkl", kl_coef=0.05)
    assert c.kl_coef == 0.05
    # dual clip can be switched off for dph (0), so that dph and grpo share one policy loss
    c = TrainConfig(model="m", algorithm="dph", reference_store="s", dual_clip=0)
    assert c.dual_clip == 0
    with pytest.raises(ConfigError, match="dual_clip"):
        TrainConfig(model="m", algorithm="grpo", dual_clip=0.5)


def test_dph_without_reference_store_says_to_presample():
    with pytest.raises(ConfigError) as e:
        TrainConfig(model="m", algorithm="dph")
    assert "reference_store" in str(e.value) and "presample" in str(e.value)


def test_kl_coef_only_for_rkl():
    with pytest.raises(ConfigError, match="rkl"):
        TrainConfig(model="m", algorithm="grpo", kl_coef=0.1)


def test_config_help_lists_every_field():
    text = config_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"`{f.name}`" in text, f.name
        assert f.metadata.get("help"), f"field {f.name} has no help text"


def test_saved_config_round_trips(tmp_path):
    c = TrainConfig(
        model="m",
        algorithm="dph",
        reference_store="s",
        divergence="forward_kl",
        dataset={"type": "gsm8k", "limit": 3},
        betas=[0.9, 0.95],
    )
    c.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c
