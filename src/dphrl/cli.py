"""Command line: ``dphrl {demo, compare, sft, presample, train, eval, report, config}``.

A refusal (a :class:`dphrl.errors.UserError`: a wrong path, key or value, a damaged file, a busy
directory) is printed as one ``dphrl: <message>`` paragraph and exits 2; ``--debug`` (or
``DPHRL_DEBUG=1``) shows its traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dphrl.errors import Interrupted, UserError

if TYPE_CHECKING:
    from dphrl.config import TrainConfig
    from dphrl.data.example import Example


def _data_arg(s: str) -> tuple[str, dict]:
    """``NAME=SPEC`` where SPEC is an inline YAML mapping or ``type:path`` (e.g. gsm8k:data/test.jsonl)."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(
            f"--data {s!r}: expected NAME=SPEC, e.g. gsm8k=gsm8k:../shared/data/gsm8k/test.jsonl")
    name, _, spec = s.partition("=")
    if spec.strip().startswith("{"):
        try:
            d = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"--data {s!r}: SPEC is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise argparse.ArgumentTypeError(
                f"--data {s!r}: SPEC must be a mapping, e.g. {{type: gsm8k, path: ...}}")
    else:
        typ, _, path = spec.partition(":")
        d = {"type": typ, "path": path} if path else {"type": typ}
    from dphrl.data.loaders import check_dataset_spec

    try:  # the spec's keys against its loader (with suggestions), before any file or model is read
        check_dataset_spec(d)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--data {name}: {e}") from e
    return name, d


def _where_arg(s: str) -> tuple[str, str]:
    """``FIELD=VALUE`` of ``--where``."""
    field, eq, value = s.partition("=")
    if not eq or not field.strip():
        raise argparse.ArgumentTypeError(f"--where {s!r}: expected FIELD=VALUE, e.g. level=Level 5")
    return field.strip(), value.strip()


def _load_for_generation(name: str, dtype: str = "float32"):
    """Tokenizer + model on the GPU when there is one (in ``dtype``), else on the CPU in fp32."""
    import torch

    from dphrl.models import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    model = load_model(name, dtype=dtype if cuda else "float32", device="cuda" if cuda else None)
    return load_tokenizer(name), model


def _check_model(name: str) -> None:
    """Refuse at once a model that cannot be loaded (a missing local path is never sent to the hub),
    before any data or weights are read: :func:`dphrl.models.check_model_available`."""
    from dphrl.models import check_model_available

    check_model_available(name)


def cmd_config(args: argparse.Namespace) -> int:
    from dphrl.config import config_help

    print(config_help())
    return 0


def cmd_presample(args: argparse.Namespace) -> int:
    from dphrl.config import load_config
    from dphrl.data import load_examples
    from dphrl.rundir import check_claim, claimed_dir

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.reference_store
    if not out:
        raise UserError("presample: set reference_store in the config (or pass --out DIR)")
    _check_model(cfg.model)
    claim = dict(what="dphrl presample", overwrite=args.overwrite, noun="a reference store")
    check_claim(out, resumable=False, **claim)  # read only: the claim itself comes after the slow loading
    examples = load_examples(cfg.dataset)
    if not examples:
        raise UserError(f"presample: the dataset {cfg.dataset} gave no examples; check its path and filters")
    tok, model = _load_for_generation(cfg.model, cfg.dtype)
    with claimed_dir(out, **claim):  # the store is swapped in whole at the end: a failure keeps the old one
        manifest = _presample(cfg, out, examples, tok, model)
    print(json.dumps(manifest["counts"], indent=2))
    return 0


def _presample(cfg: TrainConfig, out: str, examples: list[Example], tok: Any, model: Any) -> dict:
    """Sample the base model into the store at ``out``; returns its manifest."""
    from dphrl.engines import build_engine, engine_capabilities, resolve_engine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample
    from dphrl.rewards import get_reward

    engine_name = resolve_engine(cfg.engine)
    exact = engine_capabilities(engine_name).exact_logprobs
    engine = build_engine(engine_name, model, tok, batch_size=cfg.generation_batch_size, model_name=cfg.model,
                          dtype=cfg.dtype, seed=cfg.seed,
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                          max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens)
    manifest = presample(
        engine, tok, examples, get_reward(cfg.reward or examples[0].task),
        out, model_name=cfg.model, tokenizer_hash=tokenizer_hash(tok), n=cfg.presample_n,
        temperature=cfg.temperature,
        top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, threshold=cfg.split_threshold,
        keep_per_prompt=cfg.keep_per_prompt, seed=cfg.seed, reward_timeout_s=cfg.reward_timeout_s,
        reward_workers=cfg.reward_workers, progress=cfg.progress,
        # an engine whose log-probs are not the training forward's: the HF model recomputes the stored
        # log pi_ref
        logprob_model=None if exact else model, micro_batch_size=cfg.micro_batch_size,
        topk=cfg.rehearsal_topk,
    )
    return manifest


def cmd_train(args: argparse.Namespace) -> int:
    from dphrl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from dphrl.dryrun import dry_run

        print(dry_run(cfg))
        return 0
    from dphrl.trainer import Trainer

    if args.resume and args.overwrite:
        raise UserError("train: --resume and --overwrite contradict each other; pass one")
    _check_model(cfg.model)
    t0 = time.time()
    trainer = Trainer(cfg, overwrite=args.overwrite)  # validates everything before touching output_dir
    if args.resume:
        trainer.resume(args.resume)
    first = trainer.step
    last = trainer.train()
    if trainer.acc.is_main_process:
        print(train_summary(cfg, last, steps_run=trainer.step - first, seconds=time.time() - t0,
                            last_eval=trainer.monitor.last_eval))
    return 0


def train_summary(cfg: TrainConfig, last: dict, *, steps_run: int, seconds: float,
                  last_eval: dict | None = None) -> str:
    """What ``dphrl train`` prints at the end: steps, wall time, the last step's reward and pass rate, the
    last evaluation's pass@1 / greedy accuracy, and where the final model and the metrics are (every
    step's numbers are in metrics.jsonl)."""
    out = Path(cfg.output_dir)
    wall = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    lines = [f"dphrl train: {cfg.algorithm} on {cfg.model}: {cfg.max_steps} steps done "
             f"({steps_run} in this run, {wall})"]
    if last:
        nan = float("nan")
        lines.append(f"  last step: reward {last.get('reward/mean', nan):.3f}, pass rate "
                     f"{last.get('reward/pass_rate', nan):.3f}, {last.get('time/step', 0):.2f} s/step")
    evals = {k.removeprefix("eval/"): v for k, v in (last_eval or {}).items()
             if k.endswith(("/pass@1", "/greedy_acc"))}
    if evals:
        lines.append("  last evaluation: " + ", ".join(f"{k} {v:.3f}" for k, v in evals.items()))
    lines += [f"  final model: {out / 'final'}",
              f"  metrics: {out / 'metrics.jsonl'} (one JSON line per step)"]
    return "\n".join(lines)


def _check_eval_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range ``dphrl eval`` options before anything is read."""
    names = [name for name, _ in args.data]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"eval: --data names must be unique; {dup} given more than once (the later one "
                        "would replace the earlier one's results)")
    bad = [
        (args.n < 1, f"--n {args.n}: give the number of samples per problem, at least 1 (pass@k needs "
                     "n >= k)"),
        (not args.temperature > 0, f"--temperature {args.temperature}: give a sampling temperature > 0 (the "
                                   "greedy pass is run anyway)"),
        (not 0 < args.top_p <= 1, f"--top-p {args.top_p}: give a value in (0, 1] (1 = no nucleus cut)"),
        (args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: give at least 1"),
        (args.batch_size < 1, f"--batch-size {args.batch_size}: give at least 1"),
        (args.kv_budget_mb < 0, f"--kv-budget-mb {args.kv_budget_mb}: give a size in MB, or 0 for no bound"),
        (not args.reward_timeout > 0,
         f"--reward-timeout {args.reward_timeout}: give a positive number of seconds"),
        (args.reward_workers < -1,
         f"--reward-workers {args.reward_workers}: give -1 (auto), 0 (in process) or a number of workers"),
        (args.limit is not None and args.limit < 1,
         f"--limit {args.limit}: give a positive number of problems (or omit it for all)"),
    ]
    for is_bad, msg in bad:
        if is_bad:
            raise UserError(f"eval: {msg}")


def cmd_eval(args: argparse.Namespace) -> int:
    from dphrl.data import load_examples
    from dphrl.engines import engine_capabilities, resolve_engine
    from dphrl.rundir import check_claim, claimed_dir

    _check_eval_options(args)
    _check_model(args.model)
    ids = [i.strip() for i in (args.ids or "").split(",") if i.strip()]
    if args.ids_file:
        from dphrl.data.select import read_ids_file

        ids += read_ids_file(args.ids_file)
    selecting = bool(ids or args.where)
    datasets_in, limits = {}, {}
    for name, spec in args.data:  # load and check every dataset before any model is loaded
        spec = dict(spec)
        spec_limit = spec.pop("limit", None)
        limits[name] = args.limit if args.limit is not None else spec_limit
        if limits[name] and not selecting:  # the loader stops early; a selection needs every problem
            spec["limit"] = limits[name]
        try:  # a wrong spec, a malformed or empty file: the message names the file and line
            exs = load_examples(spec)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"eval: --data {name}: {e}") from e
        if not exs:
            raise UserError(f"eval: --data {name}={spec} gave no examples; check its path and filters")
        datasets_in[name] = exs
    if selecting:  # --ids / --ids-file / --where, then --limit: the first N of the selection
        from dphrl.data.select import select_examples

        datasets_in = select_examples(datasets_in, ids=ids, where=args.where or ())
        datasets_in = {n: exs[: limits[n]] if limits[n] else exs for n, exs in datasets_in.items()}
        print("selected: " + ", ".join(f"{n} {len(exs)}" for n, exs in datasets_in.items()) + " problem(s)")
    if args.reward:  # a wrong name is refused before any model is loaded
        from dphrl.rewards import get_reward

        get_reward(args.reward)
    fset = None
    if args.forgetting_set:  # checked before any model is loaded
        from dphrl.evaluation.forgetting import load_forgetting_set

        try:
            fset = load_forgetting_set(args.forgetting_set)
        except UserError as e:
            raise UserError(f"eval: --forgetting-set: {e}") from e
    claim = dict(what="dphrl eval", overwrite=args.overwrite, noun="evaluation results")
    check_claim(args.out, resumable=False, **claim)  # read only: claimed once the model is loaded
    engine_name = resolve_engine(args.engine)
    if engine_capabilities(engine_name).needs_model:
        tok, model = _load_for_generation(args.model, args.dtype)
    else:  # the engine reads the weights itself
        from dphrl.models import load_tokenizer

        tok, model = load_tokenizer(args.model), None
    with claimed_dir(args.out, **claim):  # a second eval into --out is refused while this one runs
        selection = {"ids": ids, "where": [f"{k}={v}" for k, v in args.where or ()]} if selecting else None
        n_sets = _evaluate(args, engine_name, tok, model, datasets_in, fset, selection)
    print(f"results: {Path(args.out) / 'results.json'} ({n_sets} datasets)")
    return 0


def _evaluate(args: argparse.Namespace, engine_name: str, tok: Any, model: Any, datasets_in: dict[str, list],
              fset: Any, selection: dict | None) -> int:
    """Generate, score and write ``--out``/results.json (with forgetting when ``fset``, and the
    ``--ids`` / ``--where`` selection in its config); returns the number of datasets."""
    from dphrl.engines import build_engine
    from dphrl.evaluation.runner import evaluate, write_results
    from dphrl.rewards import get_reward
    from dphrl.tasks import eval_hooks

    engine = build_engine(engine_name, model, tok, batch_size=args.batch_size, model_name=args.model,
                          dtype=args.dtype, seed=args.seed, gpu_memory_utilization=0.85,
                          kv_budget_mb=args.kv_budget_mb or None)
    if hasattr(engine, "rows_per_batch"):
        from dphrl.data.chat import encode_prompt

        longest = max(len(encode_prompt(tok, ex.prompt)) for exs in datasets_in.values() for ex in exs)
        rows = engine.rows_per_batch(longest + args.max_new_tokens)
        if rows < args.batch_size:
            print(f"dphrl eval: batches of {rows} sequences, not {args.batch_size}: {args.batch_size} rows "
                  f"of {longest} + {args.max_new_tokens} positions would need more KV cache than "
                  f"--kv-budget-mb {args.kv_budget_mb:g}", file=sys.stderr)
    datasets, rewards, style_fns, answer_fns = {}, {}, {}, {}
    timeout_s = args.reward_timeout
    for name, exs in datasets_in.items():
        datasets[name] = exs
        rewards[name] = get_reward(args.reward or exs[0].task)
        if args.sql_mode == "official" and not args.reward and exs[0].task in ("sql", "spider", "bird"):
            from dphrl.rewards.sql_official import (
                BIRD_OFFICIAL_TIMEOUT_S,
                SPIDER_OFFICIAL_TIMEOUT_S,
                official_reward,
            )

            mode = "bird-official" if exs[0].task == "bird" else "spider-official"
            rewards[name] = official_reward(mode)
            # the official per-query limits (gold + prediction; Spider's test suite: two databases)
            per_query = BIRD_OFFICIAL_TIMEOUT_S if mode == "bird-official" else 2 * SPIDER_OFFICIAL_TIMEOUT_S
            limit = 2 * per_query
            timeout_s = max(timeout_s, limit + 5)
        style_fns[name], answer_fns[name] = eval_hooks(exs)  # the task's labels (dphrl.tasks), if any
    records: list[dict] = []
    res = evaluate(
        engine, tok, datasets, rewards, n=args.n,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
        out_dir=None, style_fn=style_fns, answer_fn=answer_fns,
        num_workers=args.reward_workers,
        model_name=args.model, timeout_s=timeout_s, records_out=records,
    )  # prints the table
    if fset is not None:  # forward KL(base || this model) per token on the base's samples of held-out prompts
        from dphrl.evaluation.forgetting import forgetting

        if model is None:  # the engine read the weights itself: the forgetting forward needs the HF model
            tok, model = _load_for_generation(args.model, args.dtype)
        res["forgetting"] = forgetting(model, tok, fset)
        f = res["forgetting"]
        print(f"forgetting: KL(base || model) {f['forgetting/kl_per_token']:.4f} ± "
              f"{f['forgetting/stderr_per_token']:.4f} per token ({int(f['forgetting/sequences'])} base "
              "samples)")
    if selection is not None:
        res["config"]["selection"] = selection
    write_results(args.out, res, records)
    return len(res["datasets"])


def cmd_report(args: argparse.Namespace) -> int:
    from dphrl.evaluation.report import write_report
    from dphrl.evaluation.report_data import find_results
    from dphrl.rundir import claimed_dir

    for run in args.runs:  # every input is checked before --out is touched
        find_results(run)
    out = Path(args.out)
    # a previous report is replaced; any other directory only with --overwrite (and only one dphrl wrote)
    overwrite = args.overwrite or (out / "report.md").is_file()
    with claimed_dir(out, what="dphrl report", overwrite=overwrite, noun="files that are not a report"):
        paths = write_report([Path(p) for p in args.runs], out)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from dphrl.demo import build_base_model
    from dphrl.rundir import claimed_dir

    with claimed_dir(args.out, what="dphrl sft", overwrite=args.overwrite, noun="a model"):
        build_base_model(Path(args.out), steps=args.steps, seed=args.seed, progress=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dphrl.demo import DemoBudgetError, demo_size, run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        size = demo_size(args.quick, args.rl_steps, args.lr, methods, args.train_prompts, uneven=args.uneven,
                         more_families=args.more_families)
        if args.resume and args.overwrite:
            raise UserError("demo: --resume and --overwrite contradict each other; pass one")
        from dphrl.rundir import claim_dir

        claim_dir(Path(args.out), what="dphrl demo", resume=args.resume, overwrite=args.overwrite, lock=False)
        summary = run_demo(Path(args.out), seeds=args.seeds, sweep=args.sweep, workers=args.workers,
                           size=size, ablation=args.ablation)
    except DemoBudgetError as e:
        print(f"dphrl demo: {e}", file=sys.stderr)
        return 2
    return 1 if summary.get("failed") else 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.job:  # one job of a planned experiment (what a scheduler runs)
        from dphrl.compare.jobs import load_jobs
        from dphrl.compare.work import run_job

        jobs = {j.id: j for j in load_jobs(args.out)}
        if args.job not in jobs:
            raise UserError(f"compare: no job {args.job!r} in {Path(args.out) / 'jobs.json'}")
        result = run_job(jobs[args.job], threads=args.threads)
        print(json.dumps(result))  # the last line: the scheduler backend reads it
        return 0
    if not args.config:
        raise UserError("compare: pass --config EXPERIMENT.yaml (or --job ID to run one planned job)")
    if args.resume and args.overwrite:
        raise UserError("compare: --resume and --overwrite contradict each other; pass one")
    from dphrl.compare import load_experiment, run_experiment

    exp = load_experiment(args.config)  # a bad file fails here, before any work
    params = {k: v for k, v in {"cluster": args.cluster, "timeout_min": args.timeout_min,
                                "slurm_partition": args.slurm_partition, "gpus_per_node": args.gpus_per_node,
                                "cpus_per_task": args.cpus_per_task}.items() if v is not None}
    summary = run_experiment(exp, Path(args.out), workers=args.workers, backend=args.backend,
                             resume=args.resume, overwrite=args.overwrite, plan_only=args.plan_only,
                             submitit_params=params)
    return 1 if summary.get("failed") else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dphrl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", default=False,
                   help="Show the traceback of a refusal too (also: DPHRL_DEBUG=1).")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="Reproduce diversity collapse and its cure on CPU (the main job).")
    d.add_argument("--quick", action="store_true", help="Small version (< 5 min) for a first look and CI.")
    d.add_argument("--seeds", type=int, default=1, help="Repeat over this many seeds; report mean ± std.")
    d.add_argument("--sweep", action="store_true",
                   help="Also sweep every divergence family's coefficient (eta for dph-*, kl_coef for rkl, "
                        "rkl-k3).")
    d.add_argument("--more-families", action="store_true",
                   help="Also train the other diversity methods under the shared loss: passk, pkpo, "
                        "w-reinforce (and w-reinforce-tm: token-mean, the authors' aggregation), kl-cov, "
                        "clip-cov (with --sweep: 3 coefficients each, on the same matched-Pass@1 frontier).")
    d.add_argument("--ablation", action="store_true",
                   help="Also train grpo, rkl-k3 and dph-f with the DAPO-style policy loss (clip-higher, "
                        "token-mean).")
    d.add_argument("--workers", type=int, default=2,
                   help="Parallel single-threaded job processes (default 2 = cores).")
    d.add_argument("--rl-steps", type=int, default=None, help="RL steps per method (default 100; quick 12).")
    d.add_argument("--lr", type=float, default=None, help="RL learning rate (default 2e-4).")
    d.add_argument("--train-prompts", type=int, default=None,
                   help="RL training prompts, also pre-sampled (default 400, at most 1400).")
    d.add_argument("--methods", default=None,
                   help="Comma-separated subset of grpo,dapo,rkl,rkl-k3,dph-f,dph-js,dph-f-topk.")
    d.add_argument("--uneven", action="store_true",
                   help="The uneven variant: base SFT'd on styles A/B/C 0.05/0.05/0.90, validity "
                        "0.6/0.5/0.2, families rkl, rkl-k3, dph-f (with --sweep: does the predicted winner "
                        "win in training?).")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--resume", action="store_true", help="Continue a demo in --out (finished jobs are kept).")
    d.add_argument("--overwrite", action="store_true", help="Replace a demo found in --out.")
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("compare",
                       help="Methods x seeds x coefficients on your model: train, evaluate, report.")
    m.add_argument("--config", help="Experiment YAML (docs/config.md, section 'Experiment keys').")
    m.add_argument("--out", default="runs/compare")
    m.add_argument("--workers", type=int, default=2,
                   help="Jobs at a time (local: single-threaded CPU worker processes; submitit: jobs in "
                        "flight).")
    m.add_argument("--backend", choices=("local", "sequential", "submitit"), default="local",
                   help="local: a CPU process pool; sequential: one job after another in this process "
                        "(run it under `accelerate launch` on GPUs); submitit: each job one `dphrl compare "
                        "--job` command on Slurm (or submitit's local mode).")
    m.add_argument("--resume", action="store_true",
                   help="Continue an experiment in --out (finished jobs are kept).")
    m.add_argument("--overwrite", action="store_true", help="Replace an experiment found in --out.")
    m.add_argument("--plan-only", action="store_true",
                   help="Validate, write --out/jobs.json (each job with its dphrl command) and stop.")
    m.add_argument("--job", help="Run one job of --out/jobs.json by id (what a scheduler runs).")
    m.add_argument("--threads", type=int, default=None, help="--job: torch threads (default: torch's).")
    m.add_argument("--cluster", default=None, help="submitit: slurm | local (default: Slurm when available).")
    m.add_argument("--slurm-partition", default=None, help="submitit: the Slurm partition.")
    m.add_argument("--timeout-min", type=int, default=None,
                   help="submitit: time limit per job in minutes (24 h).")
    m.add_argument("--gpus-per-node", type=int, default=None, help="submitit: GPUs per job.")
    m.add_argument("--cpus-per-task", type=int, default=None,
                   help="submitit: CPUs (and torch threads) per job (1).")
    m.set_defaults(fn=cmd_compare)

    s = sub.add_parser("sft", help="Build the demo base model from scratch (tokenizer + tiny Llama + SFT).")
    s.add_argument("--out", default="runs/base")
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="Replace a model found in --out.")
    s.set_defaults(fn=cmd_sft)

    for name, fn, hlp in (
        ("presample", cmd_presample,
         "Sample the base model, split D_pef / D_exp, write the reference store."),
        ("train", cmd_train, "Train with grpo | dapo | rkl | dph."),
    ):
        t = sub.add_parser(name, help=hlp)
        t.add_argument("--config", help="YAML config (see `dphrl config` for every key).")
        t.add_argument("overrides", nargs="*",
                       help="key=value overrides (dotted keys for dicts: dataset.limit=64).")
        if name == "train":
            t.add_argument("--resume", help="'latest' or a checkpoint directory.")
            t.add_argument("--dry-run", action="store_true",
                           help="Validate the config, build the data, print the plan.")
            t.add_argument("--overwrite", action="store_true", help="Replace a run found in output_dir.")
        else:
            t.add_argument("--out", help="Store directory (default: the config's reference_store).")
            t.add_argument("--overwrite", action="store_true", help="Replace a store found there.")
        t.set_defaults(fn=fn)

    e = sub.add_parser("eval", help="Pass@k, diversity and styles of a model on one or more datasets.")
    e.add_argument("--model", required=True)
    e.add_argument("--data", type=_data_arg, action="append", required=True,
                   help="NAME=SPEC, SPEC an inline YAML mapping or type:path; repeat for several datasets.")
    e.add_argument("--n", type=int, default=16)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--limit", type=int, default=None,
                   help="Evaluate the first N problems of each dataset (of the selection, with --ids / "
                        "--where).")
    e.add_argument("--ids", default=None,
                   help="Evaluate only these problems: comma-separated example ids (of any --data set).")
    e.add_argument("--ids-file", default=None, help="Like --ids, one id per line ('#' comments allowed).")
    e.add_argument("--where", type=_where_arg, action="append", default=None, metavar="FIELD=VALUE",
                   help="Evaluate only problems whose FIELD (id, answer, task or a metadata key such as "
                        "level, difficulty, db_id) equals VALUE; repeat to require several.")
    e.add_argument("--reward", default="", help="Reward name or module:function (default: the task's own).")
    e.add_argument("--reward-workers", type=int, default=-1,
                   help="Reward scoring: -1 = auto pool of killable workers, N = N workers, 0 = in process.")
    e.add_argument("--reward-timeout", type=float, default=10.0, help="Per-item reward time-out in seconds.")
    e.add_argument("--sql-mode", choices=("sandbox", "official"), default="sandbox",
                   help="SQL datasets: sandbox = the training reward's semantics; official = Spider "
                        "test-suite / BIRD official execution match with their time-outs (named in "
                        "results.json).")
    e.add_argument("--batch-size", type=int, default=64,
                   help="Sequences generated together (at most; see --kv-budget-mb).")
    e.add_argument("--kv-budget-mb", type=float, default=2048.0,
                   help="Bound on one batch's KV cache (hf engines): batches hold fewer rows than "
                        "--batch-size when rows x (longest prompt + max new tokens) would need more; 0 = no "
                        "bound. 1,000 prompt + 128 new tokens on SmolLM2-135M in fp32 need ~50 MiB per row.")
    e.add_argument("--engine", default="auto",
                   help="Generation engine: auto (vllm when installed and a CUDA GPU is present, else hf) | "
                        "hf | vllm | package.module:factory.")
    e.add_argument("--dtype", default="bfloat16", help="Model dtype on a GPU (the CPU always uses float32).")
    e.add_argument("--forgetting-set", default=None,
                   help="Also report forgetting: the forward KL from the base per token on this set of "
                        "base-model samples (dphrl.evaluation.forgetting; dphrl compare writes one per seed: "
                        "OUT/seed<s>/forgetting_set).")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--overwrite", action="store_true", help="Replace results found in --out.")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report",
                       help="Markdown + HTML report (table, Pass@k curves, training curves) of runs.")
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", default="runs/report")
    r.add_argument("--overwrite", action="store_true",
                   help="Write into an --out that holds something other than a report (a dphrl directory "
                        "only).")
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("config", help="Print the config reference (every key, default, meaning).")
    c.set_defaults(fn=cmd_config)
    return p


def refusal_message(e: UserError) -> str:
    """The one paragraph printed for a refusal: ``dphrl: <message>`` (``dphrl: config error: ...`` for a
    config key); a message naming its command (``dphrl eval: ...``) keeps the name after the prefix."""
    from dphrl.config import ConfigError

    msg = str(e).strip()
    if msg.startswith("dphrl "):
        msg = msg[len("dphrl "):]
    return f"dphrl: config error: {msg}" if isinstance(e, ConfigError) else f"dphrl: {msg}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; a refusal prints ``dphrl: <message>`` and returns 2 (``--debug``: raises)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("DPHRL_DEBUG", "") not in ("", "0")
    if "--debug" in argv:  # before or after the command (`dphrl eval ... --debug`)
        argv, debug = [a for a in argv if a != "--debug"], True
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere, e.g. `train --config c.yaml --resume latest lr=1e-5`
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    previous = _stop_on_sigterm()
    try:
        return args.fn(args)
    except (Interrupted, KeyboardInterrupt) as e:  # outside the training loop, which checkpoints itself
        name = e.signal_name if isinstance(e, Interrupted) else "SIGINT"
        print(f"dphrl: {args.cmd}: stopped by {name}. Files are written atomically, so each one is complete "
              "or absent; a training run resumes from its last checkpoint with --resume latest.",
              file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    except UserError as e:
        if debug:
            raise
        print(refusal_message(e), file=sys.stderr)
        return 2
    except Exception as e:
        from dphrl.trainer import TrainingStopped

        if isinstance(e, TrainingStopped):  # SIGTERM / SIGINT: checkpoint written, clean exit
            print(f"dphrl: {e}", file=sys.stderr)
            return 143 if e.signal_name == "SIGTERM" else 130
        raise
    finally:
        _restore_sigterm(previous)


def _stop_on_sigterm() -> Any:
    """SIGTERM raises :class:`Interrupted` (a clean exit 143 with a message instead of a silent -15)
    until the training loop installs its own handler (a checkpoint at the next step boundary)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handle(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    return signal.signal(signal.SIGTERM, handle)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
