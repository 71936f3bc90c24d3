"""Launch checks in one place: what the trainer refuses at start-up and the dry run reports.

:func:`check_launch` takes the config and the launch layout (processes, sharding, the engine that
``auto`` resolved to) and returns the refusals (errors: the trainer raises them all at once) and the
warnings (the dry run prints them). The trainer and ``dphrl train --dry-run`` call the same function,
so a recipe the dry run accepts is one the trainer starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SHARDINGS", "Launch", "LaunchCheck", "check_launch", "old_logprob_refusal"]

#: Launch layouts: one process, DDP, FSDP (1 or 2), DeepSpeed ZeRO-3.
SHARDINGS = ("none", "ddp", "fsdp", "zero3")


@dataclass(frozen=True)
class Launch:
    """How a run is launched: number of processes, sharding, and the resolved generation engine."""

    world_size: int = 1
    sharding: str = "none"
    engine: str = "hf"
    #: what ``engine: auto`` resolved to here was chosen by the machine (the dry run says so)
    engine_was_auto: bool = False


@dataclass
class LaunchCheck:
    """Refusals (the trainer raises them) and warnings (the dry run prints them)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_launch(cfg: Any, launch: Launch) -> LaunchCheck:
    """Every start-up refusal and launch warning for ``cfg`` (a ``TrainConfig``) under ``launch``."""
    out = LaunchCheck()
    if launch.sharding not in SHARDINGS:
        out.errors.append(f"sharding must be one of {SHARDINGS}, got {launch.sharding!r}")
        return out
    if cfg.prompts_per_step % launch.world_size:
        out.errors.append(
            f"config key 'prompts_per_step' ({cfg.prompts_per_step}) must be divisible by the number "
            f"of processes ({launch.world_size})"
        )
    if launch.sharding == "zero3":
        out.errors.append(
            "DeepSpeed: the dphrl Trainer refuses DeepSpeed at start-up (not supported yet: the trainer "
            "accumulates micro-batches itself and DeepSpeed's engine steps inside backward()). Launch with "
            "recipes/accelerate/fsdp.yaml (FSDP, full fine-tuning, same memory plan) or "
            "recipes/accelerate/ddp.yaml with lora=true instead."
        )
    if cfg.lora and launch.sharding in ("fsdp", "zero3"):
        out.errors.append(
            "config key 'lora': lora=true under FSDP is refused by the Trainer (the merged final model needs "
            "the full weights on one process). LoRA models fit without sharding: launch with "
            "recipes/accelerate/ddp.yaml."
        )
    refusal = old_logprob_refusal(launch.engine, cfg.old_logprob)
    if refusal:
        out.errors.append(refusal)
    if launch.engine_was_auto:
        out.warnings.append(
            f"engine auto resolved to {launch.engine} here (vllm where it is installed and a CUDA GPU "
            "is present, else hf); old_logprob then follows the engine's capabilities"
        )
    return out


def old_logprob_refusal(engine: str, old_logprob: str | None) -> str | None:
    """Why ``old_logprob`` cannot be used with the (resolved) ``engine``, or None: pi_old from the rollout
    needs an engine whose log-probs are the training forward's (its ``exact_logprobs`` capability). The
    config (engine named explicitly) and :func:`check_launch` (engine resolved at run time) both ask here."""
    from dphrl.engines import engine_capabilities

    if old_logprob != "rollout" or engine == "auto" or engine_capabilities(engine).exact_logprobs:
        return None
    return (
        f"config key 'old_logprob': rollout cannot be used with the {engine} engine (its log-probs do not "
        "reproduce the training forward, e.g. vLLM's bf16 kernels, so they would bias the PPO ratio); leave "
        "old_logprob unset (recompute)."
    )
