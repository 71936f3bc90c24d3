"""Which weights an engine generates with during training: the one place that decides.

An engine that generates with the policy module itself sees every update at once; one that keeps its
own copy (vLLM) gets the policy's weights before the first generation after an update. The trainer
calls :meth:`EngineWeights.updated` after each optimizer step (and after a resume) and generates
inside :meth:`EngineWeights.generating`; nothing else reads or writes the "needs new weights" state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from dphrl import sharding
from dphrl.engines.base import EngineCapabilities, sync_weights_of

__all__ = ["EngineWeights"]


class EngineWeights:
    """Keeps ``engine`` generating with the current weights of the (prepared) ``model``."""

    def __init__(self, engine: object, caps: EngineCapabilities, model: torch.nn.Module,
                 unwrap: Callable[[torch.nn.Module], torch.nn.Module]):
        self.engine, self.caps, self.model, self.unwrap = engine, caps, model, unwrap
        self.sharded = sharding.is_sharded(model)
        self._stale = False
        self.updated()  # an engine with its own weights gets the policy's before the first rollout

    def updated(self) -> None:
        """The policy's weights changed (an optimizer step, a resume)."""
        self._stale = not self.caps.uses_policy_module

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Generation context: push the weights first when the engine's copy is stale; a sharded policy
        generating itself runs inside :func:`dphrl.sharding.generation_context`."""
        if self._stale:
            with torch.no_grad(), sharding.full_parameters(self.model):
                sync_weights_of(self.engine)(self.unwrap(self.model))
            self._stale = False
        use_ctx = self.caps.uses_policy_module and self.sharded
        with sharding.generation_context(self.model) if use_ctx else nullcontext():
            yield
