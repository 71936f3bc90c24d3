"""Shared, cheap fixtures: a char tokenizer, tiny random causal LMs, a toy verifiable task.

The toy task: prompts ``"<i>+<i>"``, the reward is 1 when the response's first character equals
the example's ``answer`` ("7"), so a random 17-token model starts near 1/17 and RL must push the
first token. Examples whose answer is ``"always"`` are always right (the reward ignores the
response): their groups have all-equal rewards (dapo dynamic sampling drops them) and presample puts
them into D_pef.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dphrl.config import TrainConfig
from dphrl.data.example import Example
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.rewards.registry import register_reward
from dphrl.testing import tiny_causal_lm

# Tiny models on 2 shared cores: one intra-op thread is several times faster than two that fight.
torch.set_num_threads(1)

TOY_CHARS = "0123456789+"
TOY_MODEL_NAME = "tiny-toy"


@register_reward("toy_first_char")
def toy_first_char(response: str, ex: Example) -> float:
    """1.0 when the first character is ``ex.answer``; ``answer == "always"`` scores 1.0 for anything."""
    if ex.answer == "always":
        return 1.0
    return float(response[:1] == ex.answer)


def toy_examples(n: int = 16, answer: str = "7", always: int = 0, prefix: str = "p") -> list[Example]:
    """``n`` toy examples; the first ``always`` of them are always right."""
    return [
        Example(
            id=f"{prefix}{i}",
            prompt=[{"role": "user", "content": f"{i}+{i}"}],
            answer="always" if i < always else answer,
            task="toy_first_char",
        )
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tok():
    """Character tokenizer over digits and '+': 6 special tokens (pad=0, eos=1) + 11 chars."""
    return build_char_tokenizer(TOY_CHARS)


@pytest.fixture
def make_model(tok):
    """Factory: a fresh tiny Llama (hidden 32, 2 layers) for ``tok``; same seed -> same weights."""

    def make(seed: int = 0, arch: str = "llama", tokenizer=None):
        return tiny_causal_lm(tokenizer or tok, arch=arch, hidden=32, layers=2, heads=4, seed=seed)

    return make


def base_cfg(tmp_path: Path, algorithm: str, **kw) -> TrainConfig:
    """A small, fast config for the toy task (callers override what they test)."""
    defaults = dict(
        model=TOY_MODEL_NAME,
        algorithm=algorithm,
        reward="toy_first_char",
        prompts_per_step=4,
        rollout_n=4,
        max_new_tokens=3,
        lr=1e-2,
        max_steps=2,
        output_dir=str(tmp_path / f"run_{algorithm}"),
        progress=False,
        micro_batch_size=8,
        mini_batches=1,
        generation_batch_size=64,
        reward_workers=0,  # in process: the toy reward is trusted (containment: test_reward_containment.py)
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


@pytest.fixture
def cfg_factory(tmp_path):
    def make(algorithm: str = "grpo", **kw) -> TrainConfig:
        return base_cfg(tmp_path, algorithm, **kw)

    return make


def make_store(
    out_dir: Path,
    model,
    tokenizer,
    examples,
    *,
    n: int = 8,
    temperature: float = 1.0,
    threshold: float = 1.0,
    max_new_tokens: int = 3,
    seed: int = 0,
    model_name: str = TOY_MODEL_NAME,
):
    """Presample a reference store for the toy task; returns the manifest."""
    from dphrl.engines.hf import HFEngine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample

    return presample(
        HFEngine(model, tokenizer),
        tokenizer,
        examples,
        toy_first_char,
        out_dir,
        model_name=model_name,
        tokenizer_hash=tokenizer_hash(tokenizer),
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        threshold=threshold,
        seed=seed,
        progress=False,
    )


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
