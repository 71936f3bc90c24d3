"""The RL loop, read top to bottom: sample prompts -> generate -> score -> advantages -> update -> log.

One class, ``Trainer``, runs every algorithm of the algorithm table (:mod:`dphrl.algorithms`:
grpo, dapo, rkl, dph); the algorithms differ only in which prompts are rolled out, which loss terms
are added and the defaults filled by the config, and the trainer reads those from the algorithm's
spec (never its name):

    live_reference : + kl_coef * KL estimator on rollout tokens against a live frozen copy of the
                     initial model (rkl).
    rehearsal      : rollouts of D_exp prompts only + eta * f-divergence on stored pi_ref samples of
                     D_pef prompts (dph). No reference model exists: log pi_ref comes from the store.

Rollout sequences and reference sequences are kept in separate lists and never share a micro-batch;
each term is normalized by its own (global) token count. Distributed runs (accelerate DDP) shard
prompts and reference samples evenly by rank and normalize with global counts, so the update of a
global batch does not depend on the number of processes.
"""

from __future__ import annotations

import copy
import json
import math
import random
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from dphrl import advantages as adv_lib
from dphrl import divergences, losses, sharding
from dphrl.batching import pad_token_id, pad_values
from dphrl.config import ConfigError, TrainConfig
from dphrl.data.chat import encode_prompt
from dphrl.data.example import Example
from dphrl.engines import build_engine, resolve_engine
from dphrl.fsutil import atomic_write_text, remove_dir, replace_dir, sweep_leftovers
from dphrl.launch import Launch, check_launch
from dphrl.models import weights_fingerprint
from dphrl.prefix import Batch, batch_logits, batch_logprobs, can_share_prefix, micro_batch_order, pack_batch
from dphrl.reference import ReferenceStore, StoreMismatchError
from dphrl.rewards.registry import CORRECT_THRESHOLD, get_reward, score_batch
from dphrl.rundir import RunDirError, RunLock, StopSignals, claim_dir


class RewardFailureError(RuntimeError):
    """Too many reward evaluations failed in one step (see ``max_reward_failure_frac``)."""


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


class PromptSampler:
    """Shuffled passes over a list of indices; the permutation depends only on (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        """The next ``k`` indices; distinct when ``k <= n`` (a new epoch started inside a call puts the
        indices already taken by that call last)."""
        out: list[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
                if out:
                    taken = set(out)
                    self._perm = [i for i in self._perm if i not in taken] + [i for i in self._perm if i in taken]
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._perm[self.pos : self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "perm": list(self._perm)}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = list(s["perm"]) if "perm" in s else self._permutation()


def load_examples(spec: dict) -> list[Example]:
    """Build the training examples from a dataset spec (``type`` picks the loader)."""
    if not spec:
        raise ValueError("config key 'dataset' is empty: give a spec such as {type: gsm8k, path: ...}")
    from dphrl.data.loaders import load_dataset_spec

    try:
        examples = load_dataset_spec(spec)
    except (ValueError, FileNotFoundError) as e:  # a data problem is a config problem: no traceback
        raise ConfigError(f"config key 'dataset' {spec}: {e}") from e
    if not examples:
        raise ConfigError(f"config key 'dataset' {spec} gave no examples; check its path and filters")
    return examples


#: ``callback(trainer, metrics)``, called after every step with that step's reduced metrics.
StepCallback = Callable[["Trainer", dict], None]


class Trainer:
    """Runs ``cfg.max_steps`` RL steps of ``cfg.algorithm``; see the module docstring.

    ``callbacks`` are called after every step (every process) with the step's metrics, e.g. to print
    progress or stop early; they must not change the model.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        examples: list[Example] | None = None,
        accelerator: Accelerator | None = None,
        callbacks: list[StepCallback] | None = None,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        self.overwrite = overwrite  # replace a run found in output_dir (else refused unless resumed)
        self._lock: RunLock | None = None
        self._resumed = self._claimed_for_resume = False
        self.spec = cfg.spec()  # the algorithm's entry in dphrl.algorithms
        self.callbacks = list(callbacks or [])
        self.engine_name = resolve_engine(cfg.engine)  # auto resolved here, recorded in run_info.json
        self.old_logprob = cfg.old_logprob_for(self.engine_name)
        mp = "bf16" if cfg.dtype == "bfloat16" else "no"
        self.acc = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=mp, log_with=cfg.trackers or None, project_dir=cfg.output_dir
        )
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        # --- model and tokenizer ------------------------------------------------------------------
        if model is None or tokenizer is None:
            from dphrl.models import load_model, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(cfg.model)
            model = model or load_model(cfg.model)
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        if cfg.gradient_checkpointing:  # recompute activations in backward: same gradients, less memory
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})  # the checkpoint kwargs (first argument of either name)
        # the weights a reference store must have been sampled from (before LoRA / sharding wrappers)
        base_fingerprint = weights_fingerprint(model) if self.spec.rehearsal else ""
        if cfg.lora:
            from dphrl.models import apply_lora

            model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules)
        self.ref_model: torch.nn.Module | None = None
        self.live_reference = self.spec.uses_live_reference(cfg.kl_coef)
        if self.live_reference and not cfg.lora:
            # rkl pays for a live frozen reference; with LoRA the base model (adapter off) is the reference
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False).to(self.acc.device)

        # --- data: which prompts are rolled out, which are rehearsed --------------------------------
        examples = examples if examples is not None else load_examples(cfg.dataset)
        self.reward_fn = get_reward(cfg.reward or examples[0].task)
        self.store: ReferenceStore | None = None
        if self.spec.rehearsal:
            self.store = ReferenceStore(cfg.reference_store, max_prompt_tokens=cfg.max_prompt_tokens)
            self.store.check_compatible(
                model_fingerprint=base_fingerprint, tokenizer_hash=_tokenizer_hash(tokenizer),
                temperature=cfg.temperature, top_p=cfg.top_p, examples=examples,
            )
            if divergences.REHEARSAL_FORMS.get(cfg.rehearsal_form).topk and self.store.topk < cfg.rehearsal_topk:
                raise StoreMismatchError(
                    f"reference store {cfg.reference_store}: field 'rehearsal_topk' is {self.store.topk}, but "
                    f"rehearsal_form {cfg.rehearsal_form} needs the top-{cfg.rehearsal_topk} of every position. "
                    f"Re-run `dphrl presample` with rehearsal_topk={cfg.rehearsal_topk}."
                )
            if self.store.dropped_long_prompts and self.acc.is_main_process:
                print(f"dphrl: dropped {self.store.dropped_long_prompts} stored reference samples whose prompt is "
                      f"longer than max_prompt_tokens={cfg.max_prompt_tokens} (the rule rollout prompts follow)")
            exp = set(self.store.exp_ids)
            self.rollout_examples = [ex for ex in examples if ex.id in exp]
            self.pef_ids = list(self.store.pef_ids)
            if not self.rollout_examples:
                raise ValueError(f"reference store {cfg.reference_store}: D_exp is empty; nothing to explore")
            n_ref = cfg.ref_prompts_per_step or max(
                1, round(cfg.prompts_per_step * len(self.pef_ids) / max(1, len(self.rollout_examples)))
            )
            # a D_pef prompt is never drawn twice in one step: at most every prompt once
            self.ref_prompts_per_step = min(n_ref, len(self.pef_ids))
            if not self.pef_ids and self.acc.is_main_process:
                print(f"dphrl: WARNING: reference store {cfg.reference_store} has no rehearsable D_pef prompt: "
                      f"{cfg.algorithm} trains without its rehearsal term (lower split_threshold at presample, or "
                      "use more training prompts)")
            self.ref_sampler = PromptSampler(max(1, len(self.pef_ids)), cfg.seed + 1)
        else:
            self.rollout_examples = examples
            self.pef_ids, self.ref_prompts_per_step = [], 0
            self.ref_sampler = None
        self._prompt_cache: dict[str, list[int]] = {}
        n_before = len(self.rollout_examples)
        self.rollout_examples = [ex for ex in self.rollout_examples if len(self._encode(ex)) <= cfg.max_prompt_tokens]
        self.dropped_long_prompts = n_before - len(self.rollout_examples)
        if self.dropped_long_prompts and self.acc.is_main_process:
            print(f"dphrl: dropped {self.dropped_long_prompts} of {n_before} prompts longer than "
                  f"max_prompt_tokens={cfg.max_prompt_tokens}")
        if not self.rollout_examples:
            raise ValueError(f"no training prompt fits max_prompt_tokens={cfg.max_prompt_tokens}; raise it")
        self.sampler = PromptSampler(len(self.rollout_examples), cfg.seed)
        self.eval_sets = {name: load_examples(spec) for name, spec in cfg.eval_data.items()} if cfg.eval_every else {}
        for name, exs in self.eval_sets.items():
            if not exs:
                raise ValueError(f"config key 'eval_data': dataset {name!r} {cfg.eval_data[name]} gave no examples")
        self.last_eval: dict[str, float] = {}

        # --- optimisation ----------------------------------------------------------------------------
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        # model and optimizer are prepared together (FSDP / DeepSpeed need both); the scheduler is ours,
        # stepped once per update whatever the number of processes
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.sharded = sharding.is_sharded(self.model)
        # the update forwards each micro-batch's distinct prompts once (dphrl.prefix) where the model allows;
        # not under FSDP: a parameter's gradient is accumulated only after both forwards' backward, so FSDP1
        # would keep every layer unsharded through the response backward (memory not measured yet)
        self.share_prefix = (cfg.share_prefix and not self.sharded
                             and can_share_prefix(self.model, cfg.gradient_checkpointing))
        self.launch = self._launch()
        errors = check_launch(cfg, self.launch).errors
        if errors:
            raise ConfigError("\n".join(errors))
        total_updates = max(1, cfg.max_steps * cfg.ppo_epochs * cfg.mini_batches)
        self.scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_updates
        )
        self.engine = self._build_engine()
        self._engine_stale = self.engine_name == "vllm"  # push the policy's weights before the first rollout
        self.step = 0
        self.totals = {"nonfinite_skipped": 0, "reward_failures": 0, "empty_updates_skipped": 0}
        self.store_check: dict[str, float] = {}
        if self.store is not None and cfg.store_check_tokens > 0:
            self.store_check = self._verify_store()
        if cfg.trackers:
            self.acc.init_trackers("dphrl", config=_flat_config(cfg))

    def _verify_store(self) -> dict[str, float]:
        """Re-score a sample of stored tokens with the training forward (same dtype and autocast) and
        refuse the store if it was not sampled from this model (:func:`dphrl.reference.verify_store`)."""
        from dphrl.reference import store_tolerance, verify_store

        cfg = self.cfg
        tol = cfg.store_check_tolerance
        if tol is None:
            tol = store_tolerance(str(self.store.manifest.get("dtype", "float32")), cfg.dtype)
        top_p = float(self.store.manifest.get("sampling", {}).get("top_p", 1.0))

        def rescore(samples: list) -> list[list[float]]:  # the training forward (every rank: the same sample)
            return self._no_grad_logprobs(self.model, [Seq(r.prompt_ids, r.response_ids) for r in samples], top_p)

        stats = verify_store(self.store, rescore, max_tokens=cfg.store_check_tokens, tolerance=tol)
        if self.acc.is_main_process and cfg.progress:
            print(f"dphrl: reference store verified: {stats['store_check/tokens']:.0f} stored tokens re-scored, "
                  f"mean |delta log pi| {stats['store_check/mean_abs_diff']:.2e} (tolerance {tol:g})")
        return stats

    def _launch(self) -> Launch:
        """This run's layout, for :func:`dphrl.launch.check_launch` and ``run_info.json``."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            kind = "zero3"
        elif self.sharded:
            kind = "fsdp"
        else:
            kind = "ddp" if self.world > 1 else "none"
        return Launch(world_size=self.world, sharding=kind, engine=self.engine_name,
                      engine_was_auto=self.cfg.engine == "auto")

    def _build_engine(self) -> Any:
        """The generation engine (:func:`dphrl.engines.build_engine`); hf generates with the policy itself."""
        cfg = self.cfg
        return build_engine(
            self.engine_name, self._unwrapped(), self.tokenizer, batch_size=cfg.generation_batch_size,
            synced_gpus=self.sharded and self.world > 1, model_name=cfg.model, dtype=cfg.dtype,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens, seed=cfg.seed + self.rank,
            distributed=self.world > 1, share_prefix=cfg.share_prefix,
        )

    def _push_weights_to_engine(self) -> None:
        """vllm: copy the current policy (LoRA folded in, shards gathered) into the engine."""
        from dphrl.engines.vllm import hf_weights_for_engine

        with torch.no_grad(), sharding.full_parameters(self.model):
            self.engine.load_weights(hf_weights_for_engine(self._unwrapped()))
        self._engine_stale = False

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the loop to ``max_steps``; save the final model. SIGTERM / SIGINT save a checkpoint at the
        next step boundary and raise :class:`TrainingStopped` (resume it with ``resume("latest")``)."""
        self._claim_output_dir()
        try:
            with StopSignals() as stop:
                return self._loop(stop)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _claim_output_dir(self) -> None:
        """Refuse an output dir holding another run unless resuming or overwriting; lock it (rank 0 decides,
        every rank raises the same error)."""
        if self._lock is not None:
            return
        err = None
        if self.acc.is_main_process:
            try:
                self._lock = claim_dir(self.out, what="dphrl train", resume=self._resumed or self._claimed_for_resume,
                                       overwrite=self.overwrite)
                for d in (self.out, self.out / "checkpoints"):  # what a killed run left half-written
                    sweep_leftovers(d)
            except RunDirError as e:
                err = str(e)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            box = [err]
            broadcast_object_list(box, from_process=0)
            err = box[0]
        if err:
            raise RunDirError(err)

    def _loop(self, stop: StopSignals) -> dict:
        cfg = self.cfg
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            atomic_write_text(self.out / "run_info.json", json.dumps(self.run_info(), indent=1))
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.algorithm}", unit="step",
                   disable=not (cfg.progress and self.acc.is_main_process))
        last: dict = {}
        if self.eval_sets and self.step == 0:  # the starting point of the Pass@k-over-steps curves
            self.log({"step": 0, **self.evaluate()})
        while self.step < cfg.max_steps:
            t0 = time.time()
            rollouts, roll_metrics = self.collect_rollouts()  # generate -> score -> advantages
            refs = self.reference_batch()  # dph: stored pi_ref samples of D_pef prompts
            t1 = time.time()
            upd_metrics = self.update(rollouts, refs)  # PPO epochs x mini-batches
            t2 = time.time()
            self.step += 1
            if self.store is not None:
                roll_metrics["ref/sequences"] = float(len(refs))
                roll_metrics["ref/tokens"] = float(sum(len(s.response_ids) for s in refs))
            metrics = {**roll_metrics, **upd_metrics, "time/rollout": t1 - t0, "time/update": t2 - t1, "time/step": t2 - t0}
            metrics = self._reduce(metrics)
            n_tok = metrics.get("response_length/mean", 0.0) * metrics.get("rollout/sequences", 0.0)
            metrics["throughput/rollout_tokens_per_s"] = n_tok / max(1e-9, metrics["time/step"])
            metrics["memory/peak_mb"] = _peak_memory_mb()
            metrics["lr"] = self.scheduler.get_last_lr()[0]
            metrics["step"] = self.step
            last = metrics
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.log(metrics)
            if self.eval_sets and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                self.log({"step": self.step, **self.evaluate()})
            if cfg.completions_every and self.step % cfg.completions_every == 0:
                self.log_completions(rollouts)
            for cb in self.callbacks:
                cb(self, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}", s_per_step=f"{metrics['time/step']:.2f}")
            stopping = self._stop_requested(stop)
            if stopping and self.step < cfg.max_steps:  # every rank agrees: checkpoint, then stop cleanly
                path = self.save_checkpoint()
                bar.close()
                raise TrainingStopped(stopping, path)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.save_final()
        for tracker in self.acc.trackers:  # flush trackers; keep the process group for later calls
            tracker.finish()
        return last

    def _stop_requested(self, stop: StopSignals) -> str | None:
        """The signal any rank received (all ranks agree, one all-reduce), or None."""
        code = {None: 0.0, "SIGINT": 1.0, "SIGTERM": 2.0}.get(stop.requested, 2.0)
        (agreed,) = self._allreduce([code], op="max")
        return {0.0: None, 1.0: "SIGINT", 2.0: "SIGTERM"}[agreed]

    # ------------------------------------------------------------------------------------------
    # phase 1: rollouts
    # ------------------------------------------------------------------------------------------
    def _encode(self, ex: Example) -> list[int]:
        if ex.id not in self._prompt_cache:
            self._prompt_cache[ex.id] = encode_prompt(self.tokenizer, ex.prompt)
        return self._prompt_cache[ex.id]

    def _local_prompts(self, k_global: int) -> list[Example]:
        idx = self.sampler.next(k_global)  # same on every rank
        per = k_global // self.world
        return [self.rollout_examples[i] for i in idx[self.rank * per : (self.rank + 1) * per]]

    def _generate_and_score(self, exs: list[Example], round_: int) -> tuple[list[list[Any]], torch.Tensor, torch.Tensor, int]:
        cfg = self.cfg
        seed = cfg.seed * 7_919 + self.step * 104_729 + round_ * 1_299_709 + self.rank * 15_485_863
        if self._engine_stale:
            self._push_weights_to_engine()
        ctx = sharding.generation_context(self.model) if self.engine_name == "hf" and self.sharded else nullcontext()
        with ctx:
            gens = self.engine.generate(
                [self._encode(ex) for ex in exs], cfg.rollout_n, max_new_tokens=cfg.max_new_tokens,
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
                f"step {self.step + 1}: {fails} of {len(flat)} reward evaluations failed or timed out "
                f"(> max_reward_failure_frac={cfg.max_reward_failure_frac}). Check the reward function "
                f"'{cfg.reward or exs[0].task}' on a few samples; the last checkpoint is intact. "
                f"First error: {next(iter(scored.errors.values()), 'n/a')}"
            )
        rewards = torch.tensor(scored.scores, dtype=torch.float32)  # (G*n,)
        lengths = torch.tensor([len(g.response_ids) for g in flat], dtype=torch.float32)  # (G*n,)
        return gens, rewards, lengths, fails

    def collect_rollouts(self) -> tuple[list[Seq], dict[str, float]]:
        """Generate rollout_n responses per prompt, score, shape, compute advantages, filter (dapo).

        Dynamic sampling keeps the first ``prompts_per_step`` informative groups in the *global* order
        of the prompts (round, then rank, then local index: the order one process would see), each
        refill round drawing a whole new batch of ``prompts_per_step`` prompts, so the trained groups do
        not depend on the number of processes. A rank may keep fewer groups than another, or none;
        the update pads it (see :meth:`optimizer_step`).
        """
        cfg, n = self.cfg, self.cfg.rollout_n
        exs = self._local_prompts(cfg.prompts_per_step)
        kept: list[tuple[list[Any], torch.Tensor, torch.Tensor]] = []  # (gens of a group, rewards, shaped)
        all_rewards, all_lengths, all_finished, fails, rounds, n_kept = [], [], [], 0, 0, 0
        while True:
            gens, rewards, lengths, f = self._generate_and_score(exs, rounds)
            fails += f
            all_rewards.append(rewards)
            all_lengths.append(lengths)
            all_finished += [g.finished for gs in gens for g in gs]
            shaped = rewards.clone()
            if cfg.overlong_buffer:
                shaped = shaped + adv_lib.overlong_penalty(
                    lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
                )
            groups = [(gens[g], rewards[g * n : (g + 1) * n], shaped[g * n : (g + 1) * n]) for g in range(len(exs))]
            if not cfg.dynamic_sampling:
                kept += groups
                break
            informative = [grp for grp in groups if bool(adv_lib.dynamic_sampling_mask(grp[1], n).all())]
            counts = self._allgather_int(len(informative))  # this round's informative groups per rank
            need = cfg.prompts_per_step - n_kept
            before = sum(counts[: self.rank])
            mine = max(0, min(counts[self.rank], need - before))
            kept += informative[:mine]
            n_kept += min(need, sum(counts))
            if n_kept >= cfg.prompts_per_step or rounds >= cfg.max_refill_rounds:
                break
            rounds += 1
            exs = self._local_prompts(cfg.prompts_per_step)  # a whole new batch (world-independent)
        shaped_all = torch.cat([s for _, _, s in kept]) if kept else torch.zeros(0)  # (G*n,)
        advs, adv_metrics = adv_lib.compute_advantages(cfg.advantage, shaped_all, n) if kept else (shaped_all, {})
        seqs = []
        for gi, (gens, _, _) in enumerate(kept):
            for j, g in enumerate(gens):
                seqs.append(Seq(g.prompt_ids, g.response_ids, old_logp=g.logprobs, advantage=float(advs[gi * n + j]),
                                text=g.text, reward=float(kept[gi][1][j])))
        if self.live_reference:
            self._attach_reference_logprobs(seqs)
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

    def _no_grad_logprobs(self, model: torch.nn.Module, seqs: list[Seq], top_p: float = 1.0) -> list[list[float]]:
        """Per-token log-probs of ``seqs`` under ``model`` (no grad, fp32), micro-batch by micro-batch as the
        update makes them (same layout, same autocast: the training numerics); every rank runs as many
        forwards as the busiest one (FSDP: collectives)."""
        out: list[list[float]] = [[] for _ in seqs]
        plan = self._micro_batches(seqs)
        (most,) = self._allreduce([len(plan)], op="max") if self.world > 1 else (len(plan),)
        with torch.no_grad(), self.acc.autocast():
            for ix in plan + [None] * (int(most) - len(plan)):
                chunk = [seqs[i] for i in ix] if ix is not None else [self._padding_seq()]
                lp, _ = batch_logprobs(model, self._pack(chunk), self.cfg.temperature, top_p=top_p)  # (B, T)
                for i, s, row in zip(ix or [], chunk, lp.float().cpu()):
                    out[i] = row[: len(s.response_ids)].tolist()
        return out

    def _micro_batches(self, seqs: list[Seq]) -> list[list[int]]:
        """Indices of each micro-batch of at most ``micro_batch_size`` sequences: with the shared-prefix
        update, whole groups sorted by length (each prompt forwarded once per micro-batch), else in order."""
        k = self.cfg.micro_batch_size
        if not self.share_prefix:
            return [list(range(i, min(i + k, len(seqs)))) for i in range(0, len(seqs), k)]
        return micro_batch_order([s.prompt_ids for s in seqs], [s.response_ids for s in seqs], max_seqs=k)

    def _pack(self, seqs: list[Seq]) -> Batch:
        """One micro-batch on the device, in the update's layout (shared prompts or packed rows)."""
        prompts, responses = [s.prompt_ids for s in seqs], [s.response_ids for s in seqs]
        return pack_batch(prompts, responses, self.pad_id, self.share_prefix).to(self.acc.device)

    def _attach_reference_logprobs(self, seqs: list[Seq]) -> None:
        """KL term: log pi_ref of every rollout token from the frozen initial model (one no-grad forward,
        same autocast as the policy)."""
        if self.ref_model is not None:
            ref = self._no_grad_logprobs(self.ref_model, seqs)
        else:  # LoRA: the base model with the adapter switched off is the initial policy
            model = self.acc.unwrap_model(self.model)
            with model.disable_adapter():
                ref = self._no_grad_logprobs(model, seqs)
        for s, lp in zip(seqs, ref):
            s.ref_logp = lp

    def reference_batch(self) -> list[Seq]:
        """dph: the stored pi_ref samples of this step's D_pef prompts (this rank's even share)."""
        if not self.ref_prompts_per_step:
            return []
        idx = self.ref_sampler.next(self.ref_prompts_per_step)
        samples = [s for i in idx for s in self.store.samples[self.pef_ids[i]]]
        mine = samples[self.rank :: self.world]  # shard evenly, never all on the last rank
        return [Seq(s.prompt_ids, s.response_ids, ref_logp=s.ref_logprobs, topk_ids=s.topk_ids,
                    topk_logp=s.topk_logprobs) for s in mine]

    # ------------------------------------------------------------------------------------------
    # phase 2: update
    # ------------------------------------------------------------------------------------------
    def _recompute_old_logprobs(self, seqs: list[Seq]) -> None:
        """old_logprob=recompute: pi_old from one no-grad forward of the policy before the update
        (instead of the engine's log-probs, e.g. when the engine's numerics or top-p differ)."""
        for s, lp in zip(seqs, self._no_grad_logprobs(self.model, seqs)):
            s.old_logp = lp

    def update(self, rollouts: list[Seq], refs: list[Seq]) -> dict[str, float]:
        cfg = self.cfg
        M = cfg.mini_batches
        if self.old_logprob == "recompute":
            self._recompute_old_logprobs(rollouts)
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
        cfg = self.cfg
        roll_chunks = [[roll_mb[i] for i in ix] for ix in self._micro_batches(roll_mb)]
        ref_chunks = [[ref_mb[i] for i in ix] for ix in self._micro_batches(ref_mb)]
        # global normalizers (each term divided by its own token / sequence count over all ranks) and the
        # micro-batch counts every rank must run, in two all-reduces
        g_roll_tok, g_roll_seq, g_ref_tok = self._allreduce(
            [sum(len(s.response_ids) for s in roll_mb), len(roll_mb), sum(len(s.response_ids) for s in ref_mb)]
        )
        n_roll, n_ref = (int(x) for x in self._allreduce([len(roll_chunks), len(ref_chunks)], op="max"))
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
            ctx = nullcontext() if sync or self.world == 1 else self.acc.no_sync(self.model)
            real = chunk is not None
            seqs = chunk if real else [self._padding_seq()]
            with ctx:
                batch = self._pack(seqs)
                if kind == "roll":
                    loss, m = self._rollout_loss(batch, seqs, max(g_roll_tok, 1.0), max(g_roll_seq, 1.0))
                else:
                    loss, m = self._reference_loss(batch, seqs, max(g_ref_tok, 1.0))
                if not real:
                    loss = loss * 0.0  # padding: the collectives run, nothing is learned or counted
                elif not torch.isfinite(loss):
                    bad = 1.0
                self.acc.backward(loss * self.world)  # DDP averages gradients over ranks; we want their sum
            if real:
                w = max(1.0, float(sum(len(x.response_ids) for x in seqs)))  # token means: weighted by tokens
                for k, v in m.items():
                    acc_metrics[k] = acc_metrics.get(k, 0.0) + v * w
                    acc_metrics["_n_" + k] = acc_metrics.get("_n_" + k, 0.0) + w
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], max_norm)
        grad_norm = float(grad_norm)
        (bad,) = self._allreduce([bad + (0.0 if math.isfinite(grad_norm) else 1.0)])
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
            self._engine_stale = self.engine_name == "vllm"  # a separate engine needs the new weights
            out["update/nonfinite_skipped"] = 0.0
        out["update/empty_skipped"] = 0.0
        out["grad_norm"] = grad_norm if math.isfinite(grad_norm) else -1.0
        return out

    def _padding_seq(self) -> Seq:
        """A one-token sequence for zero-weight padding micro-batches and forwards."""
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad_id
        return Seq([self.pad_id], [eos], old_logp=[0.0], advantage=0.0, ref_logp=[0.0])

    def _rollout_loss(self, batch, chunk: list[Seq], g_tok: float, g_seq: float) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        T = batch.resp_ids.shape[1]
        mask = batch.resp_mask  # (B, T)
        logp, ent = batch_logprobs(self.model, batch, cfg.temperature, with_entropy=True,
                                   entropy_grad=cfg.entropy_coef > 0)  # (B, T), (B, T)
        old = pad_values([s.old_logp for s in chunk], T).to(logp.device)  # (B, T) pi_old of every token
        adv = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=logp.device)  # (B,)
        agg = dict(num_tokens=g_tok, num_seqs=g_seq, max_len=cfg.max_new_tokens)
        loss, m = losses.POLICY_LOSSES.get(cfg.policy_loss)(
            logp, old, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip or None,
            agg=cfg.loss_agg, **agg,
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

    def _reference_loss(self, batch, chunk: list[Seq], g_tok: float) -> tuple[torch.Tensor, dict]:
        """eta * token-mean rehearsal divergence on stored reference samples (``rehearsal_form``)."""
        cfg = self.cfg
        T = batch.resp_ids.shape[1]
        form = divergences.REHEARSAL_FORMS.get(cfg.rehearsal_form)
        kw = dict(agg="token-mean", num_tokens=g_tok, **cfg.divergence_params)
        if not form.topk:  # the paper's sampled form: f(u) on each stored token
            logp, _ = batch_logprobs(self.model, batch, cfg.temperature)  # (B, T)
            ref = pad_values([s.ref_logp for s in chunk], T).to(logp.device)  # (B, T)
            div, m = form.loss(cfg.divergence, logp, ref, batch.resp_mask, **kw)
            return cfg.eta * div, dict(m)
        logits = batch_logits(self.model, batch, cfg.temperature)  # (B, T, V)
        ids, ref_b = _topk_tensors(chunk, T, cfg.rehearsal_topk)  # (B, T, k), (B, T, k+1)
        ids, ref_b = ids.to(logits.device), ref_b.to(logits.device)
        logp_b = divergences.topk_buckets(logits, ids)  # (B, T, k+1)
        if form.tokens:  # the sampled token's own log-probs, for the unbiased tail correction
            logz = torch.logsumexp(logits, dim=-1)  # (B, T)
            kw["tok_logp"] = logits.gather(-1, batch.resp_ids.unsqueeze(-1)).squeeze(-1) - logz  # (B, T)
            kw["tok_ref_logp"] = pad_values([s.ref_logp for s in chunk], T).to(logits.device)  # (B, T)
            kw["tok_in_topk"] = (ids == batch.resp_ids.unsqueeze(-1)).any(-1)  # (B, T)
        div, m = form.loss(cfg.divergence, logp_b, ref_b, batch.resp_mask, **kw)
        return cfg.eta * div, dict(m)

    # ------------------------------------------------------------------------------------------
    # logging and checkpoints
    # ------------------------------------------------------------------------------------------
    def _sum(self, x: float) -> float:
        return self._allreduce([x])[0]

    def _allgather_int(self, x: int) -> list[int]:
        """``x`` of every rank, in rank order."""
        if self.world == 1:
            return [int(x)]
        t = torch.tensor([int(x)], device=self.acc.device)
        return [int(v) for v in self.acc.gather(t).tolist()]

    def _allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum (or max) of ``values`` over ranks, in one collective."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], device=self.acc.device)
        if op == "max":
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return t.tolist()
        return self.acc.reduce(t, reduction="sum").tolist()

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return metrics
        # ranks may hold different keys (e.g. no reference samples on one rank: no div/* metrics);
        # reduce over the union of keys, each averaged over the ranks that have it
        from accelerate.utils import gather_object

        keys = sorted(set(gather_object(sorted(metrics))))
        t = torch.tensor([[float(metrics.get(k, 0.0)), float(k in metrics)] for k in keys], device=self.acc.device)
        t = self.acc.reduce(t, reduction="sum")  # (K, 2): sum of values, number of ranks with the key
        # counts are totals over ranks; everything else is a mean over the ranks that report it
        return {k: s if k in _SUMMED else s / max(n, 1.0) for k, (s, n) in zip(keys, t.tolist())}

    def log(self, metrics: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.cfg.trackers:
            self.acc.log(metrics, step=self.step)

    # ------------------------------------------------------------------------------------------
    # evaluation during training, completion logs
    # ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Pass@k (k = 1, 2, 4, ..., eval_n), greedy accuracy, mean reward and styles of the current policy
        on ``eval_data``: each process samples its share of the problems, the records are merged.
        Returns ``eval/<name>/<metric>`` keys (the report plots them over steps)."""
        from dphrl.evaluation.runner import dataset_metrics, evaluate

        cfg = self.cfg
        out: dict[str, float] = {}
        ctx = sharding.generation_context(self.model) if self.engine_name == "hf" and self.sharded else nullcontext()
        if self._engine_stale:
            self._push_weights_to_engine()
        for name, exs in self.eval_sets.items():
            mine = exs[self.rank :: self.world]
            style_fn = answer_fn = None
            if exs[0].task == "styles":
                from dphrl.tasks.styles import final_answer, style_of

                style_fn, answer_fn = style_of, final_answer
            records: list[dict[str, Any]] = []
            with ctx:
                evaluate(self.engine, self.tokenizer, {name: mine}, get_reward(cfg.eval_reward or exs[0].task),
                         n=cfg.eval_n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                         seed=cfg.seed * 7_919 + self.step * 104_729 + 17 + self.rank, style_fn=style_fn,
                         answer_fn=answer_fn, num_workers=cfg.reward_workers, timeout_s=cfg.reward_timeout_s,
                         progress=False, show_table=False, prompts_per_call=max(1, cfg.generation_batch_size // cfg.eval_n),
                         records_out=records)
            for r in records:  # problem index within this rank's share -> within the whole set
                r["problem"] = int(r["problem"]) * self.world + self.rank
            if self.world > 1:
                from accelerate.utils import gather_object

                records = gather_object(records)
            m = dataset_metrics(records)
            out.update({f"eval/{name}/pass@{k}": float(v) for k, v in m["pass@k"].items()})
            out[f"eval/{name}/greedy_acc"] = float(m["greedy"] or 0.0)
            out[f"eval/{name}/mean_reward"] = float(m["mean_reward"] or 0.0)
            if "styles" in m:
                out[f"eval/{name}/effective_styles"] = float(m["styles"]["effective_styles"])
            if m["diversity"].get("distinct_correct_answers") is not None:
                out[f"eval/{name}/distinct_correct"] = float(m["diversity"]["distinct_correct_answers"])
        self.last_eval = out
        return out

    def log_completions(self, rollouts: list[Seq]) -> None:
        """A few of this step's rollouts (prompt, response, reward, advantage) to completions.jsonl and
        to the trackers that have tables (wandb) or text (tensorboard)."""
        if not self.acc.is_main_process:
            return
        rows = [{"step": self.step, "prompt": self.tokenizer.decode(s.prompt_ids, skip_special_tokens=False),
                 "response": s.text, "reward": s.reward, "advantage": s.advantage}
                for s in rollouts[: self.cfg.completions_per_log]]
        with open(self.out / "completions.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for tracker in self.acc.trackers:
            try:
                if tracker.name == "wandb":
                    import wandb  # type: ignore[import-not-found]

                    cols = list(rows[0]) if rows else []
                    tracker.log({"completions": wandb.Table(columns=cols, data=[list(r.values()) for r in rows])},
                                step=self.step)
                elif tracker.name == "tensorboard":
                    tracker.writer.add_text("completions", "\n\n".join(json.dumps(r) for r in rows), self.step)
            except Exception as e:  # noqa: BLE001 - a tracker's table must never stop training
                tqdm.write(f"completions: tracker {tracker.name} failed: {e}")

    def run_info(self) -> dict[str, Any]:
        """What the config cannot say: what ``auto`` resolved to here, the launch, the versions."""
        import platform

        import transformers

        import dphrl

        return {
            "engine": self.engine_name,
            "engine_requested": self.cfg.engine,
            "old_logprob": self.old_logprob,
            "share_prefix_update": self.share_prefix,
            "world_size": self.world,
            "sharding": self.launch.sharding,
            "device": str(self.acc.device),
            "versions": {"dphrl": getattr(dphrl, "__version__", "?"), "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
        }

    def _unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint (temp dir then rename) of everything needed to resume exactly."""
        ckdir = self.out / "checkpoints"
        final = ckdir / f"step_{self.step:06d}"
        tmp = ckdir / f".step_{self.step:06d}.tmp"
        full = sharding.full_state_dict(self.model) if self.sharded else None  # a collective: every rank
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            sd = full if full is not None else {k: v.detach().cpu() for k, v in self._unwrapped().state_dict().items()}
            torch.save(sd, tmp / "model.pt")
            torch.save(
                {
                    "step": self.step,
                    "optimizer": None if self.sharded else self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "sampler": self.sampler.state_dict(),
                    "ref_sampler": self.ref_sampler.state_dict() if self.ref_sampler else None,
                    "totals": self.totals,
                },
                tmp / "trainer_state.pt",
            )
            self.cfg.save(tmp / "config.yaml")
        self.acc.wait_for_everyone()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        torch.save(rng, tmp / f"rng_{self.rank}.pt")
        if self.sharded:  # each rank's optimizer state holds its own shards
            torch.save(self.optimizer.state_dict(), tmp / f"optimizer_{self.rank}.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps({"step": self.step, "world_size": self.world}))
            replace_dir(tmp, final)
            done = self._complete_checkpoints()
            for old in done[: max(0, len(done) - self.cfg.keep_last)]:
                remove_dir(old)  # renamed away first: never a half-deleted step_N
        self.acc.wait_for_everyone()
        return final

    def _complete_checkpoints(self) -> list[Path]:
        """Checkpoint dirs that were fully written (their marker is written last, before the rename)."""
        ckdir = self.out / "checkpoints"
        return sorted(p for p in ckdir.glob("step_*") if p.is_dir() and (p / CHECKPOINT_MARKER).is_file())

    def resume(self, path: str | Path = "latest") -> None:
        """Restore model, optimizer, scheduler, RNG and data position from a checkpoint.

        The current config may differ from the checkpoint's only in keys that can change mid-run; the
        optimizer's hyper-parameters (lr, betas, weight_decay) are then applied to the restored
        optimizer and every change is printed and recorded in ``resume_log.jsonl``. Keys that define
        the run (model, data, algorithm, seed, ...) must match: see :data:`RESUME_MUST_MATCH`.
        """
        self._claimed_for_resume = True
        self._claim_output_dir()
        if str(path) == "latest":
            done = self._complete_checkpoints()
            if not done:
                raise FileNotFoundError(f"--resume latest: no complete checkpoint under {self.out / 'checkpoints'}")
            path = done[-1]
        path = Path(path)
        if not (path / CHECKPOINT_MARKER).is_file():
            raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (no {CHECKPOINT_MARKER})")
        changes = self._resume_config_changes(path)
        st = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if self.sharded:
            sd = torch.load(path / "model.pt", map_location="cpu") if self.acc.is_main_process else {}
            sharding.load_full_state_dict(self.model, sd)
            opt = torch.load(path / f"optimizer_{self.rank}.pt", map_location="cpu", weights_only=False)
        else:
            self._unwrapped().load_state_dict(torch.load(path / "model.pt", map_location="cpu"))
            opt = st["optimizer"]
        self.optimizer.load_state_dict(opt)
        self._engine_stale = self.engine_name == "vllm"
        self.scheduler.load_state_dict(st["scheduler"])
        self.sampler.load_state_dict(st["sampler"])
        if self.ref_sampler and st["ref_sampler"]:
            self.ref_sampler.load_state_dict(st["ref_sampler"])
        self.totals = st["totals"]
        self.step = st["step"]
        rng = torch.load(path / f"rng_{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        for group in self.optimizer.param_groups:  # the current config's optimizer hyper-parameters
            group["lr"] = self.cfg.lr
            group["betas"] = tuple(self.cfg.betas)
            group["weight_decay"] = self.cfg.weight_decay
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._scheduled_lrs()):
            group["lr"] = lr
        self._resumed = True
        if self.acc.is_main_process:
            if (self.out / "metrics.jsonl").exists():  # drop log lines past the checkpoint (atomic rewrite)
                lines = (self.out / "metrics.jsonl").read_text().splitlines()
                keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
                atomic_write_text(self.out / "metrics.jsonl", "".join(ln + "\n" for ln in keep))
            if changes:
                print(f"dphrl: resuming {path.name} with changed config: "
                      + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
                with open(self.out / "resume_log.jsonl", "a") as f:
                    f.write(json.dumps({"checkpoint": path.name, "step": self.step,
                                        "changed": {k: [a, b] for k, (a, b) in changes.items()}}) + "\n")

    def _scheduled_lrs(self) -> list[float]:
        """The LR schedule's value at the restored step for the (possibly changed) base LR."""
        sched = self.scheduler
        if hasattr(sched, "lr_lambdas"):
            return [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        return sched.get_last_lr()

    def _resume_config_changes(self, path: Path) -> dict[str, tuple[Any, Any]]:
        """Keys whose value differs from the checkpoint's config; refuse those that define the run."""
        import yaml

        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
        now = self.cfg.to_dict()
        changes = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
        fixed = sorted(k for k in changes if k in RESUME_MUST_MATCH)
        if fixed:
            raise ConfigError(
                f"--resume {path}: the config differs from the checkpoint's in keys that define the run: "
                + ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in fixed)
                + ". Resume with the checkpoint's values, or start a new run (--overwrite, or another output_dir)."
            )
        return changes

    def save_final(self) -> Path:
        """save_pretrained (+ tokenizer + resolved config): loadable by plain transformers."""
        final = self.out / "final"
        self.acc.wait_for_everyone()
        full = sharding.full_state_dict(self.model) if self.sharded else None  # a collective: every rank
        if self.acc.is_main_process:
            model = self._unwrapped()
            if self.cfg.lora:
                model = copy.deepcopy(model).merge_and_unload()
            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, **({"state_dict": full} if full is not None else {}))
            self.tokenizer.save_pretrained(tmp)
            self.cfg.save(tmp / "dphrl_config.yaml")
            (tmp / "dphrl_run_info.json").write_text(json.dumps(self.run_info(), indent=1))
            (tmp / "dphrl_totals.json").write_text(json.dumps({"step": self.step, **self.totals}))
            (tmp / "README.md").write_text(model_card(self.cfg, self.run_info(), self.last_eval, self.step))
            replace_dir(tmp, final)  # never a moment without a final/ once one existed
            if self.cfg.push_to_hub:
                push_folder(final, self.cfg.push_to_hub)
        self.acc.wait_for_everyone()
        return final


#: Written last into a checkpoint dir (before its rename): only marked checkpoints are resumable.
CHECKPOINT_MARKER = "COMPLETE"

#: Config keys a resumed run must share with its checkpoint (they define what was trained so far).
RESUME_MUST_MATCH = frozenset({
    "model", "algorithm", "dataset", "reward", "seed", "reference_store", "lora", "lora_r", "lora_alpha",
    "lora_target_modules", "dtype", "rollout_n", "prompts_per_step", "presample_n", "split_threshold",
    "keep_per_prompt", "max_prompt_tokens", "temperature", "top_p",
})


class TrainingStopped(RuntimeError):
    """SIGTERM / SIGINT stopped training at a step boundary after writing a checkpoint."""

    def __init__(self, signal_name: str, checkpoint: Path):
        self.signal_name, self.checkpoint = signal_name, checkpoint
        super().__init__(f"{signal_name}: stopped after step {checkpoint.name.removeprefix('step_').lstrip('0') or 0}; "
                         f"checkpoint {checkpoint}. Resume with `dphrl train --config ... --resume latest`.")


_SUMMED = {"reward/failures", "rollout/sequences", "rollout/groups_kept", "ref/sequences", "ref/tokens"}


def model_card(cfg: TrainConfig, run_info: dict, last_eval: dict[str, float], step: int) -> str:
    """``final/README.md`` in the Hugging Face model-card format (YAML metadata + a description): the base
    model, algorithm, divergence, key config, data and the latest evaluation numbers."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = cfg.spec()
    base = cfg.model if "/" in cfg.model and not cfg.model.startswith((".", "/", "~")) else None
    tags = ["dphrl", "rlvr", "reinforcement-learning", cfg.algorithm]
    if spec.rehearsal:
        tags.append(f"divergence-{cfg.divergence}")
    data = ModelCardData(library_name="transformers", base_model=base, tags=tags, pipeline_tag="text-generation")
    key = {k: getattr(cfg, k) for k in ("algorithm", "lr", "max_steps", "prompts_per_step", "rollout_n", "temperature",
                                        "clip_low", "clip_high", "dual_clip", "loss_agg", "advantage", "seed", "lora")}
    if spec.rehearsal:
        key.update(divergence=cfg.divergence, eta=cfg.eta, rehearsal_form=cfg.rehearsal_form,
                   reference_store=cfg.reference_store)
    if spec.uses_live_reference(cfg.kl_coef):
        key.update(kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    lines = [f"# {Path(cfg.output_dir).name}", "",
             f"Fine-tuned from `{cfg.model}` with [dphrl](https://github.com/) (`{cfg.algorithm}`: {spec.summary}), "
             f"{step} RL steps on `{json.dumps(cfg.dataset)}` with reward `{cfg.reward or 'the task default'}`.", "",
             "## Training configuration (key values; the full resolved config is `dphrl_config.yaml`)", "",
             "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in key.items()]
    lines += ["", f"Engine {run_info.get('engine')}, {run_info.get('world_size')} process(es), "
              f"versions {json.dumps(run_info.get('versions', {}))}.", ""]
    if last_eval:
        lines += ["## Latest evaluation (during training)", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4f} |" for k, v in sorted(last_eval.items())]
        lines.append("")
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))
    return str(card)


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload ``folder`` (the final model, exactly as written) to the Hub repo ``repo_id``."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="dphrl: final model")


def _topk_tensors(chunk: list[Seq], T: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in cfg.to_dict().items()}


def _tokenizer_hash(tokenizer: Any) -> str:
    from dphrl.models import tokenizer_hash

    return tokenizer_hash(tokenizer)
