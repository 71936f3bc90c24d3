"""The experiment file of ``dphrl compare``: what to train, how often, and how to judge it.

An experiment names a base training config (model, data, reward, budget: any ``dphrl train`` YAML
and/or keys given inline), the methods (each a name and the training-config keys it changes), the
seeds, optional coefficient sweeps per method family, the evaluation sets (in domain and out of
domain), an optional forgetting set and the claims to check. Every key is a typed field whose help
text is its reference (``docs/config.md``, section *Experiment keys*, is generated from it).

Everything is validated before any work: unknown keys get a did-you-mean, and every error names the
key, the file and the line (``claims.1.metric (exp.yaml:31)``); :func:`dphrl.compare.jobs.plan`
then resolves every (method, seed, coefficient) into a full :class:`~dphrl.config.TrainConfig`,
so a bad override fails before the first job too.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from dphrl.compare.sections import (
    METRIC,
    Claim,
    Evaluation,
    Forgetting,
    Seeds,
    did_you_mean,
    field_doc,
    type_ok,
    yaml_lines,
)
from dphrl.config import ConfigError, Range, Text, TrainConfig

__all__ = ["Claim", "Evaluation", "Experiment", "Forgetting", "experiment_help", "load_experiment",
           "yaml_lines"]

#: Training-config keys the runner sets per job (a method may not set them).
RUNNER_KEYS = ("seed", "output_dir", "reference_store")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class Experiment:
    """``dphrl compare --config experiment.yaml``: the keys of the file's top level."""

    title: str = field_doc("dphrl compare", "Report title.", Text(nonempty=True))
    description: str = field_doc("", "Text at the top of the summary: what is compared, and why.", Text())
    base_config: str = field_doc(
        "", "A dphrl train YAML (relative to the experiment file) every method starts from.", Text()
    )
    base: dict = field_doc(
        {},
        "Training config keys on top of base_config (model, "
        "dataset, reward, budget, ...; `dphrl config` lists them).",
    )
    methods: dict = field_doc(
        {},
        "{name: {training config keys}}: each method is the base config with these keys, e.g. "
        "{grpo: {algorithm: grpo}, dph-f: {algorithm: dph, divergence: forward_kl, eta: 0.3}}.",
    )
    seeds: list | int = field_doc(
        [0],
        "Seeds: a list, or N for 0..N-1. Per seed: its own base model "
        "(when built), presample store, forgetting set and every training.",
        Seeds(),
    )
    sweeps: dict = field_doc(
        {},
        "{method: {key: [values]}}: more coefficients of a method's family (eta, kl_coef, "
        "...); each value is a run named method@key=value. A family's points give its "
        "Pass@1-Pass@K curve: families are compared at matched in-domain Pass@1.",
    )
    ablations: dict = field_doc(
        {},
        "{name: {training config keys}}: more methods, reported beside "
        "the sweep (not in the main table, not in a claim's '*').",
    )
    evaluation: dict = field_doc(
        {}, "How every model and the base are evaluated (keys: Evaluation below). Required."
    )
    forgetting: dict = field_doc({}, "Optional forgetting set (keys: Forgetting below).")
    claims: list = field_doc([], "Claims checked on the results (each: Claim below).")
    base_model: dict = field_doc(
        {},
        "Build the base model per seed instead of taking base.model: {build: package.module:function, "
        "args: {...}}, called as function(out_dir, seed=seed, **args) (torch threads already set by the "
        "runner); it must save a transformers checkpoint in out_dir (the demo trains one from scratch).",
    )
    prompts_per_call: int = field_doc(
        16,
        "Prompts per generation call in presample, evaluation and the forgetting set (each "
        "call's sampling seed follows its first prompt, so the samples depend on it).",
        Range(ge=1),
    )
    #: where the file came from (None: built in code) and the line of every key in it
    source: Path | None = field(default=None, repr=False, metadata={"internal": True})
    lines: dict = field(default_factory=dict, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            if self.seeds < 1:
                raise ConfigError(f"config key 'seeds': got {self.seeds}, expected N >= 1 or a list",
                                  key="seeds")
            self.seeds = list(range(self.seeds))
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            value = getattr(self, f.name)
            if not type_ok(value, hints[f.name]):
                raise ConfigError(f"config key '{f.name}': got {value!r}, expected {hints[f.name]}",
                                  key=f.name)
            if f.metadata.get("check") is not None:
                f.metadata["check"](f.name, value, "a value")
        self._check_runs()
        _ = self.eval_spec, self.forgetting_spec, self.claim_specs  # parse (and check) every section now
        self._check_claims()

    # ---------------------------------------------------------------------------------------- sections
    @cached_property
    def eval_spec(self) -> Evaluation:
        if not self.evaluation:
            raise ConfigError("config key 'evaluation': required, e.g. {in_domain: {gsm8k: {type: gsm8k, "
                              "path: ..., limit: 200}}, n: 16}", key="evaluation")
        spec = Evaluation.parse(self.evaluation, "evaluation")
        for i, m in enumerate(spec.during_methods):
            if m not in self.methods:
                raise ConfigError(f"config key 'evaluation.during_methods.{i}': {m!r} is not a method "
                                  f"({sorted(self.methods)})", key=f"evaluation.during_methods.{i}")
        return spec

    @cached_property
    def forgetting_spec(self) -> Forgetting | None:
        return Forgetting.parse(self.forgetting, "forgetting") if self.forgetting else None

    @cached_property
    def claim_specs(self) -> list[Claim]:
        return [Claim.parse(c, f"claims.{i}") for i, c in enumerate(self.claims)]

    # ------------------------------------------------------------------------------------------- runs
    def sweep_runs(self) -> dict[str, list[tuple[Any, str]]]:
        """Family (a swept method) -> [(coefficient, run name)], the method's own run first (its value
        from the method, else from ``base``; None when both leave the key to the algorithm's default)."""
        out = {}
        for fam, spec in self.sweeps.items():
            (key, values), = spec.items()
            own = self.methods[fam].get(key, self.base.get(key))
            out[fam] = [(own, fam)] + [(v, f"{fam}@{key}={v}") for v in values]
        return out

    def run_overrides(self) -> dict[str, tuple[dict, dict[str, str]]]:
        """Every trained run: name -> (its training config keys over the base, {key: the experiment key that
        gives it}, e.g. ``methods.dph-f.eta`` or, for a sweep point's coefficient, ``sweeps.dph-f.eta.1``)."""
        def own(group: str, name: str, kw: dict) -> tuple[dict, dict[str, str]]:
            return dict(kw), {k: f"{group}.{name}.{k}" for k in kw}

        runs = {m: own("methods", m, kw) for m, kw in self.methods.items()}
        for fam, spec in self.sweeps.items():
            (key, values), = spec.items()
            for i, v in enumerate(values):
                kw, paths = own("methods", fam, self.methods[fam])
                runs[f"{fam}@{key}={v}"] = ({**kw, key: v}, {**paths, key: f"sweeps.{fam}.{key}.{i}"})
        runs.update({a: own("ablations", a, kw) for a, kw in self.ablations.items()})
        return runs

    def main_runs(self) -> list[str]:
        """The base and the methods: the main table (sweep points and ablations go to the second one)."""
        return ["base", *self.methods]

    def where(self, key: str) -> str:
        """``file:line`` of experiment key ``key`` (:func:`locate`)."""
        return locate(self.source, self.lines, key)

    def _check_runs(self) -> None:
        if not self.methods:
            raise ConfigError("config key 'methods': give at least one, e.g. {grpo: {algorithm: grpo}}",
                              key="methods")
        fields_ = [f.name for f in dataclasses.fields(TrainConfig)]
        for group in ("methods", "ablations"):
            for name, kw in getattr(self, group).items():
                key = f"{group}.{name}"
                if not isinstance(name, str) or not _NAME.match(name) or name == "base":
                    raise ConfigError(f"config key '{key}': a run name is letters, digits and . _ + - "
                                      "(not 'base', no '@': it marks sweep points)", key=key)
                if kw is None:
                    kw = getattr(self, group)[name] = {}
                if not isinstance(kw, dict):
                    raise ConfigError(f"config key '{key}': a mapping of training config keys, got {kw!r}",
                                      key=key)
                self._check_train_keys(kw, key, fields_)
        clash = set(self.methods) & set(self.ablations)
        if clash:
            raise ConfigError(f"config key 'ablations': {sorted(clash)} is also a method", key="ablations")
        self._check_train_keys(self.base, "base", fields_)
        for fam, spec in self.sweeps.items():
            key = f"sweeps.{fam}"
            if fam not in self.methods:
                raise ConfigError(f"config key '{key}': {fam!r} is not a method."
                                  f"{did_you_mean(str(fam), list(self.methods), 'methods')}",
                                  key=key)
            if not isinstance(spec, dict) or len(spec) != 1:
                raise ConfigError(f"config key '{key}': one {{key: [values]}} per family, e.g. "
                                  "{eta: [0.1, 1.0]}", key=key)
            (k, values), = spec.items()
            self._check_train_keys({k: None}, key, fields_)
            if not isinstance(values, list) or not values:
                raise ConfigError(f"config key '{key}.{k}': a non-empty list of values, got {values!r}",
                                  key=f"{key}.{k}")
            own = self.methods[fam].get(k)
            if own in values or len(set(map(str, values))) != len(values):
                raise ConfigError(f"config key '{key}.{k}': {values} repeats a value "
                                  f"(the method's own {k} is {own})", key=f"{key}.{k}")
        if self.base_model and (set(self.base_model) - {"build", "args"}
                                or not isinstance(self.base_model.get("build"), str)):
            raise ConfigError("config key 'base_model': {build: package.module:function, args: {...}}, "
                              f"got {self.base_model!r}", key="base_model")

    @staticmethod
    def _check_train_keys(kw: dict, prefix: str, fields_: list[str]) -> None:
        from dphrl.config import suggest_key

        for k in kw:
            key = f"{prefix}.{k}"
            if k not in fields_:
                raise ConfigError(f"config key '{key}': not a training config key."
                                  f"{suggest_key(str(k), fields_)}", key=key)
            if k in RUNNER_KEYS:
                raise ConfigError(f"config key '{key}': set by dphrl compare for every job (seeds: the "
                                  "experiment's 'seeds'; output_dir and reference_store: under --out)",
                                  key=key)

    def _check_claims(self) -> None:
        runs = set(self.main_runs()) | set(self.run_overrides())
        labels = self.eval_spec.labels()
        k_max = self.eval_spec.n
        for i, c in enumerate(self.claim_specs):
            for side in ("left", "right"):
                for name in c.names(side):
                    if name not in runs and not (side == "left" and name == "*"):
                        raise ConfigError(f"config key 'claims.{i}.{side}': {name!r} is not a run."
                                          f"{did_you_mean(name, sorted(runs), 'runs')}",
                                          key=f"claims.{i}.{side}")
            m = METRIC.match(c.metric)
            if m and m.group(2) and not 1 <= int(m.group(2)) <= k_max:
                raise ConfigError(f"config key 'claims.{i}.metric': {c.metric} needs "
                                  f"1 <= K <= evaluation.n ({k_max})", key=f"claims.{i}.metric")
            if c.metric == "forgetting" and self.forgetting_spec is None:
                raise ConfigError(f"config key 'claims.{i}.metric': forgetting needs a 'forgetting' set",
                                  key=f"claims.{i}.metric")
            if c.metric != "forgetting" and c.set not in labels and c.set not in labels.values():
                raise ConfigError(f"config key 'claims.{i}.set': {c.set!r} is not an evaluation set; use "
                                  f"{sorted(set(labels.values()) | set(labels))}", key=f"claims.{i}.set")

    def set_of(self, name: str) -> str:
        """The evaluation set a claim's ``set`` names (a label or a set name)."""
        labels = self.eval_spec.labels()
        return name if name in labels else next(n for n, lab in labels.items() if lab == name)

    def to_dict(self) -> dict[str, Any]:
        """The experiment as its file's keys (what ``out/experiment.yaml`` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("internal")}


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; a :class:`~dphrl.config.ConfigError` names key, file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the experiment file: {e}") from e
    try:
        data, lines = yaml.safe_load(text) or {}, yaml_lines(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of experiment keys")
    names = [f.name for f in dataclasses.fields(Experiment) if not f.metadata.get("internal")]
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in data:
        if k not in names:
            where = f"{path}:{lines.get(str(k), '?')}"
            hint = (" It is a training config key: put it under 'base:' (every method) or under a method."
                    if k in train_keys else did_you_mean(str(k), names))
            raise ConfigError(f"unknown experiment key '{k}' ({where}).{hint}", key=str(k), where=where)
    try:
        return Experiment(**data, source=path, lines=lines)
    except ConfigError as e:
        if e.key is None or e.where is not None:
            raise
        raise e.at(locate(path, lines, e.key)) from e


def locate(source: Path | None, lines: dict[str, int], key: str) -> str:
    """``file:line`` of ``key`` (or of its closest parent in the file); ``experiment built in code``."""
    if source is None:
        return "experiment built in code"
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in lines:
            return f"{source}:{lines['.'.join(parts[:n])]}"
    return f"not set in {source}"


def experiment_help() -> str:
    """Markdown reference of the experiment keys: the top level and each section (docs/config.md)."""
    from dphrl.config import config_help

    out = []
    for cls, title in ((Experiment, "Top level"), (Evaluation, "evaluation"), (Forgetting, "forgetting"),
                       (Claim, "claims (each item)")):
        table = config_help(cls).splitlines()
        table = table[:2] + [r for r in table[2:] if not r.startswith(("| `source`", "| `lines`"))]
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "`").replace(":mod:", "")
        out += [f"**{title}**: {doc}", "", *table, ""]
    return "\n".join(out)
