"""The generation-engine interface shared by the trainer, ``presample`` and ``eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Generation:
    """One sampled response.

    ``logprobs[t]`` is log pi(response_ids[t] | prompt, response_ids[:t]) under the *exact*
    distribution that was sampled from (temperature applied, renormalized after top-p/top-k), in fp32.
    ``finished`` is True when the response ended with EOS (the EOS id is the last of
    ``response_ids``); False when it was cut at ``max_new_tokens``.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool


class Engine(Protocol):
    """Anything that samples ``n`` responses per prompt."""

    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        """Return, for each prompt (token ids, chat template already applied), ``n`` generations."""
        ...
