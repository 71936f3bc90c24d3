"""Step time of DPH-RL in TRL (``DPHGRPOTrainer``) vs dphrl's own ``Trainer`` (algorithm dph), same workload.

The workload is ``benchmarks/step_time.py``'s (imported from it: tiny random Llama, synthetic task, a
quarter of the prompts easy, forming D_pef): each optimizer step rolls out ``--prompts`` D_exp prompts x
``--rollouts`` samples of <= ``--max-new-tokens`` tokens and rehearses the stored samples of the same
number of D_pef prompts (``ref_prompts_per_step``, dphrl's default), with the same divergence (js), eta,
lr, temperature (top-k / top-p off), fp32, no gradient checkpointing, ``--threads`` torch threads (1 by
default) and one optimizer step per batch. The reference store is presampled once and shared.

Runs, each in a fresh subprocess (peak RSS per run), interleaved over ``--rounds``:

* ``dphrl dph``: ``dphrl.trainer.Trainer``, micro-batch ``--micro-batch`` for rollouts and references;
* ``TRL DPH``: ``DPHGRPOTrainer`` (``loss_type="dapo"``: token-mean, clip 0.2 / 0.28, like dph's preset),
  ``per_device_train_batch_size = --micro-batch``, ``gradient_accumulation_steps = prompts x rollouts /
  micro-batch`` (TRL generates the whole batch in one call), the reference batch spread over the
  micro-steps (``ref_batch_size`` unset: the least extra memory per micro-step);
* ``TRL DPH rb``: the same with ``ref_batch_size = --micro-batch`` (fewer, larger reference forwards);
* ``TRL GRPO``: the same TRL run without the term (plain ``GRPOTrainer``, beta 0): the term's cost.

The table gives medians over the measured steps (after ``--warmup``): step, rollout (generation +
scoring), update (the rest), reference forward seconds, sequences, reference tokens, peak RSS.

    python benchmarks/trl_dph_step.py                  # defaults below, ~2 min on 2 CPU cores
    python benchmarks/trl_dph_step.py --rounds 1 --steps 2 --only "dphrl dph,TRL DPH"   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time as st  # noqa: E402  (the workload: tokenizer, examples, model, reward, presample)

RUNS = ("dphrl dph", "TRL DPH", "TRL DPH rb", "TRL GRPO")


def _setup(spec: dict):
    import torch

    from dphrl.rewards.registry import register_reward

    torch.set_num_threads(spec["threads"])
    register_reward(st.REWARD_NAME, st.bench_reward, overwrite=True)
    tok = st.build_tokenizer()
    examples = st.build_examples(spec["examples"], spec["pef_frac"])
    model = st.build_model(
        tok, spec["hidden"], spec["layers"], spec["intermediate"], spec["heads"], spec["seed"]
    )
    return tok, examples, model


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_dphrl(spec: dict) -> dict:
    """dphrl's Trainer, algorithm dph: time collect_rollouts + reference_batch + update per step."""
    import torch

    from dphrl.config import TrainConfig
    from dphrl.trainer import Trainer

    tok, examples, model = _setup(spec)
    cfg = TrainConfig(
        model=st.MODEL_NAME, algorithm="dph", reward=st.REWARD_NAME, seed=spec["seed"], divergence="js",
        eta=spec["eta"], reference_store=spec["store"], ref_prompts_per_step=spec["ref_prompts"] or None,
        prompts_per_step=spec["prompts"], rollout_n=spec["rollouts"], max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"], lr=spec["lr"], max_steps=spec["warmup"] + spec["steps"],
        micro_batch_size=spec["micro_batch"], generation_batch_size=spec["prompts"] * spec["rollouts"],
        output_dir=str(Path(spec["workdir"]) / f"run-dphrl-{spec['round']}"), progress=False,
    )
    tr = Trainer(cfg, model=model, tokenizer=tok, examples=examples)
    t_ref = st.Timer(tr.updater.reference_loss, lambda: None)
    tr.updater.reference_loss = t_ref
    steps = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        rollouts, _ = tr.collect_rollouts()
        refs = tr.reference_batch()
        t1 = time.perf_counter()
        tr.update(rollouts, refs)
        t2 = time.perf_counter()
        tr.step += 1
        steps.append(
            {
                "warmup": i < spec["warmup"],
                "step_s": t2 - t0,
                "rollout_s": t1 - t0,
                "update_s": t2 - t1,
                "ref_fwd_s": t_ref.take(),
                "rollout_seqs": len(rollouts),
                "ref_seqs": len(refs),
                "ref_tokens": sum(len(s.response_ids) for s in refs),
            }
        )
    return {
        "steps": steps,
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "ref_prompts_per_step": tr.ref_prompts_per_step,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def run_trl(spec: dict, dph: bool, ref_batch_size: int | None = None) -> dict:
    """TRL's GRPOTrainer (``dph=False``) or DPHGRPOTrainer on the D_exp prompts; steps timed by a callback."""
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dphrl.integrations.trl import DPHGRPOTrainer, trl_dataset, trl_reward
    from dphrl.reference import ReferenceStore

    tok, examples, model = _setup(spec)
    store = ReferenceStore(spec["store"])
    batch = spec["prompts"] * spec["rollouts"]
    if batch % spec["micro_batch"]:
        raise SystemExit("prompts x rollouts must be divisible by --micro-batch")
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / f"run-trl-{dph}-{spec['round']}"),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=batch // spec["micro_batch"],
        num_generations=spec["rollouts"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        max_steps=spec["warmup"] + spec["steps"],
        use_vllm=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        seed=spec["seed"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        log_level="error",
    )
    marks: list[dict] = []
    timers: dict[str, st.Timer] = {}

    class StepTimes(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks.append({"begin": time.perf_counter()})

        def on_step_end(self, a, state, control, **kw):
            marks[-1]["end"] = time.perf_counter()
            marks[-1].update({k: t.take() for k, t in timers.items()})

    common = dict(processing_class=tok, callbacks=[StepTimes()])
    data, reward = trl_dataset(examples, store), trl_reward(st.REWARD_NAME)
    if dph:
        trainer = DPHGRPOTrainer(
            model,
            reward,
            args,
            data,
            reference_store=store,
            divergence="js",
            eta=spec["eta"],
            ref_prompts_per_step=spec["ref_prompts"],
            ref_batch_size=ref_batch_size,
            **common,
        )
        timers["ref_fwd_s"] = trainer.reference_loss = st.Timer(trainer.reference_loss, lambda: None)
    else:
        trainer = GRPOTrainer(model, reward, args, data, **common)
    timers["rollout_s"] = trainer._generate_and_score_completions = st.Timer(
        trainer._generate_and_score_completions, lambda: None)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = []
    for i, m in enumerate(marks):
        step_s = m["end"] - m["begin"]
        log = logs[i] if i < len(logs) else {}
        steps.append(
            {
                "warmup": i < spec["warmup"],
                "step_s": step_s,
                "rollout_s": m["rollout_s"],
                "update_s": step_s - m["rollout_s"],
                "ref_fwd_s": m.get("ref_fwd_s"),
                "rollout_seqs": batch,
                "ref_seqs": log.get("dph/ref_sequences"),
                "ref_tokens": log.get("dph/ref_tokens"),
            }
        )
    return {
        "steps": steps,
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
        "ref_prompts_per_step": getattr(trainer, "ref_prompts_per_step", None),
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def run_worker(spec: dict, workdir: Path) -> dict:
    return st.run_worker(spec, workdir, script=__file__)


_med = st._med


def summarize(name: str, runs: list[dict]) -> dict:
    meas = [s for r in runs for s in r["steps"] if not s["warmup"]]
    if not meas:
        raise RuntimeError(f"{name}: no measured steps (is --steps >= 1?)")
    keys = ("step_s", "rollout_s", "update_s", "ref_fwd_s", "rollout_seqs", "ref_seqs", "ref_tokens")
    step = sorted(s["step_s"] for s in meas)
    return {
        "name": name,
        "median": {k: _med([s.get(k) for s in meas]) for k in keys},
        "min": step[0],
        "max": step[-1],
        "measured_steps": len(meas),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "round_medians": [_med([s["step_s"] for s in r["steps"] if not s["warmup"]]) for r in runs],
        "trl_version": runs[0].get("trl_version"),
        "ref_prompts_per_step": runs[0].get("ref_prompts_per_step"),
        "n_params": runs[0]["n_params"],
        "threads": runs[0]["threads"],
    }


def format_table(rows: list[dict]) -> str:
    head = ["run", "step s (median)", "min-max", "rollout s", "update s", "ref fwd s", "rollout seqs",
            "ref seqs", "ref tokens", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, p=2):
        return "-" if x is None else f"{x:.{p}f}"

    for r in rows:
        m = r["median"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    f(m["step_s"], 3),
                    f"{r['min']:.2f}-{r['max']:.2f}",
                    f(m["rollout_s"]),
                    f(m["update_s"]),
                    f(m["ref_fwd_s"], 3),
                    f(m["rollout_seqs"], 0),
                    f(m["ref_seqs"], 0),
                    f(m["ref_tokens"], 0),
                    f(r["peak_rss_mb"], 0),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per run (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps excluded from the statistics")
    ap.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds over the runs (fresh process each)"
    )
    ap.add_argument("--prompts", type=int, default=16, help="rollout (D_exp) prompts per optimizer step")
    ap.add_argument("--rollouts", type=int, default=8, help="samples per prompt (group size)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--eta", type=float, default=0.2, help="weight of the js term")
    ap.add_argument(
        "--micro-batch", type=int, default=16, help="sequences per forward/backward (both trainers)"
    )
    ap.add_argument("--examples", type=int, default=64, help="training prompts of the synthetic task")
    ap.add_argument("--pef-frac", type=float, default=0.25, help="fraction of easy prompts (D_pef)")
    ap.add_argument(
        "--ref-prompts",
        type=int,
        default=0,
        help="D_pef prompts rehearsed per step (0 = dphrl's default prompts*|D_pef|/|D_exp|, used by both)",
    )
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (1 is robust on a shared machine)"
    )
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma list of runs among {list(RUNS)}")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(Path(args._worker).read_text())
        name = spec["name"]
        if name == "dphrl dph":
            res = run_dphrl(spec)
        else:
            res = run_trl(spec, dph=name.startswith("TRL DPH"),
                          ref_batch_size=spec["micro_batch"] if name == "TRL DPH rb" else None)
        Path(spec["result"]).write_text(json.dumps(res))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="dphrl-trl-bench-"))
    spec = dict(
        steps=args.steps,
        warmup=args.warmup,
        prompts=args.prompts,
        rollouts=args.rollouts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        lr=args.lr,
        eta=args.eta,
        micro_batch=args.micro_batch,
        gen_batch=args.prompts * args.rollouts,
        examples=args.examples,
        pef_frac=args.pef_frac,
        hidden=args.hidden,
        layers=args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        seed=args.seed,
        threads=args.threads,
        workdir=str(tmp),
        store=str(tmp / "store"),
    )
    load_before = os.getloadavg()
    try:
        t = time.time()
        counts = st.make_store(spec)["counts"]
        n_pef, n_exp = counts["d_pef"], counts["d_exp"]
        # the same number of rehearsed prompts in both trainers (dphrl's default rule unless given)
        spec["ref_prompts"] = args.ref_prompts or max(1, round(args.prompts * n_pef / max(1, n_exp)))
        print(
            f"store: {n_pef} D_pef / {n_exp} D_exp prompts, {counts['stored_samples']} stored samples "
            f"(presample {time.time() - t:.1f}s); {spec['ref_prompts']} D_pef prompts rehearsed per step",
            flush=True,
        )
        names = [n for n in RUNS if n in {x.strip() for x in args.only.split(",")}]
        if not names:
            raise SystemExit(f"--only: choose among {list(RUNS)}")
        results: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names:
                t = time.time()
                slug = n.lower().replace(" ", "-")
                res = run_worker({**spec, "name": n, "slug": slug, "round": r}, tmp)
                results[n].append(res)
                med = _med([s["step_s"] for s in res["steps"] if not s["warmup"]])
                print(
                    f"  round {r + 1}/{args.rounds} {n:11s} median step {med:.3f}s (process "
                    f"{time.time() - t:.1f}s)",
                    flush=True,
                )
        rows = [summarize(n, results[n]) for n in names]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        f"model: tiny Llama hidden {args.hidden}, {args.layers} layers, {rows[0]['n_params'] / 1e6:.2f}M "
        f"params; {args.prompts} prompts x {args.rollouts} rollouts, <= {args.max_new_tokens} new tokens, "
        f"micro-batch {args.micro_batch}, fp32, {args.threads} thread(s); median of {args.steps} steps x "
        f"{args.rounds} round(s) after {args.warmup} warm-up; TRL {rows[-1].get('trl_version')}; python "
        f"{platform.python_version()}"
    )
    print(
        f"load average before {[round(x, 2) for x in load_before]}, after "
        f"{[round(x, 2) for x in os.getloadavg()]}"
    )
    print(format_table(rows))
    print(
        "per-round medians (s): "
        + "; ".join(f"{r['name']} " + "/".join(f"{x:.2f}" for x in r["round_medians"]) for r in rows)
    )
    by = {r["name"]: r["median"]["step_s"] for r in rows}
    for a, b, what in (
        ("TRL DPH", "dphrl dph", "step time"),
        ("TRL DPH rb", "dphrl dph", "step time"),
        ("TRL DPH", "TRL GRPO", "cost of the term"),
        ("TRL DPH rb", "TRL GRPO", "cost of the term"),
    ):
        if a in by and b in by:
            print(f"{a} / {b} ({what}): {by[a] / by[b]:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "_worker"},
                                              "summary": rows, "runs": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
