"""The algorithm table: what each ``algorithm:`` of a config does, in one place.

Every algorithm runs the same loop (rollout -> score -> advantages -> PPO update -> log); a spec
says how it differs: its preset defaults (filled only into fields the user left unset), which
prompts it rolls out on, and which loss terms it adds:

* ``live_reference``: ``kl_coef * agg(kl_estimator(log pi_theta - log pi_ref))`` on rollout tokens,
  with log pi_ref from a live frozen copy of the initial policy (with LoRA: the adapter switched off).
* ``rehearsal``: ``eta * token-mean f(pi_theta / pi_ref)`` (``divergence``) on stored pi_ref samples
  of D_pef prompts from a reference store (``dphrl presample``); rollouts then run on D_exp only.

``config.py``, ``trainer.py`` and ``dryrun.py`` read these flags and never compare algorithm names:
adding an algorithm is one ``ALGORITHMS.register(...)`` entry (plus its loss term, if new).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dphrl.registry import Registry

__all__ = ["ALGORITHMS", "COMMON_DEFAULTS", "DEFAULT_ETA", "AlgorithmSpec", "get_algorithm"]

#: Default rehearsal weight per divergence (the paper's: 0.01 for forward-KL, 0.2 for JS); others 0.1.
DEFAULT_ETA = {"forward_kl": 0.01, "js": 0.2}

#: Defaults of every algorithm, applied after the algorithm's own presets (fields still unset only).
COMMON_DEFAULTS: dict[str, Any] = {
    "clip_high": 0.2,
    "loss_agg": "seq-mean-token-mean",
    "dynamic_sampling": False,
    "overlong_buffer": 0,
    "kl_coef": 0.0,
    "kl_estimator": "k2",
}


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm: presets and the loss terms it adds to PPO-clip on rollouts."""

    name: str
    summary: str
    #: field -> value, or a callable of the (partly resolved) config, for fields left unset (None);
    #: applied in order, so a later preset may read an earlier one (eta reads divergence)
    defaults: Mapping[str, Any | Callable[[Any], Any]] = field(default_factory=dict)
    #: rolls out on every training prompt, or on D_exp only (``rehearsal`` algorithms)
    rollout_prompts: str = "all"
    #: adds ``kl_coef * KL`` on rollouts against a live frozen reference (active when kl_coef > 0)
    live_reference: bool = False
    #: adds ``eta * divergence`` on stored reference samples (needs ``reference_store``)
    rehearsal: bool = False

    def uses_live_reference(self, kl_coef: float | None) -> bool:
        """Whether a run with this ``kl_coef`` pays for a frozen reference forward."""
        return self.live_reference and bool(kl_coef)

    def fill_defaults(self, cfg: Any) -> None:
        """Set every field of ``cfg`` that is None to this algorithm's preset, then the common ones."""
        for presets in (self.defaults, COMMON_DEFAULTS):
            for key, value in presets.items():
                if getattr(cfg, key) is None:
                    setattr(cfg, key, value(cfg) if callable(value) else value)


#: Algorithms by config name (config key ``algorithm``).
ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm", config_key="algorithm")

ALGORITHMS.register("grpo", AlgorithmSpec(
    "grpo", "PPO-clip on group-normalized advantages of rollouts on all training prompts; no divergence",
))
ALGORITHMS.register("dapo", AlgorithmSpec(
    "dapo", "grpo + clip-higher, token-mean, dynamic sampling and soft overlong reward shaping",
    defaults={"clip_high": 0.28, "loss_agg": "token-mean", "dynamic_sampling": True,
              "overlong_buffer": lambda c: c.max_new_tokens // 4},
))
ALGORITHMS.register("rkl", AlgorithmSpec(
    "rkl", "grpo + kl_coef * KL estimator on rollout tokens against a live frozen copy of the initial model "
    "(default k2: the reverse-KL gradient; kl_estimator: k3 is the paper's baseline, a forward-KL gradient)",
    defaults={"kl_coef": 0.01, "kl_estimator": "k2"},
    live_reference=True,
))
ALGORITHMS.register(
    "dph",
    AlgorithmSpec(
        "dph",
        "PPO-clip on rollouts of D_exp prompts + eta * f-divergence on stored pi_ref samples of "
        "D_pef prompts",
        defaults={
            "clip_high": 0.28,
            "loss_agg": "token-mean",
            "dual_clip": 3.0,
            "divergence": "js",
            "eta": lambda c: DEFAULT_ETA.get(c.divergence, 0.1),
        },
        rollout_prompts="d_exp",
        rehearsal=True,
    ),
)


def get_algorithm(name: str) -> AlgorithmSpec:
    """The spec registered as ``name`` (error lists the valid names)."""
    spec = ALGORITHMS.get(name)
    if not isinstance(spec, AlgorithmSpec):
        raise ValueError(f"config key 'algorithm': {name!r} is not an AlgorithmSpec")
    return spec
