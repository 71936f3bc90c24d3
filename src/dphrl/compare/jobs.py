"""The job list of an experiment: plain data, resolved and validated before any work.

Per seed ``s`` (under ``OUT/seed<s>/``):

* ``prepare``: build the base model (when the experiment builds one), presample the reference store
  once (when a method rehearses: every rehearsing method of the seed shares it) and sample the
  forgetting set (when configured);
* ``train`` per run (method, sweep point, ablation): ``runs/<name>/`` (metrics.jsonl, final/);
* ``eval`` per run and for the base: ``runs/<name>/eval/results.json`` (a fixed base model, one not
  built per seed, is evaluated once, under the first seed).

A :class:`Job` is JSON (``OUT/jobs.json``): id, kind, seed, run, output dir, what it depends on, its
``spec`` (for a training the fully resolved training config) and ``cmd``, one ``dphrl`` command that
runs it alone, so any scheduler can take the list. A job is done when its marker file exists
(:meth:`Job.done`); a resumed experiment skips those, after checking that their spec did not change.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dphrl.compare.experiment import Experiment, yaml_lines
from dphrl.config import ConfigError, TrainConfig

__all__ = ["JOBS_FILE", "Job", "SpecChanged", "check_unchanged", "load_jobs", "plan", "write_jobs"]

JOBS_FILE = "jobs.json"
#: presample settings every rehearsing method of a seed must share (they share one store)
_STORE_KEYS = ("model", "dataset", "reward", "presample_n", "split_threshold", "keep_per_prompt",
               "temperature", "top_p", "max_new_tokens", "max_prompt_tokens", "dtype", "engine")


@dataclass
class Job:
    """One unit of work; ``spec`` holds everything it needs besides the files of its dependencies."""

    id: str
    kind: str  # prepare | train | eval
    seed: int
    run: str  # run name ("" for prepare; "base" evaluates the base model)
    out: str  # the directory the job writes
    deps: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)

    def marker(self) -> Path:
        """The file whose presence means the job is done."""
        out = Path(self.out)
        return {"prepare": out / "prepared.json", "train": out / "final" / "config.json",
                "eval": out / "eval" / "results.json"}[self.kind]

    def done(self) -> bool:
        return self.marker().is_file()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SpecChanged(ConfigError):
    """A finished job of the output directory was made with another spec: resuming would mix them."""


def _base_values(exp: Experiment) -> tuple[dict[str, Any], dict[str, str]]:
    """The base training config's keys (base_config file, then base:) and where each came from."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if exp.base_config:
        path = Path(exp.base_config)
        if not path.is_absolute() and exp.source is not None:
            path = exp.source.parent / path
        try:
            text = path.read_text(encoding="utf-8")
            data, lines = yaml.safe_load(text) or {}, yaml_lines(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config key 'base_config' ({exp.where('base_config')}): "
                              f"cannot read {path}: {e}",
                              key="base_config", where=exp.where("base_config")) from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of training config keys")
        Experiment._check_train_keys({k: v for k, v in data.items() if k not in ("seed", "output_dir",
                                                                                   "reference_store")},
                                     "base_config", [f.name for f in dataclasses.fields(TrainConfig)])
        for k, v in data.items():
            if k in ("seed", "output_dir", "reference_store"):
                continue  # set per job
            values[k] = v
            origin[k] = f"{path}:{lines.get(str(k), '?')}"
            origin.update({d: f"{path}:{n}" for d, n in lines.items() if d.startswith(f"{k}.")})
    for k, v in exp.base.items():
        values[k] = v
        origin[k] = exp.where(f"base.{k}")
    return values, origin


def _resolve(values: dict[str, Any], origin: dict[str, str], paths: dict[str, str], what: str) -> TrainConfig:
    """``TrainConfig(**values)``; an error names the run, the key as the experiment file spells it
    (``paths``: training key -> experiment key) and where it was given (``origin``)."""
    try:
        return TrainConfig(**values)
    except ConfigError as e:
        key = e.key or ""
        parts = key.split(".")
        found = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                      if ".".join(parts[:n]) in origin), None)
        where = origin[found] if found else "not set (a training config default)"
        shown = paths[found] + key[len(found):] if found in paths else key
        msg = re.sub(r" Fix it in the YAML file or with `[^`]*`\.$", "", str(e))
        msg = msg.replace(f"config key '{key}': ", "", 1) if msg.startswith(f"config key '{key}': ") else msg
        raise ConfigError(f"config key '{shown}' ({where}), {what}: {msg}", key=shown, where=where) from e


def _rehearses(values: dict[str, Any]) -> bool:
    from dphrl.algorithms import get_algorithm

    try:
        return get_algorithm(values.get("algorithm", TrainConfig.algorithm)).rehearsal
    except ValueError:
        return False  # TrainConfig names the bad algorithm


def _cmd(out: Path, job_id: str) -> list[str]:
    return ["dphrl", "compare", "--out", str(out), "--job", job_id]


def base_dir(exp: Experiment, out: str | Path, seed: int) -> Path:
    """Where seed ``seed``'s base-model evaluation lives: its own when the experiment builds a base model
    per seed, else the first seed's (a fixed model is evaluated once: the other seeds would only draw
    other samples from the same model)."""
    return Path(out) / f"seed{seed if exp.base_model else exp.seeds[0]}" / "runs" / "base"


def plan(exp: Experiment, out: str | Path) -> list[Job]:
    """Every job of the experiment, each training config resolved and validated (nothing is run)."""
    out = Path(out)
    base_vals, base_origin = _base_values(exp)
    base_paths = {k: f"base.{k}" for k in exp.base}
    ev, fg = exp.eval_spec, exp.forgetting_spec
    during = set(ev.during_methods or exp.methods) if ev.during_every else set()
    jobs: list[Job] = []
    for seed in exp.seeds:
        sd = out / f"seed{seed}"
        model = str(sd / "base_model") if exp.base_model else base_vals.get("model", "")
        configs: dict[str, TrainConfig] = {}
        for name, (kw, kw_paths) in exp.run_overrides().items():
            values = {**base_vals, **kw, "seed": seed, "output_dir": str(sd / "runs" / name),
                      "progress": False}
            paths = {**base_paths, **kw_paths}
            origin = {**base_origin, **{k: exp.where(p) for k, p in kw_paths.items()}}
            if exp.base_model:
                values["model"] = model
            if _rehearses(values):
                values["reference_store"] = str(sd / "store")
            if name in during:
                lim = {"limit": ev.during_limit} if ev.during_limit else {}
                values.update(eval_every=ev.during_every, eval_n=ev.during_n,
                              eval_data={n: {**s, **lim} for n, s in ev.sets().items()})
            configs[name] = _resolve(values, origin, paths, f"run {name}")
        base_cfg = _resolve({**base_vals, "algorithm": "grpo", "seed": seed,
                             "output_dir": str(sd / "runs" / "base"),
                             **({"model": model} if exp.base_model else {})}, base_origin, base_paths, "base")
        prep = Job(f"seed{seed}/prepare", "prepare", seed, "", str(sd), spec={
            "build": exp.base_model or None, "model": base_cfg.model,
            "presample": _presample_spec(exp, configs, seed, sd),
            "forgetting": None if fg is None else {
                "data": fg.data, "n": fg.n, "temperature": fg.temperature, "seed": seed,
                "max_new_tokens": fg.max_new_tokens or ev.max_new_tokens or base_cfg.max_new_tokens,
                "micro_batch_size": fg.micro_batch_size, "batch_size": ev.batch_size,
                "out": str(sd / "forgetting_set")},
        })
        jobs.append(prep)
        eval_spec = {"sets": ev.sets(), "n": ev.n, "temperature": ev.temperature, "top_p": ev.top_p,
                     "max_new_tokens": ev.max_new_tokens or base_cfg.max_new_tokens, "seed": seed,
                     "batch_size": ev.batch_size, "prompts_per_call": exp.prompts_per_call,
                     "reward": base_cfg.eval_reward, "engine": base_cfg.engine, "dtype": base_cfg.dtype,
                     "forgetting_set": None if fg is None else str(sd / "forgetting_set")}
        if exp.base_model or seed == exp.seeds[0]:  # a fixed base model is evaluated once (first seed)
            jobs.append(Job(f"seed{seed}/eval/base", "eval", seed, "base", str(sd / "runs" / "base"),
                            [prep.id], spec={**eval_spec, "model": base_cfg.model}))
        for name, cfg in configs.items():
            train = Job(f"seed{seed}/train/{name}", "train", seed, name, cfg.output_dir, [prep.id],
                        spec={"config": cfg.to_dict()})
            jobs.append(train)
            jobs.append(Job(f"seed{seed}/eval/{name}", "eval", seed, name, cfg.output_dir, [train.id],
                            spec={**eval_spec, "model": str(Path(cfg.output_dir) / "final"),
                                  "max_new_tokens": ev.max_new_tokens or cfg.max_new_tokens}))
    for j in jobs:
        j.cmd = _cmd(out, j.id)
    return jobs


def _presample_spec(exp: Experiment, configs: dict[str, TrainConfig], seed: int, sd: Path) -> dict | None:
    """The one presample of a seed (None when no method rehearses); its settings must be shared."""
    rehearsing = {n: c for n, c in configs.items() if c.spec().rehearsal}
    if not rehearsing:
        return None
    first_name, first = next(iter(rehearsing.items()))
    for name, cfg in rehearsing.items():
        for key in _STORE_KEYS:
            if getattr(cfg, key) != getattr(first, key):
                path = (exp.run_overrides()[name][1].get(key)
                        or exp.run_overrides()[first_name][1].get(key, key))
                raise ConfigError(f"config key '{path}' ({exp.where(path)}): the rehearsing runs share one "
                                  f"presample store per seed, so they must agree on {key}: {name} has "
                                  f"{getattr(cfg, key)!r}, {first_name} {getattr(first, key)!r}", key=path)
    return {"model": first.model, "dataset": first.dataset, "reward": first.reward, "n": first.presample_n,
            "temperature": first.temperature, "top_p": first.top_p, "max_new_tokens": first.max_new_tokens,
            "threshold": first.split_threshold, "keep_per_prompt": first.keep_per_prompt, "seed": seed,
            "topk": max(c.rehearsal_topk for c in rehearsing.values()),
            "prompts_per_call": exp.prompts_per_call,
            "batch_size": first.generation_batch_size, "reward_workers": first.reward_workers,
            "reward_timeout_s": first.reward_timeout_s, "dtype": first.dtype, "engine": first.engine,
            "gpu_memory_utilization": first.vllm_gpu_memory_utilization,
            "max_prompt_tokens": first.max_prompt_tokens, "out": str(sd / "store")}


def write_jobs(out: str | Path, jobs: list[Job], experiment: dict[str, Any]) -> Path:
    """``OUT/jobs.json``: the experiment (as its file's keys) and every job, as plain data."""
    from dphrl.fsutil import atomic_write_text

    path = Path(out) / JOBS_FILE
    atomic_write_text(path, json.dumps({"experiment": experiment, "jobs": [j.to_dict() for j in jobs]},
                                       indent=1, default=str))
    return path


def load_jobs(out: str | Path) -> list[Job]:
    """The jobs of ``OUT/jobs.json``."""
    path = Path(out) / JOBS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no job list here (run `dphrl compare --config ... --out {out}` first)")
    return [Job(**j) for j in json.loads(path.read_text())["jobs"]]


def check_unchanged(out: str | Path, jobs: list[Job]) -> list[str]:
    """Refuse to resume when a finished job of ``out`` was made with another spec than now planned.

    Keys that did not exist when the job was made (a setting added to dphrl since, e.g. a new config
    field) are not compared: that run could not have set them, and new settings default to the old
    behaviour. Returns them (``job: key``) so the runner can say so; every other difference refuses.
    """
    path = Path(out) / JOBS_FILE
    if not path.is_file():
        return []
    old = {j["id"]: j["spec"] for j in json.loads(path.read_text())["jobs"]}
    added: list[str] = []
    for job in jobs:
        before = old.get(job.id)
        if before is None or not job.done():
            continue
        now = json.loads(json.dumps(job.spec, default=str))
        new_keys: list[str] = []
        now = _only_known(before, now, new_keys)
        added += [f"{job.id}: {k}" for k in new_keys]
        if before != now:
            diff = _diff(before, now)
            raise SpecChanged(f"{out}: job {job.id} is finished but was made with another spec ({diff}); "
                              "resuming would mix its old results into the new experiment. Use another "
                              "--out, or --overwrite to start over.", key=None)
    return added


def _only_known(before: Any, now: Any, added: list[str], prefix: str = "") -> Any:
    """``now`` without the dict keys ``before`` lacks (recorded in ``added``), recursively."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return now
    out = {}
    for k, v in now.items():
        if k in before:
            out[k] = _only_known(before[k], v, added, f"{prefix}{k}.")
        else:
            added.append(f"{prefix}{k}")
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        parts = [_diff(a.get(k), b.get(k), f"{prefix}{k}.") for k in sorted(set(a) | set(b), key=str)
                 if a.get(k) != b.get(k)]
        return "; ".join(p for p in parts if p)
    return f"{prefix.rstrip('.')}: {a!r} -> {b!r}"

