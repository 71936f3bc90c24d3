"""The generation-engine interface shared by the trainer, ``presample`` and ``eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine needs and can do. The trainer, ``presample``, ``eval``, the config and the launch
    checks read these, never an engine's name. A factory declares them as its ``capabilities``
    attribute (:func:`dphrl.engines.with_capabilities`); a factory without one gets these defaults,
    the conservative ones: weights pushed after every update, log-probs recomputed."""

    #: generates with the policy module itself (Hugging Face ``generate``): an update is live at once,
    #: nothing to copy; under sharded training generation runs inside ``sharding.generation_context``.
    #: False: the engine holds its own copy of the weights and the trainer calls ``sync_weights(model)``
    #: before the first rollout after each update.
    uses_policy_module: bool = False
    #: its log-probs are the training forward's (same kernels, fp32): pi_old may come from the rollout,
    #: and ``presample`` may store them as log pi_ref. False: both are recomputed by the HF model.
    exact_logprobs: bool = False
    #: must be built with the loaded Hugging Face model object (else it reads the weights itself from
    #: ``model_name``, and ``eval`` does not load them into the process)
    needs_model: bool = True


class Engine(Protocol):
    """Anything that samples ``n`` responses per prompt. An engine that keeps its own copy of the
    weights (``uses_policy_module=False``) also has ``sync_weights(model)``: copy the policy's current
    weights (the unwrapped module, LoRA not merged, every parameter gathered) into the engine."""

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


def sync_weights_of(engine: Any) -> Any:
    """The engine's ``sync_weights`` method, or a clear error for an engine that keeps its own weights
    but cannot receive new ones."""
    fn = getattr(engine, "sync_weights", None)
    if fn is None:
        raise TypeError(
            f"engine {type(engine).__name__} declares uses_policy_module=False (it keeps its own weights) "
            "but has no sync_weights(model) method: the trainer could not give it the policy's "
            "new weights after an update. Add the method, or declare uses_policy_module=True."
        )
    return fn
