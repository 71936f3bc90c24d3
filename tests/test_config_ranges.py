"""Every config key is range-checked from its field metadata, and every config error names the key, where
it came from (file:line, nested keys included, or the command line) and, for unknown keys, a suggestion."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from dphrl.cli import main
from dphrl.config import (
    KEY_ALIASES,
    Check,
    ConfigError,
    Items,
    Optional,
    Range,
    TrainConfig,
    config_help,
    load_config,
)

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
BASE = {"model": "m", "algorithm": "grpo"}


def _base_type(name: str) -> type:
    args = [a for a in typing.get_args(HINTS[name]) if a is not type(None)]
    return args[0] if args else HINTS[name]


def _range(name: str) -> Range:
    check = FIELDS[name].metadata["check"]
    while isinstance(check, Optional):
        check = check.check
    assert isinstance(check, Range), f"numeric field {name} must be checked by a Range, got {check!r}"
    return check


def _outside(r: Range, integer: bool) -> list[float]:
    """Values just outside each bound of ``r`` (never its ``off`` value)."""
    down = (lambda x: x - 1) if integer else (lambda x: math.nextafter(x, -math.inf))
    up = (lambda x: x + 1) if integer else (lambda x: math.nextafter(x, math.inf))
    vals = [down(r.ge) if r.ge is not None else None, r.gt, up(r.le) if r.le is not None else None, r.lt]
    return [v for v in vals if v is not None and v != r.off]


NUMERIC = [n for n in FIELDS if _base_type(n) in (int, float)]


def test_every_field_has_a_declarative_check_and_its_default_passes():
    for name, f in FIELDS.items():
        check = f.metadata.get("check")
        assert isinstance(check, Check), (
            f"field {name!r} has no check= in its metadata (see dphrl.config.Range & co.)"
        )
        assert f.metadata.get("help"), f"field {name!r} has no help text"
    TrainConfig(**BASE)  # every default passes its own check
    assert len(NUMERIC) > 40  # the walk below covers the numeric fields


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_field_refuses_values_just_outside_its_range(name):
    r = _range(name)
    integer = _base_type(name) is int
    bad = _outside(r, integer)
    assert bad, f"{name}: a Range without bounds checks nothing"
    if not integer:
        bad += [math.inf, -math.inf, math.nan]
    for value in bad:
        with pytest.raises(ConfigError) as e:
            TrainConfig(**BASE, **{name: value})
        assert e.value.key == name and f"'{name}'" in str(e.value), (name, value, str(e.value))
    # the bounds themselves are allowed (rollout_n 1 needs a non-group advantage: a cross-field check)
    for value in (r.ge, r.le):
        if value is not None and name != "rollout_n":
            assert getattr(TrainConfig(**BASE, **{name: value}), name) == value


def test_betas_each_in_zero_one():
    check = FIELDS["betas"].metadata["check"]
    assert isinstance(check, Items) and check.length == 2
    for bad in ([0.9, 1.0], [-1e-9, 0.9], [0.9, math.nan], [0.9], [0.9, 0.99, 0.999], "0.9"):
        with pytest.raises(ConfigError, match="'betas'"):
            TrainConfig(**BASE, betas=bad)
    assert TrainConfig(**BASE, betas=[0.0, 0.95]).betas == [0.0, 0.95]


@pytest.mark.parametrize(
    "override",
    [
        "log_every=0",
        "generation_batch_size=0",
        "lr=inf",
        "lr=.nan",
        "save_every=-1",
        "warmup_steps=-5",
        "reward_timeout_s=-1",
        "reward_workers=-2",
        "reward_timeout_s=.inf",
        "rollout_n=.inf",
    ],
)
def test_issue_values_are_refused_with_key_and_place(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model=m", "algorithm=grpo", override])
    assert e.value.key == key
    assert str(e.value).startswith(f"config key '{key}' (command line): got ")


@pytest.mark.parametrize(
    "name,value",
    [
        ("trackers", ["tensorbord"]),
        ("lr_schedule", "cosin"),
        ("dtype", "fp16"),
        ("old_logprob", "sampled"),
        ("engine", "vlm"),
        ("loss_agg", "token_mean"),
        ("policy_loss", "ppo"),
        ("advantage", "gae"),
        ("kl_estimator", "k4"),
        ("rehearsal_form", "top_k"),
        ("reward", "no_such_reward"),
        ("algorithm", "ppo"),
        ("model", ""),
        ("output_dir", " "),
        ("lora", "yes"),
        ("divergence_params", [1]),
        ("lr", "fast"),
        ("max_steps", 2.5),
    ],
)
def test_non_numeric_checks_name_the_key(name, value):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{**BASE, name: value})
    assert e.value.key == name and f"'{name}'" in str(e.value)


def test_cross_field_checks_stay(tmp_path):
    with pytest.raises(ConfigError, match="'overlong_buffer'.*max_new_tokens"):
        TrainConfig(**{**BASE, "algorithm": "dapo"}, max_new_tokens=8, overlong_buffer=9)
    with pytest.raises(ConfigError, match="'kl_coef'"):  # dph has no live reference either
        TrainConfig(**{**BASE, "algorithm": "dph"}, reference_store="s", kl_coef=0.1)
    with pytest.raises(ConfigError, match="'eval_data'"):
        TrainConfig(**BASE, eval_every=5)
    with pytest.raises(ConfigError, match="'old_logprob'.*vllm"):
        TrainConfig(**BASE, engine="vllm", old_logprob="rollout")
    with pytest.raises(ConfigError, match="'rehearsal_topk'"):
        TrainConfig(**{**BASE, "algorithm": "dph"}, reference_store="s", rehearsal_form="topk")
    assert TrainConfig(**BASE, dual_clip=0).dual_clip == 0  # 0 = off, outside the range (1, inf)


def _yaml(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text("model: m\nalgorithm: grpo\n" + text)
    return p


def test_range_errors_carry_file_and_line(tmp_path):
    p = _yaml(tmp_path, "seed: 1\nlr: .inf\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"config key 'lr' ({p}:4): got inf, expected a finite number > 0")
    assert e.value.where == f"{p}:4"
    with pytest.raises(ConfigError, match=r"'save_every' \(command line\)"):
        load_config(p, ["lr=1e-5", "save_every=-1"])
    with pytest.raises(
        ConfigError, match=rf"'reference_store' \(not set in {re.escape(str(p))}\).*presample"
    ):
        load_config(p, ["lr=1e-5", "algorithm=dph"])


def test_dataset_subkeys_are_checked_at_config_time_with_their_line(tmp_path):
    absent = tmp_path / "absent.jsonl"  # never read: a wrong key is found before any data is
    p = _yaml(tmp_path, f"dataset:\n  type: gsm8k\n  path: {absent}\n  limt: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert e.value.key == "dataset.limt" and msg.startswith(f"config key 'dataset.limt' ({p}:6): ")
    assert "Did you mean 'limit'?" in msg and "valid: ['limit', 'path', 'seed', 'system', 'type']" in msg
    ok = _yaml(tmp_path, f"dataset: {{type: gsm8k, path: {absent}}}\n", "ok.yaml")
    assert load_config(ok, ["dataset.limit=8"]).dataset["limit"] == 8
    with pytest.raises(ConfigError, match=r"'dataset\.limt' \(command line\).*'limit'"):
        load_config(ok, ["dataset.limt=8"])
    with pytest.raises(ConfigError, match=rf"'dataset\.limit' \({re.escape(str(p))}:4\).*integer >= 1"):
        load_config(_yaml(tmp_path, f"dataset:\n  limit: 0\n  type: gsm8k\n  path: {absent}\n"))
    assert not absent.exists()
    with pytest.raises(ConfigError, match=r"'dataset\.type'.*unknown dataset type 'gsm8kk'.*'gsm8k'"):
        load_config(ok, ["dataset.type=gsm8kk"])
    # no type yet: any loader's keys
    with pytest.raises(ConfigError, match=r"'dataset\.max_samples'.*Did you mean 'limit'"):
        load_config(overrides=["model=m", "algorithm=grpo", "dataset.max_samples=3"])


def test_eval_data_specs_are_checked_with_nested_lines(tmp_path):
    p = _yaml(tmp_path, "eval_every: 2\neval_data:\n  gsm8k:\n    type: gsm8k\n    path: x.jsonl\n"
                        "    limmit: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert (
        e.value.key == "eval_data.gsm8k.limmit" and f"({p}:8)" in str(e.value) and "'limit'" in str(e.value)
    )
    cfg = load_config(p, ["eval_data.gsm8k={type: gsm8k, path: x.jsonl}", "eval_data.gsm8k.limit=4"])
    assert cfg.eval_data == {"gsm8k": {"type": "gsm8k", "path": "x.jsonl", "limit": 4}}
    with pytest.raises(ConfigError, match=r"'eval_data\.gsm8k'.*dataset spec"):
        TrainConfig(**BASE, eval_data={"gsm8k": {}})


@pytest.mark.parametrize(
    "key,meant",
    [
        ("learning_rate", "lr"),
        ("num_generations", "rollout_n"),
        ("beta", "kl_coef"),
        ("max_completion_length", "max_new_tokens"),
        ("max_prompt_length", "max_prompt_tokens"),
        ("epsilon", "clip_low"),
        ("epsilon_high", "clip_high"),
        ("num_iterations", "ppo_epochs"),
        ("gradient_accumulation_steps", "micro_batch_size"),
        ("loss_type", "loss_agg"),
        ("temprature", "temperature"),
    ],
)
def test_unknown_keys_suggest_the_dphrl_key(tmp_path, key, meant):
    p = _yaml(tmp_path, f"{key}: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"unknown config key '{key}' ({p}:3). Did you mean '{meant}'?")


def test_alias_table_points_at_real_keys():
    for alias, (key, _note) in KEY_ALIASES.items():
        assert key in FIELDS and alias not in FIELDS, alias


def test_cli_reports_a_dataset_typo_without_a_traceback(tmp_path, capsys):
    p = _yaml(tmp_path, "dataset:\n  type: jsonl\n  path: nowhere.jsonl\n  limt: 4\n")
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"config key 'dataset.limt' ({p}:6)" in err and "Did you mean 'limit'?" in err
    assert "Traceback" not in err


def test_reference_states_what_each_key_allows():
    text = config_help()
    assert text.splitlines()[0] == "| key | default | allowed | meaning |"
    assert "| `lr` | `1e-06` | a finite number > 0 |" in text
    assert "| `dual_clip` | `null` | 0 (off) or a finite number > 1, or null" in text
    assert "| `betas` | `[0.9, 0.999]` | a list of 2 items, each a finite number in [0, 1) |" in text
