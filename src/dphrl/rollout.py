"""Phase 1 of the loop: the step's sequences (generate -> score -> shape -> advantages -> filter).

``Seq`` is one training sequence: a rollout (with its advantage and pi_old) or a stored reference
sample (with its log pi_ref). :class:`RolloutCollector` draws the step's prompts, generates
``rollout_n`` responses per prompt, scores them in the sandboxed reward pool and computes the
advantages; :class:`ReferenceBatches` draws the step's stored pi_ref samples of D_pef prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dphrl import advantages as adv_lib
from dphrl.config import TrainConfig
from dphrl.data.chat import encode_prompt
from dphrl.data.example import Example
from dphrl.data.sampler import PromptSampler
from dphrl.dist import Collectives
from dphrl.engines.sync import EngineWeights
from dphrl.reference import ReferenceStore
from dphrl.registry import kwargs_from_config
from dphrl.rewards.registry import CORRECT_THRESHOLD, RewardFailureError, score_batch

__all__ = ["ReferenceBatches", "RewardFailureError", "RolloutCollector", "Seq"]


@dataclass
class Seq:
    """One training sequence: a rollout (with advantage) or a stored reference sample (with ref_logp)."""

    prompt_ids: list[int]
    response_ids: list[int]
    old_logp: list[float] | None = None  # rollouts: log pi_old per token
    advantage: float = 0.0
    ref_logp: list[float] | None = None  # dph reference samples: stored log pi_ref; rkl: live reference
    text: str = ""  # rollouts: the decoded response (completion logs)
    reward: float = 0.0  # rollouts: the verifiable reward (before shaping)
    topk_ids: list[list[int]] | None = None  # top-k stores: the reference's top-k ids per position
    topk_logp: list[list[float]] | None = None  # ... and its (K+1) bucket log-probs (top-k + tail)


class RolloutCollector:
    """Rollouts of the step's prompts: this rank's share of ``prompts_per_step`` prompts per round."""

    def __init__(self, cfg: TrainConfig, engine: Any, weights: EngineWeights, tokenizer: Any, reward_fn: Any,
                 examples: list[Example], coll: Collectives, totals: dict[str, int]):
        self.cfg, self.engine, self.weights, self.tokenizer = cfg, engine, weights, tokenizer
        self.reward_fn, self.examples, self.coll, self.totals = reward_fn, examples, coll, totals
        self.sampler = PromptSampler(len(examples), cfg.seed)
        self._prompt_cache: dict[str, list[int]] = {}

    def encode(self, ex: Example) -> list[int]:
        """The prompt's token ids (chat template applied), cached by example id."""
        if ex.id not in self._prompt_cache:
            self._prompt_cache[ex.id] = encode_prompt(self.tokenizer, ex.prompt)
        return self._prompt_cache[ex.id]

    def local_prompts(self, k_global: int) -> list[Example]:
        idx = self.sampler.next(k_global)  # same on every rank
        per = k_global // self.coll.world
        return [self.examples[i] for i in idx[self.coll.rank * per : (self.coll.rank + 1) * per]]

    def generate_and_score(self, exs: list[Example], step: int, round_: int
                           ) -> tuple[list[list[Any]], torch.Tensor, torch.Tensor, int]:
        """``rollout_n`` generations per prompt, their rewards (G*n,), lengths (G*n,) and failure count."""
        cfg, rank = self.cfg, self.coll.rank
        seed = cfg.seed * 7_919 + step * 104_729 + round_ * 1_299_709 + rank * 15_485_863
        with self.weights.generating():
            gens = self.engine.generate(
                [self.encode(ex) for ex in exs], cfg.rollout_n, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
            )
        flat = [g for gs in gens for g in gs]
        scored = score_batch(
            self.reward_fn, [g.text for g in flat], [ex for ex in exs for _ in range(cfg.rollout_n)],
            timeout_s=cfg.reward_timeout_s, num_workers=cfg.reward_workers,
        )
        fails = scored.failures + scored.timeouts
        if flat and fails / len(flat) > cfg.max_reward_failure_frac:
            raise RewardFailureError(
                f"step {step + 1}: {fails} of {len(flat)} reward evaluations failed or timed out "
                f"(> max_reward_failure_frac={cfg.max_reward_failure_frac}). Check the reward function "
                f"'{cfg.reward or exs[0].task}' on a few samples; the last checkpoint is intact. "
                f"First error: {next(iter(scored.errors.values()), 'n/a')}"
            )
        rewards = torch.tensor(scored.scores, dtype=torch.float32)  # (G*n,)
        lengths = torch.tensor([len(g.response_ids) for g in flat], dtype=torch.float32)  # (G*n,)
        return gens, rewards, lengths, fails

    def advantage_kwargs(self, step: int) -> dict[str, Any]:
        """The advantage estimator's config parameters (:func:`dphrl.registry.config_params`); a pass@k
        ``k`` follows the annealing schedule (``passk_anneal_step``)."""
        cfg = self.cfg
        kw = kwargs_from_config(adv_lib.ADVANTAGES.get(cfg.advantage), cfg)
        if "k" in kw and cfg.passk_anneal_step:
            kw["k"] = adv_lib.annealed_k(step, k=cfg.passk_k, k_final=cfg.passk_k_final,
                                         anneal_step=cfg.passk_anneal_step)
        return kw

    def collect(self, step: int) -> tuple[list[Seq], dict[str, float]]:
        """Generate rollout_n responses per prompt, score, shape, compute advantages, filter (dapo).

        Dynamic sampling keeps the first ``prompts_per_step`` informative groups in the *global* order
        of the prompts (round, then rank, then local index: the order one process would see), each
        refill round drawing a whole new batch of ``prompts_per_step`` prompts, so the trained groups do
        not depend on the number of processes. A rank may keep fewer groups than another, or none;
        the update pads it (see :meth:`dphrl.update.Updater.optimizer_step`).
        """
        cfg, n = self.cfg, self.cfg.rollout_n
        exs = self.local_prompts(cfg.prompts_per_step)
        kept: list[tuple[list[Any], torch.Tensor, torch.Tensor]] = []  # (gens of a group, rewards, shaped)
        all_rewards, all_lengths, all_finished, fails, rounds, n_kept = [], [], [], 0, 0, 0
        while True:
            gens, rewards, lengths, f = self.generate_and_score(exs, step, rounds)
            fails += f
            all_rewards.append(rewards)
            all_lengths.append(lengths)
            all_finished += [g.finished for gs in gens for g in gs]
            shaped = rewards.clone()
            if cfg.overlong_buffer:
                shaped = shaped + adv_lib.overlong_penalty(
                    lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
                )
            groups = [
                (gens[g], rewards[g * n : (g + 1) * n], shaped[g * n : (g + 1) * n]) for g in range(len(exs))
            ]
            if not cfg.dynamic_sampling:
                kept += groups
                break
            informative = [grp for grp in groups if bool(adv_lib.dynamic_sampling_mask(grp[1], n).all())]
            counts = self.coll.allgather_int(len(informative))  # this round's informative groups per rank
            need = cfg.prompts_per_step - n_kept
            before = sum(counts[: self.coll.rank])
            mine = max(0, min(counts[self.coll.rank], need - before))
            kept += informative[:mine]
            n_kept += min(need, sum(counts))
            if n_kept >= cfg.prompts_per_step or rounds >= cfg.max_refill_rounds:
                break
            rounds += 1
            exs = self.local_prompts(cfg.prompts_per_step)  # a whole new batch (world-independent)
        shaped_all = torch.cat([s for _, _, s in kept]) if kept else torch.zeros(0)  # (G*n,)
        advs, adv_metrics = (
            adv_lib.compute_advantages(cfg.advantage, shaped_all, n, **self.advantage_kwargs(step))
            if kept
            else (shaped_all, {})
        )
        seqs = []
        for gi, (gens, _, _) in enumerate(kept):
            for j, g in enumerate(gens):
                seqs.append(
                    Seq(
                        g.prompt_ids,
                        g.response_ids,
                        old_logp=g.logprobs,
                        advantage=float(advs[gi * n + j]),
                        text=g.text,
                        reward=float(kept[gi][1][j]),
                    )
                )
        rewards = torch.cat(all_rewards)
        lengths = torch.cat(all_lengths)
        self.totals["reward_failures"] += fails
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/pass_rate": (rewards >= CORRECT_THRESHOLD).float().mean().item(),
            "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "reward/failures": float(fails),
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "response/truncated_frac": 1.0 - float(np.mean(all_finished)),
            "rollout/sequences": float(len(seqs)),
            "rollout/groups_kept": float(len(kept)),
            "rollout/refill_rounds": float(rounds),
            **{k: float(v) for k, v in adv_metrics.items()},
        }
        return seqs, metrics


class ReferenceBatches:
    """The stored pi_ref samples of ``per_step`` D_pef prompts per step, each rank an even share."""

    def __init__(self, store: ReferenceStore | None, pef_ids: list[str], per_step: int, seed: int,
                 coll: Collectives):
        self.store, self.pef_ids, self.per_step, self.coll = store, pef_ids, per_step, coll
        self.sampler = PromptSampler(max(1, len(pef_ids)), seed) if store is not None else None

    def next(self) -> list[Seq]:
        """This step's reference samples on this rank (shard evenly, never all on the last rank)."""
        if not self.per_step:
            return []
        idx = self.sampler.next(self.per_step)
        samples = [s for i in idx for s in self.store.samples[self.pef_ids[i]]]
        mine = samples[self.coll.rank :: self.coll.world]
        return [Seq(s.prompt_ids, s.response_ids, ref_logp=s.ref_logprobs, topk_ids=s.topk_ids,
                    topk_logp=s.topk_logprobs) for s in mine]
