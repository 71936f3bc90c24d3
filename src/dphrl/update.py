"""Phase 2 of the loop: PPO epochs x mini-batches of optimizer updates, and the loss terms.

Rollout sequences and reference sequences are kept in separate micro-batches by construction (the
original code's mixing bug cannot happen); each term is normalized by its own global token count:

    loss = policy_loss(rollouts) [- entropy_coef * H] [+ kl_coef * KL(rollouts; live reference)]
           + eta * divergence(stored pi_ref samples)            (spec.rehearsal)

Every rank runs the same number of forward/backward passes (zero-weight padding micro-batches on the
ranks with fewer), so the update of a global batch does not depend on the number of processes.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from dphrl import divergences, losses
from dphrl.batching import pad_values
from dphrl.config import TrainConfig
from dphrl.dist import Collectives
from dphrl.prefix import Batch, batch_logits, batch_logprobs, micro_batch_order, pack_batch
from dphrl.registry import kwargs_from_config
from dphrl.rollout import Seq

__all__ = ["Updater", "topk_tensors"]


class Updater:
    """Optimizer updates of ``model`` on rollouts and reference samples (one instance per run)."""

    def __init__(self, cfg: TrainConfig, acc: Accelerator, coll: Collectives, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, *, pad_id: int, eos_id: int | None,
                 share_prefix: bool, ref_model: torch.nn.Module | None, live_reference: bool,
                 totals: dict[str, int], on_update: Any = None):
        self.cfg, self.acc, self.coll = cfg, acc, coll
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.pad_id, self.eos_id = pad_id, eos_id if eos_id is not None else pad_id
        self.share_prefix = share_prefix  # the update forwards each micro-batch's distinct prompts once
        self.ref_model, self.live_reference = ref_model, live_reference
        self.totals = totals  # shared with the trainer (checkpointed there)
        self.on_update = on_update or (lambda: None)  # called after every applied optimizer step
        self.step = 0  # the trainer's step count (seeds of the mini-batch permutation, messages)

    # ---------------------------------------------------------------------------------- layout
    def micro_batches(self, seqs: list[Seq]) -> list[list[int]]:
        """Indices of each micro-batch of at most ``micro_batch_size`` sequences: with the shared-prefix
        update, the cheaper of whole groups and all sequences by length (each prompt forwarded once per
        micro-batch; :func:`dphrl.prefix.plan_micro_batches`), else in order."""
        k = self.cfg.micro_batch_size
        if not self.share_prefix:
            return [list(range(i, min(i + k, len(seqs)))) for i in range(0, len(seqs), k)]
        return micro_batch_order([s.prompt_ids for s in seqs], [s.response_ids for s in seqs], max_seqs=k)

    def pack(self, seqs: list[Seq]) -> Batch:
        """One micro-batch on the device, in the update's layout (shared prompts or packed rows)."""
        prompts, responses = [s.prompt_ids for s in seqs], [s.response_ids for s in seqs]
        return pack_batch(prompts, responses, self.pad_id, self.share_prefix).to(self.acc.device)

    def padding_seq(self) -> Seq:
        """A one-token sequence for zero-weight padding micro-batches and forwards."""
        return Seq([self.pad_id], [self.eos_id], old_logp=[0.0], advantage=0.0, ref_logp=[0.0])

    # ---------------------------------------------------------------------------------- no-grad forwards
    def no_grad_logprobs(
        self, model: torch.nn.Module, seqs: list[Any], top_p: float = 1.0
    ) -> list[list[float]]:
        """Per-token log-probs of ``seqs`` under ``model`` (no grad, fp32), micro-batch by micro-batch as the
        update makes them (same layout, same autocast: the training numerics); every rank runs as many
        forwards as the busiest one (FSDP: collectives)."""
        out: list[list[float]] = [[] for _ in seqs]
        plan = self.micro_batches(seqs)
        (most,) = self.coll.allreduce([len(plan)], op="max")
        with torch.no_grad(), self.acc.autocast():
            for ix in plan + [None] * (int(most) - len(plan)):
                chunk = [seqs[i] for i in ix] if ix is not None else [self.padding_seq()]
                lp, _ = batch_logprobs(model, self.pack(chunk), self.cfg.temperature, top_p=top_p,
                                      chunked=self.cfg.chunked_head)  # (B, T)
                for i, s, row in zip(ix or [], chunk, lp.float().cpu()):
                    out[i] = row[: len(s.response_ids)].tolist()
        return out

    def attach_reference_logprobs(self, seqs: list[Seq]) -> None:
        """KL term: log pi_ref of every rollout token from the frozen initial model (one no-grad forward,
        same autocast as the policy); with LoRA the base model with the adapter switched off."""
        if self.ref_model is not None:
            ref = self.no_grad_logprobs(self.ref_model, seqs)
        else:
            model = self.acc.unwrap_model(self.model)
            with model.disable_adapter():
                ref = self.no_grad_logprobs(model, seqs)
        for s, lp in zip(seqs, ref):
            s.ref_logp = lp

    def recompute_old_logprobs(self, seqs: list[Seq]) -> None:
        """old_logprob=recompute: pi_old from one no-grad forward of the policy before the update
        (instead of the engine's log-probs, e.g. when the engine's numerics or top-p differ)."""
        for s, lp in zip(seqs, self.no_grad_logprobs(self.model, seqs)):
            s.old_logp = lp

    # ---------------------------------------------------------------------------------- updates
    def update(self, rollouts: list[Seq], refs: list[Seq], recompute_old: bool) -> dict[str, float]:
        """``ppo_epochs`` x ``mini_batches`` optimizer steps; the mean of their metrics."""
        cfg, M = self.cfg, self.cfg.mini_batches
        if recompute_old:
            self.recompute_old_logprobs(rollouts)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(cfg.seed + 31 * self.step + epoch)
            r_perm = torch.randperm(len(rollouts), generator=g).tolist()
            f_perm = torch.randperm(len(refs), generator=g).tolist()
            for m in range(M):
                roll_mb = [rollouts[i] for i in r_perm[m::M]]
                ref_mb = [refs[i] for i in f_perm[m::M]]
                for k, v in self.optimizer_step(roll_mb, ref_mb).items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}

    def optimizer_step(self, roll_mb: list[Seq], ref_mb: list[Seq]) -> dict[str, float]:
        """One optimizer update on a mini-batch; rollout and reference micro-batches kept apart.

        Every rank runs the same number of forward/backward passes (under FSDP each is a collective):
        the micro-batch counts are all-reduced (max) and a rank with fewer runs zero-weight padding
        micro-batches, which add nothing to the loss, the gradients or the normalizers. A mini-batch
        that is empty on every rank skips the update on every rank together.
        """
        roll_chunks = [[roll_mb[i] for i in ix] for ix in self.micro_batches(roll_mb)]
        ref_chunks = [[ref_mb[i] for i in ix] for ix in self.micro_batches(ref_mb)]
        # global normalizers (each term divided by its own token / sequence count over all ranks) and the
        # micro-batch counts every rank must run, in two all-reduces
        g_roll_tok, g_roll_seq, g_ref_tok = self.coll.allreduce(
            [
                sum(len(s.response_ids) for s in roll_mb),
                len(roll_mb),
                sum(len(s.response_ids) for s in ref_mb),
            ]
        )
        n_roll, n_ref = (int(x) for x in self.coll.allreduce([len(roll_chunks), len(ref_chunks)], op="max"))
        if n_roll + n_ref == 0:  # nothing to train on anywhere: no update, on every rank
            self.totals["empty_updates_skipped"] += 1
            return {"update/empty_skipped": 1.0}
        micro: list[tuple[str, list[Seq] | None]] = [("roll", c) for c in roll_chunks]
        micro += [("roll", None)] * (n_roll - len(roll_chunks))
        micro += [("ref", c) for c in ref_chunks] + [("ref", None)] * (n_ref - len(ref_chunks))
        self.optimizer.zero_grad(set_to_none=True)
        acc_metrics: dict[str, float] = {}
        bad = 0.0
        for i, (kind, chunk) in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = nullcontext() if sync or self.coll.world == 1 else self.acc.no_sync(self.model)
            seqs = chunk if chunk is not None else [self.padding_seq()]
            with ctx:
                batch = self.pack(seqs)
                if kind == "roll":
                    loss, m = self.rollout_loss(batch, seqs, max(g_roll_tok, 1.0), max(g_roll_seq, 1.0))
                else:
                    loss, m = self.reference_loss(batch, seqs, max(g_ref_tok, 1.0))
                if chunk is None:
                    loss = loss * 0.0  # padding: the collectives run, nothing is learned or counted
                elif not torch.isfinite(loss):
                    bad = 1.0
                # DDP averages gradients over ranks; we want their sum
                self.acc.backward(loss * self.coll.world)
            if chunk is not None:
                w = max(1.0, float(sum(len(x.response_ids) for x in seqs)))  # token means: weighted by tokens
                for k, v in m.items():
                    acc_metrics[k] = acc_metrics.get(k, 0.0) + v * w
                    acc_metrics["_n_" + k] = acc_metrics.get("_n_" + k, 0.0) + w
        return self._apply(acc_metrics, bad)

    def _apply(self, acc_metrics: dict[str, float], bad: float) -> dict[str, float]:
        """Clip, then step (or skip a non-finite update on every rank); the mini-batch's metrics."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(
            self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], max_norm)
        )
        (bad,) = self.coll.allreduce([bad + (0.0 if math.isfinite(grad_norm) else 1.0)])
        out = {k: v / acc_metrics["_n_" + k] for k, v in acc_metrics.items() if not k.startswith("_n_")}
        if bad:
            # NaN/inf never reaches the weights: drop the gradients, skip the update (and the LR
            # schedule: a skipped update is not an update), report it
            self.optimizer.zero_grad(set_to_none=True)
            self.totals["nonfinite_skipped"] += 1
            out["update/nonfinite_skipped"] = 1.0
            if self.acc.is_main_process:
                tqdm.write(f"step {self.step + 1}: non-finite loss or gradient; update skipped")
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.on_update()
            out["update/nonfinite_skipped"] = 0.0
        out["update/empty_skipped"] = 0.0
        out["grad_norm"] = grad_norm if math.isfinite(grad_norm) else -1.0
        return out

    # ---------------------------------------------------------------------------------- loss terms
    def rollout_loss(
        self, batch: Batch, chunk: list[Seq], g_tok: float, g_seq: float
    ) -> tuple[torch.Tensor, dict]:
        """Policy loss on rollouts, minus the entropy bonus, plus the live-reference KL term."""
        cfg = self.cfg
        T = batch.resp_ids.shape[1]
        mask = batch.resp_mask  # (B, T)
        logp, ent = batch_logprobs(self.model, batch, cfg.temperature, with_entropy=True,  # (B, T), (B, T)
                                   entropy_grad=cfg.entropy_coef > 0, chunked=cfg.chunked_head)
        old = pad_values([s.old_logp for s in chunk], T).to(logp.device)  # (B, T) pi_old of every token
        adv = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=logp.device)  # (B,)
        agg = dict(num_tokens=g_tok, num_seqs=g_seq, max_len=cfg.max_new_tokens)
        policy_loss = losses.POLICY_LOSSES.get(cfg.policy_loss)
        extra = kwargs_from_config(policy_loss, cfg)  # the entry's own hyper-parameters
        if "generator" in inspect.signature(policy_loss).parameters:  # random token choices: seeded per step
            extra["generator"] = torch.Generator().manual_seed(
                cfg.seed * 7_919 + self.step * 104_729 + self.coll.rank
            )
        loss, m = policy_loss(
            logp,
            old,
            adv,
            mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip or None,
            agg=cfg.loss_agg,
            **agg,
            **extra,
        )
        m = dict(m)
        m["entropy"] = float((ent.detach() * mask).sum() / mask.sum().clamp(min=1))
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * losses.aggregate(ent, mask, cfg.loss_agg, **agg)
        if self.live_reference:
            ref = pad_values([s.ref_logp for s in chunk], T).to(logp.device)  # (B, T)
            kl = losses.kl_estimator(logp, ref, cfg.kl_estimator)  # (B, T)
            loss = loss + cfg.kl_coef * losses.aggregate(kl, mask, cfg.loss_agg, **agg)
            m["kl/value"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, m

    def reference_loss(self, batch: Batch, chunk: list[Seq], g_tok: float) -> tuple[torch.Tensor, dict]:
        """eta * token-mean rehearsal divergence on stored reference samples (``rehearsal_form``)."""
        cfg = self.cfg
        T = batch.resp_ids.shape[1]
        form = divergences.REHEARSAL_FORMS.get(cfg.rehearsal_form)
        kw = dict(agg="token-mean", num_tokens=g_tok, **cfg.divergence_params)
        if not form.topk:  # the paper's sampled form: f(u) on each stored token
            logp, _ = batch_logprobs(self.model, batch, cfg.temperature, chunked=cfg.chunked_head)  # (B, T)
            ref = pad_values([s.ref_logp for s in chunk], T).to(logp.device)  # (B, T)
            div, m = form.loss(cfg.divergence, logp, ref, batch.resp_mask, **kw)
            return cfg.eta * div, dict(m)
        logits = batch_logits(self.model, batch, cfg.temperature)  # (B, T, V)
        ids, ref_b = topk_tensors(chunk, T, cfg.rehearsal_topk)  # (B, T, k), (B, T, k+1)
        ids, ref_b = ids.to(logits.device), ref_b.to(logits.device)
        logp_b = divergences.topk_buckets(logits, ids)  # (B, T, k+1)
        if form.tokens:  # the sampled token's own log-probs, for the unbiased tail correction
            logz = torch.logsumexp(logits, dim=-1)  # (B, T)
            kw["tok_logp"] = logits.gather(-1, batch.resp_ids.unsqueeze(-1)).squeeze(-1) - logz  # (B, T)
            kw["tok_ref_logp"] = pad_values([s.ref_logp for s in chunk], T).to(logits.device)  # (B, T)
            kw["tok_in_topk"] = (ids == batch.resp_ids.unsqueeze(-1)).any(-1)  # (B, T)
        div, m = form.loss(cfg.divergence, logp_b, ref_b, batch.resp_mask, **kw)
        return cfg.eta * div, dict(m)


def topk_tensors(chunk: list[Seq], T: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored top-k columns of ``chunk`` as (B, T, k) ids and (B, T, k+1) bucket log-probs.

    A store with more than ``k`` ids per position is cut to its ``k`` most likely (ids are stored sorted
    by probability) and the rest merged into the tail bucket. Padding positions get distinct ids and a
    uniform bucket distribution (finite everywhere; masked out of the loss).
    """
    B = len(chunk)
    ids = torch.arange(k).expand(B, T, k).clone()  # (B, T, k) distinct ids on padding
    ref = torch.full((B, T, k + 1), -math.log(k + 1))  # (B, T, k+1) uniform on padding
    for i, s in enumerate(chunk):
        n = len(s.response_ids)
        full = torch.tensor(s.topk_logp, dtype=torch.float32)  # (n, K+1)
        ids[i, :n] = torch.tensor(s.topk_ids, dtype=torch.long)[:, :k]
        ref[i, :n, :k] = full[:, :k]
        ref[i, :n, k] = torch.logsumexp(full[:, k:], dim=-1)  # (n,) the dropped ids join the tail
    return ids, ref
