"""The RL loop, read top to bottom: sample prompts -> generate -> score -> advantages -> update -> log.

One class, ``Trainer``, runs every algorithm of the algorithm table (:mod:`dphrl.algorithms`:
grpo, dapo, rkl, dph); the algorithms differ only in which prompts are rolled out, which loss terms
are added and the defaults filled by the config, and the trainer reads those from the algorithm's
spec (never its name):

    live_reference : + kl_coef * KL estimator on rollout tokens against a live frozen copy of the
                     initial model (rkl).
    rehearsal      : + eta * f-divergence on stored pi_ref samples of D_pef prompts (dph). No
                     reference model exists: log pi_ref comes from the store.
    rollout_prompts: all training prompts, or the store's D_exp only (dph).

The rooms: :mod:`dphrl.rollout` (phase 1: the step's sequences), :mod:`dphrl.update` (phase 2: PPO
updates and the loss terms), :mod:`dphrl.rehearsal` (which prompts are rolled out and rehearsed),
:mod:`dphrl.checkpoint` (save, resume, final model), :mod:`dphrl.monitor` (logs, evaluation),
:mod:`dphrl.dist` (collectives) and :mod:`dphrl.engines.sync` (the engine's weights). Distributed
runs (accelerate DDP/FSDP) shard prompts and reference samples evenly by rank and normalize with
global counts, so the update of a global batch does not depend on the number of processes.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from transformers import get_scheduler

from dphrl import checkpoint, divergences, sharding
from dphrl.batching import pad_token_id
from dphrl.checkpoint import (
    CHECKPOINT_MARKER,
    RESUME_MUST_MATCH,
    CheckpointError,
    TrainingStopped,
    model_card,
    push_folder,
)
from dphrl.config import ConfigError, TrainConfig
from dphrl.data import load_examples
from dphrl.data.example import Example
from dphrl.data.sampler import PromptSampler
from dphrl.dist import Collectives
from dphrl.engines import build_engine, engine_capabilities, resolve_engine
from dphrl.engines.sync import EngineWeights
from dphrl.fsutil import atomic_write_text, sweep_leftovers
from dphrl.launch import Launch, check_launch
from dphrl.models import weights_fingerprint
from dphrl.monitor import Monitor, peak_memory_mb
from dphrl.prefix import can_share_prefix
from dphrl.progress import progress_bar
from dphrl.reference import ReferenceStore, StoreMismatchError, verify_store
from dphrl.rehearsal import needs_store, plan_rehearsal
from dphrl.rewards.registry import get_reward
from dphrl.rollout import ReferenceBatches, RewardFailureError, RolloutCollector, Seq
from dphrl.rundir import RunDirError, RunLock, StopSignals, claim_dir
from dphrl.update import Updater, topk_tensors

__all__ = [
    "CHECKPOINT_MARKER",
    "RESUME_MUST_MATCH",
    "CheckpointError",
    "PromptSampler",
    "RewardFailureError",
    "Seq",
    "StepCallback",
    "Trainer",
    "TrainingStopped",
    "load_examples",
    "model_card",
    "push_folder",
    "topk_tensors",
]

#: ``callback(trainer, metrics)``, called after every step with that step's reduced metrics.
StepCallback = Callable[["Trainer", dict], None]


class Trainer:
    """Runs ``cfg.max_steps`` RL steps of ``cfg.algorithm``; see the module docstring.

    ``callbacks`` are called after every step (every process) with the step's metrics, e.g. to print
    progress or stop early; they must not change the model.
    """

    def __init__(self, cfg: TrainConfig, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 examples: list[Example] | None = None, accelerator: Accelerator | None = None,
                 callbacks: list[StepCallback] | None = None, overwrite: bool = False):
        self.cfg, self.spec = cfg, cfg.spec()  # the algorithm's entry in dphrl.algorithms
        self.overwrite = overwrite  # replace a run found in output_dir (else refused unless resumed)
        self.callbacks = list(callbacks or [])
        self._lock: RunLock | None = None
        self._resumed = self._claimed_for_resume = False
        self.engine_name = resolve_engine(cfg.engine)  # auto resolved here, recorded in run_info.json
        self.engine_caps = engine_capabilities(self.engine_name)
        self.old_logprob = cfg.old_logprob_for(self.engine_name)
        mp = "bf16" if cfg.dtype == "bfloat16" else "no"
        self.acc = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=mp,
            log_with=cfg.trackers or None,
            project_dir=cfg.output_dir,
        )
        self.coll = Collectives(self.acc)
        self.world, self.rank = self.coll.world, self.coll.rank
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model, self.tokenizer, base_fingerprint = self._load_model(model, tokenizer)
        examples = examples if examples is not None else load_examples(cfg.dataset)
        self.reward_fn = get_reward(cfg.reward or examples[0].task)
        self._plan_data(examples, base_fingerprint)
        self._setup_optimization(model)
        self.step = 0
        self.totals = {"nonfinite_skipped": 0, "reward_failures": 0, "empty_updates_skipped": 0}
        self.engine = build_engine(
            self.engine_name, self._unwrapped(), self.tokenizer, batch_size=cfg.generation_batch_size,
            synced_gpus=self.sharded and self.world > 1, model_name=cfg.model, dtype=cfg.dtype,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens, seed=cfg.seed + self.rank,
            distributed=self.world > 1, share_prefix=cfg.share_prefix,
        )
        self.weights = EngineWeights(self.engine, self.engine_caps, self.model, self.acc.unwrap_model)
        self.rollouts = RolloutCollector(cfg, self.engine, self.weights, self.tokenizer, self.reward_fn,
                                         self.rollout_examples, self.coll, self.totals)
        self.references = ReferenceBatches(self.store if self.spec.rehearsal else None, self.pef_ids,
                                           self.ref_prompts_per_step, cfg.seed + 1, self.coll)
        self.updater = Updater(
            cfg,
            self.acc,
            self.coll,
            self.model,
            self.optimizer,
            self.scheduler,
            pad_id=self.pad_id,
            eos_id=self.tokenizer.eos_token_id,
            share_prefix=self.share_prefix,
            ref_model=self.ref_model,
            live_reference=self.live_reference,
            totals=self.totals,
            on_update=self.weights.updated,
        )
        self.store_check: dict[str, float] = {}
        if self.store is not None and cfg.store_check_tokens > 0:
            self.store_check = self._verify_store()
        eval_sets = (
            {name: load_examples(spec) for name, spec in cfg.eval_data.items()} if cfg.eval_every else {}
        )
        self.monitor = Monitor(cfg, self.acc, self.coll, self.out, self.tokenizer, eval_sets)
        if cfg.trackers:
            self.acc.init_trackers("dphrl", config=_flat_config(cfg))

    # ------------------------------------------------------------------------------------------ set-up
    def _load_model(self, model: torch.nn.Module | None, tokenizer: Any) -> tuple[torch.nn.Module, Any, str]:
        """The policy (gradient checkpointing, LoRA), its tokenizer, the base weights' fingerprint (what a
        reference store must have been sampled from) and, for a live KL term, the frozen reference."""
        cfg = self.cfg
        if model is None or tokenizer is None:
            from dphrl.models import load_model, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(cfg.model)
            model = model or load_model(cfg.model)
        self.pad_id = pad_token_id(tokenizer)
        if cfg.gradient_checkpointing:  # recompute activations in backward: same gradients, less memory
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable({"use_reentrant": False})  # the checkpoint kwargs (first argument of either name)
        # before LoRA: what a store or an adapter checkpoint needs
        base_fingerprint = weights_fingerprint(model)
        self.base_fingerprint = base_fingerprint
        if cfg.lora:
            from dphrl.models import apply_lora

            model = apply_lora(
                model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules
            )
        self.ref_model: torch.nn.Module | None = None
        self.live_reference = self.spec.uses_live_reference(cfg.kl_coef)
        if self.live_reference and not cfg.lora:
            # rkl pays for a live frozen reference; with LoRA the base model (adapter off) is the reference
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False).to(self.acc.device)
        return model, tokenizer, base_fingerprint

    def _plan_data(self, examples: list[Example], base_fingerprint: str) -> None:
        """Open and check the reference store (if the algorithm reads one), then the rehearsal plan:
        which prompts are rolled out, which D_pef prompts are rehearsed, how many per step."""
        cfg, main = self.cfg, self.acc.is_main_process
        store = None
        if needs_store(self.spec):
            store = ReferenceStore(cfg.reference_store, max_prompt_tokens=cfg.max_prompt_tokens)
            store.check_compatible(
                model_fingerprint=base_fingerprint,
                tokenizer_hash=_tokenizer_hash(self.tokenizer),
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                examples=examples,
            )
            if divergences.REHEARSAL_FORMS.get(cfg.rehearsal_form).topk and store.topk < cfg.rehearsal_topk:
                raise StoreMismatchError(
                    f"reference store {cfg.reference_store}: field 'rehearsal_topk' is {store.topk}, but "
                    f"rehearsal_form {cfg.rehearsal_form} needs the top-{cfg.rehearsal_topk} of every "
                    f"position. Re-run `dphrl presample` with rehearsal_topk={cfg.rehearsal_topk}."
                )
            if store.dropped_long_prompts and main:
                print(
                    f"dphrl: dropped {store.dropped_long_prompts} stored reference samples whose prompt is "
                    f"longer than max_prompt_tokens={cfg.max_prompt_tokens} (the rule rollout prompts follow)"
                )
        plan = plan_rehearsal(self.spec, examples, store, prompts_per_step=cfg.prompts_per_step,
                              ref_prompts_per_step=cfg.ref_prompts_per_step)
        self.store, self.pef_ids, self.ref_prompts_per_step = store, plan.pef_ids, plan.ref_prompts_per_step
        if self.spec.rehearsal and not self.pef_ids and main:
            print(
                f"dphrl: WARNING: reference store {cfg.reference_store} has no rehearsable D_pef prompt: "
                f"{cfg.algorithm} trains without its rehearsal term (lower split_threshold at presample, or "
                "use more training prompts)"
            )
        from dphrl.data.chat import encode_prompt

        n_before = len(plan.rollout_examples)
        lens = [len(encode_prompt(self.tokenizer, ex.prompt)) for ex in plan.rollout_examples]
        self.rollout_examples = [
            ex for ex, n in zip(plan.rollout_examples, lens) if n <= cfg.max_prompt_tokens
        ]
        self.dropped_long_prompts = n_before - len(self.rollout_examples)
        if self.dropped_long_prompts and main:
            print(f"dphrl: dropped {self.dropped_long_prompts} of {n_before} prompts longer than "
                  f"max_prompt_tokens={cfg.max_prompt_tokens}")
        if not self.rollout_examples:
            shortest = min(lens, default=0)
            raise ConfigError(
                f"config key 'max_prompt_tokens': no training prompt fits in max_prompt_tokens="
                f"{cfg.max_prompt_tokens} (the shortest of {n_before} has {shortest} tokens with the chat "
                f"template); raise it to at least {shortest}", key="max_prompt_tokens")

    def _setup_optimization(self, model: torch.nn.Module) -> None:
        """AdamW and the LR schedule; model and optimizer prepared together (FSDP / DeepSpeed need both);
        the launch refusals of :func:`dphrl.launch.check_launch`."""
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
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
        # the scheduler is ours, stepped once per update whatever the number of processes
        self.scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_updates
        )

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

    def _verify_store(self) -> dict[str, float]:
        """Re-score a sample of stored tokens with the training forward (same dtype and autocast) and
        refuse the store if it was not sampled from this model (:func:`dphrl.reference.verify_store`)."""
        cfg = self.cfg

        def rescore(samples: list, top_p: float) -> list[list[float]]:  # every rank: the same sample
            return self.updater.no_grad_logprobs(
                self.model, [Seq(r.prompt_ids, r.response_ids) for r in samples], top_p
            )

        stats = verify_store(self.store, rescore, max_tokens=cfg.store_check_tokens,
                             tolerance=cfg.store_check_tolerance, train_dtype=cfg.dtype)
        if self.acc.is_main_process and cfg.progress:
            print(
                f"dphrl: reference store verified: {stats['store_check/tokens']:.0f} stored tokens "
                f"re-scored, mean |delta log pi| {stats['store_check/mean_abs_diff']:.2e}"
            )
        return stats

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run the loop to ``max_steps``; save the final model. SIGTERM / SIGINT save a checkpoint at the
        next step boundary and raise :class:`TrainingStopped` (resume it with ``resume("latest")``)."""
        self._claim_output_dir()
        try:
            with StopSignals() as stop:
                return self._loop(stop)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _loop(self, stop: StopSignals) -> dict:
        cfg = self.cfg
        self._write_run_header()
        bar = progress_bar(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.algorithm}", unit="step",
                           disable=not (cfg.progress and self.acc.is_main_process))
        last: dict = {}
        if self.monitor.eval_sets and self.step == 0:  # the starting point of the Pass@k-over-steps curves
            self.log({"step": 0, **self.evaluate()})
        while self.step < cfg.max_steps:
            t0 = time.time()
            rollouts, roll_metrics = self.collect_rollouts()  # generate -> score -> advantages
            refs = self.reference_batch()  # dph: stored pi_ref samples of D_pef prompts
            t1 = time.time()
            upd_metrics = self.update(rollouts, refs)  # PPO epochs x mini-batches
            self.step += 1
            last = self._step_metrics(roll_metrics, upd_metrics, refs, t0, t1, time.time())
            self._report(last, rollouts)
            bar.set_postfix(reward=f"{last.get('reward/mean', 0):.3f}", s_per_step=f"{last['time/step']:.2f}")
            bar.update(1)
            stopping = self.coll.agreed_signal(stop.requested)
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

    # the phases (each a short call into its room; tests and benchmarks call them one by one)
    def collect_rollouts(self) -> tuple[list[Seq], dict[str, float]]:
        """Phase 1: this step's rollouts and their metrics (plus log pi_ref for a live KL term)."""
        seqs, metrics = self.rollouts.collect(self.step)
        if self.live_reference:
            self.updater.attach_reference_logprobs(seqs)
        return seqs, metrics

    def reference_batch(self) -> list[Seq]:
        """dph: the stored pi_ref samples of this step's D_pef prompts (this rank's even share)."""
        return self.references.next()

    def update(self, rollouts: list[Seq], refs: list[Seq]) -> dict[str, float]:
        """Phase 2: PPO epochs x mini-batches of optimizer updates."""
        self.updater.step = self.step
        return self.updater.update(rollouts, refs, recompute_old=self.old_logprob == "recompute")

    def optimizer_step(self, roll_mb: list[Seq], ref_mb: list[Seq]) -> dict[str, float]:
        """One optimizer update on a mini-batch (see :meth:`dphrl.update.Updater.optimizer_step`)."""
        self.updater.step = self.step
        return self.updater.optimizer_step(roll_mb, ref_mb)

    def evaluate(self) -> dict[str, float]:
        """Pass@k of the current policy on ``eval_data`` (see :meth:`dphrl.monitor.Monitor.evaluate`)."""
        return self.monitor.evaluate(self.engine, self.weights, self.step)

    def log(self, metrics: dict[str, float]) -> None:
        self.monitor.log(metrics, self.step)

    def _step_metrics(self, roll: dict, upd: dict, refs: list[Seq], t0: float, t1: float, t2: float) -> dict:
        """The step's metrics, reduced over ranks, with times, throughput, memory and LR."""
        if self.store is not None:
            roll["ref/sequences"] = float(len(refs))
            roll["ref/tokens"] = float(sum(len(s.response_ids) for s in refs))
        metrics = {**roll, **upd, "time/rollout": t1 - t0, "time/update": t2 - t1, "time/step": t2 - t0}
        metrics = self.coll.reduce_metrics(metrics)
        n_tok = metrics.get("response_length/mean", 0.0) * metrics.get("rollout/sequences", 0.0)
        metrics["throughput/rollout_tokens_per_s"] = n_tok / max(1e-9, metrics["time/step"])
        metrics["memory/peak_mb"] = peak_memory_mb()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["step"] = self.step
        return metrics

    def _report(self, metrics: dict, rollouts: list[Seq]) -> None:
        """Log the step, evaluate when due, log completions, call the callbacks."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self.log(metrics)
        if self.monitor.eval_sets and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
            self.log({"step": self.step, **self.evaluate()})
        if cfg.completions_every and self.step % cfg.completions_every == 0:
            self.monitor.log_completions(rollouts, self.step)
        for cb in self.callbacks:
            cb(self, metrics)

    # ------------------------------------------------------------------------------------------ run dir
    def _claim_output_dir(self) -> None:
        """Refuse an output dir holding another run unless resuming or overwriting; lock it (rank 0 decides,
        every rank raises the same error)."""
        if self._lock is not None:
            return
        err = None
        if self.acc.is_main_process:
            try:
                self._lock = claim_dir(
                    self.out,
                    what="dphrl train",
                    resume=self._resumed or self._claimed_for_resume,
                    overwrite=self.overwrite,
                )
                for d in (self.out, self.out / "checkpoints"):  # what a killed run left half-written
                    sweep_leftovers(d)
            except RunDirError as e:
                err = str(e)
        err = self.coll.broadcast_object(err)
        if err:
            raise RunDirError(str(err))

    def _write_run_header(self) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out / "config.yaml")
            atomic_write_text(self.out / "run_info.json", json.dumps(self.run_info(), indent=1))

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

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of everything needed to resume exactly
        (:func:`dphrl.checkpoint.save_checkpoint`)."""
        state = {"sampler": self.rollouts.sampler.state_dict(),
                 "ref_sampler": self.references.sampler.state_dict() if self.references.sampler else None,
                 "totals": self.totals}
        return checkpoint.save_checkpoint(
            self.out,
            self.step,
            acc=self.acc,
            coll=self.coll,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=state,
            cfg=self.cfg,
            base_fingerprint=self.base_fingerprint,
        )

    def resume(self, path: str | Path = "latest") -> None:
        """Restore model, optimizer, scheduler, RNG and data position from a checkpoint.

        The current config may differ from the checkpoint's only in keys that can change mid-run; the
        optimizer's hyper-parameters (lr, betas, weight_decay) are then applied to the restored
        optimizer and every change is printed and recorded in ``resume_log.jsonl``. Keys that define
        the run (model, data, algorithm, seed, ...) must match: see :data:`RESUME_MUST_MATCH`.
        """
        path = checkpoint.checkpoint_path(self.out, path)  # verified, read only: a refusal changes nothing
        changes = checkpoint.resume_config_changes(path, self.cfg)
        self._claimed_for_resume = True
        self._claim_output_dir()
        try:
            st = checkpoint.load_checkpoint(path, acc=self.acc, coll=self.coll, model=self.model,
                                            optimizer=self.optimizer, scheduler=self.scheduler, cfg=self.cfg,
                                            base_fingerprint=self.base_fingerprint)
        except BaseException:
            self._release()
            raise
        self.weights.updated()
        self.rollouts.sampler.load_state_dict(st["sampler"])
        if self.references.sampler and st["ref_sampler"]:
            self.references.sampler.load_state_dict(st["ref_sampler"])
        self.totals.clear()
        self.totals.update(st["totals"])
        self.step = st["step"]
        self._resumed = True
        if self.acc.is_main_process:
            checkpoint.record_resume(self.out, path, self.step, changes)

    def save_final(self) -> Path:
        """save_pretrained (+ tokenizer + resolved config + model card): loadable by plain transformers."""
        return checkpoint.save_final(
            self.out,
            acc=self.acc,
            model=self.model,
            tokenizer=self.tokenizer,
            cfg=self.cfg,
            run_info=self.run_info(),
            totals=self.totals,
            last_eval=self.monitor.last_eval,
            step=self.step,
        )


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in cfg.to_dict().items()}


def _tokenizer_hash(tokenizer: Any) -> str:
    from dphrl.models import tokenizer_hash

    return tokenizer_hash(tokenizer)
