"""The rehearsal plan: which prompts are rolled out, which are rehearsed, how many per step.

One copy of each decision, used by the trainer, the dry run and the TRL integration:

* an algorithm whose spec says ``rollout_prompts: d_exp`` rolls out on the store's D_exp prompts only;
  ``all``: on every training prompt;
* an algorithm with ``rehearsal`` adds the divergence term on the stored samples of
  ``ref_prompts_per_step`` D_pef prompts per step, by default in proportion to the rollout prompts
  (``prompts_per_step * |D_pef| / |D_exp|``, at least 1), never more than |D_pef| (a D_pef prompt is
  never drawn twice in one step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dphrl.data.example import Example
from dphrl.reference import ReferenceStore, StoreMismatchError

__all__ = ["RehearsalPlan", "needs_store", "plan_rehearsal", "rehearsed_prompts_per_step"]


def rehearsed_prompts_per_step(configured: int | None, rollout_prompts: float, n_pef: int, n_exp: int) -> int:
    """D_pef prompts rehearsed per step: ``configured``, or ``round(rollout_prompts * n_pef / n_exp)``
    (at least 1) when it is None; at most ``n_pef``."""
    n = configured if configured is not None else max(1, round(rollout_prompts * n_pef / max(1, n_exp)))
    return max(0, min(int(n), n_pef))


def needs_store(spec: Any) -> bool:
    """Whether an algorithm (an ``AlgorithmSpec``) reads a reference store: to rehearse, or to know D_exp."""
    return bool(spec.rehearsal) or spec.rollout_prompts == "d_exp"


@dataclass
class RehearsalPlan:
    """The training prompts of a run: rolled out (``rollout_examples``) and rehearsed (``pef_ids``)."""

    rollout_examples: list[Example]
    pef_ids: list[str]
    ref_prompts_per_step: int
    store: ReferenceStore | None = None


def plan_rehearsal(spec: Any, examples: list[Example], store: ReferenceStore | None, *, prompts_per_step: int,
                   ref_prompts_per_step: int | None) -> RehearsalPlan:
    """The plan of algorithm ``spec`` on ``examples`` with ``store`` (None when the algorithm needs none)."""
    if not needs_store(spec):
        return RehearsalPlan(list(examples), [], 0, None)
    if store is None:
        raise ValueError(f"algorithm {spec.name} needs a reference store (config key 'reference_store')")
    if spec.rollout_prompts == "d_exp":
        exp = set(store.exp_ids)
        rollout = [ex for ex in examples if ex.id in exp]
        if not rollout:
            raise StoreMismatchError(f"reference store {store.path}: D_exp is empty; nothing to explore")
    else:
        rollout = list(examples)
    pef = list(store.pef_ids) if spec.rehearsal else []
    k = rehearsed_prompts_per_step(ref_prompts_per_step, prompts_per_step, len(pef), len(store.exp_ids))
    return RehearsalPlan(rollout, pef, k, store)
