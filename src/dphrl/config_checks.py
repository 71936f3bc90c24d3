"""The declarative checks of config values and the messages of config errors.

Every :class:`dphrl.config.TrainConfig` field names its :class:`Check` in its metadata
(``check=Range(ge=0)``); :meth:`TrainConfig.check_fields` applies them. A failed check raises
:class:`ConfigError`, whose message names the key, what was given and what is expected;
:func:`dphrl.config.load_config` adds the file and line. Unknown keys get a suggestion, including
the names other trainers (TRL, verl, HF Trainer, OpenRLHF) use for the same setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from dphrl.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names it and says how to fix it.

    ``key`` is the config key at fault (``dataset.limit`` for a sub-key) and ``where`` the place it
    came from (``recipes/x.yaml:12``, ``command line``) once :func:`load_config` has located it.
    """

    def __init__(self, message: str, *, key: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.where = where

    def at(self, where: str) -> ConfigError:
        """The same error with its location: ``config key 'lr' (recipes/x.yaml:12): ...``."""
        msg = str(self)
        head = f"config key '{self.key}'"
        if self.key is not None and msg.startswith(head + ": "):
            msg = f"{head} ({where}): {msg[len(head) + 2:]}"
        elif self.key is not None:
            msg = f"{head} ({where}): {msg}"
        else:
            msg = f"{where}: {msg}"
        return ConfigError(msg, key=self.key, where=where)


def _bad(key: str, value: Any, expected: str) -> str:
    return (
        f"config key '{key}': got {value!r}, expected {expected}. "
        f"Fix it in the YAML file or with `{key}=...`."
    )


def _error(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(_bad(key, value, expected), key=key)


# --- declarative checks: every field's metadata has ``check``; TrainConfig.validate applies them -------
class Check:
    """A constraint on one config value. ``noun`` describes the field's type ("an integer")."""

    def __call__(self, key: str, value: Any, noun: str) -> None:
        """Raise :class:`ConfigError` (with ``key``) when ``value`` is not allowed."""
        raise NotImplementedError

    def describe(self, noun: str) -> str:
        """What is allowed, for error messages and the config reference."""
        raise NotImplementedError


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range(Check):
    """A number within bounds (``ge``/``gt`` below, ``le``/``lt`` above); inf and nan are refused.
    ``off``: one value outside the bounds that is allowed too (it switches the feature off)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    off: float | None = None

    def describe(self, noun: str) -> str:
        if self.off is not None:
            return f"{_num(self.off)} (off) or {dataclasses.replace(self, off=None).describe(noun)}"
        lo = (
            f"[{_num(self.ge)}"
            if self.ge is not None
            else f"({_num(self.gt)}"
            if self.gt is not None
            else None
        )
        hi = (
            f"{_num(self.le)}]"
            if self.le is not None
            else f"{_num(self.lt)})"
            if self.lt is not None
            else None
        )
        if lo and hi:
            return f"{noun} in {lo}, {hi}"
        if lo:
            return f"{noun} {'>=' if self.ge is not None else '>'} {lo[1:]}"
        if hi:
            return f"{noun} {'<=' if self.le is not None else '<'} {hi[:-1]}"
        return noun

    def __call__(self, key: str, value: Any, noun: str) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.off is not None and value == self.off:
            return
        ok = ok and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        ok = ok and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if not ok:
            raise _error(key, value, self.describe(noun))


@dataclass(frozen=True)
class OneOf(Check):
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def describe(self, noun: str) -> str:
        return "one of " + " | ".join(self.choices)

    def __call__(self, key: str, value: Any, noun: str) -> None:
        if value not in self.choices:
            close = difflib.get_close_matches(str(value), self.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _error(key, value, self.describe(noun) + hint)


@dataclass(frozen=True)
class Name(Check):
    """A name in a :class:`dphrl.registry.Registry` (given as ``module:ATTR``, imported on first use)
    or ``package.module:attr``; ``extra`` names are accepted too, and ``""`` when ``empty``."""

    registry: str
    what: str
    extra: tuple[str, ...] = ()
    empty: bool = False

    def describe(self, noun: str) -> str:
        also = "".join(f" or {e}" for e in self.extra) + (" or empty" if self.empty else "")
        return f"{self.what} name ({self.registry.replace(':', '.')}) or package.module:attr{also}"

    def __call__(self, key: str, value: Any, noun: str) -> None:
        if value in self.extra or (self.empty and value == ""):
            return
        from dphrl.registry import import_object

        try:
            import_object(self.registry).get(value)
        except ValueError as e:
            msg = str(e).removeprefix(f"config key '{key}': ")
            also = f" Also accepted: {', '.join(map(repr, self.extra))}." if self.extra else ""
            raise ConfigError(f"config key '{key}': {msg}{also} Fix it in the YAML file or with `{key}=...`.",
                              key=key) from e


@dataclass(frozen=True)
class Optional(Check):
    """``null`` (``when_null`` says what it means) or a value passing ``check``."""

    check: Check
    when_null: str = "the algorithm's default"

    def describe(self, noun: str) -> str:
        return f"{self.check.describe(noun)}, or null ({self.when_null})"

    def __call__(self, key: str, value: Any, noun: str) -> None:
        if value is not None:
            self.check(key, value, noun)


@dataclass(frozen=True)
class Items(Check):
    """A list whose every item passes ``check`` (``of`` names an item); ``length`` fixes its size."""

    check: Check
    of: str
    length: int | None = None

    def describe(self, noun: str) -> str:
        size = f"{self.length} " if self.length is not None else ""
        return f"a list of {size}items, each {self.check.describe(self.of)}"

    def __call__(self, key: str, value: Any, noun: str) -> None:
        if not isinstance(value, list) or (self.length is not None and len(value) != self.length):
            raise _error(key, value, self.describe(noun))
        for item in value:
            try:
                self.check(key, item, self.of)
            except ConfigError as e:
                raise _error(key, value, f"{self.describe(noun)} ({item!r} is not)") from e


@dataclass(frozen=True)
class Text(Check):
    """A string; ``nonempty`` refuses ``""`` (``what`` says what is expected)."""

    what: str = "a string"
    nonempty: bool = False

    def describe(self, noun: str) -> str:
        return self.what + (" (not empty)" if self.nonempty else "")

    def __call__(self, key: str, value: Any, noun: str) -> None:
        if not isinstance(value, str) or (self.nonempty and not value.strip()):
            raise _error(key, value, self.describe(noun))


@dataclass(frozen=True)
class Flag(Check):
    """true or false."""

    def describe(self, noun: str) -> str:
        return "true | false"

    def __call__(self, key: str, value: Any, noun: str) -> None:
        if not isinstance(value, bool):
            raise _error(key, value, self.describe(noun))


@dataclass(frozen=True)
class Params(Check):
    """A mapping of parameter names (strings) to values."""

    def describe(self, noun: str) -> str:
        return "a mapping {name: value}"

    def __call__(self, key: str, value: Any, noun: str) -> None:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _error(key, value, self.describe(noun))


@dataclass(frozen=True)
class DatasetSpec(Check):
    """A dataset spec checked against its loader's signature (no data read); ``many``: {name: spec}.
    ``{}`` is allowed (no data configured; the trainer then needs examples passed in)."""

    many: bool = False

    def describe(self, noun: str) -> str:
        spec = "{type, path, limit, seed, <the loader's options>} (dphrl.data.loaders.LOADERS)"
        return f"a mapping {{name: dataset spec {spec}}}" if self.many else f"a dataset spec {spec}, or {{}}"

    def __call__(self, key: str, value: Any, noun: str) -> None:
        from dphrl.data.loaders import DatasetSpecError, check_dataset_spec

        if not isinstance(value, dict):
            raise _error(key, value, self.describe(noun))
        specs = (
            [(f"{key}.{name}", spec) for name, spec in value.items()]
            if self.many
            else [(key, value)]
            if value
            else []
        )
        for sub, spec in specs:
            if self.many and (not spec or not isinstance(spec, dict | str)):
                raise _error(sub, spec, "a dataset spec such as {type: gsm8k, path: ..., limit: 64}")
            try:
                check_dataset_spec(spec)
            except DatasetSpecError as e:
                k = f"{sub}.{e.key}" if e.key else sub
                raise ConfigError(f"config key '{k}': {e}", key=k) from e


#: Names other trainers (TRL, verl, HF Trainer, OpenRLHF) give a setting -> (the dphrl key, a note).
KEY_ALIASES: dict[str, tuple[str, str]] = {
    "learning_rate": ("lr", ""),
    "num_generations": ("rollout_n", "responses per prompt"),
    "n_samples_per_prompt": ("rollout_n", "responses per prompt"),
    "group_size": ("rollout_n", "responses per prompt"),
    "beta": ("kl_coef", "with algorithm: rkl"),
    "kl_loss_coef": ("kl_coef", "with algorithm: rkl"),
    "init_kl_coef": ("kl_coef", "with algorithm: rkl"),
    "use_kl_loss": ("kl_coef", "algorithm: rkl with kl_coef > 0"),
    "kl_loss_type": ("kl_estimator", ""),
    "kl_penalty": ("kl_estimator", ""),
    "max_completion_length": ("max_new_tokens", ""),
    "max_response_length": ("max_new_tokens", ""),
    "max_tokens": ("max_new_tokens", ""),
    "max_prompt_length": ("max_prompt_tokens", ""),
    "gradient_accumulation_steps": (
        "micro_batch_size",
        "there is no accumulation count: each of the mini_batches "
        "updates per batch accumulates gradients over micro-batches of micro_batch_size sequences",
    ),
    "per_device_train_batch_size": (
        "micro_batch_size",
        "sequences per forward/backward; the batch of a step is prompts_per_step x rollout_n sequences",
    ),
    "train_batch_size": ("prompts_per_step", "prompts per optimizer step"),
    "ppo_mini_batch_size": ("mini_batches", "a number of mini-batches per epoch, not a size"),
    "epsilon": ("clip_low", ""),
    "epsilon_low": ("clip_low", ""),
    "cliprange": ("clip_low", ""),
    "clip_ratio": ("clip_low", ""),
    "clip_ratio_low": ("clip_low", ""),
    "epsilon_high": ("clip_high", ""),
    "clip_ratio_high": ("clip_high", ""),
    "clip_ratio_c": ("dual_clip", ""),
    "num_iterations": ("ppo_epochs", ""),
    "ppo_epochs_per_batch": ("ppo_epochs", ""),
    "loss_type": ("loss_agg", "the aggregation; policy_loss picks the per-token loss"),
    "loss_agg_mode": ("loss_agg", ""),
    "adv_estimator": ("advantage", ""),
    "scale_rewards": ("advantage", "grpo_no_std: no std scaling"),
    "lr_scheduler_type": ("lr_schedule", ""),
    "lr_scheduler": ("lr_schedule", ""),
    "warmup_ratio": ("warmup_steps", "a number of updates, not a ratio"),
    "grad_clip": ("max_grad_norm", ""),
    "bf16": ("dtype", "dtype: bfloat16"),
    "torch_dtype": ("dtype", ""),
    "use_peft": ("lora", ""),
    "use_lora": ("lora", ""),
    "lora_rank": ("lora_r", ""),
    "target_modules": ("lora_target_modules", ""),
    "model_name_or_path": ("model", ""),
    "model_name": ("model", ""),
    "model_path": ("model", ""),
    "train_files": ("dataset", "a spec {type: ..., path: ...}"),
    "train_dataset": ("dataset", "a spec {type: ..., path: ...}"),
    "dataset_name": ("dataset", "a spec {type: ..., path: ...}"),
    "eval_dataset": ("eval_data", "{name: dataset spec}"),
    "report_to": ("trackers", ""),
    "logging_steps": ("log_every", ""),
    "save_steps": ("save_every", ""),
    "save_total_limit": ("keep_last", ""),
    "eval_steps": ("eval_every", ""),
    "reward_funcs": ("reward", ""),
    "use_vllm": ("engine", "engine: vllm"),
    "gpu_memory_utilization": ("vllm_gpu_memory_utilization", ""),
    "filter_groups": ("dynamic_sampling", ""),
    "max_num_gen_batches": ("max_refill_rounds", ""),
    "overlong_buffer_len": ("overlong_buffer", ""),
    "overlong_penalty_factor": ("overlong_penalty", ""),
    "total_training_steps": ("max_steps", ""),
    "num_train_epochs": ("max_steps", "a number of optimizer steps, not epochs"),
    "adam_beta1": ("betas", "[beta1, beta2]"),
    "adam_beta2": ("betas", "[beta1, beta2]"),
}


def suggest_key(key: str, names: list[str]) -> str:
    """`` Did you mean 'lr'?`` for an unknown key: a known alias (TRL/verl/HF names) or the closest keys."""
    alias = KEY_ALIASES.get(key) or KEY_ALIASES.get(key.lower())
    if alias and alias[0] in names:
        return f" Did you mean {alias[0]!r}?" + (f" ({alias[1]})" if alias[1] else "")
    close = difflib.get_close_matches(key, names, n=2)
    if close:
        return " Did you mean " + " or ".join(map(repr, close)) + "?"
    return f" Valid keys: {sorted(names)} (`dphrl config` explains each)."


