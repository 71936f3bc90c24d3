"""The sections of an experiment file (``evaluation``, ``forgetting``, each of ``claims``) as typed
dataclasses: every key documented by its help text, checked on parsing (keys with a did-you-mean,
types, values); an error names the dotted key (``claims.1.metric``), which the loader locates."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from dphrl.config import Check, ConfigError, DatasetSpec, Flag, Items, OneOf, Range, Text

__all__ = ["Claim", "Evaluation", "Forgetting", "METRIC", "Seeds", "did_you_mean", "field_doc", "type_ok",
           "yaml_lines"]

METRIC = re.compile(r"^(pass@(\d+)|greedy|styles|answer acc|forgetting)$")


@dataclass(frozen=True)
class Seeds(Check):
    """``seeds``: distinct integers in [0, 2**32) (an integer N >= 1 is turned into 0..N-1 before this
    check)."""

    def describe(self, noun: str) -> str:
        return "a list of distinct integers in [0, 2**32), or N >= 1 for 0..N-1"

    def __call__(self, key: str, value: Any, noun: str) -> None:
        for i, s in enumerate(value):
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**32:
                raise ConfigError(f"config key '{key}.{i}': got {s!r}, expected an integer in [0, 2**32)",
                                  key=f"{key}.{i}")
        if not value or len(set(value)) != len(value):
            raise ConfigError(f"config key '{key}': got {value}, expected {self.describe(noun)}", key=key)


def field_doc(default: Any, help: str, check: Check | None = None) -> Any:
    """A documented field (``help``) with its :class:`~dphrl.config.Check` (``check``)."""
    meta = {"help": help, "check": check}
    if isinstance(default, dict | list):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def yaml_lines(text: str) -> dict[str, int]:
    """Line of every key and list item of a YAML text, as dotted paths (``methods.grpo.lr``, ``claims.0``)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[f"{prefix}{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}{i}.")

    node = yaml.compose(text)
    if node is not None:
        walk(node, "")
    return lines


def did_you_mean(key: str, names: list[str], what: str = "keys") -> str:
    close = difflib.get_close_matches(key, names, n=2)
    return ((" Did you mean " + " or ".join(map(repr, close)) + "?") if close
            else f" Valid {what}: {sorted(names)}.")


def type_ok(value: Any, typ: Any) -> bool:
    args = typing.get_args(typ) or (typ,)
    for t in args:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t in (str, bool, dict, list) and isinstance(value, t):
            return True
        if t is type(None) and value is None:
            return True
    return False


class _Section:
    """A mapping of the experiment file as a dataclass: :meth:`parse` checks keys, types and values."""

    @classmethod
    def parse(cls, data: Any, prefix: str) -> Any:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if not isinstance(data, dict):
            raise ConfigError(f"config key '{prefix}': got {data!r}, expected a mapping with keys {names}",
                              key=prefix)
        for k in data:
            if k not in names:
                raise ConfigError(f"unknown key '{prefix}.{k}'.{did_you_mean(str(k), names)}",
                                  key=f"{prefix}.{k}")
        obj = cls(**data)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key, value = f"{prefix}.{f.name}", getattr(obj, f.name)
            if not type_ok(value, hints[f.name]):
                raise ConfigError(f"config key '{key}': got {value!r}, expected {hints[f.name]}", key=key)
            check = f.metadata.get("check")
            if check is not None and value is not None:
                check(key, value, "a value")
        obj.validate(prefix)  # type: ignore[attr-defined]
        return obj


@dataclass
class Evaluation(_Section):
    """``evaluation:`` every trained model and the base, on every seed."""

    in_domain: dict = field_doc(
        {},
        "{name: dataset spec}: the task trained on (exactly one set, held out "
        "from training); its Pass@1 is the x axis of the matched-Pass@1 frontier.",
        DatasetSpec(many=True),
    )
    out_of_domain: dict = field_doc(
        {},
        "{name: dataset spec, ...}: other domains (never "
        "trained on); with one set its columns are named 'ood'.",
        DatasetSpec(many=True),
    )
    n: int = field_doc(
        16,
        "Samples per problem: unbiased Pass@k for k = 1, 2, 4, ..., n (plus one greedy response).",
        Range(ge=1),
    )
    temperature: float = field_doc(1.0, "Sampling temperature of the evaluation.", Range(gt=0))
    top_p: float = field_doc(1.0, "Nucleus sampling of the evaluation.", Range(gt=0, le=1))
    max_new_tokens: int | None = field_doc(
        None, "Response length limit; null: the base config's max_new_tokens.", Range(ge=1)
    )
    batch_size: int = field_doc(64, "Sequences per generation call chunk of the engine.", Range(ge=1))
    during_every: int = field_doc(
        0,
        "Also evaluate during training every N steps (Pass@k over training steps in the report); 0 = off.",
        Range(ge=0),
    )
    during_n: int = field_doc(8, "Samples per problem during training.", Range(ge=1))
    during_limit: int = field_doc(
        0, "Problems per set during training (the first ones; 0 = all).", Range(ge=0)
    )
    during_methods: list = field_doc(
        [],
        "Methods evaluated during training (empty: every method; never the sweep points or ablations).",
        Items(Text(nonempty=True), "a method name"),
    )

    def validate(self, prefix: str) -> None:
        if len(self.in_domain) != 1:
            raise ConfigError(f"config key '{prefix}.in_domain': give exactly one set "
                              f"{{name: dataset spec}}, got {len(self.in_domain)}", key=f"{prefix}.in_domain")
        both = set(self.in_domain) & set(self.out_of_domain)
        if both:
            raise ConfigError(f"config key '{prefix}.out_of_domain': {sorted(both)} is also the in-domain "
                              "set's name", key=f"{prefix}.out_of_domain")

    @property
    def in_name(self) -> str:
        return next(iter(self.in_domain))

    def labels(self) -> dict[str, str]:
        """Set name -> its label in tables, frontier and claims: 'in', and 'ood' for a single other set
        (several: 'ood:<name>')."""
        single = len(self.out_of_domain) == 1
        return {self.in_name: "in", **{n: "ood" if single else f"ood:{n}" for n in self.out_of_domain}}

    def sets(self) -> dict[str, dict]:
        return {**self.in_domain, **self.out_of_domain}


@dataclass
class Forgetting(_Section):
    """``forgetting:`` label-free forgetting (:mod:`dphrl.evaluation.forgetting`): the base model is
    sampled once per seed on these prompts, and every model's forward KL(base || model) per token on
    those samples is reported."""

    data: dict = field_doc(
        {},
        "Dataset spec of the prompts (another domain; only the prompts are used, no reward).",
        DatasetSpec(),
    )
    n: int = field_doc(4, "Base-model samples per prompt.", Range(ge=1))
    temperature: float = field_doc(1.0, "Sampling temperature (the KL is measured at it).", Range(gt=0))
    max_new_tokens: int | None = field_doc(
        None, "Response length limit; null: the evaluation's.", Range(ge=1)
    )
    micro_batch_size: int = field_doc(16, "Sequences per forward when scoring.", Range(ge=1))

    def validate(self, prefix: str) -> None:
        if not self.data:
            raise ConfigError(f"config key '{prefix}.data': give a dataset spec of the prompts, e.g. "
                              "{type: jsonl, path: prompts.jsonl, limit: 64}", key=f"{prefix}.data")


@dataclass
class Claim(_Section):
    """``claims:`` a list; each is checked on the mean over seeds and on every seed alone:
    for every ``l`` in ``left`` and ``r`` in ``right``: ``metric(l) op scale * metric(r) + offset``."""

    metric: str = field_doc(
        "",
        "pass@K | greedy | styles (effective number) | answer acc (right "
        "final answer, any style) | forgetting (KL per token from the base).",
        Text(nonempty=True),
    )
    left: str | list = field_doc(
        "", "A run name (method, ablation, method@key=value, base), a list of them, or '*' = every method."
    )
    op: str = field_doc(">", "Comparison.", OneOf(("<", "<=", ">", ">=")))
    right: str | list | float = field_doc("base", "A run name, a list (each must hold), or a number.")
    set: str = field_doc(
        "in",
        "The evaluation set: in | ood (the one out-of-domain set) | a set's name. Ignored by forgetting.",
        Text(nonempty=True),
    )
    scale: float = field_doc(1.0, "The right side is multiplied by this ...", Range())
    offset: float = field_doc(0.0, "... and this is added (e.g. -0.03: at least 3 points below).", Range())
    beyond_std: bool = field_doc(
        False,
        "Also require |left - right| to exceed the larger seed std of the two (several seeds only).",
        Flag(),
    )
    text: str = field_doc("", "What the claim says, in words (default: the formula).")

    def validate(self, prefix: str) -> None:
        if not METRIC.match(self.metric):
            raise ConfigError(f"config key '{prefix}.metric': got {self.metric!r}, expected pass@K, greedy, "
                              "styles, answer acc or forgetting", key=f"{prefix}.metric")
        for side in ("left", "right"):
            v = getattr(self, side)
            if isinstance(v, list) and (not v or not all(isinstance(x, str) for x in v)):
                raise ConfigError(f"config key '{prefix}.{side}': a list of run names, got {v!r}",
                                  key=f"{prefix}.{side}")

    def names(self, side: str) -> list[str]:
        v = getattr(self, side)
        return [] if isinstance(v, int | float) else [v] if isinstance(v, str) else list(v)

    def describe(self) -> str:
        """The claim in words (``text``), or its formula."""
        if self.text:
            return self.text
        right = self.right if isinstance(self.right, int | float) else " and ".join(self.names("right"))
        rhs = f"{self.scale:g} x {right}" if self.scale != 1 else str(right)
        rhs += f" {'+' if self.offset >= 0 else '-'} {abs(self.offset):g}" if self.offset else ""
        on = "" if self.metric == "forgetting" else f" ({self.set})"
        return f"{' and '.join(self.names('left'))} {self.metric}{on} {self.op} {rhs}"
