"""Typed configuration for ``dphrl train`` / ``presample``: every field's help text is the reference.

A YAML file gives values; ``key=value`` command-line overrides win. Unknown keys and bad values are
reported with the key, the file (and line) and how to fix it. Fields left at ``None`` are filled by
the chosen ``algorithm``'s defaults (the paper's settings) in ``__post_init__``; the fully resolved
config is saved with every checkpoint and artifact.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dphrl.algorithms import AlgorithmSpec, get_algorithm


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and says how to fix it."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    model: str = _f("", "Policy model: local dir, Hugging Face id, .gguf file, or a built-in name (smollm2-135m-instruct).")
    algorithm: str = _f("dph", "One of grpo | dapo | rkl | dph (dphrl.algorithms.ALGORITHMS). Fills the defaults of the fields left unset.")
    dataset: dict = _f({}, "Training data spec for dphrl.data.loaders.load_dataset_spec, e.g. {type: gsm8k, path: ..., limit: 512}.")
    reward: str = _f("", "Reward name (math, gsm8k, sql, bird, styles, ...) or module:function. Empty: the task's own.")
    output_dir: str = _f("runs/train", "Where metrics.jsonl, checkpoints/ and final/ are written.")
    seed: int = _f(0, "Seed for data order, sampling and initialisation.")
    # --- divergence (dph) / KL (rkl) -----------------------------------------------------------
    divergence: str | None = _f(None, "dph: f-divergence of the rehearsal term: a registered name (forward_kl, js, alpha, ...) or package.module:f for your own generator f(u). Default js.")
    divergence_params: dict = _f({}, "Extra parameters of the divergence, e.g. {alpha: 0.5}.")
    eta: float | None = _f(None, "dph: weight of the divergence term. Default 0.01 for forward_kl, 0.2 for js, else 0.1.")
    reference_store: str = _f("", "dph: directory written by `dphrl presample` (required for dph).")
    ref_prompts_per_step: int | None = _f(None, "dph: D_pef prompts whose stored samples enter each step. Default: prompts_per_step*|D_pef|/|D_exp| (>=1).")
    store_check_tokens: int = _f(256, "dph: stored tokens re-scored with the training forward at start-up; the store is refused if their mean |delta log pi| exceeds store_check_tolerance (0 = skip the check).")
    store_check_tolerance: float | None = _f(None, "dph: tolerated mean |stored - recomputed log pi| per token. Default by dtype: 1e-3 when the store and training are both float32, 5e-2 when either is bfloat16.")
    rehearsal_form: str = _f("sampled", "dph: how the rehearsal term sees the reference: sampled (the paper's: f(u) on each stored token) | topk (exact per-position f-divergence over the reference's stored top-k tokens + one tail bucket; lower variance, biased low when k < vocab) | topk_sampled_tail (topk + a sampled-tail correction: unbiased). The topk forms need a store presampled with rehearsal_topk > 0.")
    rehearsal_topk: int = _f(0, "presample: also store the reference's top-k token ids and log-probs (and the tail mass) at every response position, for rehearsal_form topk*; 0 = off. dph: the k used (<= the store's).")
    kl_coef: float | None = _f(None, "rkl: coefficient of the KL term on rollouts against the frozen initial model. Default 0.01 (0 for others).")
    kl_estimator: str | None = _f(None, "rkl: per-token KL estimator used as a loss on rollout tokens: k2 (default; its loss gradient is the reverse-KL gradient, mode-seeking) | k3 (the paper's and verl/TRL's: its value estimates reverse KL but its loss gradient is the FORWARD-KL gradient) | k1 (zero expected gradient as a loss: no regularisation).")
    # --- pre-sampling (dphrl presample writes reference_store) ---------------------------------
    presample_n: int = _f(8, "presample: responses sampled per training prompt from the base model.")
    split_threshold: float = _f(1.0, "presample: prompts with pass rate >= this go to D_pef, the rest to D_exp.")
    keep_per_prompt: int = _f(0, "presample: correct responses stored per D_pef prompt (0 = all of them).")
    # --- rollouts -------------------------------------------------------------------------------
    prompts_per_step: int = _f(8, "Prompts per optimizer step (global, across processes).")
    rollout_n: int = _f(8, "Responses sampled per prompt (GRPO group size).")
    max_prompt_tokens: int = _f(512, "Prompts longer than this are dropped (with a count) when loading.")
    max_new_tokens: int = _f(64, "Maximum response length in tokens.")
    temperature: float = _f(1.0, "Sampling temperature; the training log-probs use the same temperature.")
    top_p: float = _f(1.0, "Nucleus sampling for rollouts (log-probs are renormalized over the nucleus).")
    generation_batch_size: int = _f(64, "Sequences generated per engine call chunk.")
    engine: str = _f("auto", "Generation engine: auto (resolved at run time, recorded in run_info.json: vllm when it is installed and a CUDA GPU is present, else hf) | hf (transformers generate) | vllm (pip install 'dphrl[vllm]', a CUDA GPU; colocated, weights pushed after every update, pi_old recomputed) | package.module:factory.")
    vllm_gpu_memory_utilization: float = _f(0.3, "engine vllm: fraction of the GPU's memory vLLM may take (the rest is the trainer's).")
    dynamic_sampling: bool | None = _f(None, "Drop groups whose rewards are all equal and refill the batch (dapo default: true).")
    max_refill_rounds: int = _f(3, "dynamic_sampling: extra generation rounds to refill the batch before training on fewer groups.")
    overlong_buffer: int | None = _f(None, "DAPO soft overlong shaping: penalty ramps over the last N tokens (dapo default: max_new_tokens//4; 0 = off).")
    overlong_penalty: float = _f(1.0, "DAPO soft overlong shaping: reward penalty at max_new_tokens.")
    # --- policy loss ----------------------------------------------------------------------------
    advantage: str = _f("grpo", "Advantage estimator: grpo | grpo_no_std | rloo.")
    policy_loss: str = _f("ppo_clip", "Policy loss: a name in dphrl.losses.POLICY_LOSSES (ppo_clip) or package.module:fn.")
    clip_low: float = _f(0.2, "PPO clip: ratio lower bound is 1 - clip_low.")
    clip_high: float | None = _f(None, "PPO clip: ratio upper bound is 1 + clip_high (grpo/rkl default 0.2; dapo/dph 0.28).")
    dual_clip: float | None = _f(None, "Dual-clip constant c > 1 for negative advantages; 0 = off. Unset: 3.0 for dph, off for the others.")
    loss_agg: str | None = _f(None, "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (grpo/rkl default seq-mean-token-mean; dapo/dph token-mean).")
    entropy_coef: float = _f(0.0, "Entropy bonus coefficient (0 in the paper).")
    old_logprob: str | None = _f(None, "Source of pi_old: rollout (engine log-probs, no extra forward) | recompute (one no-grad forward of the rollouts). Default: rollout with the hf engine and top_p 1, else recompute (top-p log-probs are renormalized over the nucleus; vLLM's kernels differ from the training forward); with engine auto it is resolved at run time.")
    # --- optimisation ---------------------------------------------------------------------------
    max_steps: int = _f(20, "Optimizer steps (one rollout batch per step, times ppo_epochs x mini_batches updates).")
    ppo_epochs: int = _f(1, "Passes over each rollout batch.")
    mini_batches: int = _f(1, "Optimizer updates per epoch (the batch is split into this many mini-batches).")
    micro_batch_size: int = _f(16, "Sequences per forward/backward (gradient accumulation inside a mini-batch).")
    lr: float = _f(1e-6, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    lr_schedule: str = _f("constant", "constant | linear | cosine (after warmup).")
    warmup_steps: int = _f(0, "Linear warmup updates.")
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 = off).")
    dtype: str = _f("float32", "float32 | bfloat16 (bf16 autocast where the hardware has it).")
    lora: bool = _f(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_target_modules: str = _f("all-linear", "LoRA target modules (peft syntax).")
    # --- robustness, logging, checkpoints ------------------------------------------------------
    max_reward_failure_frac: float = _f(0.2, "Stop with an error when more than this fraction of a step's rewards failed.")
    reward_timeout_s: float = _f(10.0, "Per-item reward time-out (seconds).")
    reward_workers: int = _f(-1, "Reward scoring: -1 = auto (a pool of min(8, max(2, CPUs per local process)) killable worker processes: a reward that hangs in C code, exits or floods output is contained; a reward the workers cannot import, e.g. a lambda, is scored in process with a warning) | N > 0 = N workers | 0 = in process (fastest, trusted rewards only).")
    log_every: int = _f(1, "Log metrics every N steps.")
    trackers: list = _f([], "Extra accelerate trackers: tensorboard, wandb (metrics.jsonl is always written).")
    save_every: int = _f(0, "Checkpoint every N steps (0 = only the final model).")
    keep_last: int = _f(2, "Checkpoints kept.")
    progress: bool = _f(True, "Show a progress bar.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, ~30% more compute); gradients are unchanged.")
    # --- evaluation during training, completion logs, model card --------------------------------
    eval_every: int = _f(0, "Evaluate every N steps (and at the end) on eval_data: unbiased Pass@k (k = 1, 2, 4, ..., eval_n), greedy accuracy, styles, logged as eval/<name>/... to metrics.jsonl and the trackers. 0 = off.")
    eval_data: dict = _f({}, "Evaluation datasets during training: {name: dataset spec}, e.g. {gsm8k: {type: gsm8k, path: ..., limit: 64}}. Each uses its task's reward unless eval_reward is set.")
    eval_n: int = _f(8, "Samples per problem for Pass@k during training.")
    eval_reward: str = _f("", "Reward for eval_data (default: each dataset's task reward).")
    completions_every: int = _f(0, "Every N steps write a sample of prompts, responses and rewards to completions.jsonl (and the trackers' tables). 0 = off.")
    completions_per_log: int = _f(4, "Rollouts written per completions log.")
    push_to_hub: str = _f("", "Hugging Face repo id to push final/ to after training (off when empty; needs network and a token).")

    def __post_init__(self) -> None:
        self.resolve()

    # The algorithm presets (dphrl.algorithms): each fills only the fields the user left unset (None).
    def resolve(self) -> None:
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
            raise ConfigError(f"{e} Fix it in the YAML file or with `algorithm=...`.") from e

    def old_logprob_for(self, engine: str) -> str:
        """pi_old source with ``engine`` (a resolved engine name): the configured one, or the default."""
        if self.old_logprob is not None:
            return self.old_logprob
        return "rollout" if self.top_p >= 1.0 and engine == "hf" else "recompute"

    def validate(self) -> None:
        from dphrl import advantages, divergences, losses
        from dphrl.engines import ENGINES

        def need(cond: bool, key: str, expected: str) -> None:
            if not cond:
                raise ConfigError(_bad(key, getattr(self, key), expected))

        def need_name(registry: Any, key: str) -> None:
            try:
                registry.get(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"{e} Fix it in the YAML file or with `{key}=...`.") from e

        need(bool(self.model), "model", "a model path, hub id, .gguf file or built-in name")
        need(self.prompts_per_step >= 1, "prompts_per_step", "an integer >= 1")
        need(self.rollout_n >= 1, "rollout_n", "an integer >= 1")
        need(self.rollout_n >= 2 or self.advantage == "none", "rollout_n", ">= 2 (group-normalized advantages need a group)")
        need(self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        need(self.temperature > 0, "temperature", "> 0")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(self.max_steps >= 0, "max_steps", ">= 0")
        need(self.ppo_epochs >= 1 and self.mini_batches >= 1, "ppo_epochs", ">= 1 (and mini_batches >= 1)")
        need(self.micro_batch_size >= 1, "micro_batch_size", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.clip_low < 1, "clip_low", "in [0, 1)")
        need(self.clip_high is not None and self.clip_high >= 0, "clip_high", ">= 0")
        need(self.dual_clip is None or self.dual_clip == 0 or self.dual_clip > 1, "dual_clip", "0 (off) or > 1")
        need(self.lr_schedule in ("constant", "linear", "cosine"), "lr_schedule", "constant | linear | cosine")
        need(self.dtype in ("float32", "bfloat16"), "dtype", "float32 | bfloat16")
        if self.engine != "auto":
            need_name(ENGINES, "engine")
        need(self.old_logprob in ("rollout", "recompute", None), "old_logprob", "rollout | recompute")
        need(self.engine != "vllm" or self.old_logprob != "rollout", "old_logprob",
             "recompute with engine: vllm (vLLM's bf16 kernels do not reproduce the training forward, so its "
             "log-probs would bias the PPO ratio; leave old_logprob unset)")
        need(0 < self.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization", "in (0, 1)")
        need(0 <= self.max_reward_failure_frac <= 1, "max_reward_failure_frac", "in [0, 1]")
        need(self.keep_last >= 1, "keep_last", "an integer >= 1 (0 would delete the checkpoint just written)")
        need_name(losses.AGGREGATIONS, "loss_agg")
        need_name(losses.POLICY_LOSSES, "policy_loss")
        need_name(advantages.ADVANTAGES, "advantage")
        need_name(losses.KL_ESTIMATORS, "kl_estimator")
        need(self.kl_coef is not None and self.kl_coef >= 0, "kl_coef", ">= 0")
        need(self.ref_prompts_per_step is None or self.ref_prompts_per_step >= 1, "ref_prompts_per_step",
             "an integer >= 1, or null for the default (prompts_per_step * |D_pef| / |D_exp|)")
        need(self.store_check_tokens >= 0, "store_check_tokens", "an integer >= 0 (0 = skip the check)")
        need(self.store_check_tolerance is None or self.store_check_tolerance > 0, "store_check_tolerance",
             "> 0, or null for the dtype-aware default")
        need(self.rehearsal_topk >= 0, "rehearsal_topk", "an integer >= 0 (0 = no top-k in the store)")
        need(self.eval_every >= 0, "eval_every", "an integer >= 0 (0 = off)")
        need(self.eval_every == 0 or bool(self.eval_data), "eval_data",
             "a non-empty mapping {name: dataset spec} when eval_every > 0")
        need(self.eval_n >= 1, "eval_n", "an integer >= 1")
        need(self.completions_every >= 0, "completions_every", "an integer >= 0 (0 = off)")
        need(self.completions_per_log >= 1, "completions_per_log", "an integer >= 1")
        spec = self.spec()
        if spec.rehearsal:
            need_name(divergences.REHEARSAL_FORMS, "rehearsal_form")
            need(not divergences.REHEARSAL_FORMS.get(self.rehearsal_form).topk or self.rehearsal_topk >= 1,
                 "rehearsal_topk", f">= 1 with rehearsal_form {self.rehearsal_form} (the k of the stored top-k)")
            need_name(divergences.DIVERGENCES, "divergence")
            need(self.eta is not None and self.eta >= 0, "eta", ">= 0")
            need(bool(self.reference_store), "reference_store",
                 "the directory written by `dphrl presample` (dph trains on stored reference samples; run presample first)")
        elif self.kl_coef and not spec.live_reference:
            with_ref = [n for n, a in _algorithms().items() if a.live_reference]
            raise ConfigError(f"kl_coef={self.kl_coef} is only used by the algorithms with a live reference "
                              f"{with_ref}; set algorithm: {with_ref[0]} or kl_coef: 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _algorithms() -> dict[str, AlgorithmSpec]:
    from dphrl.algorithms import ALGORITHMS

    return dict(ALGORITHMS.items())


def _bad(key: str, value: Any, expected: str) -> str:
    return f"config key '{key}': got {value!r}, expected {expected}. Fix it in the YAML file or with `{key}=...`."


def config_help(cls: type = TrainConfig) -> str:
    """Markdown table of every key, its default and its help text (the config reference)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{json.dumps(default)}` | {text} |")
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
            raise ConfigError(f"config key '{key}' ({where}): cannot parse {raw!r}: {e}") from e
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' ({where}): null is not allowed, expected {base.__name__}")
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
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{key}' ({where}): got {raw!r}, expected {base.__name__}") from e
    return raw


def _yaml_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key in a YAML text (for error messages)."""
    lines: dict[str, int] = {}
    node = yaml.compose(text)
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            lines[str(k.value)] = k.start_mark.line + 1
    return lines


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = TrainConfig, **kw: Any):
    """Build a config from a YAML file, ``key=value`` overrides and keyword arguments, validated."""
    values: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)

    def put(key: str, raw: Any, where: str) -> None:
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=3)
            hint = f" Did you mean {close}?" if close else f" Valid keys: {sorted(names)}."
            raise ConfigError(f"unknown config key '{key}' ({where}).{hint}")
        values[key] = _coerce(key, raw, hints[key], where)

    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        lines = _yaml_lines(text)
        for k, v in data.items():
            put(str(k), v, f"{path}:{lines.get(str(k), '?')}")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value (e.g. lr=1e-5)")
        k, _, v = ov.partition("=")
        if "." in k:  # nested dict keys: dataset.limit=32
            top, _, sub = k.partition(".")
            if top not in names or not isinstance(_default(names[top]), dict):
                dict_keys = [n for n, f in names.items() if isinstance(_default(f), dict)]
                raise ConfigError(f"override {ov!r}: only the dict keys {dict_keys} take dotted sub-keys")
            cur = dict(values.get(top) or _default(names[top]))
            cur[sub] = yaml.safe_load(v)
            values[top] = cur
            continue
        put(k.strip(), v, "command line")
    for k, v in kw.items():
        put(k, v, "keyword argument")
    return cls(**values)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
