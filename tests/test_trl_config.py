"""A dphrl config as TRL arguments: every mapped value, TRL defaults overridden, and refusals by key."""

import pytest

pytest.importorskip("trl")

from trl import GRPOConfig  # noqa: E402

from dphrl.config import TrainConfig  # noqa: E402
from dphrl.integrations.trl_config import (  # noqa: E402
    TRLMappingError,
    dph_trainer_kwargs,
    grpo_config_kwargs,
    lora_config,
)


def _cfg(**kw) -> TrainConfig:
    base = dict(model="m", algorithm="dph", divergence="js", eta=0.2, reference_store="runs/store",
                prompts_per_step=4, rollout_n=8, temperature=0.7, top_p=0.95, max_new_tokens=48, lr=3e-5,
                max_steps=12, seed=7, loss_agg="token-mean", clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                lora=True, lora_r=8, lora_alpha=16)
    base.update(kw)
    return TrainConfig(**base)


def test_the_recipe_values_reach_grpoconfig_and_trl_defaults_do_not(tmp_path):
    kw = grpo_config_kwargs(_cfg(), output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args = GRPOConfig(**kw)
    assert (args.temperature, args.top_p, args.top_k) == (0.7, 0.95, 0)
    shape = (args.num_generations, args.per_device_train_batch_size, args.gradient_accumulation_steps)
    assert shape == (8, 8, 4)
    assert args.max_completion_length == 48 and args.beta == 0.0
    assert (args.loss_type, args.epsilon, args.epsilon_high, args.delta) == ("dapo", 0.2, 0.28, 3.0)
    assert args.learning_rate == 3e-5 and args.max_steps == 12 and args.seed == 7
    # TRL's defaults are linear decay, lr 1e-6, seed 42: dphrl's constant schedule is passed explicitly
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "constant"
    assert GRPOConfig.__dataclass_fields__["seed"].default == 42
    warm = GRPOConfig(**grpo_config_kwargs(_cfg(warmup_steps=3), output_dir=str(tmp_path), use_cpu=True))
    assert getattr(warm.lr_scheduler_type, "value", warm.lr_scheduler_type) == "constant_with_warmup"
    assert warm.warmup_steps == 3
    assert grpo_config_kwargs(_cfg(loss_agg="seq-mean-token-mean"))["loss_type"] == "grpo"
    assert grpo_config_kwargs(_cfg(loss_agg="seq-mean-token-sum-norm"))["loss_type"] == "dr_grpo"
    assert grpo_config_kwargs(_cfg(dual_clip=0))["delta"] is None
    # GRPOConfig checkpoints by default; the recipe's gradient_checkpointing decides (either field name)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name is not passed
        on = GRPOConfig(**grpo_config_kwargs(_cfg(gradient_checkpointing=True), output_dir=str(tmp_path),
                                             use_cpu=True))
        off = GRPOConfig(**grpo_config_kwargs(_cfg(), output_dir=str(tmp_path), use_cpu=True))
    assert on.gradient_checkpointing is True and off.gradient_checkpointing is False


def test_dph_keywords_and_lora():
    kw = dph_trainer_kwargs(_cfg())
    assert (kw["reference_store"], kw["divergence"], kw["eta"]) == ("runs/store", "js", 0.2)
    assert dph_trainer_kwargs(_cfg(algorithm="grpo", divergence=None, eta=None, reference_store="")) == {}
    lc = lora_config(_cfg())
    assert (lc.r, lc.lora_alpha) == (8, 16)
    assert lora_config(_cfg(lora=False)) is None


GRPO = dict(algorithm="grpo", divergence=None, eta=None, reference_store="")


@pytest.mark.parametrize(("key", "overrides"), [
    ("algorithm", dict(GRPO, algorithm="rkl", kl_coef=0.1)),
    ("policy_loss", dict(GRPO, policy_loss="kl_cov", dual_clip=0)),
    ("advantage", dict(GRPO, advantage="rloo")),
    ("entropy_coef", dict(GRPO, entropy_coef=0.01)),
    ("mini_batches", dict(GRPO, mini_batches=2)),
    ("dynamic_sampling", dict(GRPO, dynamic_sampling=True)),
])
def test_what_trl_cannot_express_is_refused_by_key(key, overrides):
    cfg = _cfg(**overrides)  # a valid dphrl config
    with pytest.raises(TRLMappingError, match=key):
        grpo_config_kwargs(cfg)


def test_a_rehearsal_form_trl_lacks_is_refused():
    with pytest.raises(TRLMappingError, match="rehearsal_form"):
        dph_trainer_kwargs(_cfg(rehearsal_form="topk", rehearsal_topk=4))
