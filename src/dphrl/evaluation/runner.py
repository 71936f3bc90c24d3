"""Evaluation runner: sample n responses per problem (plus one greedy), score, and compute metrics.

Output files (in ``out_dir``):

* ``results.json``: ``{"config": {...}, "datasets": {name: metrics}, "timing": {...}}``; see
  :func:`dataset_metrics` for the per-dataset keys.
* ``samples.jsonl``: one JSON object per response with ``dataset``, ``problem`` (position in the
  dataset), ``id``, ``index`` (0..n-1 for sampled responses, -1 for the greedy one), ``response``,
  ``reward``, ``correct``, ``finished``, ``num_tokens`` and, when present, ``answer``/``style``
  (labels from ``answer_fn``/``style_fn``) and ``reward_error`` (why the reward failed; reward 0).

:func:`rescore` recomputes ``results.json`` from ``samples.jsonl`` without generating.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dphrl.data.example import Example
from dphrl.engines.base import Engine, Generation
from dphrl.evaluation.metrics import (
    DEFAULT_THRESHOLD,
    SIMILARITY_METHOD,
    AnswerFn,
    StyleFn,
    ks_for,
    maj_at_k,
    mean_ignoring_none,
    pass_at_k,
    problem_diversity,
    style_metrics,
)
from dphrl.rewards.registry import RewardFn, score_batch

GREEDY_INDEX = -1
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


def _progress(iterable: Any, *, enabled: bool, desc: str, total: int | None = None) -> Any:
    """A bar on a terminal, a line every 10 % in a redirected log (:func:`dphrl.progress.progress_bar`)."""
    if not enabled:
        return iterable
    from dphrl.progress import progress_bar

    return progress_bar(iterable, desc=desc, total=total, unit="batch")


def _model_name(engine: Any, model_name: str | None) -> str | None:
    if model_name is not None:
        return model_name
    name = getattr(engine, "model_name", None)
    if name:
        return str(name)
    cfg = getattr(getattr(engine, "model", None), "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    return str(name) if name else None


def _reward_for(
    reward_fns: Mapping[str, RewardFn] | RewardFn, name: str, examples: Sequence[Example]
) -> RewardFn:
    """``reward_fns[name]``; a single callable applies to every dataset; else the examples' task."""
    if callable(reward_fns):
        return reward_fns
    if name in reward_fns:
        return reward_fns[name]
    tasks = {ex.task for ex in examples}
    if len(tasks) == 1:
        from dphrl.rewards.registry import get_reward

        try:
            return get_reward(tasks.pop())
        except ValueError as e:
            raise ValueError(f"no reward function for dataset {name!r} ({e})") from e
    raise ValueError(f"no reward function for dataset {name!r}; reward_fns has {sorted(reward_fns)}")


# ------------------------------------------------------------------------------------------ generation
def _generate(
    engine: Engine,
    prompts: list[list[int]],
    n: int,
    *,
    chunk: int,
    progress: bool,
    desc: str,
    seed: int | None,
    **kw: Any,
) -> list[list[Generation]]:
    out: list[list[Generation]] = []
    starts = range(0, len(prompts), chunk)
    bar = _progress(starts, enabled=progress, desc=desc, total=len(starts))
    for start in bar:
        s = None if seed is None else seed + start
        gens = engine.generate(prompts[start : start + chunk], n, seed=s, **kw)
        if len(gens) != len(prompts[start : start + chunk]) or any(len(g) != n for g in gens):
            raise RuntimeError(f"engine returned a wrong number of generations (wanted {n} per prompt)")
        out.extend(gens)
    return out


def _score(
    fn: RewardFn,
    records: list[dict[str, Any]],
    examples: Sequence[Example],
    *,
    timeout_s: float,
    num_workers: int,
    progress: bool,
    desc: str,
    chunk: int = 256,
) -> tuple[int, int]:
    """Score ``records`` in place (sets ``reward``); returns (failures, timeouts)."""
    failures = timeouts = 0
    starts = range(0, len(records), chunk)
    for start in _progress(starts, enabled=progress, desc=desc, total=len(starts)):
        part = records[start : start + chunk]
        bs = score_batch(
            fn,
            [r["response"] for r in part],
            [examples[r["problem"]] for r in part],
            timeout_s=timeout_s,
            num_workers=num_workers,
        )
        for r, s in zip(part, bs.scores, strict=True):
            r["reward"] = float(s)
            r.pop("reward_error", None)
        for i, msg in (getattr(bs, "errors", None) or {}).items():
            part[i]["reward_error"] = str(msg)
        failures += bs.failures
        timeouts += bs.timeouts
    return failures, timeouts


#: One labelling function for every dataset, or ``{dataset name: function or None}`` (a missing name: none).
Labels = Callable[[str], Any] | Mapping[str, Callable[[str], Any] | None] | None


def _for_dataset(fn: Labels, name: str) -> Callable[[str], Any] | None:
    """The labelling function of dataset ``name``: ``fn`` itself, or its entry when ``fn`` is a mapping."""
    return fn.get(name) if isinstance(fn, Mapping) else fn


def _label_names(fn: Labels) -> str | dict[str, str | None] | None:
    """``fn`` as ``results.json`` records it: ``module:name``, or ``{dataset: module:name}`` for a mapping."""
    return {k: _fn_name(f) for k, f in fn.items()} if isinstance(fn, Mapping) else _fn_name(fn)


def _annotate(
    records: list[dict[str, Any]], answer_fn: AnswerFn | None, style_fn: StyleFn | None, threshold: float
) -> None:
    for r in records:
        r["correct"] = bool(r["reward"] >= threshold)
        if answer_fn is not None:
            r["answer"] = _safe_label(answer_fn, r["response"])
        if style_fn is not None:
            r["style"] = _safe_label(style_fn, r["response"])


def _safe_label(fn: Callable[[str], str | None], text: str) -> str | None:
    try:
        v = fn(text)
    except Exception:
        return None
    return None if v is None else str(v)


# --------------------------------------------------------------------------------------------- metrics
def _mean(xs: Sequence[float]) -> float | None:
    return math.fsum(xs) / len(xs) if xs else None


def dataset_metrics(
    records: Sequence[dict[str, Any]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    reward_failures: int = 0,
    reward_timeouts: int = 0,
) -> dict[str, Any]:
    """Metrics of one dataset from its sample records (the same function serves evaluate and rescore).

    Keys: ``num_problems``, ``n`` (samples per problem, the minimum if they differ), ``ks``,
    ``greedy`` (greedy accuracy or None), ``mean@n`` (mean correctness of sampled responses),
    ``mean_reward``, ``pass@k`` ({k: value}, k as strings), ``maj@k`` (only with answers),
    ``diversity`` (means over problems), ``styles`` (only with styles), ``truncated`` (share of
    sampled responses cut at max_new_tokens), ``mean_tokens``, ``reward_failures``,
    ``reward_timeouts``, ``per_problem`` ({"id", "correct", "greedy"} lists).
    """
    groups: dict[int, dict[str, Any]] = {}
    for r in records:
        g = groups.setdefault(int(r["problem"]), {"id": r["id"], "samples": [], "greedy": None})
        if int(r["index"]) == GREEDY_INDEX:
            g["greedy"] = r
        else:
            g["samples"].append(r)
    problems = [groups[p] for p in sorted(groups)]
    for g in problems:
        g["samples"].sort(key=lambda r: int(r["index"]))
    sampled = [g for g in problems if g["samples"]]
    ns = [len(g["samples"]) for g in sampled]
    n = min(ns) if ns else 0
    ks = ks_for(n) if n else []
    correct = [[float(r["reward"]) >= threshold for r in g["samples"]] for g in sampled]
    all_samples = [r for g in sampled for r in g["samples"]]
    has_answers = any("answer" in r for r in all_samples)
    has_styles = any("style" in r for r in all_samples)

    greedy = [float(g["greedy"]["reward"]) >= threshold for g in problems if g["greedy"] is not None]
    out: dict[str, Any] = {
        "num_problems": len(problems),
        "n": n,
        "ks": ks,
        "greedy": _mean([float(x) for x in greedy]),
        "mean@n": _mean([float(x) for c in correct for x in c]),
        "mean_reward": _mean([float(r["reward"]) for r in all_samples]),
        "pass@k": {
            str(k): math.fsum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct) for k in ks
        },
    }
    if has_answers:
        out["maj@k"] = {
            str(k): math.fsum(
                maj_at_k(
                    [r.get("answer") for r in g["samples"]],
                    [r["reward"] for r in g["samples"]],
                    k,
                    threshold=threshold,
                )
                for g in sampled
            )
            / len(sampled)
            for k in ks
        }
    per = [
        problem_diversity(
            [r["response"] for r in g["samples"]],
            [r["reward"] for r in g["samples"]],
            [r.get("answer") for r in g["samples"]] if has_answers else None,
            threshold=threshold,
        )
        for g in sampled
    ]
    div: dict[str, Any] = {key: mean_ignoring_none([p[key] for p in per]) for key in (per[0] if per else {})}
    div["similarity_method"] = SIMILARITY_METHOD
    out["diversity"] = div
    if has_styles:
        pooled = style_metrics(
            [r.get("style") for r in all_samples], [r["reward"] for r in all_samples], threshold=threshold
        )
        per_problem = [
            style_metrics(
                [r.get("style") for r in g["samples"]],
                [r["reward"] for r in g["samples"]],
                threshold=threshold,
            )["effective_styles"]
            for g in sampled
        ]
        pooled["effective_styles_per_problem"] = _mean(per_problem)
        out["styles"] = pooled
    out["truncated"] = _mean([0.0 if r.get("finished", True) else 1.0 for r in all_samples])
    out["mean_tokens"] = _mean([float(r.get("num_tokens") or 0) for r in all_samples])
    out["reward_failures"] = int(reward_failures)
    out["reward_timeouts"] = int(reward_timeouts)
    out["per_problem"] = {
        "id": [g["id"] for g in problems],
        "correct": [sum(float(r["reward"]) >= threshold for r in g["samples"]) for g in problems],
        "greedy": [
            None if g["greedy"] is None else bool(float(g["greedy"]["reward"]) >= threshold) for g in problems
        ],
    }
    return out


# -------------------------------------------------------------------------------------------- evaluate
def evaluate(
    engine: Engine,
    tokenizer: Any,
    datasets: Mapping[str, Sequence[Example]],
    reward_fns: Mapping[str, RewardFn] | RewardFn,
    *,
    n: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    seed: int | None = 0,
    greedy: bool = True,
    out_dir: str | Path | None = None,
    answer_fn: AnswerFn | Mapping[str, AnswerFn | None] | None = None,
    style_fn: StyleFn | Mapping[str, StyleFn | None] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    model_name: str | None = None,
    timeout_s: float = 10.0,
    threshold: float = DEFAULT_THRESHOLD,
    prompts_per_call: int = 16,
    show_table: bool = True,
    records_out: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Sample ``n`` responses (+1 greedy) per problem of every dataset, score them, compute metrics.

    ``reward_fns[name]`` scores dataset ``name`` (a single callable scores all; a missing name falls
    back to the registry reward named by the examples' ``task``). A sample is correct when its reward
    is ``>= threshold``. Returns the ``results.json`` content; with ``out_dir`` writes
    ``results.json`` and ``samples.jsonl`` there. ``answer_fn(response)`` enables maj@k and distinct
    correct answers; ``style_fn(response)`` enables style shares; either may be a mapping
    ``{dataset name: function or None}`` (e.g. each dataset's task hooks, :func:`dphrl.tasks.eval_hooks`),
    recorded per dataset in the config. ``records_out`` (a list) receives
    every sample record (e.g. to merge the shards of several processes with :func:`dataset_metrics`).
    """
    from dphrl.data.chat import encode_prompt

    if n < 1:
        raise ValueError(f"evaluate: n must be >= 1, got {n}")
    gen_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    results: dict[str, Any] = {
        "config": {
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "greedy": greedy,
            "model": _model_name(engine, model_name),
            "threshold": threshold,
            "ks": ks_for(n),
            "answer_fn": _label_names(answer_fn),
            "style_fn": _label_names(style_fn),
            "num_problems": {name: len(exs) for name, exs in datasets.items()},
            "rewards": {
                name: _fn_name(_reward_for(reward_fns, name, list(exs))) for name, exs in datasets.items()
            },
            "reward_failures": {},
            "reward_timeouts": {},
        },
        "datasets": {},
        "timing": {},
    }
    all_records: list[dict[str, Any]] = []
    for di, (name, examples) in enumerate(datasets.items()):
        examples = list(examples)
        fn = _reward_for(reward_fns, name, examples)
        prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
        t0 = time.perf_counter()
        ds_seed = None if seed is None else seed + 1_000_003 * di
        sampled = _generate(
            engine,
            prompts,
            n,
            chunk=prompts_per_call,
            progress=progress,
            desc=f"{name}: sampling n={n}",
            seed=ds_seed,
            greedy=False,
            **gen_kw,
        )
        greedy_gens = (
            _generate(
                engine,
                prompts,
                1,
                chunk=prompts_per_call,
                progress=progress,
                desc=f"{name}: greedy",
                seed=ds_seed,
                greedy=True,
                **gen_kw,
            )
            if greedy
            else None
        )
        t1 = time.perf_counter()
        records: list[dict[str, Any]] = []
        for p, ex in enumerate(examples):
            gens = [(i, g) for i, g in enumerate(sampled[p])]
            if greedy_gens is not None:
                gens.append((GREEDY_INDEX, greedy_gens[p][0]))
            for i, g in gens:
                records.append(
                    {
                        "dataset": name,
                        "problem": p,
                        "id": ex.id,
                        "index": i,
                        "response": g.text,
                        "reward": 0.0,
                        "finished": bool(g.finished),
                        "num_tokens": len(g.response_ids),
                    }
                )
        failures, timeouts = _score(
            fn,
            records,
            examples,
            timeout_s=timeout_s,
            num_workers=num_workers,
            progress=progress,
            desc=f"{name}: scoring",
        )
        _annotate(records, _for_dataset(answer_fn, name), _for_dataset(style_fn, name), threshold)
        t2 = time.perf_counter()
        results["datasets"][name] = dataset_metrics(
            records, threshold=threshold, reward_failures=failures, reward_timeouts=timeouts
        )
        results["config"]["reward_failures"][name] = failures
        results["config"]["reward_timeouts"][name] = timeouts
        results["timing"][name] = {"generate_s": t1 - t0, "score_s": t2 - t1}
        all_records.extend(records)
    if records_out is not None:
        records_out.extend(all_records)
    if out_dir is not None:
        write_results(out_dir, results, all_records)
    if show_table:
        print(format_table(results))
    return results


def _fn_name(fn: Callable | None) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def write_results(
    out_dir: str | Path, results: dict[str, Any], records: Sequence[dict[str, Any]] | None
) -> Path:
    """Write ``results.json`` (and ``samples.jsonl`` when ``records`` is given) into ``out_dir``."""
    from dphrl.fsutil import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if records is not None:  # samples first: a results.json always has its samples beside it
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(out / SAMPLES_FILE, text)
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, allow_nan=True) + "\n")
    return out / RESULTS_FILE


def load_samples(samples_jsonl: str | Path) -> list[dict[str, Any]]:
    """Read ``samples.jsonl`` records."""
    with open(samples_jsonl) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------- rescore
def rescore(
    samples_jsonl: str | Path,
    datasets: Mapping[str, Sequence[Example]] | None = None,
    reward_fns: Mapping[str, RewardFn] | RewardFn | None = None,
    *,
    answer_fn: AnswerFn | Mapping[str, AnswerFn | None] | None = None,
    style_fn: StyleFn | Mapping[str, StyleFn | None] | None = None,
    num_workers: int = 0,
    timeout_s: float = 10.0,
    threshold: float | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Recompute the results of :func:`evaluate` from its ``samples.jsonl`` without generating.

    With ``reward_fns`` (and the ``datasets`` the samples came from) every response is scored again,
    else the stored rewards are used. ``answer_fn``/``style_fn`` (or ``{dataset: function}``, as for
    :func:`evaluate`) relabel the responses; without them stored labels are kept. The config is taken
    from ``results.json`` beside the JSONL when present.
    With ``out_dir`` writes the new ``results.json`` and ``samples.jsonl`` there.
    """
    path = Path(samples_jsonl)
    records = load_samples(path)
    old_cfg: dict[str, Any] = {}
    if (path.parent / RESULTS_FILE).exists():
        old_cfg = json.loads((path.parent / RESULTS_FILE).read_text()).get("config", {})
    if threshold is None:
        threshold = float(old_cfg.get("threshold", DEFAULT_THRESHOLD))
    by_ds: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_ds.setdefault(r["dataset"], []).append(r)
    if datasets is not None:
        by_ds = {name: by_ds[name] for name in datasets if name in by_ds} | {
            k: v for k, v in by_ds.items() if k not in datasets
        }
    config = dict(old_cfg)
    config.update(threshold=threshold, rescored_from=str(path), reward_failures={}, reward_timeouts={})
    if answer_fn is not None:
        config["answer_fn"] = _label_names(answer_fn)
    if style_fn is not None:
        config["style_fn"] = _label_names(style_fn)
    results: dict[str, Any] = {"config": config, "datasets": {}}
    for name, recs in by_ds.items():
        failures = timeouts = 0
        if reward_fns is not None:
            if datasets is None or name not in datasets:
                raise ValueError(f"rescore: re-scoring dataset {name!r} needs its examples in `datasets`")
            examples = list(datasets[name])
            for r in recs:
                p = int(r["problem"])
                if p >= len(examples) or examples[p].id != r["id"]:
                    raise ValueError(
                        f"rescore: sample of problem {p} (id {r['id']!r}) does not match dataset {name!r}"
                    )
            fn = _reward_for(reward_fns, name, examples)
            failures, timeouts = _score(
                fn,
                recs,
                examples,
                timeout_s=timeout_s,
                num_workers=num_workers,
                progress=progress,
                desc=f"{name}: rescoring",
            )
        else:
            failures = int(old_cfg.get("reward_failures", {}).get(name, 0))
            timeouts = int(old_cfg.get("reward_timeouts", {}).get(name, 0))
        _annotate(recs, _for_dataset(answer_fn, name), _for_dataset(style_fn, name), threshold)
        results["datasets"][name] = dataset_metrics(
            recs, threshold=threshold, reward_failures=failures, reward_timeouts=timeouts
        )
        config["reward_failures"][name] = failures
        config["reward_timeouts"][name] = timeouts
    if out_dir is not None:
        write_results(out_dir, results, [r for recs in by_ds.values() for r in recs])
    return results


# ----------------------------------------------------------------------------------------- comparisons
def compare_to_base(results: dict[str, Any], base_results: dict[str, Any]) -> dict[str, Any]:
    """Per-dataset differences ``results − base_results`` (fractions, not points).

    Keys per shared dataset: ``greedy``, ``mean@n``, ``pass@k`` ({k: Δ} over shared k), and
    ``maj@k`` when both have it. Negative pass@k at large k means lost coverage (forgetting).
    """
    out: dict[str, Any] = {}
    cur, base = results.get("datasets", results), base_results.get("datasets", base_results)
    for name in cur:
        if name not in base:
            continue
        a, b = cur[name], base[name]
        d: dict[str, Any] = {}
        for key in ("greedy", "mean@n"):
            if a.get(key) is not None and b.get(key) is not None:
                d[key] = a[key] - b[key]
        for key in ("pass@k", "maj@k"):
            if key in a and key in b:
                shared = [k for k in a[key] if k in b[key]]
                d[key] = {k: a[key][k] - b[key][k] for k in sorted(shared, key=int)}
        out[name] = d
    return out


# ---------------------------------------------------------------------------------------------- table
def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of one ``results`` dict: one row per dataset, values in percent."""
    dsets = results.get("datasets", {})
    ks = sorted({int(k) for m in dsets.values() for k in m.get("pass@k", {})})
    n = results.get("config", {}).get("n") or (max(ks) if ks else 0)
    header = ["dataset", "problems", "greedy", f"mean@{n}"] + [f"pass@{k}" for k in ks]
    has_maj = any("maj@k" in m for m in dsets.values())
    has_sty = any("styles" in m for m in dsets.values())
    if has_maj:
        header.append(f"maj@{max(ks) if ks else n}")
    header += ["distinct-2", "sim"]
    if has_sty:
        header.append("eff.styles")
    header += ["trunc%", "fail"]
    rows = [header]
    for name, m in dsets.items():
        row = [name, str(m.get("num_problems", "")), _pct(m.get("greedy")), _pct(m.get("mean@n"))]
        row += [_pct(m.get("pass@k", {}).get(str(k))) for k in ks]
        if has_maj:
            row.append(_pct(m.get("maj@k", {}).get(str(max(ks)))) if ks else "-")
        div = m.get("diversity", {})
        sim = div.get("pairwise_similarity")
        row += [f"{div.get('distinct_2', 0):.2f}", "-" if sim is None else f"{sim:.2f}"]
        if has_sty:
            st = m.get("styles")
            row.append("-" if not st else f"{st['effective_styles']:.2f}")
        row += [_pct(m.get("truncated")), str(m.get("reward_failures", 0) + m.get("reward_timeouts", 0))]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
