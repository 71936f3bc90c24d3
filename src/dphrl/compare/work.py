"""What each job of :mod:`dphrl.compare.jobs` does: prepare a seed, train a run, evaluate a model.

Every job reads only its spec and the files its dependencies wrote, writes only under its own output
directory, and writes its marker last, so it can run in any process, on any machine that sees the
output directory, and be re-run after a crash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dphrl.compare.jobs import Job

__all__ = ["answer_accuracy", "load_for_generation", "run_job", "say"]

Log = Callable[[str], None]


def say(msg: str) -> None:
    """A time-stamped progress line (jobs of a pool print side by side)."""
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_job(job: Job | dict[str, Any], *, threads: int | None = None, log: Log = say) -> dict[str, Any]:
    """Run one job (a :class:`Job` or its dict); returns ``{"seconds", "message"}``.

    ``threads``: torch intra-op threads for the job (the local CPU pool gives each worker 1; a seed's
    base model may take more while nothing else can run); None leaves torch's setting alone (GPUs).
    """
    import torch

    job = Job(**job) if isinstance(job, dict) else job
    if threads is not None:
        torch.set_num_threads(threads if job.kind == "prepare" else 1)
    t0 = time.time()
    try:
        message = (_prepare(job, log, threads) if job.kind == "prepare"
                   else {"train": _train, "eval": _evaluate}[job.kind](job, log))
    finally:  # jobs run one after another in one process (sequential backend): free the last one's memory
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"seconds": time.time() - t0, "message": message}


def load_for_generation(name: str, dtype: str = "float32") -> tuple[Any, Any]:
    """Tokenizer + model: on the GPU when there is one (in ``dtype``), else on the CPU in fp32."""
    import torch

    from dphrl.models import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    model = load_model(name, dtype=dtype if cuda else "float32", device="cuda" if cuda else None)
    return load_tokenizer(name), model


# ---------------------------------------------------------------------------------------------- prepare
def _prepare(job: Job, log: Log, threads: int | None) -> str:
    """Base model (built when the experiment builds one), reference store, forgetting set; each made once."""
    import torch

    from dphrl.registry import import_object

    spec, made = job.spec, []
    model_dir = Path(spec["model"])
    if spec["build"] and not (model_dir / "config.json").is_file():
        log(f"seed {job.seed}: building the base model ({spec['build']['build']})")
        import_object(spec["build"]["build"], "base_model.build")(model_dir, seed=job.seed,
                                                                  **spec["build"].get("args", {}))
        made.append("base model")
    if threads is not None:
        # only the build takes idle cores: the samples stay bitwise those of any pool
        torch.set_num_threads(1)
    if spec["presample"] and not (Path(spec["presample"]["out"]) / "manifest.json").is_file():
        _presample(spec["presample"], job.seed, log)
        made.append("store")
    fg = spec["forgetting"]
    if fg and not (Path(fg["out"]) / "manifest.json").is_file():
        _forgetting_set(fg, spec["model"], spec["presample"], log)
        made.append("forgetting set")
    info: dict[str, Any] = {"made": made}
    if spec["presample"]:
        manifest = json.loads((Path(spec["presample"]["out"]) / "manifest.json").read_text())
        info["store"] = {"counts": manifest["counts"], "mean_pass_rate": manifest.get("mean_pass_rate")}
    from dphrl.fsutil import atomic_write_text

    job.marker().parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.marker(), json.dumps(info, indent=1))
    if "store" not in info:
        return f"seed {job.seed}: prepared ({', '.join(made) or 'nothing to make'})"
    c = info["store"]["counts"]
    return (f"seed {job.seed}: prepared ({', '.join(made) or 'already there'}): D_pef {c['d_pef']} prompts, "
            f"D_exp {c['d_exp']}, {c['stored_samples']} stored samples, "
            f"base pass rate {info['store']['mean_pass_rate']:.3f}")


def _presample(ps: dict[str, Any], seed: int, log: Log) -> None:
    from dphrl.data import load_examples
    from dphrl.engines import build_engine, engine_capabilities, resolve_engine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample
    from dphrl.rewards import get_reward

    examples = load_examples(ps["dataset"])
    tok, model = load_for_generation(ps["model"], ps["dtype"])
    name = resolve_engine(ps["engine"])
    exact = engine_capabilities(name).exact_logprobs
    engine = build_engine(name, model, tok, batch_size=ps["batch_size"], model_name=ps["model"],
                          dtype=ps["dtype"], seed=seed,
                          max_model_len=ps["max_prompt_tokens"] + ps["max_new_tokens"],
                          gpu_memory_utilization=ps["gpu_memory_utilization"])
    log(f"seed {seed}: presample {ps['n']} x {len(examples)} prompts from the base model")
    presample(engine, tok, examples, get_reward(ps["reward"] or examples[0].task), ps["out"],
              model_name=ps["model"], tokenizer_hash=tokenizer_hash(tok), n=ps["n"],
              temperature=ps["temperature"], top_p=ps["top_p"], max_new_tokens=ps["max_new_tokens"],
              threshold=ps["threshold"], keep_per_prompt=ps["keep_per_prompt"],
              seed=seed, prompts_per_call=ps["prompts_per_call"], reward_timeout_s=ps["reward_timeout_s"],
              reward_workers=ps["reward_workers"], progress=False, logprob_model=None if exact else model,
              topk=ps["topk"])


def _forgetting_set(fg: dict[str, Any], model_name: str, ps: dict | None, log: Log) -> None:
    from dphrl.data import load_examples
    from dphrl.evaluation.forgetting import sample_forgetting_set

    examples = load_examples(fg["data"])
    tok, model = load_for_generation(model_name, ps["dtype"] if ps else "float32")
    log(f"seed {fg['seed']}: forgetting set: {fg['n']} base-model samples x {len(examples)} prompts")
    sample_forgetting_set(model, tok, examples, fg["out"], n=fg["n"], temperature=fg["temperature"],
                          max_new_tokens=fg["max_new_tokens"], seed=fg["seed"], batch_size=fg["batch_size"],
                          micro_batch_size=fg["micro_batch_size"], model_name=model_name, overwrite=True)


# ------------------------------------------------------------------------------------------------ train
def _train(job: Job, log: Log) -> str:
    from dphrl.config import TrainConfig
    from dphrl.trainer import Trainer

    cfg = TrainConfig(**job.spec["config"])
    label = f"seed {job.seed}: {job.run}"

    def progress(trainer: Trainer, metrics: dict) -> None:
        """A line every quarter of the run (jobs run side by side, without progress bars)."""
        every = max(1, trainer.cfg.max_steps // 4)
        if trainer.step % every == 0 and trainer.step < trainer.cfg.max_steps:
            log(f"{label}: step {trainer.step}/{trainer.cfg.max_steps}, rollout pass rate "
                f"{metrics.get('reward/pass_rate', 0):.2f}, {metrics['time/step']:.1f} s/step")

    # an unfinished training restarts from scratch
    trainer = Trainer(cfg, callbacks=[progress], overwrite=True)
    trainer.train()
    return f"{label}: trained {cfg.max_steps} steps"


# ------------------------------------------------------------------------------------------------- eval
def answer_accuracy(records: list[dict[str, Any]], gold: dict[str, str]) -> float | None:
    """Share of sampled responses (not the greedy one) whose extracted final answer is the gold answer,
    whatever else the grader asks (e.g. a style): it tells a lost skill from a narrowed set of solutions.
    None when no response carries an answer label (the task has no answer hook)."""
    sampled = [r for r in records if r["index"] >= 0]
    if not sampled or not any("answer" in r for r in sampled):
        return None
    return sum(r.get("answer") is not None and r.get("answer") == gold.get(r["id"])
               for r in sampled) / len(sampled)


def _evaluate(job: Job, log: Log) -> str:
    from dphrl.data import load_examples
    from dphrl.engines import build_engine, engine_capabilities, resolve_engine
    from dphrl.evaluation.runner import evaluate, write_results
    from dphrl.models import load_tokenizer
    from dphrl.rewards import get_reward
    from dphrl.tasks import eval_hooks

    spec = job.spec
    sets = {name: load_examples(s) for name, s in spec["sets"].items()}
    name = resolve_engine(spec["engine"])
    needs_model = engine_capabilities(name).needs_model  # else (vllm) the engine reads the weights itself
    tok, model = (load_for_generation(spec["model"], spec["dtype"]) if needs_model
                  else (load_tokenizer(spec["model"]), None))
    hooks = {n: eval_hooks(exs) for n, exs in sets.items()}
    records: list[dict[str, Any]] = []
    engine = build_engine(name, model, tok, batch_size=spec["batch_size"], model_name=spec["model"],
                          dtype=spec["dtype"], seed=spec["seed"], gpu_memory_utilization=0.85)
    sizes = ", ".join(f"{n} {len(exs)}" for n, exs in sets.items())
    log(f"seed {job.seed}: {job.run}: evaluating {spec['n']} samples + greedy per problem ({sizes} problems)")
    res = evaluate(
        engine, tok, sets, {n: get_reward(spec["reward"] or exs[0].task) for n, exs in sets.items()},
        n=spec["n"], temperature=spec["temperature"], top_p=spec["top_p"],
        max_new_tokens=spec["max_new_tokens"], seed=spec["seed"],
        style_fn={n: h[0] for n, h in hooks.items()}, answer_fn={n: h[1] for n, h in hooks.items()},
        model_name=spec["model"], prompts_per_call=spec["prompts_per_call"], show_table=False, progress=False,
        records_out=records,
    )
    for n, exs in sets.items():
        acc = answer_accuracy([r for r in records if r["dataset"] == n], {ex.id: ex.answer for ex in exs})
        if acc is not None:
            res["datasets"][n]["answer_accuracy"] = acc
    if spec.get("forgetting_set"):
        from dphrl.evaluation.forgetting import forgetting, load_forgetting_set

        if model is None:  # the forgetting forward needs the HF model: free the engine's memory first
            del engine
            tok, model = load_for_generation(spec["model"], spec["dtype"])
        res["forgetting"] = forgetting(model, tok, load_forgetting_set(spec["forgetting_set"]))
    write_results(Path(job.out) / "eval", res, records)
    first = next(iter(res["datasets"].values()))
    return f"seed {job.seed}: {job.run} evaluated (first set Pass@1 {first['pass@k']['1']:.3f})"
