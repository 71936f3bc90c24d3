"""A dphrl training config as TRL arguments: ``GRPOConfig`` keywords and ``DPHGRPOTrainer`` keywords.

So that a TRL script runs what a dphrl recipe runs (same sampler, batch shape, loss aggregation,
clipping, optimizer and learning-rate schedule) without copying numbers by hand. Where TRL's default
differs from dphrl's, the dphrl value is passed explicitly: TRL's ``lr_scheduler_type`` defaults to
``linear`` (decay to 0 over ``max_steps``), dphrl's ``lr_schedule`` to ``constant``; TRL's
``learning_rate`` is 1e-6 and its ``seed`` 42. What TRL cannot express is refused with the key to
change (:class:`TRLMappingError`), never silently approximated.
"""

from __future__ import annotations

from typing import Any

from dphrl.config import TrainConfig

#: dphrl ``loss_agg`` -> TRL ``loss_type`` with the same normalization (see dphrl.losses.AGGREGATIONS and
#: TRL's ``GRPOTrainer._compute_loss``): token-mean over the optimizer step's tokens = ``dapo``; each
#: sequence's token mean averaged over sequences = ``grpo``; token sum / max length = ``dr_grpo``.
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


class TRLMappingError(ValueError):
    """A dphrl config value TRL's GRPOTrainer has no equivalent for (the message names the key)."""


def _refuse(key: str, value: Any, why: str, fix: str) -> None:
    raise TRLMappingError(f"{key}: {value!r} {why}; {fix}")


def grpo_config_kwargs(cfg: TrainConfig, **overrides: Any) -> dict[str, Any]:
    """``trl.GRPOConfig`` keyword arguments reproducing ``cfg``'s rollout, loss and optimizer on one
    process (``prompts_per_step`` prompts x ``rollout_n`` rollouts per optimizer step, one prompt group
    per micro-step). ``overrides`` (``output_dir``, ``use_cpu``, ``report_to``...) are added last."""
    if cfg.algorithm not in ("dph", "grpo"):
        _refuse("algorithm", cfg.algorithm, "is not TRL's GRPO (+ DPH's term via DPHGRPOTrainer)",
                "use algorithm dph or grpo")
    if cfg.kl_coef:
        _refuse("kl_coef", cfg.kl_coef, "needs a live reference model (TRL's beta)",
                "set kl_coef 0 (DPH rehearses stored samples instead)")
    if cfg.loss_agg not in LOSS_TYPES:
        _refuse("loss_agg", cfg.loss_agg, "has no TRL loss_type", f"use one of {sorted(LOSS_TYPES)}")
    if cfg.policy_loss != "ppo_clip":
        _refuse("policy_loss", cfg.policy_loss, "is not TRL's clipped objective", "use ppo_clip")
    if cfg.advantage != "grpo":
        _refuse("advantage", cfg.advantage, "is not TRL's group-normalized advantage", "use grpo")
    if cfg.entropy_coef:
        _refuse("entropy_coef", cfg.entropy_coef, "has no GRPOConfig equivalent", "set entropy_coef 0")
    if cfg.dynamic_sampling or cfg.overlong_buffer:
        _refuse("dynamic_sampling / overlong_buffer", (cfg.dynamic_sampling, cfg.overlong_buffer),
                "are dphrl's DAPO rollout shaping, not in TRL's GRPOTrainer", "turn them off")
    if cfg.mini_batches != 1:
        _refuse("mini_batches", cfg.mini_batches, "(several optimizer steps per rollout batch) is not mapped",
                "use mini_batches 1")
    warm_constant = cfg.lr_schedule == "constant" and cfg.warmup_steps
    schedule = "constant_with_warmup" if warm_constant else cfg.lr_schedule
    kw: dict[str, Any] = {
        "beta": 0.0,  # no TRL KL term and no reference model
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0,
        "num_generations": cfg.rollout_n,
        "per_device_train_batch_size": cfg.rollout_n,  # one prompt group per micro-step
        "gradient_accumulation_steps": cfg.prompts_per_step,
        "max_completion_length": cfg.max_new_tokens,
        "loss_type": LOSS_TYPES[cfg.loss_agg],
        "epsilon": cfg.clip_low, "epsilon_high": cfg.clip_high,
        # dphrl's dual clip c caps the ratio at c where the advantage is negative: TRL's two-sided delta
        "delta": cfg.dual_clip or None,
        "num_iterations": cfg.ppo_epochs,
        "learning_rate": cfg.lr, "lr_scheduler_type": schedule, "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay, "adam_beta1": cfg.betas[0], "adam_beta2": cfg.betas[1],
        "max_grad_norm": cfg.max_grad_norm, "max_steps": cfg.max_steps, "seed": cfg.seed,
        "bf16": cfg.dtype == "bfloat16",
        "scale_rewards": "group",
        "logging_steps": cfg.log_every,
        # GRPOConfig turns it on by default; transformers >= 5 renamed it (the old name warns)
        _checkpointing_field(): cfg.gradient_checkpointing,
    }
    kw.update(overrides)
    return kw


def _checkpointing_field() -> str:
    """``activation_checkpointing`` where the installed ``TrainingArguments`` has it, else the old name."""
    import dataclasses

    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def dph_trainer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """``DPHGRPOTrainer`` keyword arguments for ``cfg``'s rehearsal term (store, divergence, eta)."""
    if cfg.algorithm != "dph":
        return {}
    if cfg.rehearsal_form != "sampled":
        _refuse("rehearsal_form", cfg.rehearsal_form, "is not supported by DPHGRPOTrainer", "use sampled")
    return {
        "reference_store": cfg.reference_store, "divergence": cfg.divergence, "eta": cfg.eta,
        "divergence_params": dict(cfg.divergence_params or {}),
        "ref_prompts_per_step": cfg.ref_prompts_per_step,
        "store_check_tokens": cfg.store_check_tokens, "store_check_tolerance": cfg.store_check_tolerance,
    }


def lora_config(cfg: TrainConfig) -> Any:
    """The ``peft.LoraConfig`` ``dphrl train`` would use for ``cfg`` (``None`` without LoRA)."""
    if not cfg.lora:
        return None
    from dphrl.models import lora_config as make

    targets = cfg.lora_target_modules
    return make(r=cfg.lora_r, alpha=cfg.lora_alpha,
                target_modules=targets if isinstance(targets, str) else list(targets))
