"""Typed configuration for ``dphrl train`` / ``presample``: every field's help text is the reference.

A YAML file gives values; ``key=value`` command-line overrides win. Unknown keys and bad values are
reported with the key, the file (and line) and how to fix it. Fields left at ``None`` are filled by
the chosen ``algorithm``'s defaults (the paper's settings) in ``__post_init__``; the fully resolved
config is saved with every checkpoint and artifact.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dphrl.algorithms import AlgorithmSpec, get_algorithm
from dphrl.config_checks import (  # noqa: F401 - the public names of dphrl.config
    KEY_ALIASES,
    Check,
    ConfigError,
    DatasetSpec,
    Flag,
    Items,
    Name,
    OneOf,
    Optional,
    Params,
    Range,
    Text,
    _bad,
    _error,
    _num,
    suggest_key,
)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field: ``help`` is its reference text, ``check=`` its :class:`Check`
    (required by the tests)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


#: Tracker names accelerate knows (``log_with``); metrics.jsonl is always written.
TRACKERS = ("aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb")


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    model: str = _f(
        "",
        'Policy model: local dir, Hugging Face id, .gguf file, or a built-in name (smollm2-135m-instruct).',
        check=Text("a model path, hub id, .gguf file or built-in name", nonempty=True),
    )
    algorithm: str = _f(
        "dph",
        'One of grpo | dapo | rkl | dph (dphrl.algorithms.ALGORITHMS). Fills the defaults of the fields left'
        ' unset.',
        check=Name("dphrl.algorithms:ALGORITHMS", "an algorithm"),
    )
    dataset: dict = _f(
        {},
        'Training data spec for dphrl.data.loaders.load_dataset_spec, e.g. {type: gsm8k, path: ..., limit: '
        '512}.',
        check=DatasetSpec(),
    )
    reward: str = _f(
        "",
        "Reward name (math, gsm8k, sql, bird, styles, ...) or module:function. Empty: the task's own.",
        check=Name("dphrl.rewards.registry:REWARDS", "a reward", empty=True),
    )
    output_dir: str = _f(
        "runs/train",
        'Where metrics.jsonl, checkpoints/ and final/ are written.',
        check=Text("a directory path", nonempty=True),
    )
    seed: int = _f(
        0,
        "Seed for data order, sampling and initialisation (0 <= seed < 2**32: numpy's range).",
        check=Range(ge=0, le=2**32 - 1),
    )
    # --- divergence (dph) / KL (rkl) -----------------------------------------------------------
    divergence: str | None = _f(
        None,
        "dph: f-divergence of the rehearsal term: a registered name (forward_kl, js, alpha, ...) or "
        "package.module:f for your own generator f(u). Default js.",
        check=Optional(
            Name("dphrl.divergences:DIVERGENCES", "a divergence"), "js for dph; unused by the others"
        ),
    )
    divergence_params: dict = _f({}, "Extra parameters of the divergence, e.g. {alpha: 0.5}.", check=Params())
    eta: float | None = _f(
        None,
        'dph: weight of the divergence term. Default 0.01 for forward_kl, 0.2 for js, else 0.1.',
        check=Optional(Range(ge=0), "by divergence, for dph"),
    )
    reference_store: str = _f(
        "",
        'dph: directory written by `dphrl presample` (required for dph).',
        check=Text("a directory path (required for dph)"),
    )
    ref_prompts_per_step: int | None = _f(
        None,
        'dph: D_pef prompts whose stored samples enter each step. Default: prompts_per_step*|D_pef|/|D_exp| '
        '(>=1).',
        check=Optional(Range(ge=1), "prompts_per_step*|D_pef|/|D_exp|"),
    )
    store_check_tokens: int = _f(
        256,
        'dph: stored tokens re-scored with the training forward at start-up; the store is refused if their '
        'mean |delta log pi| exceeds store_check_tolerance (0 = skip the check). A spot check against '
        'accidents (another model, tokenizer, dtype or temperature: every token differs), not a proof that '
        'every stored token is right: 256 tokens are a few percent of a typical store; raise it (one '
        'no-grad forward per 256 tokens) for a stricter check.',
        check=Range(ge=0),
    )
    store_check_tolerance: float | None = _f(
        None,
        'dph: tolerated mean |stored - recomputed log pi| per token. Default by dtype: 1e-3 when the store '
        'and training are both float32, 5e-2 when either is bfloat16.',
        check=Optional(Range(gt=0), "by dtype"),
    )
    rehearsal_form: str = _f(
        "sampled",
        "dph: how the rehearsal term sees the reference: sampled (the paper's: f(u) on each stored token) | "
        "topk (exact per-position f-divergence over the reference's stored top-k tokens + one tail bucket; "
        'lower variance, biased low when k < vocab) | topk_sampled_tail (topk + a sampled-tail correction: '
        'unbiased). The topk forms need a store presampled with rehearsal_topk > 0.',
        check=Name("dphrl.divergences:REHEARSAL_FORMS", "a rehearsal form"),
    )
    rehearsal_topk: int = _f(
        0,
        "presample: also store the reference's top-k token ids and log-probs (and the tail mass) at every "
        "response position, for rehearsal_form topk*; 0 = off. dph: the k used (<= the store's).",
        check=Range(ge=0),
    )
    kl_coef: float | None = _f(
        None,
        'rkl: coefficient of the KL term on rollouts against the frozen initial model. Default 0.01 (0 for '
        'others).',
        check=Optional(Range(ge=0)),
    )
    kl_estimator: str | None = _f(
        None,
        'rkl: per-token KL estimator used as a loss on rollout tokens: k2 (default; its loss gradient is the'
        " reverse-KL gradient, mode-seeking) | k3 (the paper's and verl/TRL's: its value estimates reverse "
        'KL but its loss gradient is the FORWARD-KL gradient) | k1 (zero expected gradient as a loss: no '
        'regularisation).',
        check=Optional(Name("dphrl.losses:KL_ESTIMATORS", "a KL estimator")),
    )
    # --- pre-sampling (dphrl presample writes reference_store) ---------------------------------
    presample_n: int = _f(
        8,
        'presample: responses sampled per training prompt from the base model.',
        check=Range(ge=1),
    )
    split_threshold: float = _f(
        1.0,
        'presample: prompts with pass rate >= this go to D_pef, the rest to D_exp (in [0, 1]).',
        check=Range(ge=0, le=1),
    )
    keep_per_prompt: int = _f(
        0,
        'presample: correct responses stored per D_pef prompt (0 = all of them).',
        check=Range(ge=0),
    )
    # --- rollouts -------------------------------------------------------------------------------
    prompts_per_step: int = _f(8, "Prompts per optimizer step (global, across processes).", check=Range(ge=1))
    rollout_n: int = _f(8, "Responses sampled per prompt (GRPO group size).", check=Range(ge=1))
    max_prompt_tokens: int = _f(
        512,
        'Prompts longer than this are dropped (with a count) when loading.',
        check=Range(ge=1),
    )
    max_new_tokens: int = _f(64, "Maximum response length in tokens.", check=Range(ge=1))
    temperature: float = _f(
        1.0,
        'Sampling temperature (> 0); the training log-probs use the same temperature.',
        check=Range(gt=0),
    )
    top_p: float = _f(
        1.0,
        'Nucleus sampling for rollouts, in (0, 1] (log-probs are renormalized over the nucleus).',
        check=Range(gt=0, le=1),
    )
    generation_batch_size: int = _f(
        64,
        'Sequences generated per engine call chunk (>= 1).',
        check=Range(ge=1),
    )
    engine: str = _f(
        "auto",
        'Generation engine: auto (resolved at run time, recorded in run_info.json: vllm when it is installed'
        ' and a CUDA GPU is present, else hf) | hf (transformers generate) | hf-compact (hf whose decoding'
        ' drops ended rows: faster when response lengths vary; same distribution, another random stream)'
        " | vllm (pip install 'dphrl[vllm]', a CUDA GPU;"
        " colocated, weights pushed after every update, pi_old recomputed) | "
        'package.module:factory.',
        check=Name("dphrl.engines:ENGINES", "an engine", extra=("auto",)),
    )
    vllm_gpu_memory_utilization: float = _f(
        0.3,
        "engine vllm: fraction of the GPU's memory, in (0, 1), vLLM may take (the rest is the trainer's).",
        check=Range(gt=0, lt=1),
    )
    dynamic_sampling: bool | None = _f(
        None,
        'Drop groups whose rewards are all equal and refill the batch (dapo default: true).',
        check=Optional(Flag()),
    )
    max_refill_rounds: int = _f(
        3,
        'dynamic_sampling: extra generation rounds to refill the batch before training on fewer groups (0 = '
        'no refill).',
        check=Range(ge=0),
    )
    overlong_buffer: int | None = _f(
        None,
        'DAPO soft overlong shaping: penalty ramps over the last N tokens (dapo default: max_new_tokens//4; '
        '0 = off; at most max_new_tokens).',
        check=Optional(Range(ge=0)),
    )
    overlong_penalty: float = _f(
        1.0,
        'DAPO soft overlong shaping: reward penalty (>= 0, subtracted) at max_new_tokens.',
        check=Range(ge=0),
    )
    # --- policy loss ----------------------------------------------------------------------------
    advantage: str = _f(
        "grpo",
        'Advantage estimator: grpo | grpo_no_std | rloo | passk (Pass@k Training, Chen et al. arXiv '
        "2508.10751: analytic pass@k advantage, rewards thresholded at 'correct') | pkpo (Walder & Karkhanis"
        ' arXiv 2505.15201: unbiased pass@k reward transformation) | w_reinforce (Zhu et al. arXiv '
        '2506.01347: +lambda correct / -1 wrong, no baseline, all-equal groups not zeroed) | '
        'package.module:fn.',
        check=Name("dphrl.advantages:ADVANTAGES", "an advantage estimator"),
    )
    passk_k: int = _f(
        4,
        'advantage passk / pkpo: the k of the pass@k being optimized (1 <= k <= rollout_n).',
        check=Range(ge=1),
    )
    passk_k_final: int = _f(
        1,
        "advantage passk / pkpo with passk_anneal_step > 0: the k used from that step on (PKPO's "
        'k-annealing: explore with a large k, then exploit).',
        check=Range(ge=1),
    )
    passk_anneal_step: int = _f(
        0,
        'advantage passk / pkpo: the step at which k switches from passk_k to passk_k_final; 0 = never.',
        check=Range(ge=0),
    )
    pkpo_baseline: str = _f(
        "loo-1",
        'advantage pkpo: loo-1 (eq. 33, the estimator the paper trains with) | none (eq. 19, no baseline).',
        check=OneOf(("loo-1", "none")),
    )
    w_reinforce_lambda: float = _f(
        0.1,
        "advantage w_reinforce: weight of correct responses (incorrect ones get -1); the paper's default "
        '0.1. Pair it with loss_agg token-mean (the authors\' aggregation): with no baseline the advantages'
        ' sum below 0, and seq-mean-token-mean pushes short wrong responses down hardest, so the policy '
        'drifts to long responses.',
        check=Range(ge=0),
    )
    policy_loss: str = _f(
        "ppo_clip",
        'Policy loss: ppo_clip | kl_cov (Cui et al. arXiv 2505.22617: unclipped policy gradient + '
        'ppo_kl_coef * |log ratio| on the kl_cov_ratio fraction of tokens with the largest covariance of '
        'log-prob and advantage; needs dual_clip 0) | clip_cov (same paper: ppo_clip with the gradient of a '
        'random clip_cov_ratio fraction of tokens whose covariance lies in (clip_cov_lb, clip_cov_ub) '
        'detached) | package.module:fn.',
        check=Name("dphrl.losses:POLICY_LOSSES", "a policy loss"),
    )
    kl_cov_ratio: float = _f(
        2e-3,
        "policy_loss kl_cov: fraction of a micro-batch's tokens penalized (at least one; the paper's 2e-3).",
        check=Range(ge=0, le=1),
    )
    ppo_kl_coef: float = _f(
        1.0,
        "policy_loss kl_cov: weight of the |log ratio| penalty (the paper's 1). The penalty acts only "
        'when pi moves away from pi_old within a step (ppo_epochs > 1 or mini_batches > 1); on-policy '
        '|log ratio| is rounding noise (~3e-7 in the demo) and its gradient that noise\'s sign.',
        check=Range(ge=0),
    )
    clip_cov_ratio: float = _f(
        2e-4,
        "policy_loss clip_cov: fraction of a micro-batch's tokens whose gradient is detached (at least one "
        "when any is a candidate; the paper's 2e-4).",
        check=Range(ge=0, le=1),
    )
    clip_cov_lb: float = _f(
        1.0,
        'policy_loss clip_cov: lower bound of the covariance band of candidate tokens, >= 0: tokens that '
        "raise entropy collapse have positive covariance (the paper's 1).",
        check=Range(ge=0),
    )
    clip_cov_ub: float = _f(
        5.0,
        "policy_loss clip_cov: upper bound of the covariance band (the paper's 5).",
        check=Range(gt=0),
    )
    clip_low: float = _f(
        0.2,
        'PPO clip: ratio lower bound is 1 - clip_low (clip_low in [0, 1)).',
        check=Range(ge=0, lt=1),
    )
    clip_high: float | None = _f(
        None,
        'PPO clip: ratio upper bound is 1 + clip_high (grpo/rkl default 0.2; dapo/dph 0.28).',
        check=Optional(Range(ge=0)),
    )
    dual_clip: float | None = _f(
        None,
        'Dual-clip constant c > 1 for negative advantages; 0 = off. Unset: 3.0 for dph, off for the others.',
        check=Optional(Range(gt=1, off=0)),
    )
    loss_agg: str | None = _f(
        None,
        'token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (grpo/rkl default seq-mean-token-mean; '
        'dapo/dph token-mean).',
        check=Optional(Name("dphrl.losses:AGGREGATIONS", "a loss aggregation")),
    )
    entropy_coef: float = _f(0.0, "Entropy bonus coefficient (>= 0; 0 in the paper).", check=Range(ge=0))
    old_logprob: str | None = _f(
        None,
        'Source of pi_old: rollout (engine log-probs, no extra forward) | recompute (one no-grad forward of '
        'the rollouts). Default: rollout with the hf engine and top_p 1, else recompute (top-p log-probs are'
        " renormalized over the nucleus; vLLM's kernels differ from the training forward); with engine auto "
        'it is resolved at run time.',
        check=Optional(OneOf(("rollout", "recompute")), "by engine and top_p"),
    )
    # --- optimisation ---------------------------------------------------------------------------
    max_steps: int = _f(
        20,
        'Optimizer steps, >= 0 (one rollout batch per step, times ppo_epochs x mini_batches updates).',
        check=Range(ge=0),
    )
    ppo_epochs: int = _f(1, "Passes over each rollout batch.", check=Range(ge=1))
    mini_batches: int = _f(
        1,
        'Optimizer updates per epoch (the batch is split into this many mini-batches).',
        check=Range(ge=1),
    )
    micro_batch_size: int = _f(
        16,
        'Sequences per forward/backward (gradient accumulation inside a mini-batch).',
        check=Range(ge=1),
    )
    lr: float = _f(1e-6, "AdamW learning rate (finite, > 0).", check=Range(gt=0))
    weight_decay: float = _f(0.0, "AdamW weight decay (>= 0).", check=Range(ge=0))
    betas: list = _f(
        [0.9, 0.999],
        'AdamW betas [beta1, beta2], each in [0, 1).',
        check=Items(Range(ge=0, lt=1), "a finite number", length=2),
    )
    lr_schedule: str = _f(
        "constant",
        'constant | linear | cosine (after warmup).',
        check=OneOf(("constant", "linear", "cosine")),
    )
    warmup_steps: int = _f(0, "Linear warmup updates (0 = none).", check=Range(ge=0))
    max_grad_norm: float = _f(1.0, "Gradient clipping: max total gradient norm (0 = off).", check=Range(ge=0))
    dtype: str = _f(
        "float32",
        'float32 | bfloat16 (bf16 autocast where the hardware has it).',
        check=OneOf(("float32", "bfloat16")),
    )
    lora: bool = _f(False, "Train LoRA adapters instead of all weights.", check=Flag())
    lora_r: int = _f(16, "LoRA rank.", check=Range(ge=1))
    lora_alpha: int = _f(32, "LoRA alpha.", check=Range(ge=1))
    lora_target_modules: str = _f(
        "all-linear",
        'LoRA target modules (peft syntax).',
        check=Text("peft target modules", nonempty=True),
    )
    # --- robustness, logging, checkpoints ------------------------------------------------------
    max_reward_failure_frac: float = _f(
        0.2,
        "Stop with an error when more than this fraction of a step's rewards failed.",
        check=Range(ge=0, le=1),
    )
    reward_timeout_s: float = _f(10.0, "Per-item reward time-out in seconds (> 0).", check=Range(gt=0))
    reward_workers: int = _f(
        -1,
        'Reward scoring: -1 = auto (a pool of min(8, max(2, CPUs per local process)) killable worker '
        'processes: a reward that hangs in C code, exits or floods output is contained; a reward the workers'
        ' cannot import, e.g. a lambda, is scored in process with a warning) | N > 0 = N workers | 0 = in '
        'process (fastest, trusted rewards only).',
        check=Range(ge=-1),
    )
    log_every: int = _f(
        1,
        'Log metrics every N steps (N >= 1; the last step is always logged).',
        check=Range(ge=1),
    )
    trackers: list = _f(
        [],
        'Extra accelerate trackers, e.g. [tensorboard, wandb] (metrics.jsonl is always written).',
        check=Items(OneOf(TRACKERS), "a tracker name"),
    )
    save_every: int = _f(0, "Checkpoint every N steps (0 = only the final model).", check=Range(ge=0))
    keep_last: int = _f(2, "Checkpoints kept (>= 1: 0 would delete the one just written).", check=Range(ge=1))
    progress: bool = _f(True, "Show a progress bar.", check=Flag())
    share_prefix: bool = _f(
        True,
        "Forward each group's prompt once: in generation (hf engine: one prefill per distinct prompt, its KV"
        ' cache shared by the rollouts) and in the update (micro-batches of whole groups, or of all '
        'sequences sorted by response length when that pads less; each micro-batch forwards its prompts '
        'once and their rollouts attend to the cache). Same log-probs and gradients as '
        'without it up to float summation order (tests: 1e-5 fp32). The update shares only where the model '
        'allows it (every layer full attention, no gradient checkpointing, not FSDP-sharded: run_info.json '
        "records share_prefix_update); its peak memory holds one extra gradient-sized buffer (a parameter's "
        "gradient is accumulated after both forwards' backward) but the prompt's activations once per group "
        'instead of once per rollout.',
        check=Flag(),
    )
    chunked_head: bool = _f(
        True,
        'Compute response log-probs from the LM head in row chunks (dphrl.head), recomputed in backward, '
        'so the (micro-batch x tokens x vocabulary) fp32 logits are never held: SmolLM2-135M with 16 x 128 '
        'response tokens holds ~400 MB per copy and autograd 3-4 copies. Same values and gradients up to '
        'float summation order. Used only where exact (a plain dense nn.Linear head, fp32 or pure bf16 '
        'weights without autocast: not with dtype bfloat16 mixed precision, no non-linear transform of the '
        'logits, top_p 1, entropy_coef 0); false: the materialized path in training (update, pi_old, '
        'pi_ref); presample and evaluation scoring keep the chunked head where exact.',
        check=Flag(),
    )
    gradient_checkpointing: bool = _f(
        False,
        'Recompute activations in the backward pass (less memory, ~30% more compute); gradients are '
        'unchanged.',
        check=Flag(),
    )
    # --- evaluation during training, completion logs, model card --------------------------------
    eval_every: int = _f(
        0,
        'Evaluate every N steps (and at the end) on eval_data: unbiased Pass@k (k = 1, 2, 4, ..., eval_n), '
        'greedy accuracy, styles, logged as eval/<name>/... to metrics.jsonl and the trackers. 0 = off.',
        check=Range(ge=0),
    )
    eval_data: dict = _f(
        {},
        'Evaluation datasets during training: {name: dataset spec}, e.g. {gsm8k: {type: gsm8k, path: ..., '
        "limit: 64}}. Each uses its task's reward unless eval_reward is set.",
        check=DatasetSpec(many=True),
    )
    eval_n: int = _f(8, "Samples per problem for Pass@k during training.", check=Range(ge=1))
    eval_reward: str = _f(
        "",
        "Reward for eval_data (default: each dataset's task reward).",
        check=Name("dphrl.rewards.registry:REWARDS", "a reward", empty=True),
    )
    completions_every: int = _f(
        0,
        'Every N steps write a sample of prompts, responses and rewards to completions.jsonl (and the '
        "trackers' tables). 0 = off.",
        check=Range(ge=0),
    )
    completions_per_log: int = _f(4, "Rollouts written per completions log.", check=Range(ge=1))
    push_to_hub: str = _f(
        "",
        'Hugging Face repo id to push final/ to after training (off when empty; needs network and a token).',
        check=Text("a Hugging Face repo id, or empty"),
    )

    def __post_init__(self) -> None:
        self.resolve()

    # The algorithm presets (dphrl.algorithms): each fills only the fields the user left unset (None).
    def resolve(self) -> None:
        self.check_fields()  # types and ranges first: the presets and the checks below read them
        spec = self.spec()
        spec.fill_defaults(self)
        if self.old_logprob is None and (self.engine != "auto" or self.top_p < 1.0):
            self.old_logprob = self.old_logprob_for(self.engine)  # else resolved with the engine at run time
        self.validate()

    def spec(self) -> AlgorithmSpec:
        """The algorithm's entry in the algorithm table (ConfigError listing the valid ones)."""
        try:
            return get_algorithm(self.algorithm)
        except ValueError as e:
            raise ConfigError(f"{e} Fix it in the YAML file or with `algorithm=...`.", key="algorithm") from e

    def entry_params(self, key: str) -> dict[str, str]:
        """keyword -> config key of the registered function that config key ``key`` names (its
        :func:`dphrl.registry.config_params`); {} for one that declares none or cannot be imported."""
        from dphrl.advantages import ADVANTAGES
        from dphrl.losses import POLICY_LOSSES

        try:
            fn = {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES}[key].get(getattr(self, key))
        except ValueError:
            return {}
        return dict(getattr(fn, "config_params", {}))

    def old_logprob_for(self, engine: str) -> str:
        """pi_old source with ``engine`` (a resolved engine name): the configured one, or the default."""
        if self.old_logprob is not None:
            return self.old_logprob
        from dphrl.engines import engine_capabilities

        exact = engine_capabilities(engine).exact_logprobs
        return "rollout" if self.top_p >= 1.0 and exact else "recompute"

    def check_fields(self) -> None:
        """Apply every field's declarative ``check`` (its metadata) after checking the value's type;
        inf and nan are refused for every float field; None passes where the type allows it."""
        types_ = _field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            base, optional = types_[f.name]
            noun = _NOUNS.get(base, getattr(base, "__name__", str(base)))
            if value is None:
                if optional:
                    continue
                raise _error(f.name, value, f"{noun} (null is not allowed)")
            if not _type_ok(value, base):
                raise _error(f.name, value, noun)
            check = f.metadata.get("check")
            if base is float and not math.isfinite(value):
                expected = check.describe(noun) if check is not None else noun
                raise _error(f.name, value, f"{expected} (inf and nan are refused)")
            if check is not None:
                check(f.name, value, noun)

    def validate(self) -> None:
        """Every field's own check (:meth:`check_fields`), then the checks that relate several fields."""
        from dphrl.divergences import REHEARSAL_FORMS
        from dphrl.launch import old_logprob_refusal

        self.check_fields()

        def need(cond: bool, key: str, expected: str) -> None:
            if not cond:
                raise _error(key, getattr(self, key), expected)

        need(self.rollout_n >= 2, "rollout_n",
             f">= 2 with advantage {self.advantage} (group-normalized advantages need a group)")
        adv_keys = self.entry_params("advantage").values()
        if "passk_k" in adv_keys:
            need(
                self.passk_k <= self.rollout_n,
                "passk_k",
                f"<= rollout_n ({self.rollout_n}): pass@k of a group of rollout_n responses",
            )
            need(self.passk_k_final <= self.rollout_n, "passk_k_final", f"<= rollout_n ({self.rollout_n})")
        if self.advantage == "passk":  # k = n: every k-subset is the whole group, rho is 0 or 1, A = 0
            why = (f"< rollout_n ({self.rollout_n}) with advantage passk: at k = rollout_n every group's "
                   "pass@k is 0 or 1 and every advantage is 0 (the run would not learn)")
            need(self.passk_k < self.rollout_n, "passk_k", why)
            need(not self.passk_anneal_step or self.passk_k_final < self.rollout_n, "passk_k_final", why)
        if "clip_cov_lb" in self.entry_params("policy_loss").values():
            need(self.clip_cov_lb < self.clip_cov_ub, "clip_cov_ub", f"> clip_cov_lb ({self.clip_cov_lb})")
        if "kl_cov_ratio" in self.entry_params("policy_loss").values():
            need(
                not self.dual_clip,
                "dual_clip",
                f"0 with policy_loss {self.policy_loss} (no ratio clipping; the dph "
                "preset sets 3: write dual_clip: 0)",
            )
        need(self.overlong_buffer is None or self.overlong_buffer <= self.max_new_tokens, "overlong_buffer",
             f"<= max_new_tokens ({self.max_new_tokens}): the penalty ramps over the response's last "
             "overlong_buffer tokens")
        # the launch check's rule, at config time
        refusal = old_logprob_refusal(self.engine, self.old_logprob)
        if refusal:
            raise ConfigError(refusal, key="old_logprob")
        need(self.eval_every == 0 or bool(self.eval_data), "eval_data",
             f"a non-empty mapping {{name: dataset spec}} when eval_every > 0 (it is {self.eval_every})")
        spec = self.spec()
        if spec.rehearsal:
            need(
                not REHEARSAL_FORMS.get(self.rehearsal_form).topk or self.rehearsal_topk >= 1,
                "rehearsal_topk",
                f">= 1 with rehearsal_form {self.rehearsal_form} (the k of the stored top-k)",
            )
            need(self.divergence is not None, "divergence", f"a divergence name (algorithm {self.algorithm})")
            need(
                self.eta is not None,
                "eta",
                f"a number >= 0 (algorithm {self.algorithm} weighs its divergence)",
            )
            need(
                bool(self.reference_store),
                "reference_store",
                "the directory written by `dphrl presample` (dph trains on stored reference samples; run "
                "presample first)",
            )
        if self.kl_coef and not spec.live_reference:
            with_ref = [n for n, a in _algorithms().items() if a.live_reference]
            raise ConfigError(
                f"config key 'kl_coef': kl_coef={self.kl_coef} is only used by the algorithms with a "
                f"live reference {with_ref}; set algorithm: {with_ref[0]} or kl_coef: 0",
                key="kl_coef",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_NOUNS: dict[type, str] = {
    int: "an integer",
    float: "a finite number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """Field name -> (its base type, whether None is allowed), from the annotations."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, bool]] = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name])
        optional = type(None) in args
        out[f.name] = (
            next((a for a in args if a is not type(None)), hints[f.name]) if optional else hints[f.name],
            optional,
        )
    return out


def _type_ok(value: Any, base: Any) -> bool:
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(base, type) or isinstance(value, base)


def _algorithms() -> dict[str, AlgorithmSpec]:
    from dphrl.algorithms import ALGORITHMS

    return dict(ALGORITHMS.items())


def config_help(cls: type = TrainConfig) -> str:
    """Markdown table of every key, its default, what its check allows and its help text
    (the config reference)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "").replace("|", "\\|")
        noun = _NOUNS.get(types_[f.name][0], "any")
        check = f.metadata.get("check")
        allowed = (check.describe(noun) if check is not None else noun).replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{json.dumps(default)}` | {allowed} | {text} |")
    return "\n".join(rows)


def _coerce(key: str, raw: Any, typ: Any, where: str) -> Any:
    """Convert ``raw`` (YAML value or override string) to the field's type, or raise ConfigError."""
    if isinstance(typ, str):
        typ = eval(typ, {"dict": dict, "list": list, "str": str, "int": int, "float": float, "bool": bool})  # noqa: S307
    args = typing.get_args(typ)
    optional = type(None) in args or typ is type(None)
    base = next((a for a in args if a is not type(None)), typ) if isinstance(typ, types.UnionType) else typ
    if isinstance(raw, str) and base is not str:
        if optional and raw.lower() in ("null", "none", "~"):
            return None
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config key '{key}' ({where}): cannot parse {raw!r}: {e}", key=key, where=where
            ) from e
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' ({where}): null is not allowed, expected {base.__name__}",
                          key=key, where=where)
    try:
        if base is bool:
            if not isinstance(raw, bool):
                raise TypeError
            return raw
        if base is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise TypeError
            return int(raw)
        if base is float:
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)
        if base is str:
            return str(raw)
        if base in (dict, list):
            if not isinstance(raw, base):
                raise TypeError
            return raw
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"config key '{key}' ({where}): got {raw!r}, expected {base.__name__}",
                          key=key, where=where) from e
    return raw


def _yaml_lines(text: str) -> dict[str, int]:
    """Line number of each key in a YAML text, nested mapping keys dotted (``dataset.limit``)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    key = prefix + str(k.value)
                    if key in lines:  # YAML would keep the last one silently: a typo or a paste
                        raise DuplicateKeyError(f"key '{key}' is given twice, on lines {lines[key]} and "
                                                f"{k.start_mark.line + 1}; keep one")
                    lines[key] = k.start_mark.line + 1
                    walk(v, f"{key}.")

    walk(yaml.compose(text), "")
    return lines


class DuplicateKeyError(ValueError):
    """A YAML mapping repeats a key (``yaml.safe_load`` would keep the last one silently)."""


def _locate(key: str | None, origin: dict[str, str], path: str | Path | None) -> str | None:
    """Where ``key`` (or its closest dotted parent) was given; ``not set in ...`` for a default."""
    if key is None:
        return None
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        where = origin.get(".".join(parts[:n]))
        if where is not None:
            return where
    return f"not set in {path}" if path is not None else "not set"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type = TrainConfig, **kw: Any
):
    """Build a config from a YAML file, ``key=value`` overrides and keyword arguments, validated.

    Every :class:`ConfigError` names the key and where it came from (``file:line``, nested keys such
    as ``dataset.limit`` included, ``command line``, ``keyword argument``, or ``not set``).
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # key (dotted for sub-keys) -> where it was given
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)

    def put(key: str, raw: Any, where: str) -> None:
        if key not in names:
            raise ConfigError(f"unknown config key '{key}' ({where}).{suggest_key(key, list(names))}",
                              key=key, where=where)
        values[key] = _coerce(key, raw, hints[key], where)
        for k in [k for k in origin if k.startswith(key + ".")]:
            del origin[k]  # a whole value replaces the sub-keys' locations
        origin[key] = where

    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file: {e}") from e
        try:
            data = yaml.safe_load(text) or {}
            lines = _yaml_lines(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        except DuplicateKeyError as e:
            raise ConfigError(f"{path}: {e}.") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        for k, v in data.items():
            put(str(k), v, f"{path}:{lines.get(str(k), '?')}")
        origin.update({k: f"{path}:{n}" for k, n in lines.items() if "." in k and k.split(".")[0] in values})
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value (e.g. lr=1e-5)")
        k, _, v = ov.partition("=")
        k = k.strip()
        if "." in k:  # nested dict keys: dataset.limit=32, eval_data.gsm8k.limit=16
            _put_dotted(values, names, ov, k, v)
            origin[k] = "command line"
            continue
        put(k, v, "command line")
    for k, v in kw.items():
        put(k, v, "keyword argument")
    try:
        return cls(**values)
    except ConfigError as e:
        where = None if e.where is not None else _locate(e.key, origin, path)
        if where is None:
            raise
        raise e.at(where) from e


def _put_dotted(
    values: dict[str, Any], names: dict[str, dataclasses.Field], ov: str, key: str, raw: str
) -> None:
    """Apply the override ``top.sub[.sub2]=raw`` to the dict field ``top`` in ``values``."""
    top, *subs = key.split(".")
    dict_keys = [n for n, f in names.items() if isinstance(_default(f), dict)]
    if top not in dict_keys:
        hint = suggest_key(top, dict_keys) if top not in names else ""
        raise ConfigError(f"override {ov!r}: only the dict keys {dict_keys} take dotted sub-keys.{hint}",
                          key=top, where="command line")
    if not all(subs):
        raise ConfigError(f"override {ov!r}: empty sub-key", key=top, where="command line")
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{key}' (command line): cannot parse {raw!r}: {e}", key=key,
                          where="command line") from e
    cur = copy.deepcopy(values.get(top) or _default(names[top]))
    node = cur
    for i, part in enumerate(subs[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            inner = ".".join([top, *subs[: i + 1]])
            raise ConfigError(
                f"override {ov!r}: {inner} is {node!r}, not a mapping", key=inner, where="command line"
            )
    node[subs[-1]] = parsed
    values[top] = cur


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
